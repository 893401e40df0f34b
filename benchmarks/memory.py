"""XLA's per-device memory estimate of train.py's step for GPT-2 124M .. 1558M, dp, fsdp and
fsdp with remat, compiled on shapes over simulated CPU devices as a TPU runs it."""
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
devices = 8 # simulated CPU devices, set before JAX starts
models = 'gpt2,gpt2-medium,gpt2-large,gpt2-xl'
batch_size, micro_steps = 1, 1 # per device: its rows, its micro-batches per iteration
block_size, dtype = 1024, 'bfloat16'
fsdp = 0 # the fsdp columns' shards; 0: all devices
budget = 16.0 # GiB per device that fits (a TPU v5e chip)
exec(open(os.path.join(REPO, 'configurator.py')).read())
os.environ['JAX_PLATFORMS'], os.environ['JAX_NUM_CPU_DEVICES'] = 'cpu', str(devices)

import jax

import backends
import model
import parallel
from cli import die
import training

backends.on_cpu = lambda: False # the plain ops, as a TPU runs them
SIZES = {'gpt2': (12, 12, 768), 'gpt2-medium': (24, 16, 1024), 'gpt2-large': (36, 20, 1280),
         'gpt2-xl': (48, 25, 1600)}
fsdp = fsdp or devices
if any(n not in SIZES for n in models.split(',')) or devices % fsdp:
    die(f"models={models!r}, fsdp={fsdp}: models from {', '.join(SIZES)}, fsdp dividing {devices}")
training.set_precision(dtype)
print(f"XLA's estimate of the step per device (GiB), {devices} devices, {micro_steps} "
      f"micro-step(s) of {batch_size} x {block_size} each, {dtype}, AdamW; * fits {budget:g} GiB")
print(f"{'model':12} {'params':>8} {'dp':>10} {f'fsdp={fsdp}':>10} {f'fsdp={fsdp} remat':>16}")
for name in models.split(','):
    dims = dict(zip(('n_layer', 'n_head', 'n_embd'), SIZES[name]))
    config = lambda remat: model.GPTConfig(block_size=block_size, bias=True, remat=remat, **dims)
    params = model.param_shapes(config(False))
    tx = training.configure_optimizers(params, 0.1, 6e-4, (0.9, 0.95), 1.0)
    row = []
    for shards, remat in ((1, False), (fsdp, False), (fsdp, True)): # whole micro-batches
        t0, mesh = time.time(), parallel.make_mesh(jax.devices(), shards)
        step = training.compile_steps(config(remat), tx, mesh, micro_steps * devices, batch_size,
                                      dtype, 0)['train step'][0]
        gib = parallel.compiled_bytes(step) / 2**30
        row.append(f"{gib:.2f}{'*' if gib <= budget else ' '}".rjust(16 if remat else 10))
        print(f"  {name} fsdp={shards} remat={remat}: {time.time() - t0:.0f}s", file=sys.stderr)
    print(f"{name:12} {model.get_num_params(params) / 1e6:7.0f}M", *row)
