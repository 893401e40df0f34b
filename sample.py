"""Sample from a trained model (or a GPT-2 checkpoint), e.g.
$ python sample.py --out_dir=out-shakespeare-char --num_samples=1 --stream=True --stop="\n\n"
$ python sample.py --init_from=gpt2-xl --start="What is the answer to life?" --temperature=0"""
import os
import time

import numpy as np
import jax
import jax.numpy as jnp

from model import check_sampling, make_generate
import checkpoint
import interop
import parallel
from cli import die, die_on, on_interrupt, Progress

# -----------------------------------------------------------------------------
init_from = 'resume' # 'resume' (from out_dir), a gpt2 variant (e.g. 'gpt2-xl'), HF dir, ckpt.pt
out_dir = 'out' # ignored if init_from is not 'resume'
start = "\n" # or "<|endoftext|>" or etc. Can also specify a file, use as: "FILE:prompt.txt"
num_samples = 10 # number of samples to draw
max_new_tokens = 500 # number of tokens generated in each sample
temperature = 0.8 # 1.0 = no change, < 1.0 = less random, > 1.0 = more random; 0.0 = greedy
top_k = 200 # retain only the top_k most likely tokens, clamp others to have 0 probability
top_p = 1.0 # then the fewest likeliest tokens of total probability top_p; 1.0 = off
stop = '' # a sample ends before the first stop in its new text; \n and \t as a shell passes them
stream = False # print each sample as it is made (needs batch_size=1)
batch_size = 16 # samples drawn side by side in one compiled call
seed = 1337
device = 'cuda' # examples: 'cpu', 'cuda', 'cuda:0', 'cuda:1', etc.
dtype = 'auto' # 'float32', 'bfloat16', or 'float16'; 'auto': bfloat16 on GPU/TPU, else float32
compile = False # nanoGPT's flag: decoding is always compiled
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
# -----------------------------------------------------------------------------

on_interrupt(lambda: "interrupted") # at once, even inside the compiled sampling loop
parallel.pin_platform(device)
if num_samples < 1 or batch_size < 1:
    die(f"num_samples and batch_size must be at least 1, got {num_samples} and {batch_size}")
batch_size = min(batch_size, num_samples)
stop = stop.replace('\\n', '\n').replace('\\t', '\t') # --stop="\n\n" arrives as backslashes
if stream and batch_size > 1:
    die(f"stream=True prints one sample at a time, not {batch_size}: add --batch_size=1")
try:
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    if start.startswith('FILE:'): # before any model loads: a wrong path fails fast
        with open(start[5:], 'r', encoding='utf-8') as f:
            start = f.read()
except (OSError, UnicodeDecodeError) as e:
    die(f"cannot read the prompt file {start[5:]!r}: {getattr(e, 'strerror', None) or e}")
except ValueError as e:
    die(e)
dev = parallel.select_devices(device)[0]
dtype = parallel.select_dtype(dtype, dev.platform)

# model, and its vocabulary: its dataset's, a tokenizer.json or GPT-2's BPE
with die_on(checkpoint.CheckpointError, ValueError, OSError):
    gptconf, params, meta_dir, meta = interop.load_weights(init_from, out_dir)
params = jax.device_put(jax.tree.map(lambda p: jnp.asarray(p, dtype), params), dev)
if meta is not None:
    print(f"Loading meta from {meta_dir}...")
    if not {'stoi', 'itos'} <= meta.keys():
        die(f"the vocabulary in {meta_dir} has no stoi/itos; run its prepare.py again")
    if unknown := ', '.join(map(repr, sorted(set(start + stop) - set(meta['stoi'])))):
        die(f"the prompt or stop has characters outside the vocabulary in {meta_dir}: {unknown}")
    encode = lambda s: [meta['stoi'][c] for c in s]
    decode = lambda l: ''.join([meta['itos'][i] for i in l])
