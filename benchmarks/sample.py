"""
Sampling speed, three comparisons side by side in one run:
1. the KV cache against nanoGPT's way of generating, which re-runs the model over the whole (cropped)
   context for every new token (greedy, so both must give the same tokens, which is checked);
2. num_samples samples drawn in one batch against one at a time (sample.py's default rule: temperature
   0.8, top_k 200);
3. one sample streamed (a host callback from the compiled loop about every 20 ms, as sample.py's
   --stream=True) against the same sample not streamed;
4. and the same kind of callback in training: train.py's eval step over eval_iters batches with its
   progress bar's callback (the bar hidden) against the step without it.

$ python bench_sample.py                                   # the README's CPU model (4L/4H/128, block 64)
$ python bench_sample.py --n_layer=6 --n_head=6 --n_embd=384 --block_size=256   # the GPU config's model

Random weights: speed does not depend on them. Times are split where the sequence outgrows block_size:
from there nanoGPT crops the context and every token sits at a new position (position embeddings are
absolute), so exact sampling recomputes the whole window for every token, with or without a cache.
"""
import io
import os
import time

import numpy as np
import jax
import jax.numpy as jnp

from model import GPTConfig, gpt_forward, init_params, make_generate
import parallel
import training

# -----------------------------------------------------------------------------
n_layer = 4
n_head = 4
n_embd = 128
block_size = 64
vocab_size = 65
prompt_len = 1  # like sample.py's default start="\n"
max_new_tokens = 500
num_samples = 10
eval_iters, batch_size = 200, 12  # 4.: train.py's default eval_iters, the README's batch_size
pad_to = 16  # the recompute baseline's context lengths, rounded up: fewer shapes to compile
repeats = 3  # best of
turns = 8  # 3. and 4.: the two variants alternate, turns times best of repeats each (a shared machine is noisy)
seed = 1337
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())  # overrides
# -----------------------------------------------------------------------------

config = GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, vocab_size=vocab_size)
params = init_params(config, jax.random.PRNGKey(seed))
prompt = jax.random.randint(jax.random.PRNGKey(seed + 1), (1, prompt_len), 0, vocab_size, dtype=jnp.int32)
keys_of = lambda n: jax.vmap(jax.random.fold_in, (None, 0))(jax.random.PRNGKey(seed), jnp.arange(n))
n_fit = max(0, min(max_new_tokens, block_size - prompt_len + 1))  # new tokens drawn with the cache
n_cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
print(f"model: n_layer={n_layer} n_head={n_head} n_embd={n_embd} block_size={block_size} vocab_size={vocab_size}; "
      f"prompt {prompt_len} token(s), {max_new_tokens} new tokens, {jax.devices()[0]} ({n_cores} CPU cores), "
      f"jax {jax.__version__}")


def best_of(fn):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return min(times), out


def compiled(n_new, B, **kwargs):
    return make_generate(config, n_new, **kwargs).lower(params, jnp.repeat(prompt, B, 0), keys_of(B)).compile()


def row(name, a_s, a_tokens, b_s, b_tokens):
    print(f"{name:<40} {a_s * 1e3 / a_tokens:9.3f} ms/token {a_tokens / a_s:9.1f} tok/s | "
          f"{b_s * 1e3 / b_tokens:9.3f} ms/token {b_tokens / b_s:9.1f} tok/s | {(a_tokens / a_s) / (b_tokens / b_s):6.2f}x")


# 1. KV cache against full recompute, greedy: one compiled call for all tokens, a second for the cached part
kv_run, kv_fit = compiled(max_new_tokens, 1, temperature=0.0), compiled(n_fit, 1, temperature=0.0) if n_fit else None
kv_time, kv_out = best_of(lambda: kv_run(params, prompt, keys_of(1)))
kv_fit_time = best_of(lambda: kv_fit(params, prompt, keys_of(1)))[0] if kv_fit else 0.0
forward = jax.jit(lambda params, idx_BT, targets_BT: gpt_forward(config).apply(params, None, idx_BT, targets_BT)[0])


