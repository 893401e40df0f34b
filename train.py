"""This training script runs on one device, all the devices of a machine or across machines: one
jax.jit step over a device mesh, data parallel (DDP's role) or with --fsdp=N sharded (FSDP's).

To run on one machine (all its GPUs, or the CPU), example:
$ python train.py --batch_size=32

To run across 2 machines, the same command on both, JAX_PROCESS_ID=1 on the second (or
--coordinator_address=auto on a cluster):
$ JAX_COORDINATOR_ADDRESS=123.456.123.456:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0 python train.py
"""
import os
import time
import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import jax
from tqdm import tqdm

from model import GPTConfig, param_shapes, get_num_params, crop_block_size, from_pretrained, \
    estimate_mfu
from checkpoint import CKPT_NAME, CheckpointError, save_checkpoint, load_checkpoint, resume_path, \
    params_from_arrays, state_arrays, restore_state, describe, check_writable
import backends
import parallel
from cli import die, die_on, on_interrupt
import training
import hellaswag

# -----------------------------------------------------------------------------
# default config values designed to train a gpt2 (124M) on OpenWebText
# I/O
out_dir = 'out'
eval_interval = 2000
log_interval = 1
eval_iters = 200
eval_only = False # if True, script exits right after the first eval
always_save_checkpoint = True # if True, always save a checkpoint after each eval
init_from = 'scratch' # 'scratch' or 'resume' or 'gpt2*' or a GPT-2 directory or a nanoGPT ckpt.pt
eval_hellaswag = False # every eval also scores HellaSwag (GPT-2's tokens only)
hellaswag_examples = 0 # its first N val examples; 0: all
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
remat = False # recompute each block in the backward: less memory
# modern GPTs' options: see model.GPTConfig; config/llama.py sets Llama's
activation = 'gelu'
mlp_hidden = 0
n_kv_head = 0
rope, rope_theta = False, 10000.0
norm, norm_eps = 'layernorm', 1e-5
qk_norm = False
tie_lm_head = True
softcap = 0.0
# adamw optimizer
optimizer = 'adamw' # 'adamw' or 'muon': Muon for the blocks' 2-D weights, AdamW for the rest
muon_lr = 0.02 # Muon's max learning rate, on the same schedule
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
# distributed: one process per machine (torchrun + DDP's role)
backend = 'nccl' # kept for nanoGPT's flags; 'mpi': MPI for CPU collectives (default gloo)
coordinator_address = '' # 'host:port' of process 0, or 'auto'; default $JAX_COORDINATOR_ADDRESS
num_processes = 0 # default $JAX_NUM_PROCESSES, else 1
process_id = -1 # default $JAX_PROCESS_ID
fsdp = 1 # devices sharing each parameter, gradient and moment (FSDP); 1: DDP's copies
# system
device = 'cuda' # 'cpu', 'cuda' (all local GPUs), 'cuda:0', 'tpu'; 'cuda' falls back to what JAX has
dtype = 'auto' # 'float32', 'bfloat16', or 'float16'; 'auto': bfloat16 on GPU/TPU, float32 on CPU
compile = True # kept for nanoGPT's flags: JAX always compiles the step
seed = 1337 # init, batches and dropout are pure functions of the seed and the iteration
# -----------------------------------------------------------------------------
config_keys = [k for k,v in globals().items() if not k.startswith('_') and not k.isupper() and isinstance(v, (int, float, bool, str))]
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read()) # overrides from command line or config file
config = {k: globals()[k] for k in config_keys} # will be useful for logging
# -----------------------------------------------------------------------------

# init these up here, can override if init_from='resume' (i.e. from a checkpoint)
iter_num = 0
best_val_loss = 1e9
on_interrupt(lambda: f"interrupted at iter {iter_num}; {describe(out_dir, 'intact')}: "
                     f"continue with --init_from=resume")

# various inits, derived attributes, I/O setup; the first two before JAX starts
parallel.pin_platform(device)
backends.setup_cpu(device, n_layer, n_embd, gradient_accumulation_steps * batch_size)
parallel.start_processes(coordinator_address, num_processes, process_id, backend, config)
master_process = jax.process_index() == 0 # this process will do logging, checkpointing etc.
devices = parallel.select_devices(device)
dtype = config['dtype'] = parallel.select_dtype(dtype, devices[0].platform)
if bad := [k for k in ('gradient_accumulation_steps', 'batch_size', 'block_size', 'fsdp', 'eval_interval', 'eval_iters',
                       'log_interval') if config[k] < 1]: # nanoGPT would divide by zero or compute nothing
    die(f"{bad[0]}={config[bad[0]]}: must be at least 1")
