"""
A much shorter version of train.py for benchmarking: it times the very call train.py runs
(training.parallel_train_step over the same device plan, state donated: on a CPU several iterations
per call for small models, as train.py), reporting compile time apart from the steady state,
median ms/iter, tokens/s, MFU and peak memory.

$ python bench.py                                  # GPT-2 124M; on a CPU a CPU-sized run (see below)
$ python bench.py --batch_size=12 --block_size=64 --n_layer=4 --n_head=4 --n_embd=128 --vocab_size=65
$ python bench.py --compare=torch                  # the same configuration through PyTorch, same run
$ python bench.py --profile=True                   # jax.profiler trace for TensorBoard / Perfetto

On GPU/TPU the defaults are nanoGPT's (124M, batch_size=12, block_size=1024). On a CPU, unless
given on the command line, batch_size=2, block_size=256 and fewer steps, so that it ends in
about a minute; the output says so. CPU MFU is against a matmul peak measured at start-up
(or --peak_flops), since there is no table for CPUs.
"""
import os
import sys

import time
import resource
from contextlib import nullcontext

import numpy as np
import jax
import jax.numpy as jnp

from model import GPTConfig, param_shapes, get_num_params, estimate_mfu, flops_per_iter
import parallel
from parallel import die
import training

# -----------------------------------------------------------------------------
batch_size = 12
block_size = 1024
bias = False
real_data = True
dataset = 'openwebtext' # real_data reads data/<dataset>/train.bin; random tokens when it is missing
seed = 1337
device = 'cuda' # 'cpu', 'cuda', 'cuda:0', 'tpu': falls back to what JAX has
dtype = 'auto' # 'float32', 'bfloat16', 'float16'; 'auto': bfloat16 on GPU/TPU, float32 on CPU
compile = True # kept for nanoGPT's command lines (JAX always compiles); used by --compare=torch: torch.compile
profile = False # write a jax.profiler trace of a few steps to profile_dir
profile_dir = 'bench_log'
# model size
n_layer = 12
n_head = 12
n_embd = 768
vocab_size = 50304
gradient_accumulation_steps = 1 # micro-batches per iteration (lax.scan inside the step)
iters_per_call = 0 # as train.py: iterations per compiled call; 0: chosen as train.py chooses
optimizer = 'adamw' # as train.py: 'adamw' or 'muon'
fsdp = 1 # as train.py: devices sharing each parameter, gradient and optimizer state; 1: whole copies (DDP's)
remat = False # as train.py: recompute each block's activations in the backward
# benchmark
burnin = 10 # iterations before timing starts (CPU default: 2)
num_steps = 20 # timed iterations (CPU default: 8)
peak_flops = 0.0 # FLOP/s that MFU is measured against; 0: the device table, on CPU a matmul measured now
compare = '' # 'torch': also time Hugging Face GPT2LMHeadModel + torch.optim.AdamW on the same shapes
torch_threads = 0 # torch.set_num_threads for --compare=torch; 0: torch's default
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))]
_defaults = {k: globals()[k] for k in config_keys}
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
_given = {k for k in config_keys if globals()[k] != _defaults[k] or any(a.startswith(f'--{k}=') for a in sys.argv[1:])}
parallel.pin_platform(device) # as train.py, before JAX starts its backends
parallel.use_host_devices()
freed_kept = parallel.keep_freed_memory(device, n_layer, n_embd)
# -----------------------------------------------------------------------------

if optimizer not in training.OPTIMIZERS:
    die(f"optimizer={optimizer!r}: use one of {', '.join(map(repr, training.OPTIMIZERS))}")
if compare not in ('', 'torch'):
    die(f"compare={compare!r}: use --compare=torch, or leave it empty")
if compare and optimizer != 'adamw':
    die("--compare=torch times torch.optim.AdamW: use it with --optimizer=adamw")
for k in ('batch_size', 'block_size', 'n_layer', 'n_head', 'n_embd', 'vocab_size', 'gradient_accumulation_steps', 'num_steps'):
    if globals()[k] < 1:
        die(f"{k}={globals()[k]} must be positive")
if burnin < 0:
    die("burnin must be >= 0")