elif os.path.isdir(init_from) and not 50257 <= gptconf.vocab_size <= 50304:
    path = os.path.join(init_from, 'tokenizer.json')
    if not os.path.exists(path):
        die(f"{init_from} has no tokenizer.json for its {gptconf.vocab_size} tokens (not GPT-2's)")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        die(f"reading {path} needs the tokenizers package: pip install tokenizers")
    tokenizer = Tokenizer.from_file(path)
    encode = lambda s: tokenizer.encode(s, add_special_tokens=False).ids # <s> only as written
    decode = tokenizer.decode
elif gptconf.vocab_size < 50257:
    die(f"the model has {gptconf.vocab_size} tokens, too few for GPT-2 BPE, and no vocabulary"
        f"{f' in {meta_dir}' if meta_dir else ''}: run where train.py ran")
else:
    print("No meta found, assuming GPT-2 encodings...")
    import tiktoken
    try:
        enc = tiktoken.get_encoding("gpt2")
    except OSError as e: # requests' errors: tiktoken downloads GPT-2's BPE once, then caches it
        die(f"cannot get GPT-2's BPE for tiktoken ({type(e).__name__}): connect once, or set "
            f"TIKTOKEN_CACHE_DIR to a cache that holds it")
    encode = lambda s: enc.encode(s, allowed_special={"<|endoftext|>"})
    token = lambda i: enc.decode_single_token_bytes(i) if i < enc.n_vocab else '\ufffd'.encode()
    decode = lambda l: b''.join(map(token, l)).decode('utf-8', errors='replace')

start_ids, stop_ids = encode(start), encode(stop)
if not start_ids:
    die("the prompt is empty: give at least one token with --start=... or FILE:path")
x = jax.device_put(jnp.asarray([start_ids] * batch_size, dtype=jnp.int32), dev)

def new_text(idx_N, n, final=True):
    """Not final: without what may yet change (a stop's start, a character's first bytes)."""
    text = decode(np.asarray(idx_N[len(start_ids):len(start_ids) + n]).tolist())
    text = text.split(stop)[0] if stop else text
    return text if final else text[:len(text) - max(len(stop) - 1, 0)].rstrip('\ufffd')

class Streamer(Progress):  # prints the new text as the compiled loop makes it
    def start(self, total):
        super().start(total)
        self.printed = ''
        print(decode(start_ids), end='', flush=True)

    def show(self, n, idx_BN):
        text = new_text(idx_BN[0], n, final=False)
        print(text[len(self.printed):], end='', flush=True)
        self.printed = text

# run generation: sample k draws with fold_in(PRNGKey(seed), k)
progress = Streamer('', every=0.02, disable=True) if stream else Progress('sampling')
key = jax.random.PRNGKey(seed)
keys_of = lambda i: jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(i, i + batch_size))
t0 = time.time()
try:
    generate = make_generate(gptconf, max_new_tokens, temperature, top_k, top_p, stop_ids,
                             on_tokens=progress).lower(params, x, keys_of(0)).compile()
except jax.errors.JaxRuntimeError as e: # e.g. an XLA backend without some op in this dtype
    die(f"cannot compile in {dtype} on {dev} ({str(e).splitlines()[0]}): try another --dtype")
compile_time, decode_time, n = time.time() - t0, 0.0, 0

for first in range(0, num_samples, batch_size):
    progress.start(max_new_tokens)
    t0 = time.time()
    y, made = generate(params, x, jax.device_put(keys_of(first), dev))
    y = np.asarray(y)[:num_samples - first]
    decode_time += time.time() - t0
    progress.close()
    n += int(made) * len(y)
    for row in y:
        text = new_text(row, max_new_tokens)
        print(text[len(progress.printed):] if stream else decode(start_ids) + text)
        print('---------------')
print(f"{n:,} tokens in {decode_time:.2f}s: {n / decode_time:,.1f} tokens/s "
      f"(compile {compile_time:.1f}s, not counted)")
