"""
Devices and processes: where train.py, sample.py and bench.py run, and how a step runs there.

In the order a script needs them: what must be set before JAX starts its backends (the platform,
the CPU's cores as host devices, malloc); several processes as one run (jax.distributed, the role
of torchrun and init_process_group); device and dtype selection; the device plan (which device
computes which rows of an iteration); a step over the devices (jax.pmap, DDP's role) with the
state and batches on them; the state sharded over a device mesh and one jit step over it (fsdp, FSDP's
role); and compiling ahead of time on shapes, with XLA's memory estimate.
Functions take what they need as arguments. die() is the scripts' one way to stop on bad input.
"""
import concurrent.futures
import ctypes
import importlib.metadata
import importlib.util
import math
import os
import sys
import threading
import time
import zlib
from typing import Any, NamedTuple

import numpy as np
import jax
from tqdm import tqdm

AXIS = 'batch'  # the pmap axis: the devices sharing one iteration (DDP's world)
REPLICA = 'replica'  # over_devices' in/out axis for the train state: a whole copy on every device
DTYPES = ('float32', 'bfloat16', 'float16')


def die(msg):
    """Known bad input or state: one clear line on stderr, exit status 1, no traceback."""
    if _dying.acquire(blocking=False):  # one line, even when a background thread fails at the same moment
        print(f"error: {msg}", file=sys.stderr)
    if jax.distributed.is_initialized():
        exit_alone(1)
    sys.exit(1)


_dying = threading.Lock()


def on_interrupt(describe):
    """Ctrl-C from here on, wherever it lands: one line, `error: ` and describe(), exit status 130, no
    traceback. A save it interrupts has removed its temp file by then (checkpoint.save_checkpoint)."""
    previous = sys.excepthook

    def excepthook(kind, value, tb):
        if not issubclass(kind, KeyboardInterrupt):
            return previous(kind, value, tb)
        print(f"error: {describe()}", file=sys.stderr)
        exit_alone(130)
    sys.excepthook = excepthook


def exit_alone(code):
    """Leaves at once, without exit handlers: in a multi-process run jax.distributed's waits up to 5 minutes
    for every process, where the others' next collective should fail at once instead. Process 0 hosts the
    coordinator, so it leaves last, after a moment in which the others can report the same error themselves."""
    sys.stdout.flush()
    sys.stderr.flush()
    if jax.distributed.is_initialized() and jax.process_index() == 0:
        time.sleep(2)
    os._exit(code)


# -----------------------------------------------------------------------------
# before JAX starts its backends

PLATFORMS = {'cuda': 'gpu', 'gpu': 'gpu', 'rocm': 'gpu', 'cpu': 'cpu', 'tpu': 'tpu', 'mps': 'METAL'}
HOST_DEVICES = 2  # CPU devices per process, at most one per core (measured on a 2-core machine)
HOST_DEVICES_MAX_PARAMS = 30_000_000  # above this one CPU device is faster (each host device runs its own AdamW)


def pin_platform(device):
    """--device=cpu runs on the CPU even where JAX also has a GPU: its backends then never start, and
    backends.on_cpu(), which picks the CPU's speed paths, holds for the model and the optimizer alike."""
    if device.partition(':')[0] == 'cpu':
        jax.config.update('jax_platforms', 'cpu')


def use_host_devices(n=HOST_DEVICES):
    """Presents the CPU as n devices (at most one per core), so that pmap runs one program per core rather
    than one program whose every small op is split over the cores. An explicit
    --xla_force_host_platform_device_count in XLA_FLAGS (or JAX_NUM_CPU_DEVICES) wins."""
    if 'xla_force_host_platform_device_count' in os.environ.get('XLA_FLAGS', '') or 'JAX_NUM_CPU_DEVICES' in os.environ:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    jax.config.update('jax_num_cpu_devices', max(1, min(n, cores)))


def keep_freed_memory(device, n_layer, n_embd):
    """glibc's malloc serves a block above 32 MB with a fresh mmap and unmaps it when freed, so every call of
    a big model's step page-faults its temporary buffer in again. One arena, no mmap and no trimming keep
    such blocks for the next call (the process holds on to its peak memory). Only for a run on the CPU,
    with glibc, and for models too big for host devices (12 * n_layer * n_embd**2 parameters), whose two
    devices would contend for the one arena. Returns whether it applied."""
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
    return all(mallopt(k, v) == 1 for k, v in ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1)))


