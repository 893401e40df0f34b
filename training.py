"""
What train.py runs every iteration, importable on its own (bench.py times exactly this step):

    policy    = set_precision('bfloat16')                         # a jmp policy on model.GPT (autocast's role)
    optimizer = configure_optimizers(params, weight_decay, learning_rate, (beta1, beta2), grad_clip)
    state     = init_train_state(params, optimizer, 'bfloat16', seed)   # TrainState
    step      = make_train_step(config, optimizer)                # one iteration on one device
    calls     = make_train_calls(step, k)                         # k iterations per call (CPU, small models)
    shapes    = train_state_shapes(config, optimizer, 'bfloat16', seed)
    over      = parallel_train_step(config, optimizer, plan, shapes)  # both, over a parallel.DevicePlan's devices

One call of the step is one whole iteration on a device: forward and backward over the device's
micro-batches (lax.scan, gradients summed in fp32), the gradient average across devices (lax.pmean,
DDP's all-reduce), clipping, AdamW, and for float16 the dynamic loss scale. Under fsdp the same step is
compiled once for the whole device mesh, every device's micro-batches side by side, the state sharded.

Data are pure functions of (seed, iteration): batch_indices draws the window starts of all of an
iteration's micro-batches, and every device (or process) reads its own share, so an iteration sees
the same tokens on 1 device with 8 micro-steps, on 8 devices with 1 each, or after a resume.
"""
import dataclasses
import math
import os
import queue
import threading
from typing import Any, NamedTuple

import numpy as np
import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import io_callback
import haiku as hk
import jmp
import optax
from jaxtyping import Array, Bool, Int

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
    """exp(mean cross-entropy), inf where that overflows a float."""
    return math.exp(loss) if loss < 709.0 else math.inf


# -----------------------------------------------------------------------------
# the optimizer

OPTIMIZERS = ('adamw', 'muon')  # configure_optimizers' kinds, train.py's `optimizer` setting


def configure_optimizers(params, weight_decay, learning_rate, betas, grad_clip=0.0, kind='adamw', muon_lr=0.02):
    """nanoGPT's AdamW (torch.optim.AdamW's update, eps 1e-8) with weight decay on the >=2-D parameters
    only, after torch's clip_grad_norm_ (optax.clip_by_global_norm) when grad_clip > 0. The learning
    rate is an injected hyperparameter: the train step sets opt_state.hyperparams['learning_rate'],
    as nanoGPT sets param_group['lr'].
    kind='muon': optax.contrib.muon (orthogonalised Nesterov momentum, beta 0.95) for the blocks' 2-D
    weights, c_attn's as three matrices (q, k, v), at muon_lr on the same schedule (muon_lr / learning_rate
    times the injected rate); AdamW as above for the rest (embeddings, so the tied lm_head, LayerNorms,
    biases), as modded-nanogpt splits them. weight_decay applies to every 2-D weight, decoupled as AdamW's."""
    leaves = jax.tree.leaves(params)
    decay = [p for p in leaves if p.ndim >= 2]
    nodecay = [p for p in leaves if p.ndim < 2]
    print(f"num decayed parameter tensors: {len(decay)}, with {sum(p.size for p in decay):,} parameters")
    print(f"num non-decayed parameter tensors: {len(nodecay)}, with {sum(p.size for p in nodecay):,} parameters")
    if kind not in OPTIMIZERS:
        raise ValueError(f"optimizer={kind!r}: use one of {', '.join(map(repr, OPTIMIZERS))}")
    muon_scale = muon_lr / learning_rate if learning_rate else 0.0

    def make(learning_rate):
        decayed = lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)
        tx = optax.adamw(learning_rate, b1=betas[0], b2=betas[1], eps=1e-8, weight_decay=weight_decay, mask=decayed)
        if kind == 'muon':
            labels = lambda p: {m: {n: 'muon' if is_muon_weight(m, x) else 'adamw' for n, x in d.items()} for m, d in p.items()}
            muon = optax.contrib.muon(learning_rate * muon_scale, weight_decay=weight_decay,
                                      muon_weight_dimension_numbers=qkv_dimension_numbers)
            tx = optax.partition({'muon': split_qkv(muon), 'adamw': tx}, labels)
        return optax.chain(optax.clip_by_global_norm(grad_clip), tx) if grad_clip > 0.0 else tx
    return optax.inject_hyperparams(make)(learning_rate=learning_rate)