def recompute():
    """nanoGPT's generate loop, greedy, each step a compiled forward over the context padded to a multiple of
    pad_to (a causal model ignores the padding). Returns (tokens, seconds spent on the first n_fit)."""
    idx, t0, t_fit = np.asarray(prompt), time.perf_counter(), None
    for i in range(max_new_tokens):
        if i == n_fit:
            t_fit = time.perf_counter() - t0
        ctx = idx[:, -block_size:]
        padded = np.zeros((1, min(-(-ctx.shape[1] // pad_to) * pad_to, block_size)), np.int32)
        padded[:, :ctx.shape[1]] = ctx
        logits_BPV = forward(params, padded, padded)  # targets only to get every position's logits back
        next_id = np.asarray(logits_BPV)[:, ctx.shape[1] - 1, :].argmax(-1)  # on the host: no compile per index
        idx = np.concatenate([idx, next_id[:, None].astype(np.int32)], axis=1)
    return idx, (time.perf_counter() - t0 if t_fit is None else t_fit)


for P in sorted({min(-(-T // pad_to) * pad_to, block_size) for T in range(1, block_size + 1)}):
    jax.block_until_ready(forward(params, np.zeros((1, P), np.int32), np.zeros((1, P), np.int32)))
runs = []
for _ in range(repeats):
    t0 = time.perf_counter()
    out, fit = recompute()
    runs.append((time.perf_counter() - t0, fit, out))
re_time, re_out = min((r[0], r[2]) for r in runs)
re_fit_time = min(r[1] for r in runs)
print(f"\n1. greedy, one sample ({'the same tokens' if (np.asarray(kv_out) == re_out).all() else 'DIFFERENT TOKENS'})"
      f"{'':<8} {'kv cache':^34} | {'full recompute':^34} | speedup")
if n_fit:
    row(f"new tokens 1-{n_fit} (fit in context)", kv_fit_time, n_fit, re_fit_time, n_fit)
if n_fit < max_new_tokens:
    row(f"new tokens {n_fit + 1}-{max_new_tokens} (cropped window)", max(kv_time - kv_fit_time, 1e-9),
        max_new_tokens - n_fit, max(re_time - re_fit_time, 1e-9), max_new_tokens - n_fit)
    row(f"all {max_new_tokens} new tokens", kv_time, max_new_tokens, re_time, max_new_tokens)

# 2. num_samples samples in one batch against one at a time (sample k with key k either way)
rule = dict(temperature=0.8, top_k=200)
batched, single = compiled(max_new_tokens, num_samples, **rule), compiled(max_new_tokens, 1, **rule)
prompts, keys = jnp.repeat(prompt, num_samples, 0), keys_of(num_samples)
batch_time, batch_out = best_of(lambda: batched(params, prompts, keys))
one_time, one_out = best_of(lambda: [single(params, prompt, keys[k:k + 1]) for k in range(num_samples)])
same = (np.asarray(batch_out) == np.concatenate([np.asarray(o) for o in one_out])).all()
print(f"\n2. {num_samples} samples ({'the same tokens' if same else 'DIFFERENT TOKENS'}){'':<13} {'in one batch':^34} | "
      f"{'one at a time':^34} | speedup")
row(f"{num_samples} x {max_new_tokens} new tokens", batch_time, num_samples * max_new_tokens, one_time,
    num_samples * max_new_tokens)


# 3. one sample streamed against not, the stream's text written to memory instead of a terminal
class Streamer(parallel.Progress):
    def show(self, n, idx_BN):
        self.out.write(' '.join(map(str, idx_BN[0, prompt_len + self.n:prompt_len + n].tolist())))


streamer = Streamer('', every=0.02, disable=True)
streamed = compiled(max_new_tokens, 1, on_tokens=streamer, **rule)


def stream():
    streamer.start(max_new_tokens)
    streamer.out = io.StringIO()
    return streamed(params, prompt, keys[:1])


stream_out, stream_time, plain_time = stream(), [], []
for _ in range(turns):  # alternating: the two see the same load on a shared machine
    stream_time.append(best_of(stream)[0])
    plain_time.append(best_of(lambda: single(params, prompt, keys[:1]))[0])
stream_time, plain_time = min(stream_time), min(plain_time)
same = (np.asarray(stream_out) == np.asarray(one_out[0])).all()
print(f"\n3. one sample ({'the same tokens' if same else 'DIFFERENT TOKENS'}){'':<22} {'streamed':^34} | "
      f"{'not streamed':^34} | speedup")
row(f"{max_new_tokens} new tokens", stream_time, max_new_tokens, plain_time, max_new_tokens)


# 4. the eval step with its progress callback against without, alternating as 3.
bar = parallel.Progress('eval', disable=True)
tokens = jax.random.randint(jax.random.PRNGKey(seed + 2), (eval_iters, batch_size, block_size + 1), 0, vocab_size)
batches = (tokens[..., :-1], tokens[..., 1:], jnp.ones((eval_iters,), bool))
with_bar, without = (jax.jit(training.make_eval_step(config, axis_name=None, progress=p)) for p in (bar, None))


def eval_with_bar():
    bar.start(eval_iters)
    return with_bar(params, *batches)


bar_times, plain_times = [], []
for _ in range(turns):
    bar_times.append(best_of(eval_with_bar)[0])
    plain_times.append(best_of(lambda: without(params, *batches))[0])
same = float(eval_with_bar()) == float(without(params, *batches))
print(f"\n4. train.py's eval step, {eval_iters} batches of {batch_size} x {block_size} "
      f"({'the same loss' if same else 'DIFFERENT LOSS'}): with its progress callback {min(bar_times) * 1e3:.1f} ms, "
      f"without {min(plain_times) * 1e3:.1f} ms: {min(bar_times) / min(plain_times):.3f}x the time")
