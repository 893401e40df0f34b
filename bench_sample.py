"""
How much the KV cache buys: sample.py's compiled decoder against nanoGPT's way of generating,
which re-runs the model over the whole (cropped) context for every new token.

$ python bench_sample.py                       # shakespeare-char model size, 500 new tokens
$ python bench_sample.py --block_size=512      # same model with a context that holds all 500
$ JAX_PLATFORMS=cpu taskset -c 0,1 python bench_sample.py   # the CPU, 2 cores

Random weights: speed does not depend on them. Greedy decoding, so both must give the same
tokens, which is checked. The recompute baseline is nanoGPT's generate loop with each step a
compiled forward over the context padded up to a multiple of `pad_to` (a causal model ignores
the padding; it bounds the number of compiled shapes to block_size / pad_to).

Times are split in two. Tokens drawn while the sequence still fits in block_size come from the
cache: one position per step. Past block_size nanoGPT crops the context to the last block_size
tokens, and every token then sits at a new position (position embeddings are absolute), so no
cached key or value is valid any more: exact sampling must recompute the whole window for every
token, in both decoders, and that part cannot be faster than recompute.
"""
import os
import time

import numpy as np
import jax
import jax.numpy as jnp

from model import GPTConfig, gpt_forward, init_params
from model import make_generate

# -----------------------------------------------------------------------------
# the model of config/train_shakespeare_char.py
n_layer = 6
n_head = 6
n_embd = 384
block_size = 256
vocab_size = 65
prompt_len = 1  # like sample.py's default start="\n"
max_new_tokens = 500
pad_to = 16
repeats = 3  # best of
seed = 1337
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())  # overrides
# -----------------------------------------------------------------------------

config = GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, vocab_size=vocab_size)
params = init_params(config, jax.random.PRNGKey(seed))
idx_BT = jax.random.randint(jax.random.PRNGKey(seed + 1), (1, prompt_len), 0, vocab_size, dtype=jnp.int32)
key = jax.random.PRNGKey(0)
# new tokens drawn from a context of at most block_size tokens, i.e. with the cache
n_fit = max(0, min(max_new_tokens, block_size - prompt_len + 1))
# the cores this process may use (taskset -c 0,1 limits it to 2), not all the machine has
n_cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
print(f"model: n_layer={n_layer} n_head={n_head} n_embd={n_embd} block_size={block_size} vocab_size={vocab_size}; "
      f"prompt {prompt_len} token(s), {max_new_tokens} new tokens, {jax.devices()[0]} "
      f"({n_cores} CPU cores), jax {jax.__version__}")


def best_of(fn):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return min(times), out


# KV cache: one compiled call for the whole sample; a second, shorter one times the cached part
t0 = time.perf_counter()
kv_run = make_generate(config, max_new_tokens, temperature=0.0).lower(params, idx_BT, key).compile()
kv_fit = None
if 0 < n_fit < max_new_tokens:
    kv_fit = make_generate(config, n_fit, temperature=0.0).lower(params, idx_BT, key).compile()
print(f"kv cache: compiled in {time.perf_counter() - t0:.1f}s")
kv_time, kv_out = best_of(lambda: kv_run(params, idx_BT, key))
kv_fit_time = best_of(lambda: kv_fit(params, idx_BT, key))[0] if kv_fit else (kv_time if n_fit else 0.0)

# full recompute, as nanoGPT's generate: crop to block_size, forward, take the last position
forward = jax.jit(lambda params, idx_BT, targets_BT: gpt_forward(config).apply(params, None, idx_BT, targets_BT)[0])


def recompute():
    """Returns (tokens, seconds spent on the first n_fit new tokens)."""
    idx = np.asarray(idx_BT)
    t0, t_fit = time.perf_counter(), None
    for i in range(max_new_tokens):
        if i == n_fit:
            t_fit = time.perf_counter() - t0
        ctx = idx[:, -block_size:]
        T = ctx.shape[1]
        P = min(-(-T // pad_to) * pad_to, block_size)
        padded = np.zeros((1, P), np.int32)
        padded[:, :T] = ctx
        # targets only to get logits at every position back; the loss is ignored
        logits_BPV = forward(params, padded, padded)
        # argmax on the host: indexing a jax array with a new Python int each step would compile
        next_id = np.asarray(logits_BPV)[:, T - 1, :].argmax(-1)
        idx = np.concatenate([idx, next_id[:, None].astype(np.int32)], axis=1)
    return idx, (time.perf_counter() - t0 if t_fit is None else t_fit)


t0 = time.perf_counter()
shapes = sorted({min(-(-T // pad_to) * pad_to, block_size) for T in range(1, block_size + 1)})
for P in shapes:  # compile every padded length up front, so timings are of running only
    jax.block_until_ready(forward(params, np.zeros((1, P), np.int32), np.zeros((1, P), np.int32)))
print(f"recompute: compiled {len(shapes)} shapes in {time.perf_counter() - t0:.1f}s")
runs = []
for _ in range(repeats):
    t0 = time.perf_counter()
    out, t_fit = recompute()
    runs.append((time.perf_counter() - t0, t_fit, out))
re_time, re_fit_time, re_out = min(runs, key=lambda r: r[0])
re_fit_time = min(r[1] for r in runs)

same = bool((np.asarray(kv_out) == re_out).all())


def row(name, n, kv_t, re_t):
    if n == 0:
        return
    print(f"{name:<36} {kv_t * 1e3 / n:9.3f} ms/token {n / kv_t:9.1f} tok/s | {re_t * 1e3 / n:9.3f} ms/token "
          f"{n / re_t:9.1f} tok/s | {re_t / kv_t:6.1f}x")


print(f"{'':<36} {'kv cache':^34} | {'full recompute':^34} | speedup")
row(f"new tokens 1-{n_fit} (fit in context)", n_fit, kv_fit_time, re_fit_time)
row(f"new tokens {n_fit + 1}-{max_new_tokens} (cropped window)", max_new_tokens - n_fit,
    max(kv_time - kv_fit_time, 1e-9), max(re_time - re_fit_time, 1e-9))
if 0 < n_fit < max_new_tokens:
    row(f"all {max_new_tokens} new tokens", max_new_tokens, kv_time, re_time)
print(f"same tokens: {same}")