def is_muon_weight(module, array):
    """Muon's share: the 2-D weights inside the transformer blocks (h_0, h_1, ...)."""
    return '/h_' in module and array.ndim == 2


def _map_c_attn(fn, tree):
    """fn applied to the c_attn weights of a {module: {name: array}} tree, the other leaves as they are."""
    is_c_attn = lambda path: path[0].key.endswith('/c_attn') and path[-1].key == 'weight'
    return jax.tree_util.tree_map_with_path(lambda path, x: fn(x) if is_c_attn(path) else x, tree)


def split_qkv(inner):
    """inner sees every c_attn weight (C, 3C) as (C, 3, C): q, k and v side by side, three matrices."""
    split = lambda tree: _map_c_attn(lambda x: x.reshape(x.shape[0], 3, -1), tree)
    join = lambda tree: _map_c_attn(lambda x: x.reshape(x.shape[0], -1), tree)

    def update(updates, state, params=None):
        updates, state = inner.update(split(updates), state, None if params is None else split(params))
        return join(updates), state
    return optax.GradientTransformation(lambda params: inner.init(split(params)), update)


def qkv_dimension_numbers(params):
    """Muon's axes: (in, out) for a 2-D weight; for c_attn's (C, 3, C) the middle axis is a batch of three."""
    dims = lambda x: optax.contrib.MuonDimensionNumbers(0, 2 if x.ndim == 3 else 1)
    return jax.tree.map(dims, params)


# -----------------------------------------------------------------------------
# mixed precision

def set_precision(dtype):
    """Computes model.GPT in dtype with fp32 master parameters: a jmp policy on the module class
    (torch.autocast's role); LayerNorm's own keeps its parameters and statistics in fp32 and casts only its
    output. Applies to everything traced afterwards in this thread. Returns the GPT policy."""
    if dtype == 'float32':
        hk.mixed_precision.clear_policy(model.GPT)
        hk.mixed_precision.clear_policy(model.LayerNorm)
        return jmp.get_policy('float32')
    half = jnp.dtype(dtype)
    policy = jmp.Policy(param_dtype=jnp.float32, compute_dtype=half, output_dtype=jnp.float32)
    hk.mixed_precision.set_policy(model.GPT, policy)
    hk.mixed_precision.set_policy(model.LayerNorm, jmp.Policy(jnp.float32, jnp.float32, half))
    return policy


class LossScale(NamedTuple):
    """float16's dynamic loss scale as plain arrays (jmp's own pytree does not survive ahead-of-time lowering)."""
    scale: Any    # fp32
    counter: Any  # int32, good steps since the last change


# torch.amp.GradScaler's defaults: start at 2**16, halve on overflow, double after 2000 good steps
LOSS_SCALE_INIT, LOSS_SCALE_PERIOD, LOSS_SCALE_FACTOR = 2.0 ** 16, 2000, 2


def init_loss_scale(dtype):
    """float16 needs a dynamic loss scale; the other dtypes none (an empty tuple)."""
    return LossScale(np.float32(LOSS_SCALE_INIT), np.int32(0)) if dtype == 'float16' else ()


# -----------------------------------------------------------------------------
# the train state and the compiled step

class TrainState(NamedTuple):
    params: Any      # fp32 master parameters (Haiku dict)
    opt_state: Any   # optax state; every step sets its hyperparams['learning_rate']
    loss_scale: Any  # LossScale for float16, () otherwise
    rng: Any         # PRNG key from the seed; dropout keys fold in the iteration and the micro-batch


class Batch(NamedTuple):  # the step's loss_fn checks each micro-batch's shapes (jaxtyping, under the tests)
    x: Any  # (micro_steps, B, T) int32 inputs
    y: Any  # (micro_steps, B, T) int32 targets


def init_train_state(params, optimizer, dtype, seed):
    return TrainState(params, optimizer.init(params), init_loss_scale(dtype), jax.random.PRNGKey(seed))


