"""
This training script runs on one device in debug mode, on all the devices of a machine (data
parallel with jax.pmap, DDP's role), and across machines (JAX's distributed runtime, torchrun's).

To run on one machine (all its GPUs, or the CPU), example:
$ python train.py --batch_size=32

To run across 2 machines with 8 GPUs each: the same command on both, told where process 0 is:
$ JAX_COORDINATOR_ADDRESS=123.456.123.456:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0 python train.py
$ JAX_COORDINATOR_ADDRESS=123.456.123.456:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=1 python train.py
(or --coordinator_address=... --num_processes=2 --process_id=N). Where JAX knows the cluster (Cloud TPU
pods, SLURM, Open MPI, Kubernetes), every host runs: $ python train.py --coordinator_address=auto
Every host needs data/<dataset>/; out_dir must be shared, since every process reads the checkpoint to resume.

Data come from data/<dataset>/ relative to the working directory (an absolute --dataset path
works too). The compiled step itself lives in training.py.
"""

import os
import sys

import time
import math
import tempfile
import threading
import zlib

import numpy as np
import jax

from model import GPTConfig, init_params, param_shapes, get_num_params, crop_block_size, from_pretrained, \
    configure_optimizers, estimate_mfu, device_peak_flops, flops_per_iter
from checkpoint import CKPT_NAME, CheckpointError, save_checkpoint, load_checkpoint, flatten, unflatten_like, \
    params_to_arrays, params_from_arrays, load_meta
import training

# -----------------------------------------------------------------------------
# default config values designed to train a gpt2 (124M) on OpenWebText
# I/O
out_dir = 'out'
eval_interval = 2000
log_interval = 1
eval_iters = 200
eval_only = False # if True, script exits right after the first eval
always_save_checkpoint = True # if True, always save a checkpoint after each eval
init_from = 'scratch' # 'scratch' or 'resume' or 'gpt2*' or a local Hugging Face GPT-2 directory
# wandb logging
wandb_log = False # disabled by default
wandb_project = 'owt'
wandb_run_name = 'gpt2' # 'run' + str(time.time())
# data
dataset = 'openwebtext'
gradient_accumulation_steps = 5 * 8 # used to simulate larger batch sizes; split across all devices
batch_size = 12 # per device; if gradient_accumulation_steps > 1, this is the micro-batch size
block_size = 1024
# model
n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0 # for pretraining 0 is good, for finetuning try 0.1+
bias = False # do we use bias inside LayerNorm and Linear layers?
# adamw optimizer
learning_rate = 6e-4 # max learning rate
max_iters = 600000 # total number of training iterations
weight_decay = 1e-1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0 # clip gradients at this value, or disable if == 0.0
# learning rate decay settings
decay_lr = True # whether to decay the learning rate
warmup_iters = 2000 # how many steps to warm up for
lr_decay_iters = 600000 # should be ~= max_iters per Chinchilla
min_lr = 6e-5 # minimum learning rate, should be ~= learning_rate/10 per Chinchilla
# distributed: one process per machine, JAX's runtime connects them (torchrun + DDP's role)
backend = 'nccl' # kept for nanoGPT's command lines; JAX picks GPU/TPU collectives itself, 'mpi' selects MPI for CPU (default gloo)
coordinator_address = '' # 'host:port' of process 0, or 'auto' on a TPU pod/SLURM/Open MPI/Kubernetes; default $JAX_COORDINATOR_ADDRESS
num_processes = 0 # default $JAX_NUM_PROCESSES, else 1
process_id = -1 # default $JAX_PROCESS_ID
# system
device = 'cuda' # 'cpu', 'cuda' (all local GPUs), 'cuda:0', 'tpu', ...: the JAX platform; 'cuda' falls back to what JAX has
dtype = 'auto' # 'float32', 'bfloat16', or 'float16' (dynamic loss scaling); 'auto': bfloat16 on GPU/TPU, float32 on CPU
compile = True # kept for nanoGPT's command lines: JAX always compiles the step with XLA (see README)
seed = 1337 # model init, batches and dropout are pure functions of the seed and the iteration
iters_per_call = 0 # iterations per compiled call; 0: chosen here (several for small models on CPU, else 1)
# -----------------------------------------------------------------------------
config_keys = [k for k,v in globals().items() if not k.startswith('_') and not k.isupper() and isinstance(v, (int, float, bool, str))] # UPPER_CASE: constants
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read()) # overrides from command line or config file
config = {k: globals()[k] for k in config_keys} # will be useful for logging
# -----------------------------------------------------------------------------
training.use_host_devices() # on CPU, one device per core (up to 2): must come before JAX starts its backends
training.keep_freed_memory(device, n_layer, n_embd) # on CPU for big models, freed buffers stay for the next step: before JAX starts too

