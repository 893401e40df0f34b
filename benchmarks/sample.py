"""Sampling speed, random weights: 1. the KV cache against nanoGPT's recompute; 2. a batch of
samples against one at a time."""
import os
import sys
from time import perf_counter as now
from functools import partial

import numpy as np
import jax
import jax.numpy as jnp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from model import GPTConfig, gpt_forward, init_params, make_generate

n_layer, n_head, n_embd, block_size, vocab_size = 4, 4, 128, 64, 65  # the README's CPU model
rope = False  # True: rotary positions, whose cache rolls past block_size
prompt_len, max_new_tokens, num_samples = 1, 500, 10  # 1: sample.py's start="\n"
pad_to = 16  # recompute's context lengths rounded up: fewer compiles
repeats, seed = 3, 1337  # best of repeats
exec(open(os.path.join(REPO, 'configurator.py')).read())

config = GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size,
                   vocab_size=vocab_size, rope=rope)
params = init_params(config, jax.random.PRNGKey(seed))
prompt = jax.random.randint(jax.random.PRNGKey(seed + 1), (1, prompt_len), 0, vocab_size, jnp.int32)
keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.PRNGKey(seed), jnp.arange(num_samples))
n_fit = max(0, min(max_new_tokens, block_size - prompt_len + 1))  # new tokens with the cache
n_cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
print(f"{config}; prompt {prompt_len} token(s), {max_new_tokens} new tokens, {jax.devices()[0]} "
      f"({n_cores} CPU cores), jax {jax.__version__}")

def best_of(fn):  # (the fastest call's seconds, the result)
    runs = [(now(), jax.block_until_ready(fn()), now()) for _ in range(repeats)]
    return min(t1 - t0 for t0, _, t1 in runs), runs[-1][1]

def generator(n_new, B, **rule):
    """make_generate compiled for B samples (sample k: key k), as a call of no arguments."""
    args = (params, jnp.repeat(prompt, B, 0), keys[:B])
    return partial(make_generate(config, n_new, **rule).lower(*args).compile(), *args)

def table(title, a, b, *rows):
    print(f"\n{title:<40} {a:^34} | {b:^34} | speedup")
    rate = lambda s, n: f"{s * 1e3 / n:9.3f} ms/token {n / s:9.1f} tok/s"
    for name, a_s, b_s, n in rows:
        print(f"{name:<40} {rate(a_s, n)} | {rate(b_s, n)} | {b_s / a_s:6.2f}x")

same = lambda a, b: "the same" if np.array_equal(a, b) else "DIFFERENT"

kv_time, kv_out = best_of(generator(max_new_tokens, 1, temperature=0.0))
kv_fit_time = best_of(generator(n_fit, 1, temperature=0.0))[0] if n_fit else 0.0
forward = jax.jit(lambda params, idx_BT: gpt_forward(config).apply(params, None, idx_BT, idx_BT)[0])

def recompute():
    """nanoGPT's greedy generate over the padded context: (tokens, seconds after each new token)."""
    idx, t0, stamps = np.asarray(prompt), now(), [0.0]
    for _ in range(max_new_tokens):
        ctx = idx[:, -block_size:]
        pad = min(-(-ctx.shape[1] // pad_to) * pad_to, block_size) - ctx.shape[1]  # ignored, causal
        logits_BPV = forward(params, np.pad(ctx, ((0, 0), (0, pad))))
        next_id = np.asarray(logits_BPV)[:, ctx.shape[1] - 1].argmax(-1)  # on the host: one compile
        idx = np.concatenate([idx, next_id[:, None].astype(np.int32)], axis=1)
        stamps.append(now() - t0)
    return idx, stamps

runs = [recompute() for _ in range(repeats + 1)][1:]  # the first compiles
re_time, re_fit_time = (min(stamps[k] for _, stamps in runs) for k in (-1, n_fit))
n_crop = max_new_tokens - n_fit
crop = max(kv_time - kv_fit_time, 1e-9), max(re_time - re_fit_time, 1e-9)  # past the fit
rows = [(f"new tokens 1-{n_fit} (fit in context)", kv_fit_time, re_fit_time, n_fit),
        (f"new tokens {n_fit + 1}-{max_new_tokens} (cropped window)", *crop, n_crop),
        (f"all {max_new_tokens} new tokens", kv_time, re_time, max_new_tokens * (n_crop > 0))]
table(f"1. greedy, one sample ({same(kv_out, runs[0][0])} tokens)", 'kv cache', 'full recompute',
      *[row for row in rows if row[-1]])  # those with tokens

rule = dict(temperature=0.8, top_k=200)
single, n_all = generator(max_new_tokens, 1, **rule), num_samples * max_new_tokens
batch_time, batch_out = best_of(generator(max_new_tokens, num_samples, **rule))
one_time, one_out = best_of(lambda: [single.func(params, prompt, keys[k:k + 1])
                                     for k in range(num_samples)])
table(f"2. {num_samples} samples ({same(batch_out, np.concatenate(one_out))} tokens)",
      'in one batch', 'one at a time',
      (f"{num_samples} x {max_new_tokens} new tokens", batch_time, one_time, n_all))