def make_train_step(config, optimizer, axis_name=parallel.AXIS):
    """train_step(state, batch, lr, iter_num) -> (state, metrics): one whole iteration on a device.
    metrics: 'loss' (the mean over every device's micro-batches, unscaled), 'finite' (whether the update was
    applied: False only on float16 overflow, a step skipped as GradScaler skips it) and 'loss_scale'.
    Micro-batch m of device d is the iteration's micro-batch d * micro_steps + m, which picks its dropout key.
    axis_name=None gives the function for one device on its own (no collectives), or for the whole mesh
    (parallel.over_mesh), whose batch holds every device's micro-batches side by side: (micro_steps, R, B, T), R the devices."""
    forward = model.gpt_forward(config)

    micro_loss = lambda params, x_BT, y_BT, key: forward.apply(params, key, x_BT, y_BT, is_training=True)[1]

    def loss_fn(params, x_BT: Int[Array, "B T"], y_BT: Int[Array, "B T"], key, scaler):
        loss = micro_loss(params, x_BT, y_BT, key)
        return scaler.scale(loss), loss

    def devices_loss_fn(params, x_RBT: Int[Array, "R B T"], y_RBT: Int[Array, "R B T"], keys_R, scaler):
        # the mesh step's micro-batch: one per device side by side, each its own mean and dropout key, as DDP's
        loss = jnp.mean(jax.vmap(micro_loss, in_axes=(None, 0, 0, 0))(params, x_RBT, y_RBT, keys_R))
        return scaler.scale(loss), loss

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    devices_grad_fn = jax.value_and_grad(devices_loss_fn, has_aux=True)

    def train_step(state, batch, lr, iter_num):
        M = batch.x.shape[0]
        scaler = jmp.NoOpLossScale() if state.loss_scale == () else jmp.DynamicLossScale(
            state.loss_scale.scale, state.loss_scale.counter, period=LOSS_SCALE_PERIOD, factor=LOSS_SCALE_FACTOR)
        step_key = jax.random.fold_in(state.rng, iter_num)
        first_micro = 0 if axis_name is None else lax.axis_index(axis_name) * M

        def micro_grads(x_BT, y_BT, m):  # micro-batch m of this device: (scaled loss, loss), gradients
            if x_BT.ndim == 3:  # the mesh step: micro-batch m of every device, x_RBT
                keys_R = jax.vmap(lambda r: jax.random.fold_in(step_key, r * M + m))(jnp.arange(x_BT.shape[0]))
                # the parameters tied to the micro-step (m >= 0 always holds): else XLA gathers them once, before the
                # loop over the micro-batches, and keeps them whole on every device throughout
                params = jax.tree.map(lambda p: jnp.where(m >= 0, p, 0.0), state.params)
                return devices_grad_fn(params, x_BT, y_BT, keys_R, scaler)
            return grad_fn(state.params, x_BT, y_BT, jax.random.fold_in(step_key, first_micro + m), scaler)

        def micro_step(grads_sum, xs):
            (_, loss), grads = micro_grads(*xs)
            return jax.tree.map(jnp.add, grads_sum, grads), loss

        if M == 1:  # no accumulator to fill and divide
            (_, loss), grads = micro_grads(batch.x[0], batch.y[0], 0)
        else:  # gradient accumulation, nanoGPT's loss / gradient_accumulation_steps
            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
            grads, loss_M = lax.scan(micro_step, zeros, (batch.x, batch.y, jnp.arange(M, dtype=jnp.int32)))
            grads, loss = jax.tree.map(lambda g: g / M, grads), jnp.mean(loss_M)
        if axis_name is not None and lax.axis_size(axis_name) > 1:  # over one device XLA would still copy it all
            grads, loss = lax.pmean((grads, loss), axis_name)  # DDP's all-reduce
        grads = scaler.unscale(grads)

        hyperparams = dict(state.opt_state.hyperparams, learning_rate=jnp.asarray(lr, jnp.float32))
        opt_state = state.opt_state._replace(hyperparams=hyperparams)
        updates, new_opt_state = optimizer.update(grads, opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)

        finite, loss_scale = jnp.bool_(True), state.loss_scale
        if isinstance(scaler, jmp.DynamicLossScale):
            # GradScaler: skip the step on inf/nan gradients (the same decision on every device, the
            # gradients being averaged already) and adapt the scale
            finite = jmp.all_finite(grads)
            new_params, new_opt_state = jmp.select_tree(finite, (new_params, new_opt_state), (state.params, opt_state))
            scaler = scaler.adjust(finite)
            loss_scale = LossScale(scaler.loss_scale, scaler.counter)
        metrics = {'loss': loss, 'finite': finite, 'loss_scale': jnp.asarray(scaler.loss_scale, jnp.float32)}
        return TrainState(new_params, new_opt_state, loss_scale, state.rng), metrics

    return train_step


