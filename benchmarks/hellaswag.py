"""HellaSwag's scoring (hellaswag.evaluate) against the plain eval forward (train.py's loss on
12 x 1024 batches) on the same tokens: GPT-2 124M, random weights, HellaSwag-like lengths."""
import os
import sys
from time import perf_counter as now

import numpy as np
import jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import hellaswag
from model import GPTConfig, gpt_forward, init_params
import training

n_examples, batch_rows, dtype, turns = 2000, 128, 'bfloat16', 3
exec(open(os.path.join(REPO, 'configurator.py')).read())

training.set_precision(dtype)
config, rng = GPTConfig(), np.random.default_rng(0)  # train.py's GPT-2 124M
params = init_params(config, jax.random.PRNGKey(0))
tokens = lambda lo, hi: rng.integers(0, 50257, rng.integers(lo, hi)).tolist()  # a length in [lo, hi)
examples = [(tokens(20, 160), [tokens(10, 60) for _ in range(4)], 0) for _ in range(n_examples)]
inputs = np.concatenate([(ctx + end)[:-1] for ctx, ends, _ in examples for end in ends])
x_KBT = inputs[:len(inputs) // 12288 * 12288].reshape(-1, 12, 1024).astype(np.int32)
loss = jax.jit(lambda params, x_BT: gpt_forward(config).apply(params, None, x_BT, x_BT)[1])
plain = lambda: float(sum(loss(params, x_BT) for x_BT in x_KBT))
score = lambda: hellaswag.evaluate(params, config, examples, batch_rows)

def seconds(fn):  # both end on the host (a float, numpy): nothing is left queued
    t0 = now()
    fn()
    return now() - t0

plain(), score()  # compiles
a_s, b_s = map(min, zip(*[(seconds(score), seconds(plain)) for _ in range(turns)]))
a, b = len(inputs) / a_s, x_KBT.size / b_s
print(f"{jax.devices()[0].device_kind}, {dtype}, {n_examples} examples, batch_rows {batch_rows}: "
      f"hellaswag {a:,.0f} tokens/s, plain eval forward {b:,.0f} tokens/s: {a / b:.2f}x")
