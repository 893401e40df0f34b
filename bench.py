"""A much shorter version of train.py for benchmarking: its compiled step, apart from compile."""
import os
import resource
import sys
import time

import numpy as np
import jax

from model import GPTConfig, param_shapes, get_num_params, estimate_mfu
import backends
import parallel
from cli import die, die_on, on_interrupt
import training

# -----------------------------------------------------------------------------
batch_size = 12
block_size = 1024
bias = False
real_data = True # else random tokens
dataset = 'openwebtext'
seed = 1337
device, dtype = 'cuda', 'auto' # as train.py
compile = True # torch.compile, with --compare=torch
profile, profile_dir = False, 'bench_log' # a jax.profiler trace of 3 steps
n_layer, n_head, n_embd, vocab_size = 12, 12, 768, 50304 # GPT-2 124M
gradient_accumulation_steps = 1
optimizer, fsdp, remat = 'adamw', 1, False # as train.py
burnin, num_steps = 10, 20 # untimed iterations, then timed ones
peak_flops = 0.0 # for MFU; 0: the device's table, else measured
compare = '' # 'torch': also Hugging Face's GPT-2 in PyTorch, same batches
# -----------------------------------------------------------------------------
_defaults = dict(globals())
exec(open(os.path.join(os.path.dirname(__file__), 'configurator.py')).read())
G = gradient_accumulation_steps
on_interrupt(lambda: "interrupted")
parallel.pin_platform(device) # before JAX starts, as train.py
freed_kept = backends.setup_cpu(device, n_layer, n_embd, G * batch_size)

if compare not in ('', 'torch') or compare and optimizer != 'adamw':
    die(f"compare={compare!r} with optimizer={optimizer!r}: use --compare=torch with adamw or none")
dims = dict(vocab_size=vocab_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
if min(*dims.values(), batch_size, block_size, G, num_steps, fsdp, burnin + 1) < 1:
    die("sizes, gradient_accumulation_steps, num_steps and fsdp must be positive, burnin >= 0")
devices = parallel.select_devices(device)
platform, kind = devices[0].platform, devices[0].device_kind
dtype = parallel.select_dtype(dtype, platform)
small = dict(batch_size=2, block_size=256, burnin=2, num_steps=8, compile=False)
small = {k: v for k, v in small.items() if platform == 'cpu' and globals()[k] == _defaults[k]
         and not any(a.startswith(f'--{k}=') for a in sys.argv)} # GPU sizes: minutes on a CPU
if small:
    globals().update(small)
    print("CPU-sized defaults (give them to change):", *(f"{k}={v}" for k, v in small.items()))
tokens_per_iter = G * batch_size * block_size
print(f"{len(devices)} x {kind}, {dtype}, {n_layer}L/{n_head}H/{n_embd}C, vocab {vocab_size}"
      f", {G} micro-batch(es) of {batch_size} x {block_size} = {tokens_per_iter:,} tokens/iter"
      + f", the state sharded over {fsdp} (fsdp)" * (fsdp > 1) + ", remat" * remat)
with die_on(ValueError): # as train.py
    gptconf = GPTConfig(block_size=block_size, bias=bias, remat=remat, **dims)
    shapes = param_shapes(gptconf)
    mesh = parallel.make_mesh(devices, fsdp)
    _, ranks = parallel.side_by_side(G, batch_size, mesh)
    tx = training.configure_optimizers(shapes, 1e-2, 1e-4, (0.9, 0.95), 1.0, optimizer)
num_params = get_num_params(shapes)
print(f"number of parameters: {num_params / 1e6:.2f}M")

path = os.path.join('data', dataset, 'train.bin')
data = np.random.default_rng(seed % 2**32).integers(0, vocab_size, 2**20 + block_size, np.uint16)
if real_data and os.path.exists(path):
    data = np.memmap(path, dtype=np.uint16, mode='r')
    if len(data) <= block_size or data[:100_000].max() >= vocab_size:
        die(f"{path}: too few tokens, or ids >= vocab_size={vocab_size}")
elif real_data:
    print(f"{path} not found: using random tokens (as --real_data=False)")
make_batch = lambda it: training.windows(data, training.batch_indices(
    seed, 'train', it, len(data), block_size, (G, batch_size)), block_size)

def timed(fn, *args):
    t0 = time.perf_counter()
    return fn(*args), time.perf_counter() - t0

peak = peak_flops or parallel.device_peak_flops(devices[0])
peak_what = "given by --peak_flops" if peak_flops else f"{kind} bf16 table"
if not peak: # the best run: a shared host can halve one
    n_peak = 1 if platform == 'cpu' else len(devices) # one host device's matmul uses every core
    a, f = jax.numpy.ones((2048, 2048), device=devices[0]), jax.jit(lambda a: a @ a)
    peak = 2 * 2048**3 * n_peak / min(timed(lambda: f(a).block_until_ready())[1] for _ in range(11))
    peak_what = f"2048x2048 fp32 matmul measured now on {n_peak} {platform} device(s)"
print(f"peak: {peak / 1e9:,.1f} GFLOP/s ({peak_what})")

compiled = training.compile_steps(gptconf, tx, mesh, G, batch_size, dtype, seed, from_scratch=True)
step, compile_s = compiled['train step']
state = compiled['initial state'][0](jax.random.PRNGKey(seed)) # under fsdp, made in its shards

def jax_step(it):
    global state
    x, y = (training.arrange(a, ranks) for a in make_batch(it))
    state, metrics = step(state, parallel.put_batch(training.Batch(x, y), mesh), np.float32(1e-4),
                          np.int32(it))
    return float(parallel.local_value(metrics['loss']))

steps = {'jax': (jax_step, compile_s)}
if compare:
    try:
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError as e:
        die(f"--compare=torch: {e} (pip install torch transformers)")
    tdev = 'cuda' if platform == 'gpu' and torch.cuda.is_available() else 'cpu'
    torch.manual_seed(seed)
    tmodel = GPT2LMHeadModel(GPT2Config(n_positions=block_size, **dims, activation_function='gelu',
        resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, bos_token_id=0, eos_token_id=0)).to(tdev).train()
    if not bias:
        print("torch: Hugging Face's GPT-2 has biases whatever --bias says")
    groups = [{'params': [p for p in tmodel.parameters() if (p.dim() >= 2) == d], 'weight_decay': w}
              for d, w in ((True, 1e-2), (False, 0.0))]
    topt = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), fused=tdev == 'cuda')
    ctx = torch.autocast(tdev, getattr(torch, dtype), enabled=dtype != 'float32')
    scaler = torch.amp.GradScaler(tdev, enabled=dtype == 'float16')
    fwd = torch.compile(tmodel) if compile else tmodel

    def torch_step(it):
        for x, y in zip(*(torch.from_numpy(a).long().to(tdev) for a in make_batch(it))):
            with ctx:
                logits = fwd(x).logits.float()
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()) / G
            scaler.scale(loss).backward()
        scaler.unscale_(topt)
        torch.nn.utils.clip_grad_norm_(tmodel.parameters(), 1.0)
        scaler.step(topt)
        scaler.update()
        topt.zero_grad(set_to_none=True)
        return loss.item() * G # .item() waits for the step
    compile_s = timed(torch_step, 0)[1] # torch.compile compiles here
    steps[f"torch ({'torch.compile' if compile else 'eager'})"] = (torch_step, compile_s)

