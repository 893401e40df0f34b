"""Where a run computes: processes, devices, dtype, the mesh and its layouts, the memory check."""
import concurrent.futures
import contextlib
import math
import os
import sys
import time
import zlib

import numpy as np
import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cli import die, exit_alone

PLATFORMS = {'cuda': 'gpu', 'gpu': 'gpu', 'rocm': 'gpu', 'cpu': 'cpu', 'tpu': 'tpu', 'mps': 'METAL'}

def pin_platform(device):  # --device=cpu even where JAX also has a GPU
    if device.partition(':')[0] == 'cpu':
        jax.config.update('jax_platforms', 'cpu')

SETTINGS_THAT_MAY_DIFFER = ('out_dir', 'dataset', 'coordinator_address', 'num_processes', 'process_id',
                            'wandb_log', 'wandb_project', 'wandb_run_name')

def start_processes(coordinator_address, num_processes, process_id, backend, config):
    """Joins a multi-process run (torchrun's role), JAX_* variables as defaults."""
    coordinator_address = coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS', '')
    try:
        num_processes = num_processes or int(os.environ.get('JAX_NUM_PROCESSES', '1'))
        process_id = process_id if process_id >= 0 else int(os.environ.get('JAX_PROCESS_ID', '-1'))
    except ValueError:
        die("JAX_NUM_PROCESSES and JAX_PROCESS_ID must be integers")
    auto = coordinator_address == 'auto'
    if not auto:
        if num_processes <= 1:
            return
        if not coordinator_address:
            die(f"num_processes={num_processes} needs a coordinator: set --coordinator_address="
                f"host:port of process 0 (or JAX_COORDINATOR_ADDRESS), the same on every process")
        if not 0 <= process_id < num_processes:
            die(f"process_id={process_id}: give each process its own --process_id (or "
                f"JAX_PROCESS_ID) in [0, {num_processes})")
    jax.config.update('jax_cpu_collectives_implementation', 'mpi' if backend == 'mpi' else 'gloo')
    try:
        jax.distributed.initialize(None if auto else coordinator_address,
                                   num_processes if num_processes > 1 else None,
                                   process_id if process_id >= 0 else None)
    except Exception as e:  # no cluster, coordinator or free port
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0].rstrip('.')
        if auto and 'coordinator_address should be defined' in reason:
            reason = "JAX detects no cluster here"
        hint = ("JAX recognises Cloud TPU pods, SLURM, Open MPI and Kubernetes; elsewhere give "
                "--coordinator_address=host:port --num_processes=N --process_id=I" if auto else
                "start the same command on every process, with the same coordinator (process 0's host "
                "and a free port)")
        die(f"cannot join the multi-process run (coordinator_address={coordinator_address!r}): "
            f"{reason}; {hint}")

    def excepthook(kind, value, tb, default=sys.excepthook):  # one process stops: all others fail
        if isinstance(value, jax.errors.JaxRuntimeError):
            print(f"error: process {jax.process_index()} of {jax.process_count()}: "
                  f"{str(value).strip().splitlines()[0]}; if another process stopped first, its output "
                  f"says why", file=sys.stderr)
        else:
            default(kind, value, tb)
        exit_alone(1)
    sys.excepthook = excepthook
    keys = sorted(k for k in config if k not in SETTINGS_THAT_MAY_DIFFER)
    fingerprint = np.array([zlib.crc32(repr(config[k]).encode()) for k in keys], np.uint32)
    columns = multihost_utils.process_allgather(fingerprint).T
    differ = [k for k, col in zip(keys, columns) if (col != col[0]).any()]
    if differ:
        die(f"the processes were started with different settings ({', '.join(differ)}): "
            f"run the same command on every host")