def die(msg):
    """Known bad input or state: one clear line on stderr, non-zero exit, nothing half-done."""
    if _dying.acquire(blocking=False): # one line, even when the prefetch thread fails at the same moment
        print(f"error: {msg}", file=sys.stderr)
    if jax.distributed.is_initialized():
        exit_alone(1)
    sys.exit(1)
_dying = threading.Lock()

def exit_alone(code):
    """Leaves a multi-process run without jax.distributed's exit handler, which waits up to 5 minutes for
    every process to reach it: a process that stops alone makes the others' next collective fail at once
    instead. Process 0 hosts the coordinator, so it leaves last, after a moment in which the others can
    report the same error themselves."""
    sys.stdout.flush()
    sys.stderr.flush()
    if jax.process_index() == 0:
        time.sleep(2)
    os._exit(code)

# multi-process: must connect before anything asks JAX for devices
coordinator_address = coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS', '')
try:
    num_processes = num_processes or int(os.environ.get('JAX_NUM_PROCESSES', '1'))
    process_id = process_id if process_id >= 0 else int(os.environ.get('JAX_PROCESS_ID', '-1'))
except ValueError:
    die("JAX_NUM_PROCESSES and JAX_PROCESS_ID must be integers")
auto_cluster = coordinator_address == 'auto' # Cloud TPU pods, SLURM, Open MPI, Kubernetes: JAX reads the cluster's own variables
if num_processes > 1 and not auto_cluster:
    if not coordinator_address:
        die(f"num_processes={num_processes} needs a coordinator: set --coordinator_address=host:port of process 0 "
            f"(or JAX_COORDINATOR_ADDRESS), the same on every process")
    if not 0 <= process_id < num_processes:
        die(f"process_id={process_id}: give each process its own --process_id (or JAX_PROCESS_ID) in [0, {num_processes})")
