"""One training iteration and what it needs: lr, optimizer, precision, compiled steps, batches."""
import dataclasses
import json
import math
import os
import pickle
from typing import Any, NamedTuple

import numpy as np
import jax
import jax.numpy as jnp
import haiku as hk
import jmp
import optax
from jaxtyping import Array, Int

import backends
import model
import parallel

def get_lr(it, learning_rate, warmup_iters, lr_decay_iters, min_lr, decay_lr=True):
    """nanoGPT's learning rate decay scheduler (cosine with warmup)."""
    if not decay_lr:
        return learning_rate
    # 1) linear warmup for warmup_iters steps
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    # 2) if it > lr_decay_iters (or there is no room to decay), return min learning rate
    if it > lr_decay_iters or lr_decay_iters <= warmup_iters:
        return min_lr
    # 3) in between, use cosine decay down to min learning rate
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # coeff ranges 0..1
    return min_lr + coeff * (learning_rate - min_lr)

def perplexity(loss):
    return math.exp(loss) if loss < 709.0 else math.inf

OPTIMIZERS = ('adamw', 'muon')

def configure_optimizers(params, weight_decay, learning_rate, betas, grad_clip=0.0, kind='adamw',
                         muon_lr=0.02):
    """nanoGPT's AdamW after clip_grad_norm_, weight decay on >= 2-D parameters; kind='muon': Muon
    at muon_lr for the blocks' 2-D weights (c_attn as q, k, v)."""
    if kind not in OPTIMIZERS:
        raise ValueError(f"optimizer={kind!r}: use one of {', '.join(map(repr, OPTIMIZERS))}")
    for what, decayed in (('decayed', True), ('non-decayed', False)):
        ps = [p for p in jax.tree.leaves(params) if (p.ndim >= 2) == decayed]
        print(f"num {what} parameter tensors: {len(ps)}, with {sum(p.size for p in ps):,} parameters")
    muon_scale = muon_lr / learning_rate if learning_rate else 0.0

    def make(learning_rate):
        decayed = lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)
        tx = optax.adamw(learning_rate, b1=betas[0], b2=betas[1], eps=1e-8, weight_decay=weight_decay,
                         mask=decayed)
        if kind == 'muon':
            labels = lambda p: {m: {n: 'muon' if is_muon_weight(m, x) else 'adamw' for n, x in d.items()}
                                for m, d in p.items()}
            stack_dims = lambda p: jax.tree.map(lambda _: optax.contrib.MuonDimensionNumbers(1, 2), p)
            muon = optax.contrib.muon(learning_rate * muon_scale, weight_decay=weight_decay,
                                      muon_weight_dimension_numbers=stack_dims)
            tx = optax.partition({'muon': stacked(muon), 'adamw': tx}, labels)
        return optax.chain(optax.clip_by_global_norm(grad_clip), tx) if grad_clip > 0.0 else tx
    return optax.inject_hyperparams(make)(learning_rate=learning_rate)

def is_muon_weight(module, array):  # the 2-D weights inside the transformer blocks
    return '/h_' in module and array.ndim == 2