# -----------------------------------------------------------------------------
# several processes as one run: torchrun's and init_process_group's role

def start_processes(coordinator_address, num_processes, process_id, backend, config, may_differ=()):
    """Joins the multi-process run when one is asked for (num_processes > 1, or coordinator_address 'auto'
    where JAX reads a cluster's own variables), then checks that every process got the same settings
    (config, except the keys in may_differ): another model or batch would compile another program and the
    collectives would pair up wrongly. Missing values come from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES
    and JAX_PROCESS_ID. Call before anything asks JAX for devices."""
    coordinator_address = coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS', '')
    try:
        num_processes = num_processes or int(os.environ.get('JAX_NUM_PROCESSES', '1'))
        process_id = process_id if process_id >= 0 else int(os.environ.get('JAX_PROCESS_ID', '-1'))
    except ValueError:
        die("JAX_NUM_PROCESSES and JAX_PROCESS_ID must be integers")
    auto = coordinator_address == 'auto'
    if num_processes <= 1 and not auto:
        return
    if not auto:
        if not coordinator_address:
            die(f"num_processes={num_processes} needs a coordinator: set --coordinator_address=host:port of process 0 "
                f"(or JAX_COORDINATOR_ADDRESS), the same on every process")
        if not 0 <= process_id < num_processes:
            die(f"process_id={process_id}: give each process its own --process_id (or JAX_PROCESS_ID) in [0, {num_processes})")
    jax.config.update('jax_cpu_collectives_implementation', 'mpi' if backend == 'mpi' else 'gloo')
    try:
        if auto:
            jax.distributed.initialize(None, num_processes if num_processes > 1 else None, process_id if process_id >= 0 else None)
        else:
            jax.distributed.initialize(coordinator_address, num_processes, process_id)
    except Exception as e:  # a cluster JAX does not recognise, an unreachable coordinator, a port in use
        reason = str(e).strip().splitlines()[0].rstrip('.') if str(e).strip() else type(e).__name__
        if auto and 'coordinator_address should be defined' in reason:
            reason = "JAX detects no cluster here"
        hint = ("JAX recognises Cloud TPU pods, SLURM, Open MPI and Kubernetes; elsewhere give "
                "--coordinator_address=host:port --num_processes=N --process_id=I" if auto else
                "start the same command on every process, with the same coordinator (process 0's host and a free port)")
        die(f"cannot join the multi-process run (coordinator_address={coordinator_address!r}): {reason}; {hint}")

    def excepthook(kind, value, tb, default=sys.excepthook):
        # a collective fails in every other process when one process stops (its own error is in its output)
        if isinstance(value, jax.errors.JaxRuntimeError):
            print(f"error: process {jax.process_index()} of {jax.process_count()}: {str(value).strip().splitlines()[0]}; "
                  f"if another process stopped first, its output says why", file=sys.stderr)
        else:
            default(kind, value, tb)
        exit_alone(1)
    sys.excepthook = excepthook
    from jax.experimental import multihost_utils
    keys = sorted(k for k in config if k not in may_differ)
    fingerprint = np.array([zlib.crc32(repr(config[k]).encode()) for k in keys], np.uint32)
    differ = [k for k, col in zip(keys, multihost_utils.process_allgather(fingerprint).T) if len(set(col.tolist())) > 1]
    if differ:
        die(f"the processes were started with different settings ({', '.join(differ)}): run the same command on every host")


# -----------------------------------------------------------------------------
# device and dtype selection

def select_devices(device):
    """The devices `device` names: a platform ('cpu', 'cuda', 'tpu'; 'cuda' falls back to JAX's default
    platform when there is no GPU), optionally one device of it ('cuda:1'). Every process's devices."""
    name, _, index = device.partition(':')
    platform = PLATFORMS.get(name, name)
    try:
        devices = jax.devices(platform)
    except RuntimeError:
        if platform != 'gpu' or index:
            die(f"device={device!r}: JAX has no {name} platform here (it has {jax.default_backend()}); try --device=cpu")
        devices = jax.devices()
        print(f"device={device!r} but JAX finds no GPU: running on {devices[0].platform}")
    if index:
        if not index.isdigit() or int(index) >= len(devices):
            die(f"device={device!r}: there are {len(devices)} {name} devices")
        if jax.process_count() > 1:
            die(f"device={device!r}: pick one device only in a single-process run")
        devices = [devices[int(index)]]
    return devices


