"""
This training script runs on a single device in debug mode, on all the devices of a machine (data
parallel with jax.pmap, DDP's role), and across machines (JAX's distributed runtime, torchrun's).
Models too big for one device: --fsdp=N shards the parameters, gradients and optimizer state over N
devices (FSDP's role, on jax.jit and a device mesh), --remat=True recomputes activations in the backward.

To run on one machine (all its GPUs, or the CPU), example:
$ python train.py --batch_size=32

To run across 2 machines with 8 GPUs each: the same command on both, told where process 0 is:
$ JAX_COORDINATOR_ADDRESS=123.456.123.456:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0 python train.py
$ JAX_COORDINATOR_ADDRESS=123.456.123.456:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=1 python train.py
(or --coordinator_address=... --num_processes=2 --process_id=N). Where JAX knows the cluster (Cloud TPU
pods, SLURM, Open MPI, Kubernetes), every host runs: $ python train.py --coordinator_address=auto
Every host needs data/<dataset>/; out_dir must be shared, since every process reads the checkpoint to resume.

The compiled step is training.py's; devices and processes are parallel.py's.
"""
import os
import time
import math
import tempfile

import numpy as np
import jax

from model import GPTConfig, param_shapes, get_num_params, crop_block_size, from_pretrained, \
    estimate_mfu, flops_per_iter
from checkpoint import CKPT_NAME, CheckpointError, save_checkpoint, load_checkpoint, resume_path, flatten, \
    unflatten_like, restore_optimizer, params_to_arrays, params_from_arrays, load_meta, describe
import parallel
from parallel import die
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
init_from = 'scratch' # 'scratch' or 'resume' or 'gpt2*' or a local Hugging Face GPT-2 directory or a nanoGPT ckpt.pt
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
remat = False # recompute each block's activations in the backward (gradient checkpointing): less memory, ~1/3 more compute
# adamw optimizer
optimizer = 'adamw' # 'adamw' (nanoGPT's) or 'muon': Muon for the blocks' 2-D weights at muon_lr, AdamW for the rest
muon_lr = 0.02 # Muon's max learning rate, on the same warmup and cosine decay (optimizer='muon' only)
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
fsdp = 1 # devices sharing (sharding) each parameter, its gradient and optimizer state (FSDP, ZeRO-3); 1: DDP's whole copies
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

# various inits, derived attributes, I/O setup; the first three before JAX starts its backends
parallel.pin_platform(device) # --device=cpu: the CPU, even where JAX also has a GPU
parallel.use_host_devices() # on the CPU, one device per core (up to 2)
parallel.keep_freed_memory(device, n_layer, n_embd) # on the CPU, big models keep freed buffers for the next step
# one process per machine, one run: torchrun's and init_process_group's role (nothing happens for one process)
parallel.start_processes(coordinator_address, num_processes, process_id, backend, config, may_differ=(
    'out_dir', 'dataset', 'coordinator_address', 'num_processes', 'process_id', 'wandb_log', 'wandb_project', 'wandb_run_name'))
master_process = jax.process_index() == 0 # this process will do logging, checkpointing etc.
devices = parallel.select_devices(device)
platform = devices[0].platform
dtype = config['dtype'] = parallel.select_dtype(dtype, platform)
if not compile: # nanoGPT's CPU quick start passes it; to step through the step, use jax.disable_jit()
    print("compile=False: JAX compiles the training step with XLA either way (un-jitted ~5x slower); accepted for nanoGPT's command lines")
if min(gradient_accumulation_steps, batch_size, block_size, fsdp) < 1:
    die("gradient_accumulation_steps, batch_size, block_size and fsdp must be positive")
if optimizer not in training.OPTIMIZERS:
    die(f"optimizer={optimizer!r}: use one of {', '.join(map(repr, training.OPTIMIZERS))}")
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

# poor man's data loader: windows of the uint16 token files, drawn as pure functions of (seed, iteration)
data_dir = os.path.join('data', dataset)
try:
    num_tokens = {split: training.count_tokens(data_dir, split, block_size) for split in ('train', 'val')}
except ValueError as e:
    die(str(e))