if num_processes > 1 or auto_cluster:
    jax.config.update('jax_cpu_collectives_implementation', 'mpi' if backend == 'mpi' else 'gloo')
    try:
        if auto_cluster:
            jax.distributed.initialize(None, num_processes if num_processes > 1 else None, process_id if process_id >= 0 else None)
        else:
            jax.distributed.initialize(coordinator_address, num_processes, process_id)
    except Exception as e: # a cluster JAX does not recognise, an unreachable coordinator, a port in use
        reason = str(e).strip().splitlines()[0].rstrip('.') if str(e).strip() else type(e).__name__
        if auto_cluster and 'coordinator_address should be defined' in reason:
            reason = "JAX detects no cluster here"
        hint = ("JAX recognises Cloud TPU pods, SLURM, Open MPI and Kubernetes; elsewhere give "
                "--coordinator_address=host:port --num_processes=N --process_id=I" if auto_cluster else
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
    # every process must run the same command: another model or batch would compile another program and
    # the collectives would pair up wrongly (a hang, or silently wrong gradients), so compare them now
    from jax.experimental import multihost_utils
    may_differ = ('out_dir', 'dataset', 'coordinator_address', 'num_processes', 'process_id', # paths per host, flags or env
                  'wandb_log', 'wandb_project', 'wandb_run_name')
    keys = sorted(k for k in config if k not in may_differ)
    fingerprint = np.array([zlib.crc32(repr(config[k]).encode()) for k in keys], np.uint32)
    differ = [k for k, col in zip(keys, multihost_utils.process_allgather(fingerprint).T) if len(set(col.tolist())) > 1]
    if differ:
        die(f"the processes were started with different settings ({', '.join(differ)}): run the same command on every host")

# devices: `device` names the platform, optionally one device of it ('cuda:1')
platform_name, _, device_index = device.partition(':')
platform = {'cuda': 'gpu', 'gpu': 'gpu', 'rocm': 'gpu', 'cpu': 'cpu', 'tpu': 'tpu', 'mps': 'METAL'}.get(platform_name, platform_name)
try:
    all_devices = jax.devices(platform)
except RuntimeError:
    if platform == 'gpu' and not device_index:
        all_devices = jax.devices()
        print(f"device={device!r} but JAX finds no GPU: training on {all_devices[0].platform}")
    else:
        die(f"device={device!r}: JAX has no {platform_name} platform here (it has {jax.default_backend()}); try --device=cpu")
if device_index:
    if not device_index.isdigit() or int(device_index) >= len(all_devices):
        die(f"device={device!r}: there are {len(all_devices)} {platform_name} devices")
    if jax.process_count() > 1:
        die(f"device={device!r}: pick one device only in a single-process run")
    all_devices = [all_devices[int(device_index)]]
platform = all_devices[0].platform
master_process = jax.process_index() == 0 # this process will do logging, checkpointing etc.
if dtype == 'auto':
    dtype = 'bfloat16' if platform in ('gpu', 'tpu') else 'float32'
if dtype not in training.DTYPES:
    die(f"dtype must be 'float32', 'bfloat16' or 'float16', got {dtype!r}")
config['dtype'] = dtype
if not compile:
    # nanoGPT's CPU quick start passes --compile=False (torch.compile does not pay off there). Un-jitted, our
    # step would be ~5x slower on that very command (measured: op-by-op dispatch of every primitive) and pmap
    # barely runs at all, so the flag is accepted and the step stays compiled. To step through the training
    # step in Python, call training.make_train_step(gptconf, optimizer, axis_name=None) under jax.disable_jit().
    print("compile=False: JAX runs the training step through XLA either way (un-jitted it would be ~5x slower); "
          "the flag is accepted for nanoGPT's command lines")

if gradient_accumulation_steps < 1 or batch_size < 1 or block_size < 1:
    die("gradient_accumulation_steps, batch_size and block_size must be positive")
if iters_per_call < 0:
    die(f"iters_per_call={iters_per_call}: give a positive number, or 0 to let train.py choose")

if master_process:
    try: # fail now, not at the first checkpoint hours from now
        os.makedirs(out_dir, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix='.write-test-', dir=out_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        die(f"out_dir {out_dir!r} is not writable ({e.strerror}): choose another --out_dir")

# poor man's data loader: random windows of the uint16 token files
data_dir = os.path.join('data', dataset)
num_tokens = {}
for split in ('train', 'val'):
    path = os.path.join(data_dir, f'{split}.bin')
    if not os.path.exists(path):
        die(f"{path} not found: run python {os.path.join(data_dir, 'prepare.py')} first")
    num_tokens[split], odd = divmod(os.path.getsize(path), 2)
    if odd: # a torn copy or an interrupted prepare.py; np.memmap would refuse it with a traceback
        die(f"{path} has an odd number of bytes, so it is not whole uint16 tokens: run python {os.path.join(data_dir, 'prepare.py')} again")
    if num_tokens[split] <= block_size:
        die(f"{path} holds {num_tokens[split]} tokens, too few for block_size={block_size} "
            f"(needs at least {block_size + 1}): lower --block_size or prepare more data")

def load_split(split):
    # a new memmap every batch avoids a memory leak, as nanoGPT does
    return np.memmap(os.path.join(data_dir, f'{split}.bin'), dtype=np.uint16, mode='r')

def check_tokens(split, x, y):
    # jnp indexing past the vocabulary gives NaN, which would read as divergence, not as bad data
    top = max(int(x.max()), int(y.max()))
    if top >= gptconf.vocab_size:
        die(f"{os.path.join(data_dir, f'{split}.bin')} holds token id {top} but the model's vocabulary has "
            f"{gptconf.vocab_size} tokens: the data and its meta.json (or the checkpoint) come from different "
            f"prepare.py runs; run python {os.path.join(data_dir, 'prepare.py')} again")

def make_train_batch(it):
    """This process's share of iteration it: (local devices, micro_steps, rows, block_size). Micro-batch g
    of the iteration goes to rank g // micro_steps, wherever it lives (training.arrange)."""
    starts = training.batch_indices(seed, 'train', it, num_tokens['train'], block_size, (gradient_accumulation_steps, batch_size))
    mine = training.arrange(starts, ranks, row_split)[local_positions]
    x, y = training.get_batch(load_split('train'), mine, block_size)
    check_tokens('train', x, y)
    return training.Batch(x, y, micro_ids[local_positions])

def train_chunk_end(it):
    """The first iteration after the chunk (one compiled call) that starts at it: chunks end at eval
    points, so evals and checkpoints fall between calls, and after max_iters."""
    return max(it + 1, min(it + iters_per_call, (it // eval_interval + 1) * eval_interval, max_iters + 1))

def make_train_chunk(it):
    """Iterations it .. train_chunk_end(it)-1 stacked on axis 1, (local devices, iters_per_call, ...),
    slots past the chunk's end zero (unused)."""
    batches = [make_train_batch(i) for i in range(it, train_chunk_end(it))]
    batches += [jax.tree.map(np.zeros_like, batches[0])] * (iters_per_call - len(batches))
    return jax.tree.map(lambda *a: np.stack(a, axis=1), *batches)

def make_eval_batch(split, it):
    purpose = 'val' if split == 'val' else 'eval_train'
    starts = training.batch_indices(seed, purpose, it, num_tokens[split], block_size, (ranks * eval_per_device, batch_size))
    batch_ids = np.broadcast_to(np.arange(ranks * eval_per_device)[:, None], starts.shape)
    starts, batch_ids = (training.arrange(a, ranks, row_split)[local_positions] for a in (starts, batch_ids))
    x, y = training.get_batch(load_split(split), starts, block_size)
    check_tokens(split, x, y)
    return x, y, batch_ids[..., 0] < eval_iters

# init these up here, can override if init_from='resume' (i.e. from a checkpoint)
iter_num = 0
best_val_loss = 1e9

# attempt to derive vocab_size from the dataset
try:
    meta = load_meta(data_dir)
except CheckpointError as e:
    die(str(e))
meta_vocab_size = None
if meta is not None:
    meta_vocab_size = meta['vocab_size']
    print(f"found vocab_size = {meta_vocab_size} (inside {data_dir})")

# model init
model_args = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size,
                  bias=bias, vocab_size=None, dropout=dropout, activation='gelu') # start with model_args from command line
params = None # created after the memory check when training from scratch
ckpt_arrays = None
try:
    if init_from == 'scratch':
        # init a new model from scratch
        print("Initializing a new model from scratch")
        # determine the vocab size we'll use for from-scratch training
        if meta_vocab_size is None:
            print("defaulting to vocab_size of GPT-2 to 50304 (50257 rounded up for efficiency)")
        model_args['vocab_size'] = meta_vocab_size if meta_vocab_size is not None else 50304
        gptconf = GPTConfig(**model_args)
    elif init_from == 'resume':
        print(f"Resuming training from {out_dir}")
        ckpt_path = os.path.join(out_dir, CKPT_NAME)
        ckpt_arrays, checkpoint = load_checkpoint(ckpt_path)
        # force these config attributes to be equal otherwise we can't even resume training
        # the rest of the attributes (e.g. dropout) can stay as desired from command line
        for k in ['n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'vocab_size']:
            model_args[k] = checkpoint['model_args'][k]
        model_args['activation'] = checkpoint['model_args'].get('activation', 'gelu')
        if meta_vocab_size is not None and meta_vocab_size != model_args['vocab_size']:
            die(f"{ckpt_path} has vocab_size {model_args['vocab_size']} but {data_dir} has {meta_vocab_size}: "
                f"it was trained on another dataset (--dataset) or the data were prepared again")
        gptconf = GPTConfig(**model_args)
        params = params_from_arrays(ckpt_arrays)
        if jax.tree.map(np.shape, params) != jax.tree.map(np.shape, param_shapes(gptconf)):
            die(f"{ckpt_path}: its parameters do not match its model_args {checkpoint['model_args']}")
        iter_num = checkpoint['iter_num']
        best_val_loss = checkpoint['best_val_loss']
        if checkpoint.get('seed', seed) != seed:
            print(f"using the checkpoint's seed {checkpoint['seed']} (not {seed}) so batches continue where they left off")
            seed = checkpoint['seed']
            config['seed'] = seed
    elif init_from.startswith('gpt2') or os.path.isdir(init_from):
        print(f"Initializing from OpenAI GPT-2 weights: {init_from}")
        # initialize from OpenAI GPT-2 weights
        override_args = dict(dropout=dropout)
        gptconf, params = from_pretrained(init_from, override_args)
        # read off the created config params, so we can store them into checkpoint correctly
        for k in ['n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'vocab_size', 'activation']:
            model_args[k] = getattr(gptconf, k)
    else:
        die(f"init_from={init_from!r}: use 'scratch', 'resume', 'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl' "
            f"or a local GPT-2 directory")
except CheckpointError as e:
    shared = " (every process reads the checkpoint process 0 wrote: put out_dir on a filesystem all hosts share)"
    die(str(e) + (shared if init_from == 'resume' and jax.process_count() > 1 else ""))
except (ValueError, OSError, KeyError) as e: # bad model_args, missing or unreadable weights
    die(f"cannot initialize from {init_from!r}: {type(e).__name__}: {e}")
# crop down the model block size if desired, using model surgery
if block_size < gptconf.block_size:
    params, gptconf = crop_block_size(params, gptconf, block_size)
    model_args['block_size'] = block_size # so that the checkpoint will have the right value
elif block_size > gptconf.block_size:
    die(f"block_size={block_size} is longer than the model's {gptconf.block_size} (init_from={init_from!r})")
num_params = get_num_params(param_shapes(gptconf))
print(f"number of parameters: {num_params/1e6:.2f}M")

# like DDP, gradient accumulation is split across the devices and batch_size is per device. A CPU's host
# devices are its cores, not DDP ranks: where there are fewer micro-batches than devices they split each
# micro-batch's rows instead (training.plan_devices), the same iteration either way; small models only
try:
    n_per_process, row_split, ranks, micro_steps, rows = training.plan_devices(
        len(all_devices) // jax.process_count(), jax.process_count(), gradient_accumulation_steps, batch_size, platform, num_params)
except ValueError as e:
    die(str(e))
by_process = {}
for d in all_devices:
    by_process.setdefault(d.process_index, []).append(d)
all_devices = [d for p in sorted(by_process) for d in by_process[p][:n_per_process]]
local_devices = by_process[jax.process_index()][:n_per_process]
world = len(all_devices) # devices sharing one iteration, over all processes
local_positions = [all_devices.index(d) for d in local_devices] # this process's devices in pmap order
tokens_per_iter = gradient_accumulation_steps * batch_size * block_size
if master_process:
    split = f", its rows split over {row_split} host devices" if row_split > 1 else ""
    print(f"training on {world} {platform} device(s) in {jax.process_count()} process(es), dtype {dtype}, "
          f"{micro_steps} micro-step(s) of batch_size {batch_size} per device{split}")
print(f"tokens per iteration will be: {tokens_per_iter:,}")
micro_ids = training.micro_ids(ranks, row_split, micro_steps) # each micro-batch's (part's) dropout key
# several iterations per compiled call for small models on CPU, where each call costs the devices time
if iters_per_call == 0:
    iters_per_call = training.iters_per_call(platform, flops_per_iter(gptconf, num_params, gradient_accumulation_steps * batch_size))
eval_per_device = -(-eval_iters // ranks) # eval_iters batches spread over the ranks, the rest masked out

# mixed precision: compute in dtype, master weights and optimizer state in fp32
training.set_precision(dtype)
shapes = param_shapes(gptconf)
optimizer = configure_optimizers(shapes, weight_decay, learning_rate, (beta1, beta2), platform, grad_clip)

# compile ahead of time, on shapes only: nothing is allocated until we know it fits
def global_shapes(in_axes, args):
    """Across processes pmap lowers on global shapes (every process's rows): this process's shapes (args)
    made global. ShapedArray, not ShapeDtypeStruct: pmap reads abstract values as global shapes."""
    if jax.process_count() == 1:
        return args
    return [jax.tree.map(lambda a: jax.core.ShapedArray((world,) + a.shape[1:] if ax == 0 else a.shape, a.dtype), arg)
            for arg, ax in zip(args, in_axes)]

def local_view(compiled, in_axes):
    """Across processes the compiled step takes and returns global arrays: converts this process's rows to
    and from them, as a plain pmap call does."""
    if jax.process_count() == 1:
        return compiled
    from jax.experimental import multihost_utils
    mesh = jax.sharding.Mesh(np.array(all_devices), (training.AXIS,))
    mapped, replicated = jax.sharding.PartitionSpec(training.AXIS), jax.sharding.PartitionSpec()
    specs = tuple(mapped if ax == 0 else replicated for ax in in_axes)
    def run(*local_args):
        out = compiled(*multihost_utils.host_local_array_to_global_array(local_args, mesh, specs))
        return multihost_utils.global_array_to_host_local_array(out, mesh, mapped)
    run.memory_analysis = compiled.memory_analysis
    return run

def initial_state(key):
    """The train state from scratch (model.init_params and the optimizer's zeros), one program compiled
    alongside the steps rather than after them."""
    return training.init_train_state(init_params(gptconf, key), optimizer, dtype, seed)

print("compiling the training step" + (f" ({iters_per_call} iterations per call)" if iters_per_call > 1 else "") + "...")
train_step = training.parallel_train_chunk(training.make_train_chunk(training.make_train_step(gptconf, optimizer), iters_per_call), all_devices)
eval_step = training.parallel_eval_step(training.make_eval_step(gptconf), all_devices)
n_local = len(local_devices)
abstract_state = training.replica_shapes(jax.eval_shape(
    lambda p: training.init_train_state(p, optimizer, dtype, seed), shapes), local_devices)
tokens_shape = jax.ShapeDtypeStruct((iters_per_call, micro_steps, rows, block_size), np.int32)
abstract_batch = training.with_device_axis(training.Batch(tokens_shape, tokens_shape, jax.ShapeDtypeStruct((iters_per_call, micro_steps), np.int32)), local_devices)
scalar = lambda dt: jax.ShapeDtypeStruct((), dt)
eval_batch_shape = jax.ShapeDtypeStruct((eval_per_device, rows, block_size), np.int32)
train_axes, eval_axes = (0, 0, None, None, None), (0, 0, 0, 0)
train_args = (abstract_state, abstract_batch, jax.ShapeDtypeStruct((iters_per_call,), np.float32), scalar(np.int32), scalar(np.int32))
eval_args = (abstract_state.params, *training.with_device_axis((eval_batch_shape, eval_batch_shape, jax.ShapeDtypeStruct((eval_per_device,), np.bool_)), local_devices))
jobs = {'train step': (train_step, global_shapes(train_axes, train_args)), 'eval step': (eval_step, global_shapes(eval_axes, eval_args))}
if params is None:
    jobs['initial state'] = (jax.jit(initial_state, out_shardings=jax.sharding.SingleDeviceSharding(local_devices[0])),
                             (jax.eval_shape(jax.random.PRNGKey, seed),))
t_compile = time.time()
try:
    with jax.default_device(local_devices[0]):
        compiled = dict(zip(jobs, training.compile_ahead(*jobs.values())))
except Exception as e:
    if dtype == 'float32':
        raise # a float32 step that does not compile is a bug: show all of it
    # XLA lacks some half-precision ops on some platforms (e.g. a float16 dot with float32 accumulation on CPU)
    die(f"the training step does not compile with dtype={dtype} on {platform} ({type(e).__name__}: "
        f"{str(e).strip().splitlines()[0]}): use --dtype=float32 or {'float16' if dtype == 'bfloat16' else 'bfloat16'}")
train_step = local_view(compiled['train step'][0], train_axes)
eval_step = local_view(compiled['eval step'][0], eval_axes)
print(f"compile time: {time.time() - t_compile:.1f}s ("
      + ", ".join(f"{name} {seconds:.1f}s" for name, (_, seconds) in compiled.items()) + ", side by side)")

# will it fit? XLA's own estimate of the step's peak memory against the device's memory
need = [training.compiled_bytes(c) for c in (train_step, eval_step)]
have = training.device_memory_bytes(local_devices[0])
if None not in need:
    need = max(need) * (n_local if platform == 'cpu' else 1) # host devices share the machine's RAM
    where = f"{n_local} cpu device(s) (machine RAM)" if platform == 'cpu' else f"one {local_devices[0].device_kind}"
    have_s = f"{have / 2**30:.2f} GiB" if have else "an unknown amount"
    print(f"memory: the compiled step needs ~{need / 2**30:.3f} GiB (XLA estimate) on {where}, which has {have_s}")
    if have and need > have:
        die(f"the compiled training step needs ~{need / 2**30:.2f} GiB but {where} has {have / 2**30:.2f} GiB: "
            f"lower --batch_size (raise --gradient_accumulation_steps to keep the tokens per iteration), "
            f"--block_size or the model size")

# create the train state on the first local device, then one copy per device
with jax.default_device(local_devices[0]):
    if params is None:
        state = compiled['initial state'][0](jax.random.PRNGKey(seed))
    else:
        state = training.init_train_state(params, optimizer, dtype, seed)
    if ckpt_arrays is not None:
        try:
            state = state._replace(opt_state=unflatten_like(state.opt_state, ckpt_arrays, 'optimizer', ckpt_path))
            if state.loss_scale != () and any(k.startswith('loss_scale') for k in ckpt_arrays):
                state = state._replace(loss_scale=unflatten_like(state.loss_scale, ckpt_arrays, 'loss_scale', ckpt_path))
        except CheckpointError as e:
            die(str(e))
state = training.replicate(state, local_devices)
params = ckpt_arrays = None # free host memory: the devices hold the state now

# helps estimate an arbitrarily accurate loss over either split using many batches
def estimate_loss():
    out = {}
    for split in ['train', 'val']:
        x, y, valid = training.shard(make_eval_batch(split, iter_num), local_devices)
        total = eval_step(state.params, x, y, valid) # summed over batches and devices (each batch row_split times)
        out[split] = float(np.asarray(total.addressable_shards[0].data).reshape(())) / (eval_iters * row_split)
    return out

# learning rate decay scheduler (cosine with warmup)
def get_lr(it):
    return training.get_lr(it, learning_rate, warmup_iters, lr_decay_iters, min_lr, decay_lr)

last_saved = None # iteration of the checkpoint this run wrote last

def save(iter_num, best_val_loss):
    global last_saved
    host = training.unreplicate(state, local_devices)
    arrays = {**params_to_arrays(host.params), **flatten(host.opt_state, 'optimizer'), **flatten(host.loss_scale, 'loss_scale')}
    meta = {'model_args': model_args, 'iter_num': iter_num, 'best_val_loss': best_val_loss,
            'config': config, 'seed': seed, 'dtype': dtype}
    print(f"saving checkpoint to {out_dir}")
    try:
        save_checkpoint(os.path.join(out_dir, CKPT_NAME), arrays, meta)
    except OSError as e:
        die(f"cannot write the checkpoint to {out_dir} ({e.strerror}); the previous checkpoint is intact")
    last_saved = iter_num

def stop_diverged(it, what):
    on_disk = os.path.join(out_dir, CKPT_NAME)
    kept = (f"the checkpoint in {out_dir} (iter {last_saved}) is untouched" if last_saved is not None else
            f"the checkpoint in {out_dir} is untouched" if os.path.exists(on_disk) else "no checkpoint was written")
    die(f"iter {it}: {what}, training diverged and stops here; {kept}. Try a lower --learning_rate or --grad_clip")

def losses_of(it, n, metrics):
    """Waits for the chunk of iterations it .. it+n-1 and returns their losses; stops on nan/inf."""
    losses = np.asarray(metrics['loss'].addressable_shards[0].data).reshape(-1)[:n].tolist()
    for i, lossf in enumerate(losses):
        if not math.isfinite(lossf):
            stop_diverged(it + i, f"loss is {lossf}")
    return losses

# logging
if wandb_log and master_process:
    try:
        import wandb
    except ImportError:
        die("wandb_log=True but wandb is not installed: pip install wandb")
    wandb.init(project=wandb_project, name=wandb_run_name, config=config)

# training loop
prefetch = training.Prefetcher(make_train_chunk, local_devices, start=iter_num, after=train_chunk_end) # the first batches are on their way
t0 = time.time()
t_done = t0 # when the last chunk was waited for
iters_since_log = 0
local_iter_num = 0 # number of iterations in the lifetime of this process
running_mfu = -1.0
peak_flops = device_peak_flops(local_devices[0]) or 312e12 # unknown devices (CPUs) are measured against an A100, as nanoGPT
# a chunk is waited for (and logged) only once the next one is dispatched, so the device never idles
# while a call is dispatched (a pmap call takes ~1.4ms to return on the README CPU config; the gain
# measured there is within noise, BENCHMARKS.md)
in_flight = None # (first iter, iters, first local_iter, metrics) of the chunk dispatched last

def finish(it, n, local_it, metrics):
    """Waits for the chunk of iterations it .. it+n-1, stops on nan/inf, and prints their log lines
    when due, each iteration taking an equal share of the chunk's time."""
    global t0, t_done, iters_since_log, running_mfu
    # get losses as floats. note: this is a CPU-device sync point (every process checks for nan)
    losses = losses_of(it, n, metrics)
    t1 = time.time()
    for i, lossf in enumerate(losses):
        iters_since_log += 1
        if (it + i) % log_interval == 0:
            t_log = t_done + (t1 - t_done) * (i + 1) / n
            dt = (t_log - t0) / iters_since_log # mean over the iterations since the last log line
            t0, iters_since_log = t_log, 0
            if master_process:
                if local_it + i >= 5: # let the training loop settle a bit
                    mfu = estimate_mfu(gptconf, num_params, batch_size * micro_steps, dt, peak_flops)
                    running_mfu = mfu if running_mfu == -1.0 else 0.9*running_mfu + 0.1*mfu
                print(f"iter {it + i}: loss {lossf:.4f}, time {dt*1000:.2f}ms, mfu {running_mfu*100:.2f}%")
    t_done = t1

while True:

    # determine and set the learning rate for this iteration
    lr = get_lr(iter_num)

    # evaluate the loss on train/val sets and write checkpoints
    if iter_num % eval_interval == 0:
        if in_flight is not None: # never evaluate or save after a diverged step
            finish(*in_flight)
            in_flight = None
        losses = estimate_loss() # every process takes part (the eval is pmapped); the master reports
        if not math.isfinite(losses['val']):
            stop_diverged(iter_num, f"val loss is {losses['val']}")
        if master_process:
            print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
            if wandb_log:
                wandb.log({
                    "iter": iter_num,
                    "train/loss": losses['train'],
                    "val/loss": losses['val'],
                    "lr": lr,
                    "mfu": running_mfu*100, # convert to percentage
                })
        if losses['val'] < best_val_loss or always_save_checkpoint:
            best_val_loss = losses['val']
            if iter_num > 0 and master_process:
                save(iter_num, best_val_loss)
    if iter_num == 0 and eval_only:
        break

    # forward, backward over all micro-batches, gradient average across devices and AdamW, for each
    # iteration of the chunk: one compiled call, dispatched asynchronously while the next batches are prepared
    end = train_chunk_end(iter_num)
    lrs = np.zeros(iters_per_call, np.float32)
    lrs[:end - iter_num] = [get_lr(it) for it in range(iter_num, end)]
    state, metrics = train_step(state, prefetch.get(iter_num), lrs, np.int32(iter_num), np.int32(end - iter_num))

    # timing and logging, of the previous chunk
    if in_flight is not None:
        finish(*in_flight)
    in_flight = (iter_num, end - iter_num, local_iter_num, metrics)
    local_iter_num += end - iter_num
    iter_num = end

    # termination conditions
    if iter_num > max_iters:
        break

if in_flight is not None:
    finish(*in_flight)
prefetch.close()
if wandb_log and master_process:
    wandb.finish()
