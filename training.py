"""
The compiled pieces of training: everything train.py runs per iteration, importable on its own
(bench.py times exactly this step). train.py is the readable script around these functions.

    policy    = set_precision('bfloat16')                 # jmp policy on model.GPT (autocast's role)
    optimizer = model.configure_optimizers(params, weight_decay, learning_rate, (beta1, beta2), platform, grad_clip)
    state     = init_train_state(params, optimizer, 'bfloat16', seed)          # TrainState, one copy
    step      = parallel_train_step(make_train_step(config, optimizer), devices)  # state donated
    state     = replicate(state, devices)                                      # one copy per device
    plan      = plan_devices(len(devices), 1, accumulation, batch_size, platform, num_params)
    batch     = shard(Batch(x, y, micro), devices)    # x, y: arrange()d, (devices, micro_steps, rows, block_size)
    state, metrics = step(state, batch, np.float32(lr), np.int32(iter_num))    # metrics['loss'][0]

One call of the step is one whole iteration on every device: forward and backward over the
device's micro-batches (lax.scan, gradients summed in fp32), the gradient average across devices
(lax.pmean, DDP's all-reduce), clipping, AdamW, and for float16 the dynamic loss scale.
train.py and bench.py call it through make_train_chunk / parallel_train_chunk, which run
iters_per_call(...) such iterations per call (several only for small models on a CPU), compiled by
over_devices (jax.pmap; on a single device jax.jit).

Data are pure functions of (seed, iteration, micro-batch index): batch_indices draws the window
starts of all the iteration's micro-batches; a device (or process) reads only its own share.
The same iteration therefore sees the same tokens on 1 device with 8 micro-steps, on 8 devices
with 1 each, or after a resume.
"""
import concurrent.futures
import ctypes
import importlib.metadata
import importlib.util
import math
import os
import queue
import threading
import time
from typing import Any, NamedTuple

import numpy as np
import jax
import jax.numpy as jnp
from jax import lax
import haiku as hk
import jmp
import optax

import model

AXIS = 'batch'  # name of the pmap axis: the devices that share one iteration (DDP's world)
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


# -----------------------------------------------------------------------------
# learning rate schedule

def get_lr(it, learning_rate, warmup_iters, lr_decay_iters, min_lr, decay_lr=True):
    """nanoGPT's schedule: linear warmup, cosine decay to min_lr at lr_decay_iters, min_lr after."""
    if not decay_lr:
        return learning_rate
    # 1) linear warmup for warmup_iters steps
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    # 2) past lr_decay_iters (or no room to decay at all), the minimum
    if it > lr_decay_iters or lr_decay_iters <= warmup_iters:
        return min_lr
    # 3) in between, cosine from learning_rate down to min_lr
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # 1..0
    return min_lr + coeff * (learning_rate - min_lr)


# -----------------------------------------------------------------------------
# mixed precision