def select_dtype(dtype, platform):
    """'auto' is bfloat16 on GPU/TPU and float32 on the CPU (where float32 is the fast one)."""
    if dtype == 'auto':
        return 'bfloat16' if platform in ('gpu', 'tpu') else 'float32'
    if dtype not in DTYPES:
        die(f"dtype must be 'float32', 'bfloat16' or 'float16', got {dtype!r}")
    return dtype


# dense bf16 peak FLOP/s by device kind (a substring of jax's device_kind), the unit of MFU
PEAK_FLOPS = {
    'H200': 989e12, 'H100': 989e12, 'A100': 312e12, 'A10G': 125e12, 'L4': 121e12, 'V100': 125e12,
    'RTX 4090': 165e12, 'RTX 3090': 71e12,
    'TPU v6': 918e12, 'TPU v5p': 459e12, 'TPU v5 lite': 197e12, 'TPU v5e': 197e12, 'TPU v4': 275e12,
}


def device_peak_flops(device):
    """A device's peak FLOP/s from PEAK_FLOPS, or None when unknown (e.g. a CPU: measure it)."""
    return next((flops for name, flops in PEAK_FLOPS.items() if name.lower() in device.device_kind.lower()), None)


# -----------------------------------------------------------------------------
# the device plan: which device computes which rows of an iteration

CALL_FLOPS = 32e9  # on a CPU, a compiled call of about this many FLOPs amortises its dispatch
MAX_ITERS_PER_CALL = 16


class DevicePlan(NamedTuple):
    devices: list        # the devices sharing an iteration, every process's, in pmap order
    local_devices: list  # this process's among them
    row_split: int       # each micro-batch's rows are split over this many devices (1: DDP's whole micro-batches)
    micro_steps: int     # micro-batches per device per iteration
    rows: int            # rows of each of them: batch_size // row_split
    iters_per_call: int  # iterations per compiled call
    fsdp: int = 1        # devices sharing (sharding) each parameter, gradient and moment; 1: DDP's whole copies


def split_rows(n_local, n_processes, accumulation, batch_size, platform, num_params):
    """(devices used per process, row_split). As DDP, whole micro-batches go to the devices of every process.
    A CPU's host devices are one machine's cores, not DDP ranks: when there are too few micro-batches they
    split each micro-batch's rows instead (the smallest such split; failing all, one device per process),
    and only for models up to HOST_DEVICES_MAX_PARAMS. The same mean gradient over the same tokens either
    way. ValueError when the micro-batches do not divide over the devices."""
    per_process, row_split = n_local, 1
    if platform == 'cpu':
        fits = [r for r in range(1, n_local + 1) if n_local % r == 0 and batch_size % r == 0
                and accumulation * r % (n_processes * n_local) == 0] if num_params <= HOST_DEVICES_MAX_PARAMS else []
        per_process, row_split = (n_local, fits[0]) if fits else (1, 1)
    ranks = n_processes * per_process // row_split
    if accumulation % ranks != 0:
        raise ValueError(f"gradient_accumulation_steps={accumulation} must be divisible by the number of devices ({ranks})")
    return per_process, row_split