def select_devices(device):  # all processes' devices of a platform, or one ('cuda:1')
    name, _, index = device.partition(':')
    try:
        devices = jax.devices(PLATFORMS.get(name, name))
    except RuntimeError:
        if PLATFORMS.get(name) != 'gpu' or index:
            die(f"device={device!r}: JAX has no {name} platform here (it has "
                f"{jax.default_backend()}); try --device=cpu")
        devices = jax.devices()
        print(f"device={device!r} but JAX finds no GPU: running on {devices[0].platform}")
    devices = sorted(devices, key=lambda d: (d.process_index, d.id))
    if index:
        if not index.isdigit() or int(index) >= len(devices):
            die(f"device={device!r}: there are {len(devices)} {name} devices")
        if jax.process_count() > 1:
            die(f"device={device!r}: pick one device only in a single-process run")
        devices = [devices[int(index)]]
    return devices

def select_dtype(dtype, platform):  # 'auto': bfloat16 on GPU/TPU, float32 on the CPU
    if dtype == 'auto':
        return 'bfloat16' if platform in ('gpu', 'tpu') else 'float32'
    if dtype not in ('float32', 'bfloat16', 'float16'):
        die(f"dtype must be 'float32', 'bfloat16' or 'float16', got {dtype!r}")
    return dtype

# dense bf16 peak FLOP/s by (a substring of) jax's device_kind, the unit of MFU
PEAK_FLOPS = {
    'H200': 989e12, 'H100': 989e12, 'A100': 312e12, 'A10G': 125e12, 'L4': 121e12, 'V100': 125e12,
    'RTX 4090': 165e12, 'RTX 3090': 71e12, 'TPU v6': 918e12, 'TPU v5p': 459e12,
    'TPU v5 lite': 197e12, 'TPU v5e': 197e12, 'TPU v4': 275e12,
}

def device_peak_flops(device):  # None when unknown (a CPU)
    kind = device.device_kind.lower()
    return next((flops for name, flops in PEAK_FLOPS.items() if name.lower() in kind), None)

# one mesh: (devices / fsdp) data-parallel groups x fsdp devices sharing each array
DATA, SHARDS = 'data', 'fsdp'
MIN_SHARDED = 2 ** 14  # elements; smaller ones (biases, norms, counters) stay whole

def make_mesh(devices, fsdp):  # fsdp=1 is data parallel: DDP's whole copies
    if fsdp > 1 and len(devices) == 1:
        raise ValueError(f"fsdp={fsdp} shards the state over several devices but this run has one: "
                         f"use --fsdp=1")
    if len(devices) % fsdp:
        raise ValueError(f"fsdp={fsdp} must divide the number of devices ({len(devices)}): "
                         f"e.g. --fsdp={len(devices)}")
    return Mesh(np.array(devices).reshape(-1, fsdp), (DATA, SHARDS))

def side_by_side(accumulation, batch_size, mesh):
    """(micro-steps, ranks): micro-batches run `ranks` at a time, as on DDP's ranks."""
    ranks = math.gcd(accumulation, mesh.size)
    if ranks * batch_size % mesh.size:
        raise ValueError(f"gradient_accumulation_steps={accumulation} must be divisible by the number "
                         f"of devices ({mesh.size})")
    return accumulation // ranks, ranks

def array_sharding(mesh, shape):  # split over SHARDS along the longest axis they divide
    n = mesh.shape[SHARDS]
    axes = [i for i in sorted(range(len(shape)), key=lambda i: -shape[i]) if shape[i] % n == 0]
    spec = [None] * len(shape)
    if n > 1 and axes and math.prod(shape) >= MIN_SHARDED:
        spec[axes[0]] = SHARDS
    return NamedSharding(mesh, P(*spec))

def state_sharding(tree, mesh):
    return jax.tree.map(lambda a: array_sharding(mesh, np.shape(a)), tree)

def row_sharding(mesh):  # batches (steps, rows, ...): the rows over every device
    return NamedSharding(mesh, P(None, (DATA, SHARDS)))

def replicated(mesh):
    return NamedSharding(mesh, P())

def local_rows(rows):  # this process's rows: its devices are consecutive in the mesh
    n = rows // jax.process_count()
    return slice(jax.process_index() * n, (jax.process_index() + 1) * n)