def set_precision(dtype):
    """Computes model.GPT in dtype with fp32 master parameters: a jmp policy set on the module class
    (torch.autocast's role). LayerNorm gets its own policy so its parameters and statistics stay
    fp32 and only its output is cast. Applies to everything traced afterwards in this thread.
    Returns the GPT policy."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if dtype == 'float32':
        hk.mixed_precision.clear_policy(model.GPT)
        hk.mixed_precision.clear_policy(model.LayerNorm)
        return jmp.get_policy('float32')
    half = DTYPES[dtype]
    policy = jmp.Policy(param_dtype=jnp.float32, compute_dtype=half, output_dtype=jnp.float32)
    hk.mixed_precision.set_policy(model.GPT, policy)
    hk.mixed_precision.set_policy(model.LayerNorm, jmp.Policy(jnp.float32, jnp.float32, half))
    return policy


class LossScale(NamedTuple):
    """float16's dynamic loss scale as plain arrays (jmp.DynamicLossScale is rebuilt from them in
    the step: jmp's own pytree does not survive jax's ahead-of-time lowering)."""
    scale: Any    # fp32
    counter: Any  # int32, good steps since the last change


# torch.cuda.amp.GradScaler's defaults: start at 2**16, halve on overflow, double after 2000 good steps
LOSS_SCALE_INIT, LOSS_SCALE_PERIOD, LOSS_SCALE_FACTOR = 2.0 ** 16, 2000, 2


def init_loss_scale(dtype):
    """float16 needs dynamic loss scaling; the other dtypes need none (an empty tuple)."""
    if dtype == 'float16':
        return LossScale(np.float32(LOSS_SCALE_INIT), np.int32(0))
    return ()


def _jmp_loss_scale(loss_scale):
    if loss_scale == ():
        return jmp.NoOpLossScale()
    return jmp.DynamicLossScale(loss_scale.scale, loss_scale.counter, period=LOSS_SCALE_PERIOD, factor=LOSS_SCALE_FACTOR)


# -----------------------------------------------------------------------------
# train state and the compiled step

class TrainState(NamedTuple):
    params: Any      # fp32 master parameters (Haiku dict)
    opt_state: Any   # optax state; opt_state.hyperparams['learning_rate'] is set by every step
    loss_scale: Any  # LossScale for float16, () otherwise
    rng: Any         # base PRNG key from the seed; dropout keys fold in iteration and micro-batch


class Batch(NamedTuple):
    x: Any      # (M, B, T) int32 inputs, M micro-batches (a leading device axis under pmap)
    y: Any      # (M, B, T) int32 targets
    micro: Any  # (M,) int32 global micro-batch index: picks each micro-batch's dropout key


def init_train_state(params, optimizer, dtype, seed):
    return TrainState(params, optimizer.init(params), init_loss_scale(dtype), jax.random.PRNGKey(seed))


def make_train_step(config, optimizer, axis_name=AXIS):
    """train_step(state, batch, lr, iter_num) -> (state, metrics): one whole iteration.
    metrics: 'loss' (mean over all micro-batches of all devices, unscaled), 'finite' (whether the
    update was applied: always True except float16 overflow steps, skipped like GradScaler),
    'loss_scale'. axis_name=None gives the single-device function (no collectives), for jax.jit."""
    forward = model.gpt_forward(config)

    def loss_fn(params, x_BT, y_BT, key, loss_scale):
        _, loss = forward.apply(params, key, x_BT, y_BT, is_training=True)
        return loss_scale.scale(loss), loss

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state, batch, lr, iter_num):
        M = batch.x.shape[0]
        scaler = _jmp_loss_scale(state.loss_scale)
        step_key = jax.random.fold_in(state.rng, iter_num)

        def micro_step(grads_sum, xs):
            x_BT, y_BT, micro = xs
            (_, loss), grads = grad_fn(state.params, x_BT, y_BT, jax.random.fold_in(step_key, micro), scaler)
            return jax.tree.map(jnp.add, grads_sum, grads), loss

        if M == 1:  # no accumulator to fill and divide: passes over every parameter less
            (_, loss), grads = grad_fn(state.params, batch.x[0], batch.y[0], jax.random.fold_in(step_key, batch.micro[0]), scaler)
        else:
            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
            grads, loss_M = lax.scan(micro_step, zeros, (batch.x, batch.y, batch.micro))
            grads = jax.tree.map(lambda g: g / M, grads)  # nanoGPT's loss / gradient_accumulation_steps
            loss = jnp.mean(loss_M)
        if axis_name is not None and lax.axis_size(axis_name) > 1:  # over one device XLA still copies everything
            grads, loss = lax.pmean((grads, loss), axis_name)  # DDP's all-reduce
        grads = scaler.unscale(grads)

        hyperparams = dict(state.opt_state.hyperparams)
        hyperparams['learning_rate'] = jnp.asarray(lr, hyperparams['learning_rate'].dtype)
        opt_state = state.opt_state._replace(hyperparams=hyperparams)
        updates, new_opt_state = optimizer.update(grads, opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)

        if isinstance(scaler, jmp.DynamicLossScale):
            # GradScaler: skip the step on inf/nan gradients (the same decision on every device,
            # since the gradients were averaged first) and adapt the scale
            finite = jmp.all_finite(grads)
            new_params, new_opt_state = jmp.select_tree(finite, (new_params, new_opt_state), (state.params, opt_state))
            scaler = scaler.adjust(finite)
            loss_scale = LossScale(scaler.loss_scale, scaler.counter)
        else:
            finite, loss_scale = jnp.bool_(True), state.loss_scale
        metrics = {'loss': loss, 'finite': finite, 'loss_scale': jnp.asarray(scaler.loss_scale, jnp.float32)}
        return TrainState(new_params, new_opt_state, loss_scale, state.rng), metrics

    return train_step


def parallel_train_step(train_step, devices):
    """train_step over a run's devices (over_devices); the state is donated, so its buffers are reused for
    the new state. Call with (replicate()d state, sharded batch, lr, iter_num)."""
    return over_devices(train_step, devices, (REPLICA, 0, None, None), (REPLICA, 0), donate_argnums=(0,))


REPLICA = 'replica'  # over_devices' axis for the train state: one copy of it on every device


def single_device(devices):
    """Whether a run is one device in one process (devices: this process's or all the run's): its steps are
    then not pmapped and its state has no device axis (over_devices)."""
    return len(devices) == 1 and jax.process_count() == 1


def over_devices(fn, devices, in_axes, out_axes, donate_argnums=()):
    """fn on each of a run's devices, DDP's way, compiled: the state (axis REPLICA) one copy on every device,
    batches (axis 0) split along their leading device axis, None broadcast; fn sees one device's part (and
    collectives over AXIS). Outputs other than the state come back with a leading device axis. Over several
    devices jax.pmap (the state with a leading device axis too); over a single device jax.jit of a
    jax.shard_map on it, the state without that axis: under pmap XLA copied every donated state buffer after
    the update, pmap's per-device arrays being views without the axis (GPT-2 124M on a CPU: 228 copies, ~5%
    of the step, BENCHMARKS.md)."""
    if not single_device(devices):
        pmap_axes = lambda axes: tuple(0 if a == REPLICA else a for a in axes) if isinstance(axes, tuple) else 0
        return jax.pmap(fn, axis_name=AXIS, in_axes=pmap_axes(in_axes), out_axes=pmap_axes(out_axes),
                        donate_argnums=donate_argnums, devices=devices)
    P = jax.sharding.PartitionSpec
    specs = lambda axes: tuple(P(AXIS) if a == 0 else P() for a in axes) if isinstance(axes, tuple) else P(AXIS)

    def per_device(*args):
        out = fn(*(jax.tree.map(lambda a: a[0], x) if ax == 0 else x for x, ax in zip(args, in_axes)))
        device_axis = lambda o, ax: o if ax == REPLICA else jax.tree.map(lambda v: v[None], o)
        return tuple(map(device_axis, out, out_axes)) if isinstance(out_axes, tuple) else device_axis(out, out_axes)
    # check_vma=False: shard_map cannot tell that the state comes out the same on every device (here there
    # is one; make_train_step skips the all-reduce over it)
    on_device = jax.shard_map(per_device, mesh=jax.sharding.Mesh(np.array(devices), (AXIS,)),
                              in_specs=specs(in_axes), out_specs=specs(out_axes), check_vma=False)
    return jax.jit(on_device, donate_argnums=donate_argnums)


# on a CPU the host shares its cores with the devices: every call of a small model's step costs a dispatch
# and a wait whose time the devices lose (README CPU config, 1000 iterations of train.py: 8 iterations per
# call took 0.94x the wall time of one per call, four alternating pairs, BENCHMARKS.md). A call of about
# this many FLOPs amortises that
CALL_FLOPS = 32e9
MAX_ITERS_PER_CALL = 16


def iters_per_call(platform, flops_per_iter):
    """Iterations train.py runs per compiled call: 1 on GPU/TPU (there the host has cores of its own
    and dispatches ahead of the device) and for big models; on a CPU as many as make ~CALL_FLOPS,
    up to MAX_ITERS_PER_CALL."""
    if platform != 'cpu':
        return 1
    return int(max(1, min(MAX_ITERS_PER_CALL, CALL_FLOPS // max(flops_per_iter, 1))))


def make_train_chunk(train_step, k):
    """chunk(state, batches, lrs, iter0, n) -> (state, metrics): iterations iter0 .. iter0+n-1 (n <= k)
    in one call, each exactly train_step with batches[i] (leading axis k, slots past n unused), lrs[i]
    and iteration iter0+i. metrics: train_step's, each with a leading axis k (entries past n are zeros).
    n is an argument, not a constant: chunks cut short at eval points need no second compile."""
    def chunk(state, batches, lrs, iter0, n):
        if k == 1:  # no loop at all: the plain step
            state, metrics = train_step(state, jax.tree.map(lambda a: a[0], batches), lrs[0], iter0)
            return state, jax.tree.map(lambda v: v[None], metrics)

        def body(i, carry):
            state, metrics = carry
            state, m = train_step(state, jax.tree.map(lambda a: a[i], batches), lrs[i], iter0 + i)
            return state, jax.tree.map(lambda acc, v: acc.at[i].set(v), metrics, m)
        shapes = jax.eval_shape(train_step, state, jax.tree.map(lambda a: a[0], batches), lrs[0], iter0)[1]
        metrics = jax.tree.map(lambda s: jnp.zeros((k,) + s.shape, s.dtype), shapes)
        return lax.fori_loop(0, n, body, (state, metrics))
    return chunk


def parallel_train_chunk(chunk, devices):
    """parallel_train_step for make_train_chunk: call with (replicate()d state, sharded batches
    of shape (devices, k, ...), lrs (k,), iter0, n)."""
    return over_devices(chunk, devices, (REPLICA, 0, None, None, None), (REPLICA, 0), donate_argnums=(0,))


def make_eval_step(config, axis_name=AXIS):
    """eval_step(params, x_KBT, y_KBT, valid_K) -> sum over valid batches of the mean loss, summed
    over devices too: estimate_loss divides by the number of batches. No dropout (model.eval())."""
    forward = model.gpt_forward(config)

    def eval_step(params, x_KBT, y_KBT, valid_K):
        def one(total, xs):
            x_BT, y_BT, valid = xs
            _, loss = forward.apply(params, None, x_BT, y_BT, is_training=False)
            return total + jnp.where(valid, loss, 0.0), None
        total, _ = lax.scan(one, jnp.float32(0.0), (x_KBT, y_KBT, valid_K))
        return total if axis_name is None else lax.psum(total, axis_name)

    return eval_step


def parallel_eval_step(eval_step, devices):
    """eval_step over a run's devices (over_devices): call with (replicate()d params, sharded batches)."""
    return over_devices(eval_step, devices, (REPLICA, 0, 0, 0), 0)


