"""XLA's per-device memory estimate of train.py's step for GPT-2 124M .. 1558M and Llama's shapes,
dp, fsdp and fsdp with remat, compiled on shapes over simulated CPU devices as a TPU runs it."""
import os
import sys

GPT2 = dict(block_size=1024, bias=True)
LLAMA = dict(block_size=2048, bias=False, rope=True, norm='rmsnorm', activation='swiglu')
MODELS = {  # name: GPTConfig's keyword arguments (transformers' configs for Llama)
    'gpt2': dict(GPT2, n_layer=12, n_head=12, n_embd=768),
    'gpt2-medium': dict(GPT2, n_layer=24, n_head=16, n_embd=1024),
    'gpt2-large': dict(GPT2, n_layer=36, n_head=20, n_embd=1280),
    'gpt2-xl': dict(GPT2, n_layer=48, n_head=25, n_embd=1600),
    'llama3.2-1b': dict(LLAMA, n_layer=16, n_head=32, n_embd=2048, n_kv_head=8, mlp_hidden=8192,
                        vocab_size=128256, rope_theta=500000.0),  # tied lm_head
    'llama2-7b': dict(LLAMA, n_layer=32, n_head=32, n_embd=4096, mlp_hidden=11008,
                      vocab_size=32000, tie_lm_head=False)}
if __name__ == '__main__':  # imported: the table only
    REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, REPO)
    devices = 8 # simulated CPU devices, set before JAX starts
    models = 'gpt2,gpt2-medium,gpt2-large,gpt2-xl'
    batch_size, micro_steps = 1, 1 # per device: its rows, its micro-batches per iteration
    block_size, dtype = 0, 'bfloat16' # 0: the model's (GPT-2 1024, Llama 2048)
    fsdp = 0 # the fsdp columns' shards; 0: all devices
    budget = 16.0 # GiB per device that fits (a TPU v5e chip; 80: an H100)
    exec(open(os.path.join(REPO, 'configurator.py')).read())
    os.environ['JAX_PLATFORMS'], os.environ['JAX_NUM_CPU_DEVICES'] = 'cpu', str(devices)

    import time
    import jax

    import backends
    import model
    import parallel
    from cli import die
    import training

    backends.on_cpu = lambda: False # the plain ops, as a TPU runs them
    fsdp = fsdp or devices
    if any(n not in MODELS for n in models.split(',')) or devices % fsdp:
        die(f"models={models!r}, fsdp={fsdp}: models from {', '.join(MODELS)}, "
            f"fsdp dividing {devices}")
    training.set_precision(dtype)
    print(f"XLA's estimate of the step per device (GiB), {devices} devices, {micro_steps} "
          f"micro-step(s) of {batch_size} x T each, {dtype}, AdamW; * fits {budget:g} GiB")
    print(f"{'model':12} {'T':>5} {'params':>8} {'dp':>10} {f'fsdp={fsdp}':>10} "
          f"{f'fsdp={fsdp} remat':>16}")
    for name in models.split(','):
        kw = dict(MODELS[name], **({'block_size': block_size} if block_size else {}))
        config = lambda remat: model.GPTConfig(remat=remat, **kw)
        params = model.param_shapes(config(False))
        tx = training.configure_optimizers(params, 0.1, 6e-4, (0.9, 0.95), 1.0)
        row = []
        for shards, remat in ((1, False), (fsdp, False), (fsdp, True)): # whole micro-batches
            t0, mesh = time.time(), parallel.make_mesh(jax.devices(), shards)
            step = training.compile_steps(config(remat), tx, mesh, micro_steps * devices,
                                          batch_size, dtype, 0)['train step'][0]
            gib = parallel.compiled_bytes(step) / 2**30
            row.append(f"{gib:.2f}{'*' if gib <= budget else ' '}".rjust(16 if remat else 10))
            print(f"  {name} fsdp={shards} remat={remat}: {time.time() - t0:.0f}s",
                  file=sys.stderr)
        print(f"{name:12} {kw['block_size']:5} {model.get_num_params(params) / 1e6:7.0f}M", *row)
