"""
Sample from a trained model (or a GPT-2 checkpoint).

$ python sample.py --out_dir=out-shakespeare-char          # a model train.py wrote
$ python sample.py --init_from=gpt2-xl --start="What is the answer to life, the universe, and everything?" \
    --num_samples=5 --max_new_tokens=100                    # OpenAI's GPT-2 (Hugging Face hub)
$ python sample.py --init_from=path/to/dir --start=FILE:prompt.txt --temperature=0
                                                            # a save_pretrained GPT-2 dir; greedy
$ python sample.py --init_from=path/to/ckpt.pt              # nanoGPT's checkpoint (needs torch to read it)

$ python sample.py --out_dir=out-shakespeare-char --num_samples=1 --stream=True --stop="\n\n" --top_p=0.9

--temperature=0 is greedy decoding (top_k, top_p and seed do not matter then). Sample k uses the key
fold_in(PRNGKey(seed), k), so it is the same token for token whether drawn alone or in a batch, and a run
is reproducible. Decoding runs model.make_generate: batch_size samples side by side in one compiled loop
with a KV cache, the tokens nanoGPT's generate picks, past block_size too.
"""
import os
import time

import numpy as np
import jax
import jax.numpy as jnp

from model import GPTConfig, from_pretrained, check_sampling, make_generate
import checkpoint
import parallel
from parallel import die

# -----------------------------------------------------------------------------
init_from = 'resume' # either 'resume' (from an out_dir) or a gpt2 variant (e.g. 'gpt2-xl'), or a local Hugging Face GPT-2 dir, or a nanoGPT ckpt.pt
out_dir = 'out' # ignored if init_from is not 'resume'; ours (ckpt.safetensors), else a nanoGPT ckpt.pt in it
start = "\n" # or "<|endoftext|>" or etc. Can also specify a file, use as: "FILE:prompt.txt"
num_samples = 10 # number of samples to draw
max_new_tokens = 500 # number of tokens generated in each sample
temperature = 0.8 # 1.0 = no change, < 1.0 = less random, > 1.0 = more random, in predictions; 0.0 = greedy
top_k = 200 # retain only the top_k most likely tokens, clamp others to have 0 probability
top_p = 1.0 # nucleus sampling after top_k: keep the fewest most likely tokens whose probabilities sum to top_p; 1.0 = off
stop = '' # a sample ends where this string first appears in its new text, which is printed without it; '' = none
stream = False # print each sample's text as it is produced (one sample at a time: batch_size=1 or num_samples=1)
batch_size = 16 # samples drawn side by side in one compiled call; lower it if memory is short
seed = 1337
device = 'cuda' # examples: 'cpu', 'cuda', 'cuda:0', 'cuda:1', etc.; 'cuda' falls back to what JAX has
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
except ValueError as e:
    die(e)
if start.startswith('FILE:'): # read before any model loads, so that a wrong path fails fast
    try:
        with open(start[5:], 'r', encoding='utf-8') as f:
            start = f.read()
    except (OSError, UnicodeDecodeError) as e:
        die(f"cannot read the prompt file {start[5:]!r}: {getattr(e, 'strerror', None) or e}")
dev = parallel.select_devices(device)[0]
dtype = parallel.select_dtype(dtype, dev.platform)

# model
ckpt_meta = None
if init_from == 'resume' or init_from.endswith('.pt'):
    ckpt_path = checkpoint.resume_path(out_dir) if init_from == 'resume' else init_from
    try:
        arrays, ckpt_meta = checkpoint.load_checkpoint(ckpt_path)
        if 'model_args' not in ckpt_meta:
            raise checkpoint.CheckpointError(f"{ckpt_path} has no model_args: not written by train.py")
        gptconf = GPTConfig(**ckpt_meta['model_args'])
        params = checkpoint.params_from_arrays(arrays)
    except checkpoint.CheckpointError as e:
        die(e)
    except (TypeError, ValueError) as e:
        die(f"{ckpt_path}: bad model_args ({e})")