def plan_devices(devices, accumulation, batch_size, num_params, flops_per_iter, iters_per_call=0, fsdp=1):
    """The DevicePlan of a run over `devices` (select_devices'). iters_per_call 0: several iterations per
    call for small models on a CPU, where the host shares its cores with the devices and every call costs
    them time; one elsewhere (there the host dispatches ahead of the device). fsdp > 1: every device, whole
    micro-batches, a mesh of (devices / fsdp) data-parallel groups x fsdp shards. ValueError as split_rows,
    or when fsdp does not divide the devices."""
    platform = devices[0].platform
    by_process = {}
    for d in devices:
        by_process.setdefault(d.process_index, []).append(d)
    n_local = len(by_process[jax.process_index()])
    if fsdp > 1 and len(devices) == 1:
        raise ValueError(f"fsdp={fsdp} shards the state over several devices but this run has one: use --fsdp=1")
    if fsdp > 1 and len(devices) % fsdp:
        raise ValueError(f"fsdp={fsdp} must divide the number of devices ({len(devices)}): e.g. --fsdp={len(devices)}")
    # under fsdp every device takes whole micro-batches, a CPU's host devices too
    per_process, row_split = split_rows(n_local, len(by_process), accumulation, batch_size,
                                        platform if fsdp == 1 else 'mesh', num_params)
    devices = [d for p in sorted(by_process) for d in by_process[p][:per_process]]
    if iters_per_call == 0:
        iters_per_call = 1 if platform != 'cpu' else int(max(1, min(MAX_ITERS_PER_CALL, CALL_FLOPS // max(flops_per_iter, 1))))
    return DevicePlan(devices, by_process[jax.process_index()][:per_process], row_split,
                      accumulation * row_split // len(devices), batch_size // row_split, iters_per_call, fsdp)


def split_batch(a_GB, plan):
    """An iteration's (micro-batches, batch_size, ...) rows -> this process's share, (local devices,
    micro_steps, rows, ...). Micro-batch g's rows part k becomes micro-batch g * row_split + k of rows rows,
    and device p of the plan takes micro-batches p * micro_steps onwards."""
    a = a_GB.reshape(len(plan.devices), -1, plan.rows, *a_GB.shape[2:])
    return a[[plan.devices.index(d) for d in plan.local_devices]]


# -----------------------------------------------------------------------------
# a step over the devices, and the state and batches on them

def single_device(devices):
    """One device in one process: its steps are not pmapped and the state has no device axis (over_devices)."""
    return len(devices) == 1 and jax.process_count() == 1


def device_sharding(devices, replicated=False):
    """Batches' layout: the leading axis split over the devices. Replicated: a whole copy on every device."""
    mesh = jax.sharding.Mesh(np.array(devices), (AXIS,))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec() if replicated else jax.sharding.PartitionSpec(AXIS))


class OverDevices(NamedTuple):
    """A function compiled over a run's devices (over_devices); compile it with compile_ahead."""
    fn: Any        # jax.pmap, or on a single device jax.jit
    in_axes: tuple
    devices: list


def over_devices(fn, devices, in_axes, out_axes, donate_argnums=()):
    """fn on each device, DDP's way: arguments with axis REPLICA are the state, a whole copy on every
    device; axis 0, batches split along their leading device axis; None, the same value for all. fn sees one
    device's part, and collectives over AXIS. Outputs other than the state come back with a leading device
    axis. Over several devices jax.pmap (the state with a device axis too); over a single device jax.jit of
    a shard_map, whose state has no such axis and is updated in place, where pmap copied it every step."""
    if not single_device(devices):
        pmap_axes = lambda axes: tuple(0 if a == REPLICA else a for a in axes) if isinstance(axes, tuple) else 0
        return OverDevices(jax.pmap(fn, axis_name=AXIS, in_axes=pmap_axes(in_axes), out_axes=pmap_axes(out_axes),
                                    donate_argnums=donate_argnums, devices=devices), in_axes, devices)
    P = jax.sharding.PartitionSpec
    specs = lambda axes: tuple(P(AXIS) if a == 0 else P() for a in axes) if isinstance(axes, tuple) else P(AXIS)

    def per_device(*args):
        out = fn(*(jax.tree.map(lambda a: a[0], x) if ax == 0 else x for x, ax in zip(args, in_axes)))
        device_axis = lambda o, ax: o if ax == REPLICA else jax.tree.map(lambda v: v[None], o)
        return tuple(map(device_axis, out, out_axes)) if isinstance(out_axes, tuple) else device_axis(out, out_axes)
    # check_vma=False: shard_map cannot tell that the state comes out the same on every device (there is one)
    on_device = jax.shard_map(per_device, mesh=jax.sharding.Mesh(np.array(devices), (AXIS,)),
                              in_specs=specs(in_axes), out_specs=specs(out_axes), check_vma=False)
    return OverDevices(jax.jit(on_device, donate_argnums=donate_argnums), in_axes, devices)


def replicate(tree, devices):
    """One copy of every leaf on each of this process's devices, along a leading device axis (on a single
    device, without it): the state's layout in over_devices."""
    if single_device(devices):
        return jax.device_put(tree, device_sharding(devices, replicated=True))
    sharding = device_sharding(devices)
    return jax.tree.map(lambda a: jax.device_put(np.broadcast_to(np.asarray(a)[None], (len(devices),) + np.shape(a)),
                                                 sharding), tree)


def unreplicate(tree, devices):
    """replicate's inverse: the first local device's copy, as numpy arrays on the host (read off the shard
    itself: indexing would compile an op for every parameter shape)."""
    def first(a):
        if not hasattr(a, 'shape') or np.ndim(a) == 0:
            return a
        if single_device(devices):
            return np.asarray(a)
        if isinstance(a, jax.Array):
            return np.asarray(a.addressable_shards[0].data).reshape(a.shape[1:])
        return np.asarray(a[0])
    return jax.tree.map(first, tree)


def shard(tree, where):
    """numpy arrays with a leading device axis -> device arrays, slice i on device i. where: the devices, or
    a sharding (batch_sharding's)."""
    sharding = where if isinstance(where, jax.sharding.Sharding) else device_sharding(where)
    return jax.device_put(tree, sharding)  # one call for the whole tree: half the time of one per leaf


def first_shard(a):
    """A per-device output as numpy, the first local device's part (the same on every device after a pmean)."""
    return np.asarray(a.addressable_shards[0].data)


# -----------------------------------------------------------------------------
# the state sharded over a mesh (FSDP, ZeRO-3): GSPMD partitions one jit-compiled step

DATA, SHARDS = 'data', 'fsdp'  # the mesh's axes: data-parallel groups x the devices sharing each array
MIN_SHARDED = 2 ** 14  # elements; smaller arrays (biases, LayerNorms, counters, the PRNG key) stay whole


def mesh_of(plan):
    """(devices / fsdp) x fsdp devices, in the plan's order: a group's shards on neighbouring devices."""
    return jax.sharding.Mesh(np.array(plan.devices).reshape(-1, plan.fsdp), (DATA, SHARDS))


def fsdp_sharding(mesh, shape):
    """An array's layout under fsdp: split over SHARDS along its longest axis that they divide (a parameter
    and its moments alike, the rule reading only the shape), whole on every device when none does or it is small."""
    n = mesh.shape[SHARDS]
    axes = [i for i in sorted(range(len(shape)), key=lambda i: -shape[i]) if shape[i] % n == 0]
    spec = [None] * len(shape)
    if axes and math.prod(shape) >= MIN_SHARDED:
        spec[axes[0]] = SHARDS
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))


def state_sharding(tree, plan):
    """fsdp_sharding of every leaf of a pytree of arrays or shapes."""
    mesh = mesh_of(plan)
    return jax.tree.map(lambda a: fsdp_sharding(mesh, np.shape(a)), tree)


class OverMesh(NamedTuple):
    """A function compiled once for the whole mesh (over_mesh); compile it with compile_ahead."""
    fn: Any        # jax.jit with the shardings
    in_axes: tuple
    devices: list
    mesh: Any


def batch_sharding(plan):
    """The layout of this process's batches, leading axis over its devices in the plan's order (shard's)."""
    if plan.fsdp == 1:
        return device_sharding(plan.local_devices)
    return jax.sharding.NamedSharding(mesh_of(plan).local_mesh, jax.sharding.PartitionSpec((DATA, SHARDS)))


def over_mesh(fn, plan, in_axes, out_axes, state, donate_argnums=()):
    """fn once over the plan's mesh, GSPMD's way: arguments with axis REPLICA are the state (or its
    parameters), laid out as state_sharding of `state`, their shapes; axis 0, batches split along their
    leading device axis as over_devices takes them, which fn sees whole; None, the same value for all.
    Outputs (axes as over_devices'): REPLICA laid out as the state, the rest replicated. XLA inserts the
    collectives: all-gathers of the parameters where they are used, the gradients' reduction onto their shards."""
    P, mesh = jax.sharding.PartitionSpec, mesh_of(plan)
    layout = {REPLICA: state_sharding(state, plan), 0: jax.sharding.NamedSharding(mesh, P((DATA, SHARDS))),
              None: jax.sharding.NamedSharding(mesh, P())}
    out = lambda a: layout[REPLICA] if a == REPLICA else layout[None]
    outs = tuple(map(out, out_axes)) if isinstance(out_axes, tuple) else out(out_axes)
    return OverMesh(jax.jit(fn, in_shardings=tuple(layout[a] for a in in_axes), out_shardings=outs,
                            donate_argnums=donate_argnums), in_axes, plan.devices, mesh)


def put_state(tree, plan):
    """The train state (or its parameters) where the plan's step takes it, from host arrays or arrays on a
    device: a whole copy on each local device (replicate); under fsdp each device's slices only (state_sharding)."""
    if plan.fsdp == 1:
        return replicate(tree, plan.local_devices)

    def place(a, sharding):
        if isinstance(a, jax.Array) and (a.sharding == sharding or not a.is_fully_addressable):
            return jax.device_put(a, sharding)  # laid out already, or in another layout of the mesh's
        a = np.asarray(a)  # from the host, each device's slice
        return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])
    return jax.tree.map(place, tree, state_sharding(tree, plan))