def make_train_calls(train_step, k):
    """calls(state, batches, lrs, iter0, n) -> (state, metrics): iterations iter0 .. iter0+n-1 (n <= k) in
    one call, each exactly train_step with batches[i] (leading axis k, slots past n unused), lrs[i] and
    iteration iter0+i. metrics: train_step's with a leading axis k (zeros past n). n is an argument, so
    that calls cut short at eval points need no second compile."""
    def calls(state, batches, lrs, iter0, n):
        if k == 1:
            state, metrics = train_step(state, jax.tree.map(lambda a: a[0], batches), lrs[0], iter0)
            return state, jax.tree.map(lambda v: v[None], metrics)

        def body(i, carry):
            state, metrics = carry
            state, m = train_step(state, jax.tree.map(lambda a: a[i], batches), lrs[i], iter0 + i)
            return state, jax.tree.map(lambda acc, v: acc.at[i].set(v), metrics, m)
        shapes = jax.eval_shape(train_step, state, jax.tree.map(lambda a: a[0], batches), lrs[0], iter0)[1]
        metrics = jax.tree.map(lambda s: jnp.zeros((k,) + s.shape, s.dtype), shapes)
        return lax.fori_loop(0, n, body, (state, metrics))
    return calls


def make_eval_step(config, axis_name=parallel.AXIS, progress=None):
    """eval_step(params, x_KBT, y_KBT, valid_K) -> the sum over the valid batches of their mean loss,
    summed over the devices too (estimate_loss divides). No dropout: model.eval()'s role. progress: a
    parallel.Progress that the first device tells how many of its batches are done. axis_name=None: for one
    device, or for the whole mesh, whose arguments carry every device's batches: (R, K, B, T) and (R, K)."""
    forward = model.gpt_forward(config)
    batch_loss = lambda params, x_BT, y_BT: forward.apply(params, None, x_BT, y_BT, is_training=False)[1]

    def eval_step(params, x_KBT: Int[Array, "*R K B T"], y_KBT: Int[Array, "*R K B T"], valid_K: Bool[Array, "*R K"]):
        first_device = True if axis_name is None else lax.axis_index(axis_name) == 0
        loss = batch_loss
        if x_KBT.ndim == 4:  # the mesh's batches: K first, the devices' side by side, each batch its own mean
            x_KBT, y_KBT, valid_K = (jnp.moveaxis(a, 0, 1) for a in (x_KBT, y_KBT, valid_K))
            loss = jax.vmap(batch_loss, in_axes=(None, 0, 0))

        def one(carry, xs):
            total, report = carry
            k, x_BT, y_BT, valid = xs
            batch_total = jnp.sum(jnp.where(valid, loss(params, x_BT, y_BT), 0.0))
            if progress is not None:
                call = lambda: io_callback(progress, jax.ShapeDtypeStruct((), jnp.int32), k + 1)
                report = lax.cond(first_device & (k + 1 >= report), call, lambda: report)
            return (total + batch_total, report), None
        (total, _), _ = lax.scan(one, (jnp.float32(0.0), jnp.int32(1)), (jnp.arange(len(valid_K)), x_KBT, y_KBT, valid_K))
        return total if axis_name is None else lax.psum(total, axis_name)

    return eval_step


# XLA:CPU's default scheduler runs a remat'd block's recomputation as early as it can, keeping alive what remat
# would free; the memory-optimized one runs it where the backward needs it
CPU_REMAT_OPTIONS = {'xla_cpu_scheduler_type': 'CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED'}


