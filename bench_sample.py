"""
How much the KV cache buys: sample.py's compiled decoder against nanoGPT's way of generating,
which re-runs the model over the whole (cropped) context for every new token.

$ python bench_sample.py                       # shakespeare-char model size, 500 new tokens
$ python bench_sample.py --block_size=1024     # same model with a context that holds all 500

Random weights: speed does not depend on them. Greedy decoding, so both must give the same
tokens, which is checked. The recompute baseline is nanoGPT's generate loop with each step a
compiled forward over the context padded up to a multiple of `pad_to` (a causal model ignores
the padding; it bounds the number of compiled shapes to block_size / pad_to).
"""
import time

import numpy as np
import jax
import jax.numpy as jnp

from model import GPTConfig, gpt_forward, init_params
from sample import make_generate

# -----------------------------------------------------------------------------
# the model of config/train_shakespeare_char.py
n_layer = 6
n_head = 6
n_embd = 384
block_size = 256
vocab_size = 65
prompt_len = 1  # like sample.py's default start="\n"
max_new_tokens = 500
pad_to = 32
repeats = 3  # best of
seed = 1337
exec(open('configurator.py').read())  # overrides from command line or config file
# -----------------------------------------------------------------------------

config = GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, vocab_size=vocab_size)
params = init_params(config, jax.random.PRNGKey(seed))
idx_BT = jax.random.randint(jax.random.PRNGKey(seed + 1), (1, prompt_len), 0, vocab_size, dtype=jnp.int32)
key = jax.random.PRNGKey(0)
print(f"model: n_layer={n_layer} n_head={n_head} n_embd={n_embd} block_size={block_size} vocab_size={vocab_size}; "
      f"prompt {prompt_len} token(s), {max_new_tokens} new tokens, {jax.devices()[0]}")


def best_of(fn):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return min(times), out


# KV cache: one compiled call for the whole sample
t0 = time.perf_counter()
kv_run = make_generate(config, max_new_tokens, temperature=0.0).lower(params, idx_BT, key).compile()
print(f"kv cache: compiled in {time.perf_counter() - t0:.1f}s")
kv_time, kv_out = best_of(lambda: kv_run(params, idx_BT, key))

# full recompute, as nanoGPT's generate: crop to block_size, forward, take the last position
forward = jax.jit(lambda params, idx_BT, targets_BT: gpt_forward(config).apply(params, None, idx_BT, targets_BT)[0])


def recompute():
    idx = np.asarray(idx_BT)
    for _ in range(max_new_tokens):
        ctx = idx[:, -block_size:]
        T = ctx.shape[1]
        P = min(-(-T // pad_to) * pad_to, block_size)
        padded = np.zeros((1, P), np.int32)
        padded[:, :T] = ctx
        # targets only to get logits at every position back; the loss is ignored
        logits_BPV = forward(params, padded, padded)
        next_id = np.asarray(jnp.argmax(logits_BPV[:, T - 1, :], axis=-1))
        idx = np.concatenate([idx, next_id[:, None].astype(np.int32)], axis=1)
    return idx


t0 = time.perf_counter()
shapes = sorted({min(-(-T // pad_to) * pad_to, block_size) for T in range(1, block_size + 1)})
for P in shapes:  # compile every padded length up front, so timings are of running only
    jax.block_until_ready(forward(params, np.zeros((1, P), np.int32), np.zeros((1, P), np.int32)))
print(f"recompute: compiled {len(shapes)} shapes in {time.perf_counter() - t0:.1f}s")
re_time, re_out = best_of(recompute)

same = bool((np.asarray(kv_out) == re_out).all())
n_cached = max(0, min(max_new_tokens, block_size - prompt_len + 1)) if prompt_len <= block_size else 0
print(f"kv cache : {kv_time * 1e3 / max_new_tokens:8.3f} ms/token  {max_new_tokens / kv_time:9.1f} tokens/s")
print(f"recompute: {re_time * 1e3 / max_new_tokens:8.3f} ms/token  {max_new_tokens / re_time:9.1f} tokens/s")
print(f"speedup  : {re_time / kv_time:.1f}x per token ({n_cached} of {max_new_tokens} new tokens fit in block_size "
      f"and use the cache; the rest recompute the cropped window in both); same tokens: {same}")
