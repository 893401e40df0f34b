"""train.py and training.py (issue 3): nanoGPT's schedule, torch's AdamW, gradient accumulation
and data parallelism inside the compiled step, mixed precision with GradScaler's semantics,
pure-function data, bit-exact resume, wandb offline, and the memory check.

The parts are tested in-process on a tiny model against code nobody here wrote (nanoGPT's
formulas, torch.optim.AdamW, jax.grad of the plain loss); the script runs as a subprocess. The
subprocesses share one JAX persistent compilation cache, so only the first run compiles."""
import glob
import json
import math
import os
import re
import struct
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import backends  # noqa: E402
import model  # noqa: E402
import training  # noqa: E402
from checkpoint import CKPT_NAME, load_checkpoint, flatten  # noqa: E402
import parallel  # noqa: E402

from tests.tinydata import tiny_text, write_char_dataset  # noqa: E402
VOCAB = 65


def tiny_config(dropout=0.0, bias=False):
    return model.GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=VOCAB, dropout=dropout, bias=bias)


def tokens(shape, seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, size=shape).astype(np.int32)


def capture_grads():
    """An optax 'optimizer' that applies nothing and keeps the gradients it was given as its
    state: the train step's gradient, read off exactly (no subtraction of parameters)."""
    def make(learning_rate):
        return optax.GradientTransformation(
            lambda params: jax.tree.map(jnp.zeros_like, params),
            lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))
    return optax.inject_hyperparams(make)(learning_rate=1.0)


def assert_trees_close(a, b, rtol, atol, what=''):
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol,
                                   err_msg=what + jax.tree_util.keystr(path))


# -----------------------------------------------------------------------------
# learning rate: nanoGPT's get_lr, written out here from its definition

def nanogpt_lr(it, lr, warmup, decay_iters, min_lr):
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if it > decay_iters:
        return min_lr
    ratio = (it - warmup) / (decay_iters - warmup)
    assert 0 <= ratio <= 1
    return min_lr + 0.5 * (1 + math.cos(math.pi * ratio)) * (lr - min_lr)