# -----------------------------------------------------------------------------
# the CPU as host devices, and how an iteration's micro-batches go onto devices

HOST_DEVICES = 2  # CPU devices per process (at most one per core); measured on a 2-core machine
# above this many parameters one CPU device is faster: every host device all-reduces the gradients and runs
# its own AdamW update (2 host devices vs 1, measured: 0.8M params 1.5x, 10.7M 1.09x, GPT-2 124M 0.78x)
HOST_DEVICES_MAX_PARAMS = 30_000_000


def use_host_devices(n=HOST_DEVICES):
    """Call before JAX starts its backends. Presents the CPU as n devices (at most one per core), so
    that pmap runs one program per core: on the README CPU config 1.5x faster than one program whose
    every small op is split over the cores (BENCHMARKS.md). An explicit
    --xla_force_host_platform_device_count in XLA_FLAGS (or JAX_NUM_CPU_DEVICES) wins; GPU/TPU runs are
    unaffected."""
    if 'xla_force_host_platform_device_count' in os.environ.get('XLA_FLAGS', '') or 'JAX_NUM_CPU_DEVICES' in os.environ:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    jax.config.update('jax_num_cpu_devices', max(1, min(n, cores)))


def keep_freed_memory(device, n_layer, n_embd):
    """Call before JAX starts its backends. glibc's malloc serves a big block (above 32 MB) with a fresh
    mmap and unmaps it when it is freed, so every call of a compiled step page-faults its temporary
    buffer in again (GPT-2 124M at B=2, T=256: 945 MB, 243K page faults per step, ~10% of the step,
    BENCHMARKS.md). One malloc arena for all threads, no mmap, and no trimming of the heap keep such
    blocks for the next call (the process holds on to its peak memory). Only for a run on the CPU (device
    'cpu', or no GPU/TPU plugin for JAX installed), with glibc, and for models too big for host devices
    (12 * n_layer * n_embd**2 parameters, before the vocabulary is known): there the two devices' programs
    contend for the one arena (README config: iterations 37-38 -> 42-44 ms). Returns whether it applied."""
    if 12 * n_layer * n_embd ** 2 <= HOST_DEVICES_MAX_PARAMS:
        return False
    if device.partition(':')[0] != 'cpu' and (any(True for _ in importlib.metadata.entry_points(group='jax_plugins'))
                                               or any(importlib.util.find_spec(m) for m in ('jax_plugins', 'libtpu'))):
        return False  # an accelerator may take the run
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8  # glibc's malloc.h
    return all(mallopt(k, v) == 1 for k, v in ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1)))  # -1: never trim