def get_batch(split, starts, vocab_size):
    """x, y of the windows of split that start at starts, shape starts.shape + (block_size,)."""
    data = np.memmap(os.path.join(data_dir, f'{split}.bin'), dtype=np.uint16, mode='r') # anew each batch: no memory leak (nanoGPT)
    x, y = training.get_batch(data, starts, block_size)
    top = max(int(x.max()), int(y.max())) # past the vocabulary jnp's lookup gives NaN, read as divergence
    if top >= vocab_size:
        die(f"{os.path.join(data_dir, f'{split}.bin')} holds token id {top} but the model's vocabulary has "
            f"{vocab_size} tokens: the data and its meta.json (or the checkpoint) come from different "
            f"prepare.py runs; run python {os.path.join(data_dir, 'prepare.py')} again")
    return x, y

# init these up here, can override if init_from='resume' (i.e. from a checkpoint)
iter_num = 0
best_val_loss = 1e9
# Ctrl-C from here on: one line saying where the run got to and what is on disk
parallel.on_interrupt(lambda: f"interrupted at iter {iter_num}; {describe(out_dir, 'intact')}: continue with --init_from=resume")

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
    elif init_from == 'resume' or init_from.endswith('.pt'): # out_dir's (ours, else nanoGPT's ckpt.pt), or a ckpt.pt
        ckpt_path = resume_path(out_dir) if init_from == 'resume' else init_from
        print(f"Resuming training from {ckpt_path}")
        ckpt_arrays, checkpoint = load_checkpoint(ckpt_path)
        saved_with = checkpoint.get('config', {}).get('optimizer', 'adamw') # nanoGPT's ckpt.pt: AdamW
        if saved_with != optimizer:
            die(f"{ckpt_path} holds {saved_with}'s state but optimizer={optimizer!r}: resume with --optimizer={saved_with}")
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
        die(f"init_from={init_from!r}: use 'scratch', 'resume', 'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl', "
            f"a local GPT-2 directory or a nanoGPT ckpt.pt")
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
gptconf.remat = remat # how the step computes, not the model: not in model_args
num_params = get_num_params(param_shapes(gptconf))
print(f"number of parameters: {num_params/1e6:.2f}M")

# like DDP, gradient accumulation is split across all the devices and batch_size is per device. A CPU's
# host devices are its cores, not DDP ranks: with too few micro-batches they split each one's rows instead
try:
    plan = parallel.plan_devices(devices, gradient_accumulation_steps, batch_size, num_params,
                                 flops_per_iter(gptconf, num_params, gradient_accumulation_steps * batch_size), iters_per_call, fsdp)
except ValueError as e:
    die(str(e))
tokens_per_iter = gradient_accumulation_steps * batch_size * block_size
if master_process:
    split = f", its rows split over {plan.row_split} host devices" if plan.row_split > 1 else f", the state sharded over {fsdp} (fsdp)" if fsdp > 1 else ""
    print(f"training on {len(plan.devices)} {platform} device(s) in {jax.process_count()} process(es), dtype {dtype}, "
          f"{plan.micro_steps} micro-step(s) of batch_size {batch_size} per device{split}")
print(f"tokens per iteration will be: {tokens_per_iter:,}")