# poor man's data loader
data_dir = os.path.join('data', dataset)
with die_on(ValueError):
    mesh = parallel.make_mesh(devices, fsdp)
    micro_steps, ranks = parallel.side_by_side(gradient_accumulation_steps, batch_size, mesh)
    if master_process:
        check_writable(out_dir) # fail now, not at the first checkpoint
    num_tokens = {s: training.count_tokens(data_dir, s, block_size) for s in ('train', 'val')}
    vocab = training.load_meta(data_dir) # attempt to derive vocab_size from the dataset
tokens_per_iter = gradient_accumulation_steps * batch_size * block_size
print(f"tokens per iteration will be: {tokens_per_iter:,}")

ckpt_path = ckpt_arrays = None
meta_vocab_size = vocab['vocab_size'] if vocab else None
if vocab:
    print(f"found vocab_size = {meta_vocab_size} (inside {data_dir})")

# model init
model_args = {k: config[k] for k in GPTConfig.__dataclass_fields__ if k in config}
try:
    if init_from == 'scratch':
        # init a new model from scratch
        print("Initializing a new model from scratch")
        # determine the vocab size we'll use for from-scratch training
        if meta_vocab_size is None:
            print("defaulting to vocab_size of GPT-2 to 50304 (50257 rounded up for efficiency)")
        model_args['vocab_size'] = meta_vocab_size if meta_vocab_size is not None else 50304
        params = None # made compiled, in its shards, once XLA says the step fits
    elif init_from == 'resume' or init_from.endswith('.pt'): # out_dir's, or a nanoGPT ckpt.pt
        ckpt_path = resume_path(out_dir) if init_from == 'resume' else init_from
        print(f"Resuming training from {ckpt_path}")
        ckpt_arrays, ckpt_meta = load_checkpoint(ckpt_path)
        saved_with = ckpt_meta.get('config', {}).get('optimizer', 'adamw') # nanoGPT's: AdamW
        if saved_with != optimizer:
            die(f"{ckpt_path} holds {saved_with}'s state but optimizer={optimizer!r}: "
                f"resume with --optimizer={saved_with}")
        # the checkpoint's architecture, else we can't even resume training; dropout as desired
        model_args = {**ckpt_meta['model_args'], 'dropout': dropout}
        if meta_vocab_size is not None and meta_vocab_size != model_args['vocab_size']:
            die(f"{ckpt_path} has vocab_size {model_args['vocab_size']} but {data_dir} has {meta_vocab_size}: "
                f"it was trained on another dataset (--dataset) or the data were prepared again")
        params = params_from_arrays(ckpt_arrays, model_args, ckpt_path)
        iter_num = ckpt_meta['iter_num']
        best_val_loss = ckpt_meta['best_val_loss']
        if ckpt_meta.get('seed', seed) != seed:
            print(f"using the checkpoint's seed {ckpt_meta['seed']} (not {seed}): batches continue")
            seed = config['seed'] = ckpt_meta['seed']
    elif init_from.startswith('gpt2') or os.path.isdir(init_from):
        print(f"Initializing from pretrained weights: {init_from}")
        gptconf, params = from_pretrained(init_from, dict(dropout=dropout))
        model_args = vars(gptconf)
    else:
        die(f"init_from={init_from!r}: use 'scratch', 'resume', 'gpt2', 'gpt2-medium', 'gpt2-large', "
            f"'gpt2-xl', a local Hugging Face directory or a nanoGPT ckpt.pt")
    gptconf = GPTConfig(**model_args)
except CheckpointError as e:
    die(f"{e}" + (" (every process reads the checkpoint process 0 wrote: put out_dir on a filesystem all "
                  "hosts share)") * (init_from == 'resume' and jax.process_count() > 1))
except (ValueError, OSError, KeyError, TypeError) as e: # bad model_args, missing or unreadable weights
    die(f"cannot initialize from {init_from!r}: {type(e).__name__}: {e}")
