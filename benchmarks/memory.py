"""
How much memory a device needs to train GPT-2 124M .. 1558M, as XLA estimates it for the compiled step
(train.py's own memory check), compiled on shapes only: nothing is allocated, so it runs on a laptop.
Data parallel (every device a whole copy), fsdp (each device a share of the parameters, gradients and
AdamW moments) and fsdp with remat, over simulated devices:

$ python bench_memory.py                     # 8 devices, batch_size 1 per device, block_size 1024, bfloat16
$ python bench_memory.py --models=gpt2-xl --micro_steps=4   # config/finetune_shakespeare.py on 8 devices

The step is traced with the plain ops that a TPU runs (backends.py's CPU paths off); XLA:CPU compiles and
estimates it, with the memory-optimized scheduler where remat is on, as train.py does on a CPU. A GPU
runs cuDNN's fused attention instead, which keeps no (T, T) scores: less than these figures.
"""
import os
import sys
import time

devices = 8 # simulated CPU devices, set before JAX starts
models = 'gpt2,gpt2-medium,gpt2-large,gpt2-xl'
batch_size = 1 # per device
micro_steps = 1 # micro-batches per device per iteration (gradient_accumulation_steps / devices)
block_size = 1024
dtype = 'bfloat16'
fsdp = 0 # the fsdp rows' shards; 0: all the devices
budget = 16.0 # GiB per device marked as fitting (a TPU v5e chip)
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
os.environ['XLA_FLAGS'] = os.environ.get('XLA_FLAGS', '') + f' --xla_force_host_platform_device_count={devices}'
os.environ['JAX_PLATFORMS'] = 'cpu'

import jax  # noqa: E402

import backends  # noqa: E402
import model  # noqa: E402
import parallel  # noqa: E402
from parallel import die  # noqa: E402
import training  # noqa: E402

backends.on_cpu = lambda: False # trace the plain ops, as a TPU runs them
SIZES = {'gpt2': (12, 12, 768), 'gpt2-medium': (24, 16, 1024), 'gpt2-large': (36, 20, 1280), 'gpt2-xl': (48, 25, 1600)}
names = models.split(',')
if any(n not in SIZES for n in names):
    die(f"models={models!r}: use a comma-separated list of {', '.join(SIZES)}")
fsdp = fsdp or devices
if devices % fsdp:
    die(f"fsdp={fsdp} must divide devices={devices}")
training.set_precision(dtype)
print(f"XLA's per-device estimate of the training step (parallel.compiled_bytes, GiB) on {devices} devices, "
      f"batch_size {batch_size} x {micro_steps} micro-step(s) per device, block_size {block_size}, {dtype}, AdamW; "
      f"* fits in {budget:g} GiB")
print(f"{'model':12} {'params':>8} {'dp':>10} {f'fsdp={fsdp}':>10} {f'fsdp={fsdp} remat':>16}")
for name in names:
    n_layer, n_head, n_embd = SIZES[name]
    config = lambda remat: model.GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size,
                                           vocab_size=50304, bias=True, dropout=0.0, remat=remat)
    params = model.param_shapes(config(False))
    tx = training.configure_optimizers(params, 0.1, 6e-4, (0.9, 0.95), 1.0)
    row = []
    for shards, remat in ((1, False), (fsdp, False), (fsdp, True)):
        # whole micro-batches on every device, as on accelerators (train.py's plan keeps a big model on one CPU device)
        plan = parallel.DevicePlan(jax.devices(), jax.devices(), 1, micro_steps, batch_size, 1, shards)
        t0 = time.time()
        step = training.compile_steps(config(remat), tx, plan, dtype, 0)['train step'][0]
        gib = parallel.compiled_bytes(step) / 2**30
        row.append(f"{gib:.2f}{'*' if gib <= budget else ' '}")
        print(f"  {name} fsdp={shards} remat={remat}: {gib:.2f} GiB, compiled in {time.time() - t0:.0f}s", file=sys.stderr)
    print(f"{name:12} {model.get_num_params(params) / 1e6:7.0f}M {row[0]:>10} {row[1]:>10} {row[2]:>16}")