class DevicePlan(NamedTuple):
    per_process: int  # devices used in each process
    row_split: int    # devices sharing each micro-batch's rows (1: whole micro-batches, as DDP)
    ranks: int        # groups of devices sharing whole micro-batches (DDP's world size)
    micro_steps: int  # micro-batches per device per iteration
    rows: int         # rows of each micro-batch per device


def plan_devices(n_local, n_processes, accumulation, batch_size, platform, num_params):
    """Which devices share an iteration's `accumulation` micro-batches of `batch_size` rows. Like
    DDP, whole micro-batches are spread over the devices of all processes. A CPU's host devices are
    one machine's cores, not DDP ranks: groups of row_split of them may instead share each
    micro-batch's rows when there are too few micro-batches (the README CPU config has one); the
    smallest such row_split is chosen, failing all one device per process. Either way an iteration
    computes the same mean gradient over the same tokens. Host devices only for models up to
    HOST_DEVICES_MAX_PARAMS. ValueError when accumulation does not divide over the ranks."""
    per_process, r = n_local, 1
    if platform == 'cpu':
        fits = [r for r in range(1, n_local + 1) if n_local % r == 0 and batch_size % r == 0
                and accumulation % (n_processes * n_local // r) == 0] if num_params <= HOST_DEVICES_MAX_PARAMS else []
        per_process, r = (n_local, fits[0]) if fits else (1, 1)
    ranks = n_processes * per_process // r
    if accumulation % ranks != 0:
        raise ValueError(f"gradient_accumulation_steps={accumulation} must be divisible by the number of devices ({ranks})")
    return DevicePlan(per_process, r, ranks, accumulation // ranks, batch_size // r)


def arrange(a_GB, ranks, row_split):
    """(accumulation, batch_size, ...) -> (devices, micro_steps, batch_size // row_split, ...) in pmap
    order: device p takes the micro-batches of rank p // row_split, rows part p % row_split of them."""
    G, B = a_GB.shape[:2]
    a = a_GB.reshape(ranks, G // ranks, row_split, B // row_split, *a_GB.shape[2:])
    return np.swapaxes(a, 1, 2).reshape(ranks * row_split, G // ranks, B // row_split, *a_GB.shape[2:])


def micro_ids(ranks, row_split, micro_steps):
    """Batch.micro for every device, (devices, micro_steps): micro-batch g's rows part k is g * row_split + k,
    so each micro-batch (and each part of one) draws its own dropout key. With row_split 1, simply g."""
    g = np.arange(ranks * micro_steps).reshape(ranks, 1, micro_steps)
    return (g * row_split + np.arange(row_split)[None, :, None]).reshape(ranks * row_split, micro_steps).astype(np.int32)


# -----------------------------------------------------------------------------
# devices: one copy of the state per device, one slice of the batch per device

def device_sharding(devices, replicated=False):
    """The layout of batches and per-device outputs: leading axis split over the devices; or, replicated,
    a whole copy on every device (the state on a single device, over_devices)."""
    mesh = jax.sharding.Mesh(np.array(devices), (AXIS,))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec() if replicated else jax.sharding.PartitionSpec(AXIS))


def replicate(tree, devices):
    """One copy of every leaf on each of this process's devices along a leading device axis, the state's
    layout in over_devices; on a single device (single_device) the leaf itself. A leaf already there is not
    copied: a step that donates the state deletes it."""
    if single_device(devices):
        return jax.device_put(tree, device_sharding(devices, replicated=True))
    sharding = device_sharding(devices)
    return jax.tree.map(lambda a: jax.device_put(np.broadcast_to(np.asarray(a)[None], (len(devices),) + np.shape(a)),
                                                 sharding), tree)


def unreplicate(tree, devices):
    """replicate's inverse: the first local device's copy, as numpy arrays on the host. Read from the shard
    itself: a[0] would compile an indexing op for every parameter shape (0.5s at the first checkpoint of the
    README config)."""
    def first(a):
        if not hasattr(a, 'shape') or np.ndim(a) == 0:
            return a
        if single_device(devices):
            return np.asarray(a)
        if isinstance(a, jax.Array):
            return np.asarray(a.addressable_shards[0].data).reshape(a.shape[1:])
        return np.asarray(a[0])
    return jax.tree.map(first, tree)


def shard(tree, devices):
    """numpy arrays with a leading axis of len(devices) -> device arrays, slice i on device i."""
    return jax.device_put(tree, device_sharding(devices))  # one call for the whole tree: half the host time of one per leaf


# -----------------------------------------------------------------------------
# data: windows of a uint16 token file, drawn as a pure function of (seed, purpose, iteration)

PURPOSE = {'train': 0, 'val': 1, 'eval_train': 2}  # eval's train batches differ from the step's


def batch_indices(seed, purpose, it, num_tokens, block_size, shape):
    """Window starts in [0, num_tokens - block_size) for iteration `it`, shape e.g.
    (micro-batches, batch_size). The same arguments give the same starts on any machine,
    process or device layout, so a resumed run reads what the uninterrupted one would."""
    rng = np.random.default_rng([seed, PURPOSE[purpose], it])
    return rng.integers(0, num_tokens - block_size, size=shape)


def get_batch(data, starts, block_size):
    """x, y int32 arrays of shape starts.shape + (block_size,): y is x shifted by one token."""
    window = np.asarray(data[starts[..., None] + np.arange(block_size + 1)], dtype=np.int32)
    return window[..., :-1], window[..., 1:]


class Prefetcher:
    """Makes batches on a background thread and copies them to the devices ahead of use
    (pin_memory + non_blocking's role). make(i) returns the pytree of numpy arrays for iteration
    i; get(i) returns it on the devices. Iterations must be asked for in order from `start`, each
    followed by after(i) (i + 1 unless given: train.py's chunks of iterations)."""

    def __init__(self, make, devices, start, depth=2, after=lambda i: i + 1):
        self._make, self._devices, self._next, self._after = make, devices, start, after
        self._queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(start,), daemon=True)
        self._thread.start()

    def _run(self, i):
        while not self._stop.is_set():
            try:
                item = (i, shard(self._make(i), self._devices), None)
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
        got, batch, error = self._queue.get()
        if error is not None:
            raise error
        self._next = self._after(i)
        return batch

    def close(self):
        self._stop.set()
        self._thread.join(timeout=5)


# -----------------------------------------------------------------------------
# compile ahead of time, and ask XLA how much memory the step needs

def abstract(tree):
    """ShapeDtypeStructs of a pytree of arrays (or of ShapeDtypeStructs)."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), tree)


def with_device_axis(tree, devices):
    """ShapeDtypeStructs of a tree of per-device shapes, with the leading device axis that shard() gives
    them (and on a single device its layout, which jax.jit compiles for)."""
    sharding = device_sharding(devices) if single_device(devices) else None
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct((len(devices),) + tuple(np.shape(a)), a.dtype, sharding=sharding), tree)


def replica_shapes(tree, devices):
    """ShapeDtypeStructs of what replicate(tree, devices) gives."""
    if not single_device(devices):
        return with_device_axis(tree, devices)
    sharding = device_sharding(devices, replicated=True)
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype, sharding=sharding), tree)


def compile_ahead(*jobs):
    """jobs: (fn, args) pairs -> [(compiled, seconds)]: fn.lower(*args).compile() for each, args may be
    ShapeDtypeStructs; seconds runs from the start of the job's lowering to the end of its compile. Each job
    is lowered in turn (tracing is Python) and handed to its own thread to compile: XLA releases the GIL
    for much of a compile, so on a multi-core CPU the compiles overlap in part (BENCHMARKS.md)."""
    def compile_one(lowered, t0):
        compiled = lowered.compile()
        return compiled, time.time() - t0

    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        futures = []
        for fn, args in jobs:
            t0 = time.time()
            futures.append(pool.submit(compile_one, fn.lower(*args), t0))
        return [f.result() for f in futures]


def compiled_bytes(compiled):
    """XLA's estimate of the peak memory one device needs to run the compiled function:
    arguments + outputs not aliased to donated arguments + temporaries + code. None if unknown."""
    try:
        m = compiled.memory_analysis()
    except Exception:
        return None
    if m is None:
        return None
    if isinstance(m, (list, tuple)):
        m = m[0]
    return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
            + m.temp_size_in_bytes + m.generated_code_size_in_bytes)


def device_memory_bytes(device):
    """Memory available to one device: its allocator limit on GPU/TPU; on CPU the machine's RAM
    (shared by all host devices). None if unknown."""
    try:
        stats = device.memory_stats()
    except Exception:
        stats = None
    if stats and stats.get('bytes_limit'):
        return int(stats['bytes_limit'])
    if device.platform == 'cpu':
        try:
            return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
        except (ValueError, OSError, AttributeError):
            return None
    return None