else:
    try:
        gptconf, params = from_pretrained(init_from, dict(dropout=0.0))
    except (ValueError, FileNotFoundError) as e:
        die(e)
    except Exception as e: # e.g. no network for the Hugging Face hub
        die(f"could not load {init_from!r}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
# mixed precision the simple way: the weights in dtype (LayerNorm's statistics stay fp32 in model.py)
params = jax.device_put(jax.tree.map(lambda p: jnp.asarray(p, dtype), params), dev)

# the dataset's vocabulary if it has one (character-level), else GPT-2's BPE
meta, meta_dir = None, None
if ckpt_meta is not None and 'dataset' in ckpt_meta.get('config', {}):
    meta_dir = os.path.join('data', ckpt_meta['config']['dataset'])
    try:
        meta = checkpoint.load_meta(meta_dir)
    except checkpoint.CheckpointError as e:
        die(e)
if meta is not None:
    print(f"Loading meta from {meta_dir}...")
    if 'stoi' not in meta or 'itos' not in meta:
        die(f"the vocabulary in {meta_dir} has no stoi/itos; run its prepare.py again")
    if meta['vocab_size'] != gptconf.vocab_size:
        die(f"the vocabulary in {meta_dir} has {meta['vocab_size']} tokens but the checkpoint's model has "
            f"{gptconf.vocab_size}: the dataset was prepared again differently, or this is another model")
    stoi, itos = meta['stoi'], meta['itos']
    unknown = sorted(set(c for c in start + stop if c not in stoi))
    if unknown:
        die(f"the prompt or stop string has characters outside the {ckpt_meta['config']['dataset']} vocabulary: "
            f"{', '.join(repr(c) for c in unknown)}")
    encode = lambda s: [stoi[c] for c in s]
    decode = lambda l: ''.join([itos[i] for i in l])
else:
    if gptconf.vocab_size < 50257:
        where = f" (looked in {meta_dir})" if meta_dir else ""
        die(f"the model's vocabulary has {gptconf.vocab_size} tokens, too few for GPT-2 BPE, and its dataset "
            f"vocabulary (meta.json or meta.pkl) was not found{where}: run sample.py from the directory "
            f"train.py ran in, or prepare the dataset again")
    print("No meta found, assuming GPT-2 encodings...")
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    encode = lambda s: enc.encode(s, allowed_special={"<|endoftext|>"})
    # ids past GPT-2's 50257 (the padding rows of a 50304 vocabulary, never in the data) print as U+FFFD
    decode = lambda l: b''.join(enc.decode_single_token_bytes(i) if i < enc.n_vocab else '\ufffd'.encode()
                                for i in l).decode('utf-8', errors='replace')

# encode the beginning of the prompt
start_ids = encode(start)
if not start_ids:
    die("the prompt is empty: give at least one token with --start=... or FILE:path")
if max(start_ids) >= gptconf.vocab_size:
    die(f"the prompt encodes to token {max(start_ids)} but the model's vocabulary has only "
        f"{gptconf.vocab_size} tokens: use a prompt within its vocabulary")
stop_ids = encode(stop)
if stop and not stop_ids:
    die(f"the stop string {stop!r} encodes to no tokens: give another --stop")
x = jax.device_put(jnp.asarray([start_ids] * batch_size, dtype=jnp.int32), dev)
key = jax.random.PRNGKey(seed)
T = len(start_ids)

def new_text(idx_N, n, final=True):
    """The text of a sample's first n new tokens, cut where the stop string begins. Not final: without what
    may still change (a stop string's possible beginning, a character whose bytes are not all in yet)."""
    text = decode(np.asarray(idx_N[T:T + n]).tolist())
    if stop and stop in text:
        return text[:text.index(stop)]
    return text if final else text[:len(text) - max(len(stop) - 1, 0)].rstrip('\ufffd')

class Streamer(parallel.Progress):
    """stream=True: prints a sample's new text as the compiled loop produces it, about every 20 ms."""
    def start(self, total):
        super().start(total)
        self.printed = ''
        print(decode(start_ids), end='', flush=True)

    def show(self, n, idx_BN, final=False):
        text = new_text(idx_BN[0], n, final)
        print(text[len(self.printed):], end='', flush=True)
        self.printed = text

# run generation: compiled once (timed apart), then one call per batch of samples
progress = Streamer('', every=0.02, disable=True) if stream else parallel.Progress('sampling')
keys_of = lambda first: jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(first, first + batch_size))
t0 = time.time()
try:
    generate = make_generate(gptconf, max_new_tokens, temperature, top_k, top_p, stop_ids, on_tokens=progress) \
        .lower(params, x, keys_of(0)).compile()
except jax.errors.JaxRuntimeError as e: # e.g. an XLA backend without some op in this dtype
    die(f"could not compile the decoder in {dtype} on {dev} ({str(e).splitlines()[0]}): "
        f"try another --dtype (float32, bfloat16)")
compile_time = time.time() - t0
decode_time = 0.0
for first in range(0, num_samples, batch_size):
    progress.start(max_new_tokens)
    t0 = time.time()
    y = np.asarray(jax.block_until_ready(generate(params, x, jax.device_put(keys_of(first), dev))))
    decode_time += time.time() - t0
    progress.close()
    for row in y[:num_samples - first]:
        if stream:
            progress.show(max_new_tokens, row[None], final=True)
            print()
        else:
            print(decode(start_ids) + new_text(row, max_new_tokens))
        print('---------------')
print(f"{num_samples * max_new_tokens:,} tokens in {decode_time:.2f}s: "
      f"{num_samples * max_new_tokens / decode_time:,.1f} tokens/s (compile {compile_time:.1f}s, not counted)")
