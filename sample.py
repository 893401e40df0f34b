"""
Sample from a trained model (or a GPT-2 checkpoint), e.g.
$ python sample.py --out_dir=out-shakespeare-char --num_samples=1 --stream=True --stop="\n\n"
$ python sample.py --init_from=gpt2-xl --start="What is the answer to life?" --temperature=0
Sample k draws with fold_in(PRNGKey(seed), k): the same tokens alone or in a batch.
"""
import os
import time

import numpy as np
import jax
import jax.numpy as jnp

from model import from_pretrained, check_sampling, make_generate
import checkpoint
import parallel
import training
from cli import die, Progress

# -----------------------------------------------------------------------------
init_from = 'resume' # 'resume' (out_dir's), a gpt2 variant (e.g. 'gpt2-xl'), an HF dir, a ckpt.pt
out_dir = 'out' # ignored if init_from is not 'resume'; its ckpt.safetensors, else a ckpt.pt
start = "\n" # or "<|endoftext|>" or etc. Can also specify a file, use as: "FILE:prompt.txt"
num_samples = 10 # number of samples to draw
max_new_tokens = 500 # number of tokens generated in each sample
temperature = 0.8 # 1.0 = no change, < 1.0 = less random, > 1.0 = more random; 0.0 = greedy
top_k = 200 # retain only the top_k most likely tokens, clamp others to have 0 probability
top_p = 1.0 # then keep the fewest likeliest tokens whose probabilities sum to top_p; 1.0 = off
stop = '' # a sample ends where this string first appears in its new text (printed without it)
stream = False # print each sample as it is produced (one at a time: batch_size=1)
batch_size = 16 # samples drawn side by side in one compiled call; lower it if memory is short
seed = 1337
device = 'cuda' # examples: 'cpu', 'cuda', 'cuda:0', 'cuda:1', etc.
dtype = 'auto' # 'float32', 'bfloat16', or 'float16'; 'auto': bfloat16 on GPU/TPU, float32 on CPU
compile = False # kept for nanoGPT's command lines: the decoding loop is always compiled
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read()) # overrides from command line or config file
# -----------------------------------------------------------------------------

parallel.pin_platform(device)
if num_samples < 1 or batch_size < 1:
    die(f"num_samples and batch_size must be at least 1, got {num_samples} and {batch_size}")
batch_size = min(batch_size, num_samples)
if stream and batch_size > 1:
    die(f"stream=True prints one sample at a time, not a batch of {batch_size}: add --batch_size=1")
try:
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    if start.startswith('FILE:'): # read before any model loads, so that a wrong path fails fast
        with open(start[5:], 'r', encoding='utf-8') as f:
            start = f.read()
except (OSError, UnicodeDecodeError) as e:
    die(f"cannot read the prompt file {start[5:]!r}: {getattr(e, 'strerror', None) or e}")
except ValueError as e:
    die(e)
dev = parallel.select_devices(device)[0]
dtype = parallel.select_dtype(dtype, dev.platform)

# model, and the dataset's vocabulary if it has one (character-level), else GPT-2's BPE
ckpt_meta = {}
try:
    if init_from == 'resume' or init_from.endswith('.pt'):
        ckpt_path = checkpoint.resume_path(out_dir) if init_from == 'resume' else init_from
        arrays, ckpt_meta = checkpoint.load_checkpoint(ckpt_path)
        gptconf = checkpoint.model_config(ckpt_meta.get('model_args'), ckpt_path)
        params = checkpoint.params_from_arrays(arrays)
    else:
        gptconf, params = from_pretrained(init_from, dict(dropout=0.0))
    dataset = ckpt_meta.get('config', {}).get('dataset')
    meta_dir = os.path.join('data', dataset) if dataset else None
    meta = training.load_meta(meta_dir) if meta_dir else None
except (checkpoint.CheckpointError, ValueError, FileNotFoundError) as e:
    die(e)
except Exception as e: # e.g. no network for the Hugging Face hub
    die(f"could not load {init_from!r}: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}")