if iters_per_call < 0:
    die(f"iters_per_call={iters_per_call}: give a positive number, or 0 to choose as train.py does")

devices = parallel.select_devices(device)
platform = devices[0].platform
dtype = parallel.select_dtype(dtype, platform)

if platform == 'cpu':
    # nanoGPT's GPU-sized defaults take minutes per iteration on a CPU
    cpu_defaults = dict(batch_size=2, block_size=256, burnin=2, num_steps=8, compile=False)
    changed = {k: v for k, v in cpu_defaults.items() if k not in _given}
    globals().update(changed)
    if changed:
        print("CPU-sized defaults (give them on the command line to change): "
              + ", ".join(f"{k}={v}" for k, v in changed.items()))
gptconf = GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                    dropout=0.0, bias=bias, remat=remat)
num_params = get_num_params(param_shapes(gptconf))
# as train.py: micro-batches over the devices, or on CPU each micro-batch's rows over the host devices
try:
    plan = parallel.plan_devices(devices, gradient_accumulation_steps, batch_size, num_params,
                                 flops_per_iter(gptconf, num_params, gradient_accumulation_steps * batch_size), iters_per_call, fsdp)
except ValueError as e:
    die(str(e))
devices, iters_per_call = plan.devices, plan.iters_per_call
tokens_per_iter = gradient_accumulation_steps * batch_size * block_size
print(f"{len(devices)} {platform} device(s) ({devices[0].device_kind}), dtype {dtype}, "
      f"{n_layer}L/{n_head}H/{n_embd}C, vocab {vocab_size}, batch_size {batch_size} x block_size {block_size} "
      f"x {gradient_accumulation_steps} micro-batch(es) = {tokens_per_iter:,} tokens/iter"
      + (f", each micro-batch's rows split over {plan.row_split} host devices" if plan.row_split > 1 else "")
      + (f", the state sharded over {fsdp} (fsdp)" if fsdp > 1 else "") + (", remat" if remat else ""))
if iters_per_call > 1:
    print(f"jax: {iters_per_call} iterations per compiled call (train.py's choice here unless given); times are per iteration")

# data: windows of data/<dataset>/train.bin as train.py reads them, else fixed random tokens
data_path = os.path.join('data', dataset, 'train.bin')
if real_data and not os.path.exists(data_path):
    print(f"{data_path} not found: using random tokens (as --real_data=False)")
    real_data = False
if real_data:
    train_data = np.memmap(data_path, dtype=np.uint16, mode='r')
    if len(train_data) <= block_size:
        die(f"{data_path} holds {len(train_data)} tokens, too few for block_size={block_size}")
    if int(train_data[:100_000].max()) >= vocab_size:
        die(f"{data_path} has token ids >= vocab_size={vocab_size}: give --vocab_size of its tokenizer")

    def make_batch(it):
        """The iteration's (gradient_accumulation_steps, batch_size, block_size) inputs and targets."""
        starts = training.batch_indices(seed, 'train', it, len(train_data), block_size, (gradient_accumulation_steps, batch_size))
        return training.get_batch(train_data, starts, block_size)
else:
    _tokens = np.random.default_rng(seed).integers(0, vocab_size, (gradient_accumulation_steps, batch_size, block_size + 1), dtype=np.int32)

    def make_batch(it):
        return _tokens[..., :-1], _tokens[..., 1:]


def jax_calls(call):
    """The batches of call number `call`: iterations call*iters_per_call onwards, stacked on axis 1."""
    its = range(call * iters_per_call, (call + 1) * iters_per_call)
    return jax.tree.map(lambda *a: np.stack(a, axis=1), *[training.Batch(*[parallel.split_batch(a, plan) for a in make_batch(it)])
                                                          for it in its])


def measure_matmul_peak(n=2048, reps=10):
    """FLOP/s of an n x n fp32 matmul on the device: the best of several runs, since on a shared CPU host
    a single run can measure half the peak."""
    with jax.default_device(devices[0]):
        a = jnp.ones((n, n), jnp.float32)
        f = jax.jit(lambda a, b: a @ b)
        for _ in range(2):
            f(a, a).block_until_ready()
        best = float('inf')
        for _ in range(reps):
            t0 = time.perf_counter()
            f(a, a).block_until_ready()
            best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