def put_batch(tree, mesh):  # this process's rows of numpy batches -> global arrays
    if jax.process_count() == 1:  # the same, by a shorter path
        return jax.device_put(tree, row_sharding(mesh))

    def put(a):
        shape = (a.shape[0], a.shape[1] * jax.process_count(), *a.shape[2:])
        return jax.make_array_from_process_local_data(row_sharding(mesh), a, shape)
    return jax.tree.map(put, tree)

def put_state(tree, shardings):  # from host arrays each device gets only its slices
    def place(a, sharding):
        if isinstance(a, jax.Array) and (a.sharding == sharding or not a.is_fully_addressable):
            return jax.device_put(a, sharding)
        a = np.asarray(a)
        return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])
    return jax.tree.map(place, tree, shardings)

def get_state(tree):  # numpy, one array at a time; every process calls it
    def gather(a):
        if a.is_fully_addressable:
            return np.asarray(a)
        if a.is_fully_replicated:
            return local_value(a)
        return np.asarray(multihost_utils.process_allgather(a, tiled=True))
    return jax.tree.map(gather, tree)

def local_value(a):  # a replicated output (the loss) as numpy
    return np.asarray(a.addressable_data(0))

# compiling ahead of time on shapes, and XLA's estimate of the memory it needs
def compile_ahead(jobs, compiler_options=None):
    """{name: (jitted, argument shapes)} -> {name: (compiled, seconds)}, on threads side by side."""
    compile_one = lambda lowered, t0: (lowered.compile(compiler_options), time.time() - t0)
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        futures = {name: pool.submit(compile_one, fn.lower(*args), time.time())
                   for name, (fn, args) in jobs.items()}
        return {name: future.result() for name, future in futures.items()}

def compiled_bytes(compiled):  # XLA's estimate of one device's peak memory, or None
    try:
        m = compiled.memory_analysis()
        m = m[0] if isinstance(m, (list, tuple)) else m
        return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                + m.temp_size_in_bytes + m.generated_code_size_in_bytes)
    except Exception:  # a backend without the analysis
        return None

def device_memory_bytes(device):  # the allocator's limit, or a CPU's RAM
    with contextlib.suppress(Exception):  # no memory_stats
        if limit := (device.memory_stats() or {}).get('bytes_limit'):
            return int(limit)
    if device.platform == 'cpu':
        return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    return None

def process_bytes(compiled, mesh):
    """The biggest estimate on one device; on a CPU, whose devices share the RAM, all of them."""
    need = [compiled_bytes(c) for c in compiled]
    local = mesh.local_devices
    return None if None in need else max(need) * (len(local) if local[0].platform == 'cpu' else 1)

def check_memory(compiled, mesh, other_settings):
    """Prints XLA's estimate; dies when the devices have less, with other_settings()' estimates."""
    need, device = process_bytes(compiled, mesh), mesh.local_devices[0]
    if need is None:
        return
    have = device_memory_bytes(device)
    where = (f"{len(mesh.local_devices)} cpu device(s) (machine RAM)" if device.platform == 'cpu'
             else f"one {device.device_kind}")
    print(f"memory: the compiled step needs ~{need / 2**30:.3f} GiB (XLA estimate) on {where}, which has "
          + (f"{have / 2**30:.2f} GiB" if have else "an unknown amount"))
    if have and need > have:
        estimates = [(flags, process_bytes(c, m)) for flags, c, m in other_settings()]
        others = ", ".join(f"{flags} ~{b / 2**30:.2f} GiB" + (" (fits)" if b <= have else "")
                           for flags, b in estimates if b)
        die(f"the compiled training step needs ~{need / 2**30:.2f} GiB but {where} has "
            f"{have / 2**30:.2f} GiB" + (f"; XLA's estimates with {others}" if others else "")
            + ": take a setting that fits, or lower --batch_size (raise --gradient_accumulation_steps "
              "to keep the tokens per iteration), --block_size or the model size")