def get_state(tree, plan):
    """put_state's inverse: numpy arrays on the host, gathered one array at a time (so the host holds one
    whole copy of the state and no device more than its share plus one array). Under fsdp across processes
    every process must call it (the gathers are collectives)."""
    if plan.fsdp == 1:
        return unreplicate(tree, plan.local_devices)
    from jax.experimental import multihost_utils

    def gather(a):
        if a.is_fully_addressable:
            return np.asarray(a)
        if a.is_fully_replicated:
            return np.asarray(a.addressable_data(0))
        return np.asarray(multihost_utils.process_allgather(a, tiled=True))
    return jax.tree.map(gather, tree)


# -----------------------------------------------------------------------------
# the host's view of a long compiled loop

class Progress:
    """A tqdm bar fed from inside a compiled loop through a host callback (e.g. model.make_generate's
    on_tokens): called with the steps done, it returns at which step it wants to be called next, about
    `every` seconds later, since each callback stalls the loop (~0.7 ms on a CPU). The bar appears only once
    the work has run for `delay` seconds. start(total) before each run, close() after."""

    def __init__(self, desc, every=0.25, delay=2.0, disable=False):
        self.desc, self.every, self.delay, self.disable, self.bar = desc, every, delay, disable, None

    def start(self, total, desc=None):
        self.bar = tqdm(total=total, desc=desc or self.desc, delay=self.delay, disable=self.disable, leave=False)
        self.t, self.n = time.time(), 0

    def __call__(self, n, *args):
        n = int(n)
        self.show(n, *map(np.asarray, args))  # numpy: a jax array sliced anew each call would compile each time
        now = time.time()
        per_second = max(n - self.n, 1) / max(now - self.t, 1e-6)
        self.t, self.n = now, n
        return np.int32(min(n + max(1, int(per_second * self.every)), 2 ** 31 - 1))  # the loop counts in int32

    def show(self, n, *args):
        self.bar.update(n - self.bar.n)

    def close(self):
        self.bar.close()