if peak_flops > 0:
    peak, peak_what = peak_flops, "given by --peak_flops"
elif parallel.device_peak_flops(devices[0]):
    peak, peak_what = parallel.device_peak_flops(devices[0]), f"{devices[0].device_kind} bf16 table"
    if dtype == 'float32':
        peak_what += " (fp32 runs are measured against it too)"
else:
    n_peak = 1 if platform == 'cpu' else len(devices) # one host device's matmul already uses every core
    peak, peak_what = measure_matmul_peak() * n_peak, f"2048x2048 fp32 matmul measured now on {n_peak} {platform} device(s)"
print(f"peak: {peak / 1e9:,.1f} GFLOP/s ({peak_what})")


def mfu_of(dt):
    return estimate_mfu(gptconf, num_params, batch_size * gradient_accumulation_steps, dt, peak)


def report(name, compile_s, times, per_call=1):
    times = np.asarray(times)
    med = float(np.median(times))
    counted = f"{len(times)} calls of {per_call} iterations" if per_call > 1 else f"{len(times)} iters"
    print(f"{name}: compile {compile_s:.1f}s | median {med * 1000:.2f} ms/iter "
          f"(min {times.min() * 1000:.2f}, max {times.max() * 1000:.2f}, {counted}) | "
          f"{tokens_per_iter / med:,.0f} tokens/s | MFU {mfu_of(med) * 100:.1f}%")
    return med


# -----------------------------------------------------------------------------
# JAX: training.py's step, as train.py builds it

training.set_precision(dtype)
print(f"number of parameters: {num_params / 1e6:.2f}M")
tx = training.configure_optimizers(param_shapes(gptconf), 1e-2, 1e-4, (0.9, 0.95), grad_clip=1.0, kind=optimizer)
compiled = training.compile_steps(gptconf, tx, plan, dtype, seed, from_scratch=True)
step, compile_s = compiled['train step']
need = parallel.compiled_bytes(step)
state = parallel.put_state(compiled['initial state'][0](jax.random.PRNGKey(seed)), plan) # under fsdp, made in its shards

lrs = np.full(iters_per_call, 1e-4, np.float32)


def jax_call(call):
    """Runs call number `call` (iters_per_call iterations) and returns its last loss, once it is back."""
    global state
    state, metrics = step(state, parallel.shard(jax_calls(call), parallel.batch_sharding(plan)), lrs, np.int32(call * iters_per_call), np.int32(iters_per_call))
    return float(parallel.first_shard(metrics['loss']).reshape(-1)[-1])


def jax_step(call):
    """One timed call: batches made and sent to the devices, the step, the loss back (as torch_timed times
    make_batch, the step and loss.item()); returns the time per iteration."""
    t0 = time.perf_counter()
    lossf = jax_call(call)
    return lossf, (time.perf_counter() - t0) / iters_per_call



# -----------------------------------------------------------------------------
# PyTorch reference: the same model shapes as Hugging Face's GPT-2, torch.optim.AdamW, clipping