@pytest.mark.parametrize('warmup,decay_iters', [(100, 5000), (2000, 600000), (0, 10), (1, 2)])
def test_get_lr_matches_nanogpt_formula(warmup, decay_iters):
    lr, min_lr = 6e-4, 6e-5
    its = sorted(set([0, 1, warmup - 1, warmup, warmup + 1, (warmup + decay_iters) // 2, decay_iters - 1,
                      decay_iters, decay_iters + 1, 3 * decay_iters] + list(range(0, 3 * decay_iters, max(1, decay_iters // 97)))))
    for it in (i for i in its if i >= 0):
        got = training.get_lr(it, lr, warmup, decay_iters, min_lr)
        assert got == pytest.approx(nanogpt_lr(it, lr, warmup, decay_iters, min_lr), rel=1e-12, abs=0), it
        assert training.get_lr(it, lr, warmup, decay_iters, min_lr, decay_lr=False) == lr
    # the landmarks, by hand: the first warmup step is lr/(warmup+1), the peak is lr, the end min_lr
    if warmup:
        assert training.get_lr(0, lr, warmup, decay_iters, min_lr) == pytest.approx(lr / (warmup + 1))
    assert training.get_lr(warmup, lr, warmup, decay_iters, min_lr) == pytest.approx(lr)
    assert training.get_lr(decay_iters, lr, warmup, decay_iters, min_lr) == pytest.approx(min_lr)
    assert training.get_lr(decay_iters + 7, lr, warmup, decay_iters, min_lr) == min_lr


# -----------------------------------------------------------------------------
# AdamW: training.configure_optimizers against torch.optim.AdamW + clip_grad_norm_

@pytest.mark.parametrize('grad_clip', [1.0, 0.0])
def test_adamw_matches_torch(grad_clip):
    """configure_optimizers' AdamW steps like torch.optim.AdamW with clip_grad_norm_, and its state has the
    checkpoint names of the layout train.py has always saved (written out here), so old checkpoints resume."""
    torch = pytest.importorskip('torch')
    rng = np.random.default_rng(1)
    # Haiku-shaped parameters: 2-D weights and embeddings decay, 1-D biases and gains do not
    params = {'transformer/h_0/attn/c_attn': {'weight': rng.normal(0, 0.5, (6, 5)), 'bias': rng.normal(0, 0.5, (5,))},
              'transformer/ln_f': {'weight': 1 + rng.normal(0, 0.1, (6,))},
              'transformer/wte': {'weight': rng.normal(0, 0.5, (7, 6))}}
    params = jax.tree.map(lambda a: np.asarray(a, np.float32), params)
    wd, lr_max, betas = 0.1, 1e-2, (0.9, 0.95)
    lrs = [training.get_lr(i, lr_max, 3, 8, 1e-3) for i in range(8)]
    # gradient norms both above and below the clip threshold
    grads_per_step = [jax.tree.map(lambda p, s=s: np.asarray(rng.normal(0, s, p.shape), np.float32), params)
                      for s in (2.0, 0.01, 1.0, 0.05, 3.0, 0.2, 0.02, 5.0)]

    optimizer = training.configure_optimizers(params, wd, lr_max, betas, grad_clip)
    state = optimizer.init(params)
    ours = params
    adam = 'optimizer.inner_state[1][0]' if grad_clip else 'optimizer.inner_state[0]'
    assert sorted(flatten(state, 'optimizer')) == sorted(
        ['optimizer.count', "optimizer.hyperparams['learning_rate']", f'{adam}.count']
        + [f"{adam}.{m}['{module}']['{name}']" for m in ('mu', 'nu') for module, p in params.items() for name in p])

    @jax.jit
    def step(ours, state, grads, lr):
        # exactly as training.make_train_step sets the rate each iteration
        hyper = dict(state.hyperparams, learning_rate=jnp.asarray(lr, state.hyperparams['learning_rate'].dtype))
        updates, state = optimizer.update(grads, state._replace(hyperparams=hyper), ours)
        return optax.apply_updates(ours, updates), state

    leaves, treedef = jax.tree.flatten(params)
    tparams = [torch.nn.Parameter(torch.tensor(np.array(p))) for p in leaves]
    # nanoGPT's configure_optimizers: decay on the >= 2-D tensors only
    groups = [{'params': [p for p in tparams if p.dim() >= 2], 'weight_decay': wd},
              {'params': [p for p in tparams if p.dim() < 2], 'weight_decay': 0.0}]
    topt = torch.optim.AdamW(groups, lr=lr_max, betas=betas, eps=1e-8)
    clipped = []
    for grads, lr in zip(grads_per_step, lrs):
        for p, g in zip(tparams, jax.tree.leaves(grads)):
            p.grad = torch.tensor(np.array(g))
        if grad_clip != 0.0:
            norm = torch.nn.utils.clip_grad_norm_(tparams, grad_clip)
            clipped.append(float(norm) > grad_clip)
        for group in topt.param_groups:
            group['lr'] = lr
        topt.step()
        ours, state = step(ours, state, grads, np.float32(lr))
        want = jax.tree.unflatten(treedef, [p.detach().numpy() for p in tparams])
        assert_trees_close(ours, want, rtol=1e-5, atol=1e-6)
    if grad_clip != 0.0:
        assert any(clipped) and not all(clipped)  # both regimes were exercised


def test_configure_optimizers_counts_as_nanogpt(capsys):
    """nanoGPT's printed counts for GPT-2 124M at vocab 50304 (decay = every >=2-D tensor), from shapes."""
    shapes = model.param_shapes(model.GPTConfig())
    training.configure_optimizers(shapes, weight_decay=0.1, learning_rate=6e-4, betas=(0.9, 0.95))
    out = capsys.readouterr().out
    assert "num decayed parameter tensors: 50, with 124,354,560 parameters" in out, out
    assert "num non-decayed parameter tensors: 98, with 121,344 parameters" in out, out
    shapes = model.param_shapes(model.GPTConfig(bias=False, n_layer=2, n_embd=64, n_head=2, vocab_size=100, block_size=8))
    training.configure_optimizers(shapes, 0.1, 6e-4, (0.9, 0.95))
    out = capsys.readouterr().out
    # no biases: only the 2*n_layer+1 LayerNorm weights are left undecayed
    assert "num non-decayed parameter tensors: 5, with 320 parameters" in out, out
    assert f"num decayed parameter tensors: 10, with {100 * 64 + 8 * 64 + 2 * 12 * 64 * 64:,} parameters" in out, out


# -----------------------------------------------------------------------------
# Muon: training.configure_optimizers(kind='muon') against optax.contrib.muon applied by hand

def test_muon_matches_optax_muon_applied_by_hand():
    """Our Muon equals, step for step, optax's Muon on the blocks' 2-D weights with c_attn cut into three
    separate (C, C) matrices q, k, v, and optax's AdamW on the rest, after one global-norm clip (set up here
    by hand from the issue's split); cutting c_attn changes the update (so the split is really there)."""
    config = model.GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=11, bias=True)
    params = model.init_params(config, jax.random.PRNGKey(0))
    wd, lr_max, muon_lr, betas, clip = 0.1, 1e-2, 0.05, (0.9, 0.95), 1.0
    ours_tx = training.configure_optimizers(params, wd, lr_max, betas, clip, kind='muon', muon_lr=muon_lr)

    def by_hand_split(tree):  # {name: matrix} for Muon, the rest for AdamW
        muon, adamw = {}, {}
        for module, leaves in tree.items():
            for name, x in leaves.items():
                if '/h_' in module and x.ndim == 2 and module.endswith('c_attn'):
                    for j, part in enumerate('qkv'):
                        muon[f'{module}.{part}'] = x[:, j * 16:(j + 1) * 16]
                elif '/h_' in module and x.ndim == 2:
                    muon[f'{module}.{name}'] = x
                else:
                    adamw[f'{module}.{name}'] = x
        return muon, adamw

    hand_muon = optax.inject_hyperparams(optax.contrib.muon)(learning_rate=muon_lr, weight_decay=wd)
    decayed = lambda t: jax.tree.map(lambda x: x.ndim >= 2, t)
    hand_adamw = optax.inject_hyperparams(optax.adamw, static_args=('mask',))(  # else a callable is a schedule
        learning_rate=lr_max, b1=betas[0], b2=betas[1], eps=1e-8, weight_decay=wd, mask=decayed)
    hand_clip = optax.clip_by_global_norm(clip)
    fused_muon = optax.contrib.muon(muon_lr, weight_decay=wd)  # c_attn as one (C, 3C) matrix: what the split avoids
    ours_state = ours_tx.init(params)
    muon_p, adamw_p = by_hand_split(params)
    muon_state, adamw_state, clip_state = hand_muon.init(muon_p), hand_adamw.init(adamw_p), hand_clip.init(params)
    c_attn = 'transformer/h_0/attn/c_attn'
    fused_state = fused_muon.init(params[c_attn]['weight'])
    rng = np.random.default_rng(3)
    for lr, scale in [(1e-2, 1.0), (5e-3, 0.01), (2e-3, 0.3)]:  # the first step is clipped
        grads = jax.tree.map(lambda p: jnp.asarray(scale * rng.standard_normal(p.shape), jnp.float32), params)
        ours_state.hyperparams['learning_rate'] = jnp.float32(lr)
        ours, ours_state = jax.jit(ours_tx.update)(grads, ours_state, params)

        clipped, clip_state = jax.jit(hand_clip.update)(grads, clip_state)
        muon_g, adamw_g = by_hand_split(clipped)
        muon_state.hyperparams['learning_rate'] = jnp.float32(lr * muon_lr / lr_max)
        adamw_state.hyperparams['learning_rate'] = jnp.float32(lr)
        muon_u, muon_state = jax.jit(hand_muon.update)(muon_g, muon_state, muon_p)  # compiled: eager Muon is slow
        adamw_u, adamw_state = jax.jit(hand_adamw.update)(adamw_g, adamw_state, adamw_p)
        want_muon, want_adamw = muon_u, adamw_u
        got_muon, got_adamw = by_hand_split(ours)
        assert sorted(got_muon) == sorted(want_muon) and sorted(got_adamw) == sorted(want_adamw)
        for name in want_muon:
            np.testing.assert_allclose(got_muon[name], want_muon[name], rtol=1e-5, atol=1e-7, err_msg=name)
        for name in want_adamw:
            np.testing.assert_allclose(got_adamw[name], want_adamw[name], rtol=1e-5, atol=1e-7, err_msg=name)
        fused, fused_state = jax.jit(fused_muon.update)(clipped[c_attn]['weight'], fused_state, params[c_attn]['weight'])
        fused = fused * (lr / lr_max)  # fused_muon runs at muon_lr throughout
        assert np.abs(np.asarray(fused) - np.asarray(ours[c_attn]['weight'])).max() > 1e-3 * np.abs(np.asarray(fused)).max()
        params = optax.apply_updates(params, ours)
        muon_p, adamw_p = by_hand_split(params)


# -----------------------------------------------------------------------------
# gradient accumulation in the compiled step, and data parallelism over devices

def test_accumulated_gradient_equals_big_batch_gradient():
    config = tiny_config()
    params = tiny_params(config)
    state = training.init_train_state(params, capture_grads(), 'float32', 0)
    M, B, T = 4, 2, config.block_size
    x, y = tokens((M, B, T), 1), tokens((M, B, T), 2)
    step = jax.jit(training.make_train_step(config, capture_grads()))
    new_state, metrics = step(state, training.Batch(x, y), np.float32(1.0), np.int32(0))
    accumulated = new_state.opt_state.inner_state

    # the gradient of nanoGPT's loss on the whole batch at once, computed plainly
    forward = model.gpt_forward(config)
    big_loss, big_grads = jax.jit(jax.value_and_grad(
        lambda p: forward.apply(p, None, x.reshape(M * B, T), y.reshape(M * B, T), is_training=True)[1]))(params)
    assert float(metrics['loss']) == pytest.approx(float(big_loss), rel=1e-6)
    assert_trees_close(accumulated, big_grads, rtol=1e-4, atol=1e-7)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(big_grads)) > 1e-3  # not trivially zero
    assert bool(metrics['finite'])


# -----------------------------------------------------------------------------
# precision: bfloat16 / float16 compute, fp32 master state, float16 dynamic loss scale

@pytest.fixture
def precision():
    """training.set_precision sets a class-level policy: always put float32 back."""
    yield training.set_precision
    training.set_precision('float32')


def tiny_params(config, seed=0):
    """Parameters of a tiny model, initialized in one compiled call (eager init costs more)."""
    return jax.device_get(jax.jit(lambda key: model.init_params(config, key))(jax.random.PRNGKey(seed)))


def one_step_setup(dtype, config=None, seed=0):
    config = config or tiny_config()
    params = tiny_params(config, seed)
    optimizer = training.configure_optimizers(params, 0.1, 1e-3, (0.9, 0.95), 1.0)
    state = jax.jit(lambda p: training.init_train_state(p, optimizer, dtype, seed))(params)
    x, y = tokens((2, 4, config.block_size), 3), tokens((2, 4, config.block_size), 4)
    batch = training.Batch(x, y)
    return config, optimizer, state, batch


def fp32_loss(config, params, batch):
    """The step's loss (the mean over its equal-sized micro-batches) in float32, without dropout."""
    forward = model.gpt_forward(config)
    M, B, T = batch.x.shape
    loss = jax.jit(lambda p, x, y: forward.apply(p, None, x, y)[1])
    return float(loss(params, batch.x.reshape(M * B, T), batch.y.reshape(M * B, T)))


def assert_all_fp32(tree, what):
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating):
            assert jnp.asarray(leaf).dtype == jnp.float32, what + jax.tree_util.keystr(path)


def assert_computes_in(dtype, config, params, batch):
    """The model's activations inside are dtype (the logits are cast back to float32 at the end)."""
    forward = model.gpt_forward(config)
    jaxpr = jax.make_jaxpr(lambda p: forward.apply(p, None, batch.x[0], batch.y[0]))(params)
    dtypes = [v.aval.dtype for eqn in jaxpr.eqns for v in eqn.outvars if hasattr(v.aval, 'dtype')]
    assert sum(d == jnp.dtype(dtype) for d in dtypes) > len(dtypes) // 4, set(dtypes)


def adam_count(opt_state):
    counts = [int(s.count) for s in jax.tree.leaves(opt_state.inner_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
              if isinstance(s, optax.ScaleByAdamState)]
    assert len(counts) == 1
    return counts[0]


def test_bfloat16_step_keeps_fp32_master_state(precision):
    config, optimizer, state, batch = one_step_setup('float32')
    reference = fp32_loss(config, state.params, batch)
    precision('bfloat16')
    config, optimizer, state, batch = one_step_setup('bfloat16')
    assert_computes_in('bfloat16', config, state.params, batch)
    step = jax.jit(training.make_train_step(config, optimizer))
    losses = []
    for it in range(2):
        state, metrics = step(state, batch, np.float32(1e-3), np.int32(it))
        assert bool(metrics['finite'])
        losses.append(float(metrics['loss']))
    assert_all_fp32(state.params, 'params')
    assert_all_fp32(state.opt_state, 'opt_state')
    assert adam_count(state.opt_state) == 2  # AdamW really stepped twice
    assert state.loss_scale == ()  # bfloat16 needs no loss scaling
    # the same model in half precision: close to the fp32 loss, not equal to it
    assert abs(losses[0] - reference) < 0.05 and losses[0] != reference


def test_float16_step_and_dynamic_loss_scale(precision):
    """float16 with GradScaler's semantics: start at 2**16, an overflowing step is skipped and
    halves the scale, 2000 good steps in a row double it. (dropout > 0: on CPU, XLA has no
    float16 dot with float32 accumulation, which jax.nn.dot_product_attention asks for.)"""
    config = tiny_config(dropout=0.1)
    _, _, state, batch = one_step_setup('float32', config)
    reference = fp32_loss(config, state.params, batch)
    precision('float16')
    config, optimizer, state, batch = one_step_setup('float16', config)
    assert_computes_in('float16', config, state.params, batch)
    assert state.loss_scale.scale.dtype == np.float32 and float(state.loss_scale.scale) == 2.0 ** 16
    step = jax.jit(training.make_train_step(config, optimizer))
    lr, it = np.float32(1e-3), np.int32(0)

    # good steps: applied, scale kept, counted; master state stays float32
    good, m = step(state, batch, lr, it)
    assert bool(m['finite']) and abs(float(m['loss']) - reference) < 0.1
    good, m = step(good, batch, lr, np.int32(1))
    assert bool(m['finite'])
    assert float(good.loss_scale.scale) == 2.0 ** 16 and int(good.loss_scale.counter) == 2
    assert adam_count(good.opt_state) == 2
    assert_all_fp32(good.params, 'params')
    assert_all_fp32(good.opt_state, 'opt_state')
    assert not np.array_equal(np.asarray(good.params['transformer/wte']['weight']),
                              np.asarray(state.params['transformer/wte']['weight']))

    # a scale that overflows float16 in the backward pass: the step is skipped, the scale halves
    huge = training.LossScale(np.float32(2.0 ** 100), np.int32(17))
    skipped, m = step(state._replace(loss_scale=huge), batch, lr, it)
    assert not bool(m['finite'])
    assert np.isfinite(float(m['loss']))  # the forward was fine; only the scaled gradients overflowed
    assert float(skipped.loss_scale.scale) == 2.0 ** 99 and int(skipped.loss_scale.counter) == 0
    for a, b in zip(jax.tree.leaves((skipped.params, skipped.opt_state.inner_state)),
                    jax.tree.leaves((state.params, state.opt_state.inner_state))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # untouched, AdamW's count included

    # the 2000th consecutive good step doubles the scale and restarts the count
    grown, m = step(state._replace(loss_scale=training.LossScale(np.float32(2.0 ** 16), np.int32(1999))), batch, lr, it)
    assert bool(m['finite'])
    assert float(grown.loss_scale.scale) == 2.0 ** 17 and int(grown.loss_scale.counter) == 0


# -----------------------------------------------------------------------------
# data: the batch of iteration i is a pure function of (seed, i); windows are next-token pairs

FREED_MEMORY_SCRIPT = textwrap.dedent('''
    import ctypes, resource, sys, threading
    sys.path.insert(0, sys.argv[1])
    import backends
    applied = backends.setup_cpu('cpu', 12, 768, 2) if sys.argv[2] == '1' else False
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.restype, libc.memset.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    faults = []

    def step():  # what XLA does with a step's temporary buffer, on a thread of its own
        for _ in range(4):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            block = libc.malloc(256 << 20)
            libc.memset(block, 1, 256 << 20)
            libc.free(block)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    thread = threading.Thread(target=step)
    thread.start()
    thread.join()
    print(applied, *faults)
''')


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason="glibc's mallopt: Linux only")
def test_setup_cpu_reuses_a_freed_block_without_page_faults(monkeypatch):
    """glibc by default maps a 256 MiB block afresh on every malloc (65,536 page faults of 4 KiB each
    time); after backends.setup_cpu for a big model a block malloc'd again on another thread reuses the
    freed one. Small models (host devices) are left alone: their devices' threads would contend for one arena."""
    monkeypatch.setenv('JAX_NUM_CPU_DEVICES', '1')  # JAX has started here: leave its devices be
    assert not backends.setup_cpu('cpu', n_layer=4, n_embd=128, rows=12)  # the README config: not applied
    for keep in ('0', '1'):
        out = subprocess.run([sys.executable, '-c', FREED_MEMORY_SCRIPT, REPO, keep], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        applied, first, *again = out.stdout.split()
        assert applied == str(keep == '1')
        assert int(first) > 60_000, out.stdout  # the first touch of 256 MiB faults in either case
        if keep == '1':
            assert all(int(n) < 1_000 for n in again), out.stdout
        else:
            assert all(int(n) > 60_000 for n in again), out.stdout


def test_batches_are_pure_functions_of_seed_and_iteration():
    n, T = 10_000, 16
    data = np.arange(n, dtype=np.uint16)  # token value = its position: windows are easy to check
    a = training.batch_indices(1337, 'train', 5, n, T, (4, 3))
    np.testing.assert_array_equal(a, training.batch_indices(1337, 'train', 5, n, T, (4, 3)))
    # after other draws, in another order: still the same
    for it in (9, 0, 4):
        training.batch_indices(1337, 'train', it, n, T, (4, 3))
    np.testing.assert_array_equal(a, training.batch_indices(1337, 'train', 5, n, T, (4, 3)))
    assert not np.array_equal(a, training.batch_indices(1337, 'train', 6, n, T, (4, 3)))
    assert not np.array_equal(a, training.batch_indices(1338, 'train', 5, n, T, (4, 3)))
    assert not np.array_equal(a, training.batch_indices(1337, 'val', 5, n, T, (4, 3)))
    # a negative seed (numpy's generators take none; --seed=-5 was a traceback) is a seed like another
    negative = training.batch_indices(-5, 'train', 5, n, T, (4, 3))
    np.testing.assert_array_equal(negative, training.batch_indices(-5, 'train', 5, n, T, (4, 3)))
    assert not np.array_equal(negative, training.batch_indices(5, 'train', 5, n, T, (4, 3)))
    # all starts leave room for a window and its target
    many = training.batch_indices(0, 'train', 0, 50, T, (1000,))
    assert many.min() >= 0 and many.max() <= 50 - T - 1 and many.max() == 50 - T - 1

    x, y = training.windows(data, a, T)
    assert x.shape == y.shape == (4, 3, T) and x.dtype == y.dtype == np.int32
    np.testing.assert_array_equal(x, a[..., None] + np.arange(T))        # x = data[s : s+T]
    np.testing.assert_array_equal(y, a[..., None] + np.arange(1, T + 1))  # y = data[s+1 : s+T+1]
    # through a memmap of a uint16 file, as train.py reads it
    mm_data = np.random.default_rng(0).integers(0, 50000, 1000).astype(np.uint16)
    starts = training.batch_indices(3, 'train', 2, 1000, T, (5,))
    x, y = training.windows(mm_data, starts, T)
    for row, s in enumerate(starts):
        np.testing.assert_array_equal(x[row], mm_data[s:s + T])
        np.testing.assert_array_equal(y[row], mm_data[s + 1:s + 1 + T])


def test_compile_ahead_compiles_jobs_side_by_side_from_shapes():
    """train.py compiles its train step, eval step and initial state in one compile_ahead call: each
    compiled function must compute what jax.jit does, under its own name, and a failing job must raise."""
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    double, matmul = jax.jit(lambda a: a * 2), jax.jit(lambda a, b: a @ b)
    shape = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)
    done = parallel.compile_ahead({'double': (double, (shape(x),)), 'matmul': (matmul, (shape(x), shape(x.T)))})
    (c_double, s_double), (c_matmul, s_matmul) = done['double'], done['matmul']
    np.testing.assert_array_equal(np.asarray(c_double(x)), x * 2)
    np.testing.assert_array_equal(np.asarray(c_matmul(x, x.T)), x @ x.T)
    assert s_double > 0 and s_matmul > 0
    with pytest.raises(TypeError):  # shapes that do not fit: the error reaches the caller
        parallel.compile_ahead({'double': (double, (shape(x),)), 'matmul': (matmul, (shape(x), shape(x)))})


def test_step_updates_the_donated_state_in_place():
    """train.py's step on one device's mesh writes the new parameters and AdamW moments into the donated
    buffers (pmap over one device copied every one of them after the update), and runs."""
    config = tiny_config()
    params = model.init_params(config, jax.random.PRNGKey(0))
    tx = training.configure_optimizers(params, 0.1, 1e-3, (0.9, 0.95), 1.0)
    mesh = parallel.make_mesh(jax.devices()[:1], 1)
    compiled = training.compile_steps(config, tx, mesh, 1, 2, 'float32', 0, from_scratch=True)
    step = compiled['train step'][0]
    hlo = step.as_text()
    copies = re.findall(r'= (\S+) copy\(', hlo[hlo.index('\nENTRY'):])
    assert len(copies) < len(jax.tree.leaves(params)), copies
    state = compiled['initial state'][0](jax.random.PRNGKey(0))
    batch = parallel.put_batch(training.Batch(tokens((1, 2, config.block_size)), tokens((1, 2, config.block_size), 1)), mesh)
    new_state, metrics = step(state, batch, np.float32(1e-3), np.int32(0))
    assert np.isfinite(float(parallel.local_value(metrics['loss'])))
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    assert state.params['transformer/wte']['weight'].is_deleted()  # donated


def test_put_state_and_get_state_round_trip():
    mesh = parallel.make_mesh(jax.devices()[:1], 1)
    tree = {'w': np.arange(6, dtype=np.float32).reshape(2, 3), 'n': np.int32(7)}
    host = parallel.get_state(parallel.put_state(tree, parallel.state_sharding(tree, mesh)))
    assert isinstance(host['w'], np.ndarray) and host['w'].shape == (2, 3)
    np.testing.assert_array_equal(host['w'], tree['w'])
    assert int(host['n']) == 7


# -----------------------------------------------------------------------------
# train.py as a subprocess

TINY = ['--device=cpu', '--dtype=float32', '--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32',
        '--batch_size=4', '--gradient_accumulation_steps=2', '--eval_iters=3', '--log_interval=1',
        '--dropout=0.1', '--learning_rate=1e-3', '--warmup_iters=2', '--lr_decay_iters=20', '--min_lr=1e-4',
        '--always_save_checkpoint=True']
N = 4  # resume: 2N iterations in one go, or N then resume to 2N


@pytest.fixture(scope='module')
def env(tmp_path_factory):
    e = dict(os.environ)
    e.update(PYTHONUNBUFFERED='1', JAX_PLATFORMS='cpu')  # conftest's XLA cache and flags
    e.pop('WANDB_MODE', None)
    return e


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
    """A character-level dataset as data/shakespeare_char/prepare.py writes it."""
    return write_char_dataset(str(tmp_path_factory.mktemp('data') / 'tiny'), tiny_text(30000))


def train(dataset, out_dir, *extra, env, cwd, timeout=300, wrapper=()):
    cmd = [sys.executable, *wrapper, os.path.join(REPO, 'train.py'), f'--dataset={dataset}', f'--out_dir={out_dir}',
           *TINY, f'--eval_interval={N}', *extra]
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def logged(text):
    """{iteration: loss text} from 'iter N: loss X, ...' lines, {step: (train, val)} from eval lines."""
    iters = {int(m[1]): m[2] for m in re.finditer(r'^iter (\d+): loss (\S+),', text, re.M)}
    steps = re.findall(r'^step (\d+): train loss (\S+), val loss (\S+), val perplexity (\S+)$', text, re.M)
    for _, _, val, ppl in steps:  # exp(val loss), to its printed digits
        assert abs(float(ppl) - math.exp(float(val))) <= 0.005 + 1e-4 * math.exp(float(val)), (val, ppl)
    return iters, {int(step): (train, val) for step, train, val, _ in steps}


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory, dataset, env):
    """2N iterations in one run, logging to wandb offline."""
    work = tmp_path_factory.mktemp('uninterrupted')
    e = dict(env, WANDB_MODE='offline', WANDB_DIR=str(work), WANDB_SILENT='true')
    proc = train(dataset, str(work / 'out'), f'--max_iters={2 * N}', '--wandb_log=True',
                 '--wandb_project=test-project', '--wandb_run_name=test-run', env=e, cwd=str(work))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return work, proc.stdout


def test_resume_continues_bit_exactly(tmp_path, dataset, env, uninterrupted):
    work, log_full = uninterrupted
    out = str(tmp_path / 'out')
    # the first half with nanoGPT's CPU flag --compile=False: the run goes on (train.py says why the step
    # stays compiled), its losses the default's
    first = train(dataset, out, f'--max_iters={N}', '--compile=False', env=env, cwd=str(tmp_path))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert load_checkpoint(os.path.join(out, CKPT_NAME))[1]['iter_num'] == N
    second = train(dataset, out, f'--max_iters={2 * N}', '--init_from=resume', env=env, cwd=str(tmp_path))
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f'Resuming training from {out}' in second.stdout

    full_iters, full_evals = logged(log_full)
    first_iters, first_evals = logged(first.stdout)
    second_iters, second_evals = logged(second.stdout)
    assert sorted(full_iters) == list(range(2 * N + 1)) and sorted(full_evals) == [0, N, 2 * N]
    assert sorted(second_iters) == list(range(N, 2 * N + 1)) and sorted(second_evals) == [N, 2 * N]
    assert len(set(full_iters.values())) > N  # the loss moves: there is something to compare
    for it, loss in {**first_iters, **second_iters}.items():
        assert loss == full_iters[it], (it, loss, full_iters[it])
    for it, losses in {**first_evals, **second_evals}.items():
        assert losses == full_evals[it], (it, losses, full_evals[it])

    a, meta_a = load_checkpoint(os.path.join(str(work / 'out'), CKPT_NAME))
    b, meta_b = load_checkpoint(os.path.join(out, CKPT_NAME))
    assert meta_a['iter_num'] == meta_b['iter_num'] == 2 * N
    assert meta_a['best_val_loss'] == meta_b['best_val_loss']
    assert meta_a['model_args'] == meta_b['model_args']
    assert sorted(a) == sorted(b) and any(k.startswith('model.') for k in a) and any(k.startswith('optimizer') for k in a)
    for name in a:  # parameters and AdamW moments, bit for bit
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


# Runs train.py with each step's metrics held back 0.3 s on the device (a host callback); prints, as a
# step is sent, the steps before the previous one that have not ended, and at exit how many were sent.
HELD_BACK = r'''
import atexit, os, runpy, sys, time
import jax
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
import training

def hold(metrics):
    return jax.pure_callback(lambda m: (time.sleep(0.3), m)[1],
                             jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), metrics), metrics)

class HeldBack:
    def __init__(self, step):
        self.step, self.sent, self.hold = step, [], jax.jit(hold)
        atexit.register(lambda: print(f'sent {len(self.sent)} steps', flush=True))
        atexit.register(jax.block_until_ready, self.sent)  # no callback left running at exit
    def __getattr__(self, name):  # the memory check reads the compiled step's analyses
        return getattr(self.step, name)
    def __call__(self, *args):
        late = [k for k, m in enumerate(self.sent[:-1]) if not all(a.is_ready() for a in jax.tree.leaves(m))]
        if late:
            print(f'step {len(self.sent)} sent before step(s) {late} ended', flush=True)
        state, metrics = self.step(*args)
        self.sent.append(self.hold(metrics))
        return state, self.sent[-1]

compile_steps = training.compile_steps
def held_back(*args, **kwargs):
    compiled = compile_steps(*args, **kwargs)
    compiled['train step'] = HeldBack(compiled['train step'][0]), compiled['train step'][1]
    return compiled
training.compile_steps = held_back
runpy.run_path(sys.argv[0], run_name='__main__')
'''


def test_at_most_two_steps_in_flight(tmp_path, dataset, env):
    """No loss read for many steps (log_interval past max_iters) and every step's end held back: a step is
    sent only once the steps before the previous one have ended. With every step sent at once, XLA:CPU's
    all-reduce over host devices deadlocked within a few steps and its rendezvous timeout aborted the run."""
    wrapper = tmp_path / 'held_back.py'
    wrapper.write_text(HELD_BACK)
    run = train(dataset, str(tmp_path / 'out'), '--max_iters=6', '--log_interval=1000', '--eval_interval=6',
                env=env, cwd=str(tmp_path), wrapper=[str(wrapper)])
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert 'training on 2 cpu device(s)' in run.stdout and re.search(r'^step 6: ', run.stdout, re.M)
    assert 'sent 7 steps' in run.stdout and 'sent before' not in run.stdout, run.stdout[-2000:]


def test_muon_trains_resumes_bit_exactly_and_refuses_another_optimizer(tmp_path, dataset, env, uninterrupted):
    """optimizer='muon' through train.py with gradient accumulation, on two host devices: its own losses (not AdamW's), its state
    in the checkpoint, N + resume + N equal to 2N bit for bit; resuming it as AdamW is one line, the file kept."""
    muon = ['--optimizer=muon', '--muon_lr=0.02']
    full = train(dataset, str(tmp_path / 'full'), f'--max_iters={2 * N}', *muon, env=env, cwd=str(tmp_path))
    assert full.returncode == 0, full.stdout[-3000:] + full.stderr[-3000:]
    out = str(tmp_path / 'out')
    first = train(dataset, out, f'--max_iters={N}', *muon, env=env, cwd=str(tmp_path))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    second = train(dataset, out, f'--max_iters={2 * N}', '--init_from=resume', *muon, env=env, cwd=str(tmp_path))
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    full_iters, _ = logged(full.stdout)
    assert sorted(full_iters) == list(range(2 * N + 1))
    assert 'training on 2 cpu device(s)' in full.stdout  # as AdamW: the deadlock was not Muon's
    assert {**logged(first.stdout)[0], **logged(second.stdout)[0]} == full_iters
    adamw_iters, _ = logged(uninterrupted[1])
    assert full_iters[0] == adamw_iters[0] and full_iters[2 * N] != adamw_iters[2 * N]  # same start, other steps
    a, _ = load_checkpoint(os.path.join(str(tmp_path / 'full'), CKPT_NAME))
    b, meta = load_checkpoint(os.path.join(out, CKPT_NAME))
    assert meta['config']['optimizer'] == 'muon' and sorted(a) == sorted(b)
    # momentum per shape, stacked: q, k, v, attn.c_proj of 2 layers (32, 32); c_fc (32, 128); mlp.c_proj
    assert {a[k].shape for k in a if "['muon']" in k and a[k].ndim == 3} == {(8, 32, 32), (2, 32, 128), (2, 128, 32)}
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    before = open(os.path.join(out, CKPT_NAME), 'rb').read()
    wrong = train(dataset, out, f'--max_iters={3 * N}', '--init_from=resume', env=env, cwd=str(tmp_path))
    err = wrong.stderr.strip().splitlines()
    assert wrong.returncode == 1 and len(err) == 1, wrong.stderr[-2000:]
    assert "muon's state" in err[0] and '--optimizer=muon' in err[0], err
    assert open(os.path.join(out, CKPT_NAME), 'rb').read() == before


def wandb_records(path):
    """The records of a wandb offline run file: a 7-byte W&B header, then LevelDB-log framed
    protobuf Records in 32 KiB blocks (7-byte chunk headers: crc, length, type)."""
    from wandb.proto import wandb_internal_pb2
    data = open(path, 'rb').read()
    assert data[:4] == b':W&B'
    block, pos, chunk, records = 32768, 7, b'', []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack('<IHB', data[pos:pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            break
        chunk += data[pos:pos + length]
        pos += length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b''
    return records


def test_log_and_eval_lines_keep_nanogpts_order(uninterrupted):
    """nanoGPT's loop: an eval at every eval_interval before that iteration's step, one log line per
    iteration, in order."""
    _, log = uninterrupted
    lines = re.findall(r'^(step|iter) (\d+):', log, re.M)
    expected = []
    for it in range(2 * N + 1):
        if it % N == 0:
            expected.append(('step', str(it)))
        expected.append(('iter', str(it)))
    assert lines == expected


def test_eval_only_reports_losses_and_perplexities_and_exits(tmp_path, dataset, env):
    proc = train(dataset, str(tmp_path / 'out'), '--eval_only=True', env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    m = re.search(r'^eval_only: train loss (\S+) \(perplexity (\S+)\), val loss (\S+) \(perplexity (\S+)\)$',
                  proc.stdout, re.M)
    assert m, proc.stdout[-2000:]
    assert abs(float(m[2]) - math.exp(float(m[1]))) < 0.01 and abs(float(m[4]) - math.exp(float(m[3]))) < 0.01
    iters, evals = logged(proc.stdout)
    assert iters == {} and evals == {0: (m[1], m[3])}  # the eval, then nothing: no step, no checkpoint
    assert not os.path.exists(tmp_path / 'out' / CKPT_NAME)


def test_wandb_offline_logs_nanogpt_keys(uninterrupted):
    pytest.importorskip('wandb')
    work, log = uninterrupted
    runs = glob.glob(str(work / 'wandb' / 'offline-run-*' / 'run-*.wandb'))
    assert len(runs) == 1, os.listdir(work)
    records = wandb_records(runs[0])
    history = [{item.key or '/'.join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
               for r in records if r.WhichOneof('record_type') == 'history']
    assert [h['iter'] for h in history] == [0, N, 2 * N]  # one row per eval
    _, evals = logged(log)
    for h in history:
        assert {'iter', 'train/loss', 'val/loss', 'lr', 'mfu'} <= set(h)
        assert (f"{h['train/loss']:.4f}", f"{h['val/loss']:.4f}") == evals[h['iter']]
        assert h['lr'] == pytest.approx(training.get_lr(h['iter'], 1e-3, 2, 20, 1e-4))
    run = [r.run for r in records if r.WhichOneof('record_type') == 'run'][0]
    assert run.project == 'test-project' and run.display_name == 'test-run'
    # the run's config is train.py's settings, as on the command line
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    for key, value in [('batch_size', 4), ('gradient_accumulation_steps', 2), ('dropout', 0.1), ('n_embd', 32)]:
        assert config[key] in (value, {'value': value}), (key, config.get(key))
    assert 'CKPT_NAME' not in config


def test_memory_check_refuses_what_cannot_fit(tmp_path, dataset, env):
    out = tmp_path / 'out'
    # about 2**22 sequences of 32 tokens per micro-batch: far beyond this machine's RAM. One host device
    # and 2 x an odd batch_size: no fsdp and one halving, fewer settings to compile for the estimates
    one = dict(env, XLA_FLAGS=env['XLA_FLAGS'] + ' --xla_force_host_platform_device_count=1')
    proc = train(dataset, str(out), '--batch_size=4000002', '--max_iters=2', env=one, cwd=str(tmp_path))
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert 'Traceback' not in proc.stderr and err, proc.stderr[-3000:]
    assert re.match(r'error: the compiled training step needs ~[\d.]+ GiB but .* has [\d.]+ GiB; XLA\'s estimates with '
                    r'.*--batch_size=2000001 --gradient_accumulation_steps=4 ~[\d.]+ GiB: take a setting that fits, '
                    r'or lower --batch_size', err[-1]), err[-1]
    assert not re.search(r'^(iter|step) 0:', proc.stdout, re.M)  # refused before any training
    assert not (out / CKPT_NAME).exists()


def test_resume_at_a_shorter_block_size_crops_the_adamw_moments_too(tmp_path, dataset, env, uninterrupted):
    """--init_from=resume --block_size=16 on a block_size 32 checkpoint: model surgery as for a pretrained
    model, and wpe's AdamW moments cropped with it (they failed the restore's shape check). Resumed at its
    last eval's iteration, the run saves before its one step: every array is the old one, wpe's cropped."""
    work, _ = uninterrupted
    (tmp_path / 'out').mkdir()
    old, _ = load_checkpoint(str(work / 'out' / CKPT_NAME))
    with open(tmp_path / 'out' / CKPT_NAME, 'wb') as f:
        f.write(open(work / 'out' / CKPT_NAME, 'rb').read())
    proc = train(dataset, str(tmp_path / 'out'), '--init_from=resume', '--block_size=16', f'--max_iters={2 * N}',
                 '--always_save_checkpoint=True', env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    new, meta = load_checkpoint(str(tmp_path / 'out' / CKPT_NAME))
    assert meta['model_args']['block_size'] == 16 and new.keys() == old.keys()
    cropped = [k for k in old if 'wpe' in k]
    assert len(cropped) == 3, cropped  # the weight, its two moments
    for k in old:
        np.testing.assert_array_equal(new[k], old[k][:16] if k in cropped else old[k], err_msg=k)


def test_init_from_local_gpt2_directory_crops_and_overrides_dropout(tmp_path, dataset, env):
    """init_from=<save_pretrained directory>: GPT-2 weights (Conv1D transposed), block_size cropped
    by model surgery, dropout from the command line, as nanoGPT's init_from='gpt2*'. With a zero
    learning rate the saved parameters are the loaded ones."""
    torch = pytest.importorskip('torch')
    transformers = pytest.importorskip('transformers')
    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=VOCAB,
                                        activation_function='gelu_new')
    hf_dir = tmp_path / 'tiny-gpt2'
    transformers.GPT2LMHeadModel(hf_config).save_pretrained(hf_dir)
    hf = {k: v.detach().numpy() for k, v in transformers.GPT2LMHeadModel.from_pretrained(hf_dir).state_dict().items()}

    out = tmp_path / 'out'
    proc = train(dataset, str(out), f'--init_from={hf_dir}', '--block_size=16', '--dropout=0.05',
                 '--learning_rate=0', '--min_lr=0', '--max_iters=2', '--eval_interval=2', env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    arrays, meta = load_checkpoint(str(out / CKPT_NAME))
    nanogpt_args = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, bias=True, vocab_size=VOCAB,
                        dropout=0.05, activation='gelu_new')
    assert {k: meta['model_args'][k] for k in nanogpt_args} == nanogpt_args
    assert not meta['model_args']['rope'] and meta['model_args']['tie_lm_head']  # GPT-2's, the rest
    np.testing.assert_array_equal(arrays['model.transformer.wpe.weight'], hf['transformer.wpe.weight'][:16])
    np.testing.assert_array_equal(arrays['model.transformer.wte.weight'], hf['transformer.wte.weight'])
    for name in ('attn.c_attn', 'attn.c_proj', 'mlp.c_fc', 'mlp.c_proj'):  # Conv1D (in, out) -> Linear (out, in)
        np.testing.assert_array_equal(arrays[f'model.transformer.h.1.{name}.weight'],
                                      hf[f'transformer.h.1.{name}.weight'].T)
    np.testing.assert_array_equal(arrays['model.transformer.h.0.ln_1.bias'], hf['transformer.h.0.ln_1.bias'])


def test_micro_batches_run_side_by_side_as_ddp_ranks():
    """parallel.side_by_side and training.arrange against layouts written out by hand."""
    mesh = lambda n: types.SimpleNamespace(size=n)
    assert parallel.side_by_side(4, 12, mesh(2)) == (2, 2)  # DDP: 2 ranks, 2 micro-steps each
    assert parallel.side_by_side(40, 12, mesh(8)) == (5, 8)  # nanoGPT's train_gpt2 on 8 GPUs
    assert parallel.side_by_side(1, 12, mesh(2)) == (1, 1)  # README CPU config: its rows over 2 host devices
    assert parallel.side_by_side(2, 12, mesh(4)) == (1, 2)  # 2 micro-batches' rows over 4 devices
    with pytest.raises(ValueError, match=r'gradient_accumulation_steps=3 must be divisible by the number of devices \(2\)'):
        parallel.side_by_side(3, 5, mesh(2))
    a_GB = np.arange(4 * 2).reshape(4, 2)  # micro-batch g, row b holds 2g + b
    # 2 ranks of 2 micro-steps: step m holds micro-batches m and 2 + m, as DDP's rank r takes r * 2 onwards
    np.testing.assert_array_equal(training.arrange(a_GB, 2), [[0, 1, 4, 5], [2, 3, 6, 7]])
    np.testing.assert_array_equal(training.arrange(a_GB, 1), a_GB)
    np.testing.assert_array_equal(training.arrange(a_GB, 4), [[0, 1, 2, 3, 4, 5, 6, 7]])
    assert training.arrange(np.zeros((4, 2, 9)), 2).shape == (2, 4, 9)  # tokens ride along


def test_cpu_row_split_over_host_devices_equals_one_device(tmp_path, dataset, env):
    """One micro-batch per iteration (as the README CPU config): on 2 host devices each takes half of its
    rows (train.py's default on CPU), and losses and parameters equal those of 1 device. Without dropout,
    whose masks depend on the split."""
    flags = ['--gradient_accumulation_steps=1', '--dropout=0.0', '--max_iters=3', '--eval_interval=3']
    runs = {}
    for n in (1, 2):
        e = dict(env, XLA_FLAGS=env['XLA_FLAGS'] + f' --xla_force_host_platform_device_count={n}')
        proc = train(dataset, str(tmp_path / f'out{n}'), *flags, env=e, cwd=str(tmp_path))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        runs[n] = proc.stdout
    assert 'training on 2 cpu device(s)' in runs[2] and 'training on 1 cpu device(s)' in runs[1]
    (iters1, evals1), (iters2, evals2) = logged(runs[1]), logged(runs[2])
    assert sorted(iters1) == sorted(iters2) == [0, 1, 2, 3] and sorted(evals1) == sorted(evals2) == [0, 3]
    np.testing.assert_allclose([float(iters2[i]) for i in iters1], [float(v) for v in iters1.values()], atol=2e-4)
    np.testing.assert_allclose([float(v) for i in evals1 for v in evals2[i]],
                               [float(v) for i in evals1 for v in evals1[i]], atol=2e-4)
    one, _ = load_checkpoint(str(tmp_path / 'out1' / CKPT_NAME))
    two, _ = load_checkpoint(str(tmp_path / 'out2' / CKPT_NAME))
    for k in one: # AdamW divides by each gradient's size: rounding in a near-zero gradient moves a weight
        np.testing.assert_allclose(two[k], one[k], rtol=1e-4, atol=1e-5, err_msg=k) # of ~1e-2 by ~1e-6


def test_cpu_data_parallel_gradients_meet_in_one_all_reduce():
    """On CPU host devices (data parallel) each device's gradient is summed in one all-reduce of one flat
    array, as XLA:CPU's devices meet once per array (55 times a step for the README's model before). Each
    device's part, with backends.all_reduce_once's keys: a rank's own key when it has a device to itself,
    folded with the device's place among its rank's devices when its rows are split over several."""
    script = textwrap.dedent('''
        import re, sys
        sys.path.insert(0, sys.argv[1])
        import numpy as np, jax, jax.numpy as jnp
        import backends, model, parallel, training
        config = model.GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64)
        tx = training.configure_optimizers(model.param_shapes(config), 0.1, 1e-3, (0.9, 0.95), 1.0)
        mesh = parallel.make_mesh(jax.devices(), 1)
        hlo = training.compile_steps(config, tx, mesh, 1, 4, 'float32', 0)['train step'][0].as_text()
        print('operands', *[m.count('%') for m in re.findall(r' all-reduce\\(([^)]*)\\)', hlo)])
        accumulate = lambda params, x, y, keys_MD, scaler: (  # a device's draw, its rows' sum
            {'u': jax.random.uniform(keys_MD[0, 0], (3,))}, jnp.sum(x * 1.0))
        x = jnp.arange(8 * 5).reshape(1, 8, 5)
        for R in (4, 2, 1):
            keys_MR = jax.random.split(jax.random.PRNGKey(1), R)[None]
            run = jax.jit(backends.all_reduce_once(accumulate, mesh, parallel.row_sharding(mesh).spec))
            grads, loss = run({}, x, x, keys_MR, None)
            print('ranks', R, float(loss), *np.asarray(grads['u']).tolist())
    ''')
    proc = subprocess.run([sys.executable, '-c', script, REPO], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, XLA_FLAGS=os.environ['XLA_FLAGS'] + ' --xla_force_host_platform_device_count=4'))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    operands = [int(n) for n in re.search(r'^operands(.*)$', proc.stdout, re.M)[1].split()]
    assert len(operands) == 1 and operands[0] <= 2, operands  # the flat gradient and the loss
    for R in (4, 2, 1):
        row = [float(v) for v in re.search(rf'^ranks {R} (.*)$', proc.stdout, re.M)[1].split()]
        keys = jax.random.split(jax.random.PRNGKey(1), R)
        per_rank = 4 // R
        draws = [jax.random.uniform(keys[r] if per_rank == 1 else jax.random.fold_in(keys[r], c), (3,))
                 for r in range(R) for c in range(per_rank)]
        assert row[0] == pytest.approx(sum(range(40)) / 4)  # the devices' mean
        np.testing.assert_allclose(row[1:], np.mean(draws, 0), rtol=1e-6)