# mixed precision the simple way: weights in dtype (LayerNorm's statistics stay fp32 in model.py)
params = jax.device_put(jax.tree.map(lambda p: jnp.asarray(p, dtype), params), dev)
if meta is not None:
    print(f"Loading meta from {meta_dir}...")
    if 'stoi' not in meta or 'itos' not in meta:
        die(f"the vocabulary in {meta_dir} has no stoi/itos; run its prepare.py again")
    if meta['vocab_size'] != gptconf.vocab_size:
        die(f"the vocabulary in {meta_dir} has {meta['vocab_size']} tokens but the checkpoint's "
            f"model has {gptconf.vocab_size}: the data was prepared again, or it is another model")
    unknown = sorted(set(start + stop) - set(meta['stoi']))
    if unknown:
        die(f"the prompt or stop string has characters outside the {dataset} vocabulary: "
            f"{', '.join(repr(c) for c in unknown)}")
    encode = lambda s: [meta['stoi'][c] for c in s]
    decode = lambda l: ''.join([meta['itos'][i] for i in l])
elif gptconf.vocab_size < 50257:
    die(f"the model's vocabulary has {gptconf.vocab_size} tokens, too few for GPT-2 BPE, and its "
        f"dataset's (meta.json or meta.pkl) was not found{f' in {meta_dir}' if meta_dir else ''}: "
        f"run sample.py from the directory train.py ran in, or prepare the dataset again")
else:
    print("No meta found, assuming GPT-2 encodings...")
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    encode = lambda s: enc.encode(s, allowed_special={"<|endoftext|>"})
    # ids past GPT-2's 50257 (a padded vocabulary's rows, never in the data) print as U+FFFD
    token = lambda i: enc.decode_single_token_bytes(i) if i < enc.n_vocab else '\ufffd'.encode()
    decode = lambda l: b''.join(map(token, l)).decode('utf-8', errors='replace')

# encode the beginning of the prompt
start_ids, stop_ids = encode(start), encode(stop)
if not start_ids:
    die("the prompt is empty: give at least one token with --start=... or FILE:path")
x = jax.device_put(jnp.asarray([start_ids] * batch_size, dtype=jnp.int32), dev)

def new_text(idx_N, n, final=True):
    """A sample's first n new tokens as text, cut at the stop string. Not final: without what may
    still change (a stop string's possible beginning, a character whose bytes are not all in)."""
    text = decode(np.asarray(idx_N[len(start_ids):len(start_ids) + n]).tolist())
    if stop and stop in text:
        return text[:text.index(stop)]
    return text if final else text[:len(text) - max(len(stop) - 1, 0)].rstrip('\ufffd')

class Streamer(Progress):
    """stream=True: prints the new text as the compiled loop produces it, about every 20 ms."""
    def start(self, total):
        super().start(total)
        self.printed = ''
        print(decode(start_ids), end='', flush=True)

    def show(self, n, idx_BN, final=False):
        text = new_text(idx_BN[0], n, final)
        print(text[len(self.printed):], end='', flush=True)
        self.printed = text

# run generation: compiled once (timed apart), then one call per batch of samples
progress = Streamer('', every=0.02, disable=True) if stream else Progress('sampling')
key = jax.random.PRNGKey(seed)
keys_of = lambda i: jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(i, i + batch_size))
t0 = time.time()
try:
    generate = make_generate(gptconf, max_new_tokens, temperature, top_k, top_p, stop_ids,
                             on_tokens=progress).lower(params, x, keys_of(0)).compile()
except jax.errors.JaxRuntimeError as e: # e.g. an XLA backend without some op in this dtype
    die(f"could not compile the decoder in {dtype} on {dev} ({str(e).splitlines()[0]}): "
        f"try another --dtype (float32, bfloat16)")
compile_time, decode_time = time.time() - t0, 0.0
for first in range(0, num_samples, batch_size):
    progress.start(max_new_tokens)
    t0 = time.time()
    y = np.asarray(generate(params, x, jax.device_put(keys_of(first), dev)))
    decode_time += time.time() - t0
    progress.close()
    for row in y[:num_samples - first]:
        if stream:
            progress.show(max_new_tokens, row[None], final=True)
        print('' if stream else decode(start_ids) + new_text(row, max_new_tokens))
        print('---------------')
n = num_samples * max_new_tokens
print(f"{n:,} tokens in {decode_time:.2f}s: {n / decode_time:,.1f} tokens/s "
      f"(compile {compile_time:.1f}s, not counted)")