def train_state_shapes(config, optimizer, dtype, seed):
    """The TrainState's shapes and dtypes, nothing allocated."""
    return jax.eval_shape(lambda p: init_train_state(p, optimizer, dtype, seed), model.param_shapes(config))


def parallel_train_step(config, optimizer, plan, state):
    """The train step over the plan's devices (parallel.over_devices; under fsdp parallel.over_mesh),
    plan.iters_per_call iterations per call (make_train_calls), the state donated: compile it with (state,
    batches, lrs, iter0, n), one device's shapes, batches (iters_per_call, micro_steps, rows, T); state: its shapes."""
    axes = (parallel.REPLICA, 0, None, None, None), (parallel.REPLICA, 0)
    if plan.fsdp > 1:
        calls = make_train_calls(make_train_step(config, optimizer, axis_name=None), plan.iters_per_call)
        devices_inside = lambda batches: jax.tree.map(lambda a: jnp.moveaxis(a, 0, 2), batches)  # (k, M, R, B, T)
        return parallel.over_mesh(lambda state, batches, *rest: calls(state, devices_inside(batches), *rest), plan,
                                  *axes, state, donate_argnums=(0,))
    calls = make_train_calls(make_train_step(config, optimizer), plan.iters_per_call)
    return parallel.over_devices(calls, plan.devices, *axes, donate_argnums=(0,))


def parallel_eval_step(config, plan, params, progress=None):
    """The eval step over the plan's devices: compile it with (params, x, y, valid), one device's shapes."""
    axes = (parallel.REPLICA, 0, 0, 0), 0
    if plan.fsdp > 1:
        return parallel.over_mesh(make_eval_step(config, None, progress), plan, *axes, params)
    return parallel.over_devices(make_eval_step(config, progress=progress), plan.devices, *axes)