# crop down the model block size if desired, using model surgery
if block_size < gptconf.block_size:
    params, gptconf = crop_block_size(params, gptconf, block_size)
    ckpt_arrays = ckpt_arrays and {k: v[:block_size] if 'wpe' in k else v for k, v in ckpt_arrays.items()} # wpe's moments too
elif block_size > gptconf.block_size:
    die(f"block_size={block_size} is longer than the model's {gptconf.block_size} (init_from={init_from!r})")
# every field of the config, so we can store them into the checkpoint correctly
model_args = {k: v for k, v in vars(gptconf).items() if k != 'remat'}
gptconf.remat = remat # how the step computes, not the model: not in model_args
num_params = get_num_params(param_shapes(gptconf))
print(f"number of parameters: {num_params/1e6:.2f}M")
print(f"training on {len(devices)} {devices[0].platform} device(s) in {jax.process_count()} process(es), "
      f"dtype {dtype}, {micro_steps} micro-step(s) of {ranks} x batch_size {batch_size}"
      + (f", the state sharded over {fsdp} (fsdp)" if fsdp > 1 else ""))

def get_batch(split, purpose, it, micro_batches):
    """This process's rows of micro_batches batches of split, `ranks` side by side."""
    starts = training.batch_indices(seed, purpose, it, num_tokens[split], block_size, (micro_batches, batch_size))
    starts = training.arrange(starts, ranks)[:, parallel.local_rows(ranks * batch_size)]
    data = np.memmap(os.path.join(data_dir, f'{split}.bin'), dtype=np.uint16, mode='r') # anew: no leak
    with die_on(ValueError):
        return training.windows(data, starts, block_size, gptconf.vocab_size)

with die_on(ValueError, OSError): # data/hellaswag's val set is downloaded on first use
    hellaswag_val = hellaswag.load_examples('', hellaswag_examples, gptconf) if eval_hellaswag else []
    tx = training.configure_optimizers(param_shapes(gptconf), weight_decay, learning_rate, (beta1, beta2),
                                       grad_clip, optimizer, muon_lr)
    # compiled ahead of time on shapes, in dtype: nothing allocated until XLA says it fits
    print("compiling the training step...")
    compiled = training.compile_steps(gptconf, tx, mesh, gradient_accumulation_steps, batch_size, dtype,
                                      seed, eval_iters, params is None)
