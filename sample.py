"""
Sample from a trained model (or a GPT-2 checkpoint).

$ python sample.py --out_dir=out-shakespeare-char          # a model train.py wrote
$ python sample.py --init_from=gpt2-xl --start="What is the answer to life, the universe, and everything?" \
    --num_samples=5 --max_new_tokens=100                    # OpenAI's GPT-2 (Hugging Face hub)
$ python sample.py --init_from=path/to/dir --start=FILE:prompt.txt --temperature=0
                                                            # a save_pretrained GPT-2 dir; greedy

--temperature=0 is greedy decoding (the most likely token every step; top_k and seed do not
matter then). Each sample k uses the key fold_in(PRNGKey(seed), k), so a run is reproducible.

Decoding uses a KV cache: the prompt goes through the model once (prefill), then each new token
is one single-position step, all of it inside one compiled function (lax.fori_loop). Tokens
are the ones nanoGPT's generate would pick, including past block_size (see make_generate).
"""
import os
import sys
import time

import numpy as np
import jax
import jax.numpy as jnp

from model import GPTConfig, gpt_forward, gpt_decode, init_cache, from_pretrained
import checkpoint

# -----------------------------------------------------------------------------
init_from = 'resume'  # 'resume' (from out_dir), a gpt2 variant (e.g. 'gpt2-xl'), or a local Hugging Face GPT-2 dir
out_dir = 'out'  # ignored unless init_from is 'resume'
start = "\n"  # or "<|endoftext|>" or etc. Can also specify a file, use as: "FILE:prompt.txt"
num_samples = 10  # number of samples to draw
max_new_tokens = 500  # number of tokens generated in each sample
temperature = 0.8  # 1.0 = no change, < 1.0 = less random, > 1.0 = more random; 0.0 = greedy (always the most likely token)
top_k = 200  # retain only the top_k most likely tokens, clamp others to have 0 probability
seed = 1337
device = 'cuda' if jax.default_backend() == 'gpu' else 'cpu'  # examples: 'cpu', 'cuda', 'cuda:0', 'cuda:1'
dtype = 'bfloat16' if jax.default_backend() != 'cpu' else 'float32'  # 'float32' or 'bfloat16' or 'float16'
compile = False  # kept for nanoGPT's flags; ignored: the decoding loop is always compiled (jax.jit)
# -----------------------------------------------------------------------------


def crop_top_k(logits_BV, top_k):
    """nanoGPT's top-k cut: logits below the k-th largest of their row become -inf. Ties at the
    k-th value all stay, so more than k tokens can survive. top_k None or >= V keeps everything."""
    if top_k is None:
        return logits_BV
    v_BK, _ = jax.lax.top_k(logits_BV, min(top_k, logits_BV.shape[-1]))
    return jnp.where(logits_BV < v_BK[:, -1:], -jnp.inf, logits_BV)


def sample_next(logits_BV, key, temperature, top_k):
    """One step of nanoGPT's sampling rule: scale by 1/temperature, crop to the top k, softmax,
    draw one token per row. temperature 0.0 means greedy: the argmax, whatever top_k is
    (nanoGPT would divide by zero)."""
    if temperature == 0.0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = crop_top_k(logits_BV / temperature, top_k)
    # categorical samples from softmax(logits) itself; -inf entries have probability 0
    return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