def compile_steps(config, optimizer, plan, dtype, seed, eval_batches=0, from_scratch=False, eval_progress=None):
    """train.py's compiled functions, ahead of time on shapes only (nothing allocated), side by side
    (parallel.compile_ahead): {'train step', 'eval step' for eval_batches batches of every split (none for 0;
    eval_progress its parallel.Progress), 'initial state' from scratch, on the first local device or under
    fsdp in its shards: (compiled, seconds)}."""
    state = train_state_shapes(config, optimizer, dtype, seed)
    ints = lambda *shape: jax.ShapeDtypeStruct(shape, np.int32)
    tokens = ints(plan.iters_per_call, plan.micro_steps, plan.rows, config.block_size)
    lrs = jax.ShapeDtypeStruct((plan.iters_per_call,), np.float32)
    jobs = {'train step': (parallel_train_step(config, optimizer, plan, state), (state, Batch(tokens, tokens), lrs, ints(), ints()))}
    if eval_batches:
        shape = (eval_batches * plan.row_split // len(plan.devices), plan.rows, config.block_size)
        valid = jax.ShapeDtypeStruct(shape[:1], np.bool_)
        jobs['eval step'] = (parallel_eval_step(config, plan, state.params, eval_progress),
                             (state.params, ints(*shape), ints(*shape), valid))
    if from_scratch:  # nanoGPT's initialisation and the optimizer's zeros, compiled alongside the steps
        initial_state = lambda key: init_train_state(model.init_params(config, key), optimizer, dtype, seed)
        where = parallel.state_sharding(state, plan) if plan.fsdp > 1 else jax.sharding.SingleDeviceSharding(plan.local_devices[0])
        jobs['initial state'] = (jax.jit(initial_state, out_shardings=where), (jax.eval_shape(jax.random.PRNGKey, seed),))
    options = CPU_REMAT_OPTIONS if config.remat and plan.devices[0].platform == 'cpu' else None
    return parallel.compile_ahead(jobs, plan.local_devices, options)


def other_settings(config, optimizer, devices, accumulation, batch_size, dtype, seed, plan, num_params):
    """For a memory check that refuses: (flags, [train step compiled on shapes], local devices) with every
    device sharing the state (fsdp), with remat, both, and batch_size halved up to 3 times (accumulation
    doubled: the same tokens per iteration). Settings the devices cannot take are left out."""
    now = dict(fsdp=plan.fsdp, remat=config.remat, batch_size=batch_size, gradient_accumulation_steps=accumulation)
    settings = [dict(fsdp=len(devices)), dict(remat=True), dict(fsdp=len(devices), remat=True)]
    settings += [dict(batch_size=batch_size >> i, gradient_accumulation_steps=accumulation << i)
                 for i in range(1, 4) if batch_size >> i and (batch_size >> i) << i == batch_size]
    seen = {()}
    for s in settings:
        s = {k: v for k, v in s.items() if v != now[k]}  # what changes, once each
        if tuple(s.items()) in seen:
            continue
        seen.add(tuple(s.items()))
        try:
            p = parallel.plan_devices(devices, s.get('gradient_accumulation_steps', accumulation), s.get('batch_size', batch_size),
                                      num_params, 0, plan.iters_per_call, s.get('fsdp', plan.fsdp))
        except ValueError:
            continue
        c = dataclasses.replace(config, remat=s.get('remat', config.remat))
        yield " ".join(f"--{k}={v}" for k, v in s.items()), [compile_steps(c, optimizer, p, dtype, seed)['train step'][0]], p.local_devices


# -----------------------------------------------------------------------------
# data: windows of a uint16 token file, drawn as a pure function of (seed, purpose, iteration)

PURPOSE = {'train': 0, 'val': 1, 'eval_train': 2}  # eval's train batches differ from the step's


def count_tokens(data_dir, split, block_size):
    """The number of tokens in data_dir/split.bin; ValueError, one line naming the file and the fix, when it
    is missing, torn or too short for block_size."""
    path, prepare = os.path.join(data_dir, f'{split}.bin'), os.path.join(data_dir, 'prepare.py')
    if not os.path.exists(path):
        raise ValueError(f"{path} not found: run python {prepare} first")
    n, odd = divmod(os.path.getsize(path), 2)
    if odd:  # a torn copy or an interrupted prepare.py; np.memmap would refuse it with a traceback
        raise ValueError(f"{path} has an odd number of bytes, so it is not whole uint16 tokens: run python {prepare} again")
    if n <= block_size:
        raise ValueError(f"{path} holds {n} tokens, too few for block_size={block_size} "
                         f"(needs at least {block_size + 1}): lower --block_size or prepare more data")
    return n


def batch_indices(seed, purpose, it, num_tokens, block_size, shape):
    """Window starts in [0, num_tokens - block_size) for iteration `it`, e.g. shape (micro-batches,
    batch_size): the same on any machine, process or device layout, and after a resume."""
    rng = np.random.default_rng([seed, PURPOSE[purpose], it])
    return rng.integers(0, num_tokens - block_size, size=shape)


def get_batch(data, starts, block_size):
    """x, y int32 arrays of shape starts.shape + (block_size,); y is x shifted by one token."""
    window = np.asarray(data[starts[..., None] + np.arange(block_size + 1)], dtype=np.int32)
    return window[..., :-1], window[..., 1:]


class Prefetcher:
    """Makes batches on a background thread and puts them on the devices ahead of use (pin_memory and
    non_blocking's role). make(i) returns the numpy pytree of iteration i, get(i) the same on the devices
    (`where`: parallel.shard's).
    Iterations are asked for in order from `start`, each followed by after(i) (i + 1 unless given)."""

    def __init__(self, make, where, start, depth=2, after=lambda i: i + 1):
        self._make, self._where, self._next, self._after = make, where, start, after
        self._queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(start,), daemon=True)
        self._thread.start()

    def _run(self, i):
        while not self._stop.is_set():
            try:
                item = (i, parallel.shard(self._make(i), self._where), None)
            except BaseException as e:  # handed to the consumer, raised there
                item = (i, None, e)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    pass
            if item[2] is not None:
                return
            i = self._after(i)

    def get(self, i):
        if i != self._next:
            raise ValueError(f"Prefetcher: asked for iteration {i}, expected {self._next}")
        _, batch, error = self._queue.get()
        if error is not None:
            raise error
        self._next = self._after(i)
        return batch

    def close(self):
        self._stop.set()
        self._thread.join(timeout=5)