def _columns(module, shape):  # Muon's matrices in a weight: c_attn's (C, (H + 2G) D) is q, k and v
    C, O = shape
    return [C, (O - C) // 2, (O - C) // 2] if module.endswith('/c_attn') else [O]

def stacked(inner):
    """inner sees the Muon weights as one (n, I, O) stack per shape: one batched orthogonalisation each."""
    def stack(tree):
        out = {}
        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
            for piece in jnp.split(x, np.cumsum(_columns(path[0].key, x.shape))[:-1], axis=1):
                out.setdefault('x'.join(map(str, piece.shape)), []).append(piece)
        return {k: jnp.stack(v) for k, v in out.items()}

    def unstack(stacks, like):
        paths, treedef = jax.tree_util.tree_flatten_with_path(like)
        rest, leaves = {k: iter(v) for k, v in stacks.items()}, []  # each stack's next matrix
        for path, x in paths:
            pieces = [next(rest[f'{x.shape[0]}x{cols}']) for cols in _columns(path[0].key, x.shape)]
            leaves.append(jnp.concatenate(pieces, axis=1))
        return jax.tree_util.tree_unflatten(treedef, leaves)

    def update(updates, state, params=None):
        new, state = inner.update(stack(updates), state, None if params is None else stack(params))
        return unstack(new, updates), state
    return optax.GradientTransformation(lambda params: inner.init(stack(params)), update)

def set_precision(dtype):
    """model.GPT computes in dtype, its parameters fp32 (autocast's role)."""
    if dtype == 'float32':
        hk.mixed_precision.clear_policy(model.GPT)
        hk.mixed_precision.clear_policy(model.LayerNorm)
        return
    half = jnp.dtype(dtype)
    hk.mixed_precision.set_policy(model.GPT, jmp.Policy(jnp.float32, half, jnp.float32))
    hk.mixed_precision.set_policy(model.LayerNorm, jmp.Policy(jnp.float32, jnp.float32, half))

class LossScale(NamedTuple):  # float16's, as GradScaler's (jmp's pytree does not survive lowering)
    scale: Any    # fp32: 2**16, halved on overflow, doubled after 2000 good steps
    counter: Any  # int32, good steps since the last change

class TrainState(NamedTuple):
    params: Any      # fp32 master parameters
    opt_state: Any   # every step sets its hyperparams['learning_rate']
    loss_scale: Any  # LossScale for float16, () otherwise
    rng: Any         # dropout keys fold in the iteration and the micro-batch

class Batch(NamedTuple):  # (micro-steps, ranks * B, T) int32 inputs and targets
    x: Any
    y: Any

def init_train_state(params, tx, dtype, seed):
    loss_scale = LossScale(np.float32(2.0 ** 16), np.int32(0)) if dtype == 'float16' else ()
    return TrainState(params, tx.init(params), loss_scale, jax.random.PRNGKey(seed))

def over_ranks(fn, ranks, *args):  # fn of each micro-batch side by side (leading axis)
    return jax.vmap(fn)(*args) if ranks > 1 else fn(*(a[0] for a in args))[None]

def make_train_step(gptconf, tx, ranks=1, sharded=False, mesh=None):
    """train_step(state, batch, lr, iter_num) -> (state, metrics); float16 overflows skipped."""
    forward = model.gpt_forward(gptconf)

    def loss_fn(params, x_RBT: Int[Array, "R B T"], y_RBT: Int[Array, "R B T"], keys_R, scaler):
        micro = lambda x_BT, y_BT, key: forward.apply(params, key, x_BT, y_BT, is_training=True)[1]
        loss = jnp.mean(over_ranks(micro, keys_R.shape[0], x_RBT, y_RBT, keys_R))
        return scaler.scale(loss), loss
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def accumulate(params, x_MNT, y_MNT, keys_MR, scaler):  # -> (grads, loss), micro-steps' mean
        M, _, T = x_MNT.shape

        def micro_grads(x_NT, y_NT, keys_R, m):
            p = params
            if sharded:  # tied to the micro-step: else XLA gathers them whole before the loop
                p = jax.tree.map(lambda a: jnp.where(m >= 0, a, 0.0), p)
            x_RBT, y_RBT = (a.reshape(len(keys_R), -1, T) for a in (x_NT, y_NT))
            (_, loss), grads = grad_fn(p, x_RBT, y_RBT, keys_R, scaler)
            return grads, loss

        def micro_step(grads_sum, xs):
            grads, loss = micro_grads(*xs)
            return jax.tree.map(jnp.add, grads_sum, grads), loss

        if M == 1:  # no accumulator to fill and divide
            return micro_grads(x_MNT[0], y_MNT[0], keys_MR[0], 0)
        # gradient accumulation, nanoGPT's loss / gradient_accumulation_steps
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        grads, loss_M = jax.lax.scan(micro_step, zeros, (x_MNT, y_MNT, keys_MR, jnp.arange(M)))
        return jax.tree.map(lambda g: g / M, grads), jnp.mean(loss_M)
    if mesh is not None and not sharded and mesh.size > 1:
        accumulate = backends.all_reduce_once(accumulate, mesh, parallel.row_sharding(mesh).spec)

    def train_step(state, batch, lr, iter_num):
        M = batch.x.shape[0]
        scaler = jmp.NoOpLossScale() if state.loss_scale == () else jmp.DynamicLossScale(
            state.loss_scale.scale, state.loss_scale.counter)
        step_key = jax.random.fold_in(state.rng, iter_num)  # rank r's micro-step m: r * M + m
        keys_MR = jax.vmap(jax.vmap(jax.random.fold_in, (None, 0)), (None, 0))(
            step_key, jnp.arange(M)[:, None] + M * jnp.arange(ranks))
        grads, loss = accumulate(state.params, batch.x, batch.y, keys_MR, scaler)
        grads = scaler.unscale(grads)

        hyperparams = dict(state.opt_state.hyperparams, learning_rate=jnp.asarray(lr, jnp.float32))
        opt_state = state.opt_state._replace(hyperparams=hyperparams)
        updates, new_opt_state = tx.update(grads, opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)

        finite, loss_scale = jnp.bool_(True), state.loss_scale
        if isinstance(scaler, jmp.DynamicLossScale):  # GradScaler: skip inf/nan steps
            finite = jmp.all_finite(grads)
            new_params, new_opt_state = jmp.select_tree(finite, (new_params, new_opt_state),
                                                        (state.params, opt_state))
            scaler = scaler.adjust(finite)
            loss_scale = LossScale(scaler.loss_scale, scaler.counter)
        metrics = {'loss': loss, 'finite': finite, 'loss_scale': jnp.float32(scaler.loss_scale)}
        return TrainState(new_params, new_opt_state, loss_scale, state.rng), metrics

    return train_step

def make_eval_step(gptconf, ranks, n_batches):
    """eval_step(params, x, y, k) -> the sum of step k's batch losses among the first n_batches."""
    forward = model.gpt_forward(gptconf)

    def eval_step(params, x_KNT: Int[Array, "K N T"], y_KNT: Int[Array, "K N T"], k):
        K, _, T = x_KNT.shape
        loss = lambda x_BT, y_BT: forward.apply(params, None, x_BT, y_BT)[1]
        loss_R = over_ranks(loss, ranks, *(a[k].reshape(ranks, -1, T) for a in (x_KNT, y_KNT)))
        return jnp.sum(jnp.where(jnp.arange(ranks) * K + k < n_batches, loss_R, 0.0))
    return eval_step

def train_state_shapes(gptconf, tx, dtype, seed):
    return jax.eval_shape(lambda p: init_train_state(p, tx, dtype, seed), model.param_shapes(gptconf))

# XLA:CPU's default scheduler runs remat's recomputation early, keeping alive what remat frees
CPU_REMAT_OPTIONS = {'xla_cpu_scheduler_type': 'CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED'}

def compile_steps(gptconf, tx, mesh, accumulation, batch_size, dtype, seed, eval_iters=0,
                  from_scratch=False):
    """{'train step', 'eval step', 'initial state': (compiled, seconds)}, compiled on shapes in dtype."""
    set_precision(dtype)
    micro_steps, ranks = parallel.side_by_side(accumulation, batch_size, mesh)
    state = train_state_shapes(gptconf, tx, dtype, seed)
    where, rows = parallel.state_sharding(state, mesh), parallel.row_sharding(mesh)
    same = parallel.replicated(mesh)
    shape = lambda dtype, *shape: jax.ShapeDtypeStruct(shape, dtype)
    tokens = lambda steps: shape(np.int32, steps, ranks * batch_size, gptconf.block_size)
    step = make_train_step(gptconf, tx, ranks, mesh.shape[parallel.SHARDS] > 1, mesh)
    step = jax.jit(step, in_shardings=(where, rows, same, same), out_shardings=(where, same),
                   donate_argnums=0)
    jobs = {'train step': (step, (state, Batch(tokens(micro_steps), tokens(micro_steps)),
                                  shape(np.float32), shape(np.int32)))}
    if eval_iters:
        evaluate = jax.jit(make_eval_step(gptconf, ranks, eval_iters), out_shardings=same,
                           in_shardings=(where.params, rows, rows, same))
        steps = -(-eval_iters // ranks)
        jobs['eval step'] = (evaluate, (state.params, tokens(steps), tokens(steps), shape(np.int32)))
    if from_scratch:  # nanoGPT's init and the tx's zeros, made in their shards
        initial_state = lambda key: init_train_state(model.init_params(gptconf, key), tx, dtype, seed)
        jobs['initial state'] = (jax.jit(initial_state, out_shardings=where),
                                 (jax.eval_shape(jax.random.PRNGKey, seed),))
    platform = mesh.devices.flat[0].platform
    try:
        return parallel.compile_ahead(jobs, CPU_REMAT_OPTIONS if gptconf.remat and platform == 'cpu' else None)
    except Exception as e:  # some platforms lack half-precision ops
        if dtype == 'float32':
            raise  # a bug: show all of it
        raise ValueError(f"the training step does not compile with dtype={dtype} on {platform} "
                         f"({type(e).__name__}: {str(e).strip().splitlines()[0]}): use --dtype=float32 "
                         f"or {'float16' if dtype == 'bfloat16' else 'bfloat16'}") from None

def other_settings(gptconf, tx, devices, accumulation, batch_size, dtype, seed, fsdp):
    """(flags, [train step], mesh) for a refusing memory check: fsdp, remat, smaller batches."""
    now = dict(fsdp=fsdp, remat=gptconf.remat, batch_size=batch_size,
               gradient_accumulation_steps=accumulation)
    settings = [dict(fsdp=len(devices)), dict(remat=True), dict(fsdp=len(devices), remat=True)]
    settings += [dict(batch_size=batch_size >> i, gradient_accumulation_steps=accumulation << i)
                 for i in (1, 2, 3) if (batch_size >> i) << i == batch_size]
    tried = []
    for s in settings:
        s = {k: v for k, v in s.items() if now[k] != v}  # what changes, once each
        if not s or s in tried:
            continue
        tried.append(s)
        n = {**now, **s}
        try:
            mesh = parallel.make_mesh(devices, n['fsdp'])
            step = compile_steps(dataclasses.replace(gptconf, remat=n['remat']), tx, mesh,
                                 n['gradient_accumulation_steps'], n['batch_size'], dtype, seed)
        except ValueError:
            continue
        yield " ".join(f"--{k}={v}" for k, v in s.items()), [step['train step'][0]], mesh

# data: windows of a token file, a function of (seed, purpose, iteration)
PURPOSE = {'train': 0, 'val': 1, 'eval_train': 2}  # eval's train batches differ from the step's

def count_tokens(data_dir, split, block_size):  # of data_dir/split.bin, checked
    path, prepare = os.path.join(data_dir, f'{split}.bin'), os.path.join(data_dir, 'prepare.py')
    if not os.path.exists(path):
        raise ValueError(f"{path} not found: run python {prepare} first")
    n, odd = divmod(os.path.getsize(path), 2)
    if odd:
        raise ValueError(f"{path} has an odd number of bytes, so it is not whole uint16 tokens: "
                         f"run python {prepare} again")
    if n <= block_size:
        raise ValueError(f"{path} holds {n} tokens, too few for block_size={block_size} "
                         f"(needs at least {block_size + 1}): lower --block_size or prepare more data")
    return n

def batch_indices(seed, purpose, it, num_tokens, block_size, shape):
    """Window starts for iteration `it`, of shape (micro-batches, batch_size)."""
    rng = np.random.default_rng([seed % 2**32, PURPOSE[purpose], it])  # numpy takes no negative seed
    return rng.integers(0, num_tokens - block_size, size=shape)

def arrange(a_GB, ranks):
    """(G micro-batches, B, ...) -> (G / ranks steps, ranks * B, ...); rank r's are r * M onwards."""
    G, B = a_GB.shape[:2]
    a = a_GB.reshape(ranks, G // ranks, B, *a_GB.shape[2:]).swapaxes(0, 1)
    return a.reshape(G // ranks, ranks * B, *a_GB.shape[2:])

def windows(data, starts, block_size, vocab_size=None):
    """x, y of shape starts.shape + (block_size,), y shifted by one token; ids < vocab_size checked."""
    window = np.asarray(data[starts[..., None] + np.arange(block_size + 1)], dtype=np.int32)
    if vocab_size and (top := window.max()) >= vocab_size:  # jnp's lookup would give NaN: divergence
        raise ValueError(f"{data.filename} holds token id {top} but the model has {vocab_size} tokens: the "
                         f"data and meta.json (or the checkpoint) differ; run python "
                         f"{os.path.dirname(data.filename)}/prepare.py again")
    return window[..., :-1], window[..., 1:]

class _PlainUnpickler(pickle.Unpickler):  # a pickle naming any class or function runs nothing
    def find_class(self, module, name):
        raise ValueError(f"refusing to load {module}.{name}: meta.pkl may only hold plain dicts, "
                         f"strings and ints")

def load_meta(data_dir):
    """{'vocab_size', 'stoi', 'itos'} of meta.json (ours) or meta.pkl (nanoGPT's), else None."""
    paths = [os.path.join(data_dir, f) for f in ('meta.json', 'meta.pkl')]
    path = next(filter(os.path.exists, paths), None)
    if path is None:
        return None
    try:
        with open(path, 'rb') as f:
            meta = json.load(f) if path.endswith('.json') else _PlainUnpickler(f).load()
    except Exception as e:  # the refusal above, or a torn or foreign file
        why = f": {e}" if 'refusing' in str(e) else f" is unreadable ({type(e).__name__}: {e}); run prepare.py again"
        raise ValueError(f"{path}{why}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get('vocab_size'), int):
        raise ValueError(f"{path} has no integer vocab_size; run prepare.py again")
    if 'itos' in meta:  # JSON object keys are strings
        meta['itos'] = {int(i): s for i, s in meta['itos'].items()}
    return meta