def call_end(it):
    """The first iteration after the compiled call that starts at it: calls end at eval points, so evals and
    checkpoints fall between calls, and after max_iters."""
    return max(it + 1, min(it + plan.iters_per_call, (it // eval_interval + 1) * eval_interval, max_iters + 1))

def train_batches(it):
    """This process's share of the iterations of the call that starts at it, stacked on axis 1: (local
    devices, iters_per_call, micro_steps, rows, block_size); the slots past the call's end are zeros."""
    batches = []
    for i in range(it, call_end(it)):
        starts = training.batch_indices(seed, 'train', i, num_tokens['train'], block_size, (gradient_accumulation_steps, batch_size))
        batches.append(training.Batch(*get_batch('train', parallel.split_batch(starts, plan), gptconf.vocab_size)))
    batches += [jax.tree.map(np.zeros_like, batches[0])] * (plan.iters_per_call - len(batches))
    return jax.tree.map(lambda *a: np.stack(a, axis=1), *batches)

# eval_iters batches per split, padded to a multiple of the devices; the padding is masked out
eval_batches = -(-eval_iters // len(plan.devices)) * len(plan.devices)
eval_progress = parallel.Progress('eval', disable=not master_process) # a bar when an eval runs long

def eval_batch(split, it):
    """This process's share of split's eval batches at iteration it, and which of them count."""
    starts = training.batch_indices(seed, 'val' if split == 'val' else 'eval_train', it, num_tokens[split], block_size,
                                    (eval_batches, batch_size))
    x, y = get_batch(split, parallel.split_batch(starts, plan), gptconf.vocab_size)
    batch_ids = parallel.split_batch(np.broadcast_to(np.arange(eval_batches)[:, None], starts.shape), plan)
    return x, y, batch_ids[..., 0] < eval_iters

# mixed precision: compute in dtype, master weights and optimizer state in fp32 (autocast and GradScaler's role)
training.set_precision(dtype)

# optimizer (an optax transformation, tx: `optimizer` is the config's choice)
tx = training.configure_optimizers(param_shapes(gptconf), weight_decay, learning_rate, (beta1, beta2), grad_clip, optimizer, muon_lr)

# compile ahead of time, on shapes only: nothing is allocated until XLA says it fits
print("compiling the training step" + (f" ({plan.iters_per_call} iterations per call)" if plan.iters_per_call > 1 else "") + "...")
t_compile = time.time()
try:
    compiled = training.compile_steps(gptconf, tx, plan, dtype, seed, eval_batches, params is None, eval_progress)
except Exception as e: # XLA lacks some half-precision ops on some platforms (e.g. a float16 dot with float32 accumulation on CPU)
    if dtype == 'float32':
        raise # a float32 step that does not compile is a bug: show all of it
    die(f"the training step does not compile with dtype={dtype} on {platform} ({type(e).__name__}: "
        f"{str(e).strip().splitlines()[0]}): use --dtype=float32 or {'float16' if dtype == 'bfloat16' else 'bfloat16'}")
train_step, eval_step = compiled['train step'][0], compiled['eval step'][0]
print(f"compile time: {time.time() - t_compile:.1f}s ("
      + ", ".join(f"{name} {seconds:.1f}s" for name, (_, seconds) in compiled.items()) + ", side by side)")
# XLA's own estimate against the device's memory; a refusal lists XLA's estimates for other settings
parallel.check_memory([train_step, eval_step], plan.local_devices, lambda: training.other_settings(
    gptconf, tx, devices, gradient_accumulation_steps, batch_size, dtype, seed, plan, num_params))

# the train state, made on the first local device, then one copy per device (model.to(device)'s role) or under fsdp its shards
with jax.default_device(plan.local_devices[0]):
    if params is None:
        state = compiled['initial state'][0](jax.random.PRNGKey(seed))
    else:
        state = training.init_train_state(params if fsdp == 1 else parallel.put_state(params, plan), tx, dtype, seed)
    if ckpt_arrays is not None: # the optimizer's state_dict (a ckpt.pt's torch AdamW state converted)
        try:
            state = state._replace(opt_state=restore_optimizer(state.opt_state, ckpt_arrays, ckpt_path))
            if state.loss_scale != () and any(k.startswith('loss_scale') for k in ckpt_arrays):
                state = state._replace(loss_scale=unflatten_like(state.loss_scale, ckpt_arrays, 'loss_scale', ckpt_path))
        except CheckpointError as e:
            die(str(e))
state = parallel.put_state(state, plan)
params = ckpt_arrays = None # free up memory: the devices hold the state now

# helps estimate an arbitrarily accurate loss over either split using many batches
def estimate_loss():
    out = {}
    for split in ['train', 'val']:
        x, y, valid = parallel.shard(eval_batch(split, iter_num), parallel.batch_sharding(plan))
        eval_progress.start(valid.shape[1], f"eval {split}")
        total = eval_step(state.params, x, y, valid) # summed over batches and devices (each batch row_split times)
        out[split] = float(parallel.first_shard(total).reshape(())) / (eval_iters * plan.row_split)
        eval_progress.close()
    return out

# learning rate decay scheduler (cosine with warmup)
def get_lr(it):
    return training.get_lr(it, learning_rate, warmup_iters, lr_decay_iters, min_lr, decay_lr)

def save(iter_num, best_val_loss):
    host = parallel.get_state(state, plan) # under fsdp every process hands over its shards
    if not master_process:
        return
    arrays = {**params_to_arrays(host.params), **flatten(host.opt_state, 'optimizer'), **flatten(host.loss_scale, 'loss_scale')}
    meta = {'model_args': model_args, 'iter_num': iter_num, 'best_val_loss': best_val_loss,
            'config': config, 'seed': seed, 'dtype': dtype}
    print(f"saving checkpoint to {out_dir}")
    try:
        save_checkpoint(os.path.join(out_dir, CKPT_NAME), arrays, meta)
    except OSError as e:
        die(f"cannot write the checkpoint to {out_dir} ({e.strerror}); the previous checkpoint is intact")

def stop_diverged(it, what):
    die(f"iter {it}: {what}, training diverged and stops here; {describe(out_dir, 'untouched')}. "
        f"Try a lower --learning_rate or --grad_clip")

# logging
if wandb_log and master_process:
    try:
        import wandb
    except ImportError:
        die("wandb_log=True but wandb is not installed: pip install wandb")
    wandb.init(project=wandb_project, name=wandb_run_name, config=config)

# training loop
prefetch = training.Prefetcher(train_batches, parallel.batch_sharding(plan), start=iter_num, after=call_end) # the first batches are on their way
t0 = time.time()
local_iter_num = 0 # number of iterations in the lifetime of this process
running_mfu = -1.0
peak_flops = parallel.device_peak_flops(plan.local_devices[0]) or 312e12 # unknown devices (CPUs) against an A100, as nanoGPT
rank_sequences = gradient_accumulation_steps * batch_size * plan.row_split // len(plan.devices) # per iteration, per DDP rank
while True:

    # evaluate the loss on train/val sets and write checkpoints
    if iter_num % eval_interval == 0:
        losses = estimate_loss() # every process takes part (the eval is pmapped); the master reports
        if not math.isfinite(losses['val']):
            stop_diverged(iter_num, f"val loss is {losses['val']}")
        if master_process:
            print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}, "
                  f"val perplexity {training.perplexity(losses['val']):.2f}")
            if wandb_log:
                wandb.log({"iter": iter_num, "train/loss": losses['train'], "val/loss": losses['val'],
                           "val/perplexity": training.perplexity(losses['val']), "lr": get_lr(iter_num),
                           "mfu": running_mfu*100}) # mfu as a percentage
        if losses['val'] < best_val_loss or always_save_checkpoint:
            best_val_loss = losses['val']
            if iter_num > 0 and (master_process or fsdp > 1):
                save(iter_num, best_val_loss)
    if iter_num == 0 and eval_only:
        if master_process:
            print(f"eval_only: train loss {losses['train']:.4f} (perplexity {training.perplexity(losses['train']):.2f}), "
                  f"val loss {losses['val']:.4f} (perplexity {training.perplexity(losses['val']):.2f})")
        break

    # forward, backward over all micro-batches, the gradient average across devices and AdamW, for each
    # iteration of the call, in one compiled call; its learning rates set for each of them
    end = call_end(iter_num)
    lrs = np.zeros(plan.iters_per_call, np.float32)
    lrs[:end - iter_num] = [get_lr(it) for it in range(iter_num, end)]
    state, metrics = train_step(state, prefetch.get(iter_num), lrs, np.int32(iter_num), np.int32(end - iter_num))

    # timing and logging. note: the losses are a sync point, and every process checks them for nan
    lossfs = parallel.first_shard(metrics['loss']).reshape(-1)[:end - iter_num].tolist()
    t1 = time.time()
    dt = (t1 - t0) / (end - iter_num) # each iteration of the call takes its share of the call's time
    t0 = t1
    for it, lossf in enumerate(lossfs, start=iter_num):
        if not math.isfinite(lossf):
            stop_diverged(it, f"loss is {lossf}")
        if it % log_interval == 0 and master_process:
            if local_iter_num >= 5: # let the training loop settle a bit
                mfu = estimate_mfu(gptconf, num_params, rank_sequences, dt, peak_flops)
                running_mfu = mfu if running_mfu == -1.0 else 0.9*running_mfu + 0.1*mfu
            print(f"iter {it}: loss {lossf:.4f}, time {dt*1000:.2f}ms, mfu {running_mfu*100:.2f}%")
        local_iter_num += 1
    iter_num = end

    # termination conditions
    if iter_num > max_iters:
        break

prefetch.close()
if wandb_log and master_process:
    wandb.finish()