eval_batches = -(-eval_iters // ranks) * ranks # in whole steps of `ranks`; the padding is left out
train_step, eval_step = compiled['train step'][0], compiled['eval step'][0]
print("compile time (side by side): " + ", ".join(f"{name} {s:.1f}s" for name, (_, s) in compiled.items()))
# XLA's estimate against the device's memory; a refusal lists other settings'
parallel.check_memory([train_step, eval_step], mesh, lambda: training.other_settings(
    gptconf, tx, devices, gradient_accumulation_steps, batch_size, dtype, seed, fsdp))

# the train state on the mesh: whole on every device, or its shards under fsdp
shardings = parallel.state_sharding(training.train_state_shapes(gptconf, tx, dtype, seed), mesh)
if params is None:
    state = compiled['initial state'][0](jax.random.PRNGKey(seed))
else:
    state = training.init_train_state(parallel.put_state(params, shardings.params), tx, dtype, seed)
    if ckpt_arrays is not None: # the optimizer's state (a ckpt.pt's converted)
        with die_on(CheckpointError):
            state = restore_state(state, ckpt_arrays, ckpt_path)
    state = parallel.put_state(state, shardings)
params = ckpt_arrays = None # free up memory: the devices hold the state now

# helps estimate an arbitrarily accurate loss over either split using many batches
def estimate_loss(params):
    out = {}
    for split, purpose in [('train', 'eval_train'), ('val', 'val')]:
        x, y = parallel.put_batch(get_batch(split, purpose, iter_num, eval_batches), mesh)
        steps = tqdm(range(eval_batches // ranks), f"eval {split}", delay=2, leave=False, disable=not master_process)
        out[split] = sum(float(parallel.local_value(eval_step(params, x, y, np.int32(k)))) for k in steps) / eval_iters
    return out

# learning rate decay scheduler (cosine with warmup)
def get_lr(it):
    return training.get_lr(it, learning_rate, warmup_iters, lr_decay_iters, min_lr, decay_lr)

def stop_diverged(it, what):
    die(f"iter {it}: {what}, training diverged and stops here; {describe(out_dir, 'untouched')}. "
        f"Try a lower --learning_rate or --grad_clip")

# logging
if wandb_log and master_process:
    with die_on(Exception): # no wandb package, or not logged in: its message says what to do
        import wandb
        wandb.init(project=wandb_project, name=wandb_run_name, config=config)

# training loop
train_batch = lambda it: parallel.put_batch(
    training.Batch(*get_batch('train', 'train', it, gradient_accumulation_steps)), mesh)
prefetch = ThreadPoolExecutor(1) # the next batch is made while a step runs (pin_memory's role)
next_batch = prefetch.submit(train_batch, iter_num)
t0 = time.time()
local_iter_num = 0 # number of iterations in the lifetime of this process
running_mfu = -1.0
metrics = None # the last step's
peak_flops = parallel.device_peak_flops(devices[0]) or 312e12 # unknown devices (CPUs) against an A100
while True:

    # evaluate the loss on train/val sets and write checkpoints
    if iter_num % eval_interval == 0:
        losses = estimate_loss(state.params) # every process takes part; the master reports
        if not math.isfinite(losses['val']):
            stop_diverged(iter_num, f"val loss is {losses['val']}")
        acc_norm = hellaswag.evaluate(state.params, gptconf, hellaswag_val)[2] if eval_hellaswag else None
        if master_process:
            print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}, "
                  f"val perplexity {training.perplexity(losses['val']):.2f}"
                  + (f", hellaswag acc_norm {acc_norm:.4f}" if eval_hellaswag else ""))
            if wandb_log:
                wandb.log({"iter": iter_num, "train/loss": losses['train'], "val/loss": losses['val'],
                           "val/perplexity": training.perplexity(losses['val']), "lr": get_lr(iter_num),
                           "mfu": running_mfu*100, # mfu as a percentage
                           **({"hellaswag/acc_norm": acc_norm} if eval_hellaswag else {})})
        if losses['val'] < best_val_loss or always_save_checkpoint:
            best_val_loss = losses['val']
            if iter_num > 0:
                arrays = state_arrays(parallel.get_state(state)) # every process: its shards under fsdp
                if master_process:
                    meta = {'model_args': model_args, 'iter_num': iter_num, 'best_val_loss': best_val_loss,
                            'config': config, 'seed': seed, 'dtype': dtype}
                    print(f"saving checkpoint to {out_dir}")
                    try:
                        save_checkpoint(os.path.join(out_dir, CKPT_NAME), arrays, meta)
                    except OSError as e:
                        die(f"cannot write the checkpoint to {out_dir} ({e.strerror}); "
                            f"the previous checkpoint is intact")
    if iter_num == 0 and eval_only:
        if master_process:
            print("eval_only: " + ", ".join(f"{k} loss {v:.4f} (perplexity {training.perplexity(v):.2f})"
                                            for k, v in losses.items()))
        break

    # forward, backward and update over every micro-batch, in one compiled call
    batch, next_batch = next_batch.result(), prefetch.submit(train_batch, iter_num + 1)
    in_flight = metrics # at most two steps in flight: with more, XLA:CPU's all-reduce deadlocked
    state, metrics = train_step(state, batch, np.float32(get_lr(iter_num)), np.int32(iter_num))
    jax.block_until_ready(in_flight)

    # timing and logging
    t1 = time.time()
    dt = t1 - t0
    t0 = t1
    if iter_num % log_interval == 0:
        # get loss as float. note: this is a CPU-GPU sync point; every process checks it for nan
        lossf = float(parallel.local_value(metrics['loss']))
        if not math.isfinite(lossf):
            stop_diverged(iter_num, f"loss is {lossf}")
        if local_iter_num >= 5: # let the training loop settle a bit
            mfu = estimate_mfu(gptconf, num_params, batch_size * micro_steps * ranks / len(devices), dt, peak_flops)
            running_mfu = mfu if running_mfu == -1.0 else 0.9*running_mfu + 0.1*mfu
        if master_process:
            print(f"iter {iter_num}: loss {lossf:.4f}, time {dt*1000:.2f}ms, mfu {running_mfu*100:.2f}%")
    iter_num += 1
    local_iter_num += 1

    # termination conditions
    if iter_num > max_iters:
        break

prefetch.shutdown(wait=False, cancel_futures=True) # wandb finishes its run at exit