if compare == 'torch':
    try:
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError as e:
        die(f"--compare=torch needs torch and transformers ({e}): pip install torch transformers")
    if torch_threads > 0:
        torch.set_num_threads(torch_threads)
    tdev = 'cuda' if platform == 'gpu' and torch.cuda.is_available() else 'cpu'
    torch.manual_seed(seed)
    tmodel = GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_positions=block_size, n_embd=n_embd, n_layer=n_layer,
                                        n_head=n_head, activation_function='gelu', resid_pdrop=0.0, embd_pdrop=0.0,
                                        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)).to(tdev)
    tmodel.train()
    if not bias:
        print("torch: Hugging Face GPT-2 always has biases; bias=False only drops them on the JAX side")
    decay = [p for p in tmodel.parameters() if p.dim() >= 2]
    nodecay = [p for p in tmodel.parameters() if p.dim() < 2]
    topt = torch.optim.AdamW([{'params': decay, 'weight_decay': 1e-2}, {'params': nodecay, 'weight_decay': 0.0}],
                             lr=1e-4, betas=(0.9, 0.95), fused=tdev == 'cuda')
    ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
    ctx = nullcontext() if dtype == 'float32' else torch.autocast(device_type=tdev, dtype=ptdtype)
    scaler = torch.amp.GradScaler(tdev, enabled=dtype == 'float16')
    fwd = tmodel
    if compile:
        print("torch: compiling the model with torch.compile (--compile=False for eager)")
        fwd = torch.compile(tmodel)

    def torch_step(it):
        x, y = make_batch(it)
        for m in range(gradient_accumulation_steps):
            xb = torch.from_numpy(np.ascontiguousarray(x[m])).long().to(tdev)
            yb = torch.from_numpy(np.ascontiguousarray(y[m])).long().to(tdev)
            with ctx:
                logits = fwd(xb).logits
                loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.size(-1)), yb.view(-1))
                loss = loss / gradient_accumulation_steps
            scaler.scale(loss).backward()
        scaler.unscale_(topt)
        torch.nn.utils.clip_grad_norm_(tmodel.parameters(), 1.0)
        scaler.step(topt)
        scaler.update()
        topt.zero_grad(set_to_none=True)
        return loss.item() * gradient_accumulation_steps

    def torch_timed(it):
        t0 = time.perf_counter()
        lossf = torch_step(it)  # .item() waits for the step
        return lossf, time.perf_counter() - t0

    t0 = time.perf_counter()
    torch_step(0)  # torch.compile compiles here
    torch_compile_s = time.perf_counter() - t0

# -----------------------------------------------------------------------------
# timing: with --compare=torch the two take turns of TURN steps, so that both see the same load on a
# shared machine, and the first step of each turn is not timed: torch's OpenMP threads spin-wait after
# its last op and would slow the other's first step; medians after burn-in
TURN = 5

runners = [('jax', jax_step)] + ([('torch', torch_timed)] if compare == 'torch' else [])
times = {name: [] for name, _ in runners}
done = {name: 0 for name, _ in runners} # calls run (a JAX call runs iters_per_call iterations)
total = burnin + num_steps
while any(len(times[name]) < num_steps for name, _ in runners):
    for name, run in runners:
        for k in range(TURN if len(runners) > 1 else total):
            if len(times[name]) >= num_steps:
                break
            done[name] += 1
            it = done[name]
            lossf, dt = run(it)
            if it > burnin and (k > 0 or len(runners) == 1):
                times[name].append(dt)
            if it == burnin or len(times[name]) == num_steps or it % 10 == 0:
                print(f"{name} {it} loss: {lossf:.4f}, {dt * 1000:.1f}ms")
jax_med = report("jax", compile_s, times['jax'], iters_per_call)
if compare == 'torch':
    torch_med = report("torch" + (" (torch.compile)" if compile else " (eager)"), torch_compile_s, times['torch'])
    print(f"jax/torch: {torch_med / jax_med:.2f}x the tokens/s of torch (torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; jax {jax.__version__})")
    if freed_kept:  # one process: torch's big tensors are malloc'd under the same settings
        print("(torch shares this process's malloc settings, parallel.keep_freed_memory: they speed its step up too)")

stats = devices[0].memory_stats() or {}
if stats.get('peak_bytes_in_use'):
    print(f"peak memory: {stats['peak_bytes_in_use'] / 2**20:,.1f} MiB in use on {devices[0].device_kind}"
          + (f" (XLA's estimate for the step: {need / 2**20:,.1f} MiB)" if need else ""))
else:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(f"peak memory: {rss:,.1f} MiB process RSS" + (" (torch's included)" if compare else "")
          + (f"; XLA's estimate for the step: {need / 2**20:,.1f} MiB per device" if need else ""))

if profile:
    os.makedirs(profile_dir, exist_ok=True)
    with jax.profiler.trace(profile_dir):
        for call in range(3):
            with jax.profiler.StepTraceAnnotation('train', step_num=call):
                jax_call(call)
    print(f"profile: jax.profiler trace of 3 calls ({3 * iters_per_call} iterations) in {profile_dir} "
          f"(tensorboard --logdir={profile_dir}, or Perfetto)")