def make_generate(config, max_new_tokens, temperature=1.0, top_k=None):
    """nanoGPT's GPT.generate as one compiled function (params, idx_BT, key) -> idx_BN, where
    N = T + max_new_tokens and idx_BN starts with the prompt idx_BT. New token i is drawn with
    jax.random.fold_in(key, i).

    While the sequence fits in block_size, the prompt is prefilled into the KV cache once and
    every further step feeds only the newest token. Past block_size nanoGPT crops the context to
    the last block_size tokens, which then sit at positions 0..block_size-1: every position
    shifts by one each step, so cached keys and values are stale. From there on each step
    recomputes the cropped window (a second loop in the same compiled function), which gives
    the same tokens as nanoGPT's full recompute. That part costs what recompute costs: the
    cache speeds up only the tokens drawn while the sequence fits in block_size."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0.0:
        raise ValueError(f"temperature must be >= 0.0 (0.0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be at least 1 (or None for no cut), got {top_k}")
    decode = gpt_decode(config).apply  # (params, idx_BT, cache, pos) -> (logits_BV, cache)
    forward = gpt_forward(config).apply  # (params, rng, idx_BT) -> (logits_B1V, None)
    block_size = config.block_size

    @jax.jit
    def generate(params, idx_BT, key):
        B, T = idx_BT.shape
        idx_BN = jnp.zeros((B, T + max_new_tokens), jnp.int32).at[:, :T].set(idx_BT.astype(jnp.int32))

        def put_next(i, L, logits_BV, idx_BN):
            # token number L (new token i) from the logits of a context of L tokens
            next_B = sample_next(logits_BV, jax.random.fold_in(key, i), temperature, top_k)
            return jax.lax.dynamic_update_slice_in_dim(idx_BN, next_B[:, None], L, axis=1)

        def cached_step(i, carry):
            # tokens 0..L-2 are in the cache; the newest one (index L-1) joins at position L-1
            idx_BN, cache = carry
            L = T + i
            tok_B1 = jax.lax.dynamic_slice_in_dim(idx_BN, L - 1, 1, axis=1)
            logits_BV, cache = decode(params, tok_B1, cache, L - 1)
            return put_next(i, L, logits_BV, idx_BN), cache

        def window_step(i, idx_BN):
            # nanoGPT's crop: the last block_size tokens, at positions 0..block_size-1
            L = T + i
            win_BS = jax.lax.dynamic_slice_in_dim(idx_BN, L - block_size, block_size, axis=1)
            return put_next(i, L, forward(params, None, win_BS)[0][:, -1, :], idx_BN)

        # The two phases are split at trace time (T and block_size are static), so each loop body
        # is straight-line code: no lax.cond, and no cache carried where it is no longer used.
        # new token i comes from a context of T + i tokens: cached while T + i <= block_size
        n_cached = min(max_new_tokens, block_size - T + 1) if T <= block_size else 0
        if T <= block_size:
            # token 0: prefill the whole prompt at positions 0..T-1 in one pass
            cache = init_cache(config, B, params['transformer/wte']['weight'].dtype)
            logits_BV, cache = decode(params, idx_BT.astype(jnp.int32), cache, 0)
            idx_BN = put_next(0, T, logits_BV, idx_BN)
            idx_BN, _ = jax.lax.fori_loop(1, n_cached, cached_step, (idx_BN, cache))
        else:
            idx_BN = window_step(0, idx_BN)
        if max(n_cached, 1) < max_new_tokens:  # traced only when the run outgrows block_size
            idx_BN = jax.lax.fori_loop(max(n_cached, 1), max_new_tokens, window_step, idx_BN)
        return idx_BN

    return generate


def generate(params, config, idx_BT, max_new_tokens, temperature=1.0, top_k=None, key=None):
    """Like nanoGPT's model.generate(idx, max_new_tokens, temperature, top_k), with an explicit
    PRNG key (unused when temperature is 0). Compiles on every call: reuse make_generate's
    function to sample repeatedly."""
    key = jax.random.PRNGKey(0) if key is None else key
    return make_generate(config, max_new_tokens, temperature, top_k)(params, jnp.asarray(idx_BT), key)


def fail(msg):
    """Bad input: one line on stderr, exit status 1, no traceback."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
    # overrides from command line or config file (found next to this script, whatever the cwd)
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())

    if max_new_tokens < 1:
        fail(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if num_samples < 1:
        fail(f"num_samples must be at least 1, got {num_samples}")
    if temperature < 0.0:
        fail(f"temperature must be >= 0.0 (0.0 means greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        fail(f"top_k must be at least 1 (top_k >= the vocabulary size keeps every token), got {top_k}")

    # the prompt file is read before any model loads, so a wrong path fails fast
    if start.startswith('FILE:'):
        try:
            with open(start[5:], 'r', encoding='utf-8') as f:
                start = f.read()
        except (OSError, UnicodeDecodeError) as e:
            fail(f"cannot read the prompt file {start[5:]!r}: {getattr(e, 'strerror', None) or e}")

    # device and dtype
    platform, _, index = device.partition(':')
    platform = {'cuda': 'gpu'}.get(platform, platform)
    try:
        dev = jax.devices(platform)[int(index or 0)]
    except (RuntimeError, IndexError, ValueError):
        fail(f"device {device!r} is not available; JAX sees {[str(d) for d in jax.devices()]} (try --device=cpu)")
    ptdtype = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}.get(dtype)
    if ptdtype is None:
        fail(f"dtype must be 'float32', 'bfloat16' or 'float16', got {dtype!r}")

    # model
    ckpt_meta = None
    if init_from == 'resume':
        ckpt_path = os.path.join(out_dir, checkpoint.CKPT_NAME)
        try:
            arrays, ckpt_meta = checkpoint.load_checkpoint(ckpt_path)
            if 'model_args' not in ckpt_meta:
                raise checkpoint.CheckpointError(f"{ckpt_path} has no model_args: not written by train.py")
            gptconf = GPTConfig(**ckpt_meta['model_args'])
            params = checkpoint.params_from_arrays(arrays)
        except checkpoint.CheckpointError as e:
            fail(e)
        except (TypeError, ValueError) as e:
            fail(f"{ckpt_path}: bad model_args ({e})")
    else:
        try:
            gptconf, params = from_pretrained(init_from, dict(dropout=0.0))
        except (ValueError, FileNotFoundError) as e:
            fail(e)
        except Exception as e:  # e.g. no network for the Hugging Face hub
            fail(f"could not load {init_from!r}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    # mixed precision the simple way: decode in dtype (LayerNorm statistics stay fp32 in model.py)
    params = jax.device_put(jax.tree.map(lambda p: jnp.asarray(p, ptdtype), params), dev)

    # the dataset's vocabulary if it has one (character-level), else GPT-2 BPE
    meta, meta_dir = None, None
    if ckpt_meta is not None and 'dataset' in ckpt_meta.get('config', {}):
        meta_dir = os.path.join('data', ckpt_meta['config']['dataset'])
        try:
            meta = checkpoint.load_meta(meta_dir)
        except checkpoint.CheckpointError as e:
            fail(e)
    if meta is not None:
        print(f"Loading meta from {meta_dir}...")
        if 'stoi' not in meta or 'itos' not in meta:
            fail(f"the vocabulary in {meta_dir} has no stoi/itos; run its prepare.py again")
        if meta['vocab_size'] != gptconf.vocab_size:
            fail(f"the vocabulary in {meta_dir} has {meta['vocab_size']} tokens but the checkpoint's model has "
                 f"{gptconf.vocab_size}: the dataset was prepared again differently, or this is another model")
        stoi, itos = meta['stoi'], meta['itos']

        def encode(s):
            unknown = sorted(set(c for c in s if c not in stoi))
            if unknown:
                fail(f"the prompt has characters outside the {ckpt_meta['config']['dataset']} vocabulary: "
                     f"{', '.join(repr(c) for c in unknown)}")
            return [stoi[c] for c in s]

        def decode(ids):
            return ''.join(itos[i] for i in ids)
    else:
        if gptconf.vocab_size < 50257:
            where = f" (looked in {meta_dir})" if meta_dir else ""
            fail(f"the model's vocabulary has {gptconf.vocab_size} tokens, too few for GPT-2 BPE, and its dataset "
                 f"vocabulary (meta.json or meta.pkl) was not found{where}: run sample.py from the directory "
                 f"train.py ran in, or prepare the dataset again")
        print("No meta found, assuming GPT-2 encodings...")
        import tiktoken
        enc = tiktoken.get_encoding("gpt2")

        def encode(s):
            return enc.encode(s, allowed_special={"<|endoftext|>"})

        def decode(ids):
            # ids past GPT-2's 50257 (padding rows of a 50304 vocab, never in the data) print as U+FFFD
            return b''.join(enc.decode_single_token_bytes(i) if i < enc.n_vocab else '\ufffd'.encode()
                            for i in ids).decode('utf-8', errors='replace')

    # encode the beginning of the prompt
    start_ids = encode(start)
    if not start_ids:
        fail("the prompt is empty: give at least one token with --start=... or FILE:path")
    if max(start_ids) >= gptconf.vocab_size:
        fail(f"the prompt encodes to token {max(start_ids)} but the model's vocabulary has only "
             f"{gptconf.vocab_size} tokens: use a prompt within its vocabulary")
    x = jax.device_put(jnp.asarray(start_ids, dtype=jnp.int32)[None, ...], dev)
    key = jax.device_put(jax.random.PRNGKey(seed), dev)

    # compile once (timed apart), then draw the samples
    t0 = time.time()
    try:
        run = make_generate(gptconf, max_new_tokens, temperature, top_k).lower(params, x, key).compile()
    except jax.errors.JaxRuntimeError as e:  # e.g. an XLA backend without some op in this dtype
        fail(f"could not compile the decoder in {dtype} on {dev} ({str(e).splitlines()[0]}): "
             f"try another --dtype (float32, bfloat16)")
    compile_time = time.time() - t0
    decode_time = 0.0
    for k in range(num_samples):
        t0 = time.time()
        y = jax.block_until_ready(run(params, x, jax.random.fold_in(key, k)))
        decode_time += time.time() - t0
        print(decode(np.asarray(y[0]).tolist()))
        print('---------------')
    print(f"{num_samples * max_new_tokens:,} tokens in {decode_time:.2f}s: "
          f"{num_samples * max_new_tokens / decode_time:,.1f} tokens/s (compile {compile_time:.1f}s, not counted)")