# --compare=torch: turns of 5 steps, each turn's first untimed (torch's threads spin after it)
times, done = {name: [] for name in steps}, dict.fromkeys(steps, 0)
while any(len(t) < num_steps for t in times.values()):
    for name, (run, _) in steps.items():
        for k in range(5 if compare else burnin + num_steps):
            if len(times[name]) == num_steps:
                break
            done[name] = it = done[name] + 1
            lossf, dt = timed(run, it)
            if it > burnin and (k > 0 or not compare):
                times[name].append(dt)
            if it == burnin or len(times[name]) == num_steps or it % 10 == 0:
                print(f"{name.split()[0]} {it} loss: {lossf:.4f}, {dt * 1000:.1f}ms")
for name, (_, compile_s) in steps.items():
    t = np.asarray(times[name]) * 1000
    times[name] = med = np.median(t)
    print(f"{name}: compile {compile_s:.1f}s | median {med:.2f} ms/iter (min {t.min():.2f}, "
          f"max {t.max():.2f}, {len(t)} iters) | {tokens_per_iter / med * 1000:,.0f} tokens/s | "
          f"MFU {estimate_mfu(gptconf, num_params, G * batch_size, med / 1000, peak) * 100:.1f}%")
if compare:
    print(f"jax/torch: {times[name] / times['jax']:.2f}x the tokens/s of torch (torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; jax {jax.__version__})"
          + "; torch shares backends.setup_cpu's malloc settings" * freed_kept)

used = (devices[0].memory_stats() or {}).get('peak_bytes_in_use')
where = f"in use on {kind}" if used else "process RSS" + " (torch's included)" * bool(compare)
used = used or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 # KiB on Linux
need = (parallel.compiled_bytes(step) or 0) / 2**20
print(f"peak memory: {used / 2**20:,.1f} MiB {where}"
      + f"; XLA's estimate for the step: {need:,.1f} MiB per device" * bool(need))

if profile:
    with jax.profiler.trace(profile_dir):
        for it in range(3):
            with jax.profiler.StepTraceAnnotation('train', step_num=it):
                jax_step(it)
    print(f"profile: a trace of 3 iterations in {profile_dir} (tensorboard --logdir={profile_dir})")