# -----------------------------------------------------------------------------
# compiling ahead of time on shapes, and XLA's estimate of the memory a step needs

def abstract(tree):
    """ShapeDtypeStructs of a pytree of arrays (or of ShapeDtypeStructs)."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), tree)


def _lowering_shapes(step, local_devices, args):
    """The abstract arguments an OverDevices step lowers on, from one device's: the device axis added as
    replicate and shard add it. Across processes pmap lowers on global shapes (every process's devices):
    ShapedArrays, which it reads as such."""
    n = len(step.devices)
    if isinstance(step, OverMesh):  # a batch's global shape; the state as it is
        return [jax.tree.map(lambda a: jax.ShapeDtypeStruct((n,) + np.shape(a), a.dtype), arg) if ax == 0 else arg
                for arg, ax in zip(args, step.in_axes)]
    if jax.process_count() > 1:
        return [arg if ax is None else jax.tree.map(lambda a: jax.core.ShapedArray((n,) + np.shape(a), a.dtype), arg)
                for arg, ax in zip(args, step.in_axes)]
    single = single_device(step.devices)
    sharding = {REPLICA: device_sharding(step.devices, replicated=True) if single else None,
                0: device_sharding(step.devices) if single else None}
    lead = lambda ax: () if ax == REPLICA and single else (len(local_devices),)
    return [arg if ax is None else jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(lead(ax) + np.shape(a), a.dtype, sharding=sharding[ax]), arg)
        for arg, ax in zip(args, step.in_axes)]


def _local_view(compiled, step, local_devices):
    """Across processes the compiled step takes and returns global arrays: converts this process's parts to
    and from them, as a plain pmap call does."""
    if jax.process_count() == 1:
        return compiled
    from jax.experimental import multihost_utils
    mesh = jax.sharding.Mesh(np.array(step.devices), (AXIS,))
    P = jax.sharding.PartitionSpec
    specs = tuple(P() if ax is None else P(AXIS) for ax in step.in_axes)
    if isinstance(step, OverMesh):  # the state is global already; batches become global, outputs stay so
        def run(*args):
            return compiled(*(multihost_utils.host_local_array_to_global_array(a, step.mesh, P((DATA, SHARDS)))
                              if ax == 0 else a for a, ax in zip(args, step.in_axes)))
        run.memory_analysis = compiled.memory_analysis
        return run

    def run(*local_args):
        out = compiled(*multihost_utils.host_local_array_to_global_array(local_args, mesh, specs))
        return multihost_utils.global_array_to_host_local_array(out, mesh, P(AXIS))
    run.memory_analysis = compiled.memory_analysis
    return run


def compile_ahead(jobs, local_devices, compiler_options=None):
    """jobs: {name: (fn, args)}, fn an OverDevices or OverMesh (args as one device sees them, e.g.
    ShapeDtypeStructs: the device axes are added here; OverMesh's state whole) or a jax.jit function (args as given). Returns {name: (compiled, seconds)},
    seconds from the start of its lowering to the end of its compile. Each job is lowered in turn (tracing
    is Python) and compiled on a thread of its own: XLA releases the GIL for much of a compile, so the
    compiles overlap. Compiled steps take this process's arrays. compiler_options: XLA's, for every job."""
    def compile_one(name, lowered, t0):
        return name, lowered.compile(compiler_options), time.time() - t0

    with jax.default_device(local_devices[0]), concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        futures = []
        for name, (fn, args) in jobs.items():
            t0 = time.time()
            if isinstance(fn, (OverDevices, OverMesh)):
                futures.append((fn, pool.submit(compile_one, name, fn.fn.lower(*_lowering_shapes(fn, local_devices, args)), t0)))
            else:
                futures.append((None, pool.submit(compile_one, name, fn.lower(*args), t0)))
        done = {}
        for fn, future in futures:
            name, compiled, seconds = future.result()
            done[name] = (compiled if fn is None else _local_view(compiled, fn, local_devices), seconds)
        return done


def compiled_bytes(compiled):
    """XLA's estimate of the peak memory one device needs to run a compiled function: arguments, outputs
    not aliased to donated arguments, temporaries and code. None if unknown."""
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
    """Memory available to one device: its allocator's limit on GPU/TPU; on the CPU the machine's RAM
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


def process_bytes(compiled, local_devices):
    """XLA's estimate of the memory the biggest of the compiled functions needs on one of this process's
    devices; on a CPU, where host devices share the machine's RAM, on all of them. None if unknown."""
    need = [compiled_bytes(c) for c in compiled]
    if None in need:
        return None
    return max(need) * (len(local_devices) if local_devices[0].platform == 'cpu' else 1)


def check_memory(compiled, local_devices, other_settings=None):
    """Prints XLA's estimate of the memory the compiled functions need on this process's devices, and dies
    when that is more than they have. other_settings: called then, (flags, [compiled], local devices) of
    settings that might fit, whose estimates the refusal lists."""
    need = process_bytes(compiled, local_devices)
    if need is None:
        return
    device = local_devices[0]
    have = device_memory_bytes(device)
    where = f"{len(local_devices)} cpu device(s) (machine RAM)" if device.platform == 'cpu' else f"one {device.device_kind}"
    print(f"memory: the compiled step needs ~{need / 2**30:.3f} GiB (XLA estimate) on {where}, which has "
          + (f"{have / 2**30:.2f} GiB" if have else "an unknown amount"))
    if have and need > have:
        estimates = [(flags, process_bytes(c, devices)) for flags, c, devices in (other_settings() if other_settings else [])]
        others = ", ".join(f"{flags} ~{b / 2**30:.2f} GiB" + (" (fits)" if b <= have else "") for flags, b in estimates if b)
        die(f"the compiled training step needs ~{need / 2**30:.2f} GiB but {where} has {have / 2**30:.2f} GiB"
            + (f"; XLA's estimates with {others}" if others else "")
            + ": take a setting that fits, or lower --batch_size (raise --gradient_accumulation_steps to keep the "
              "tokens per iteration), --block_size or the model size")
