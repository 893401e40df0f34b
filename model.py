"""
Full definition of a GPT Language Model in JAX + Haiku, all of it in this single file.
A port of nanoGPT's model.py: the same modules, initialisation and parameter names.

Shape glossary (suffixes on array names):
  B: batch size           T: sequence length (queries)    S: key/value length (cache slots)
  C: n_embd (channels)    H: n_head                       D: head size, C // H
  V: vocab size           F: MLP hidden size, 4 * C       N: prompt + new tokens (generate)
  I, O: a Linear's in and out features   K: eval batches, R: devices side by side (training.py's mesh step)
e.g. x_BTC is (B, T, C), att_BHTS is (B, H, T, S), logits_BTV is (B, T, V). The public functions carry the
same names as jaxtyping annotations, checked where the code is traced when a type checker is on (the tests).

Parameters live in a Haiku dict {module path: {name: array}} whose entries map one to one onto
nanoGPT's state_dict names:  'transformer/h_0/attn/c_attn' ['weight'] <-> 'transformer.h.0.attn.c_attn.weight'.
Linear weights are stored (in, out), GPT-2's Conv1D layout, the transpose of torch's nn.Linear.
The few products whose fastest form depends on the device go through backends.py.
"""
import json
import math
import os
import re
from dataclasses import dataclass, asdict

import numpy as np
import jax
import jax.numpy as jnp
import haiku as hk
from jax.experimental import io_callback
from jaxtyping import Array, Float, Int, UInt32

import backends

Arrayish = Array | np.ndarray  # what callers hand in: jax or numpy arrays
KV = tuple[Float[Array, "B H D S"], Float[Array, "B H S D"]]  # one layer's cache: keys, values


def apply_dropout(x, rate, is_training):
    return hk.dropout(hk.next_rng_key(), rate, x) if is_training and rate > 0.0 else x


@dataclass
class Linear(hk.Module):
    """nn.Linear with nanoGPT's N(0, std) init and zero bias."""
    out_features: int
    bias: bool = True
    std: float = 0.02
    name: str | None = None

    def __call__(self, x):
        w_IO = hk.get_parameter('weight', (x.shape[-1], self.out_features), init=hk.initializers.RandomNormal(self.std))
        y = backends.matmul(x, w_IO)
        return y + hk.get_parameter('bias', (self.out_features,), init=jnp.zeros) if self.bias else y


@dataclass
class Embedding(hk.Module):
    """nn.Embedding's table, N(0, 0.02) init."""
    num_embeddings: int
    embedding_dim: int
    name: str | None = None

    def __call__(self):
        return hk.get_parameter('weight', (self.num_embeddings, self.embedding_dim), init=hk.initializers.RandomNormal(0.02))


@dataclass
class LayerNorm(hk.Module):
    """LayerNorm but with an optional bias (eps 1e-5); statistics in fp32 whatever the compute dtype."""
    bias: bool
    name: str | None = None

    def __call__(self, x):
        C = x.shape[-1]
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + 1e-5) * hk.get_parameter('weight', (C,), init=jnp.ones)
        if self.bias:
            y = y + hk.get_parameter('bias', (C,), init=jnp.zeros)
        return y.astype(x.dtype)


def residual_std(config):
    """GPT-2's scaled init of the residual projections (c_proj): 0.02 / sqrt(2 * n_layer)."""
    return 0.02 / math.sqrt(2 * config.n_layer)


@dataclass
class CausalSelfAttention(hk.Module):
    config: 'GPTConfig'
    name: str | None = None

    def __call__(self, x_BTC: Float[Array, "B T C"], is_training=False, kv: KV | None = None, pos=0):
        """kv: an optional cache (k_BHDS, v_BHSD) into which the T new tokens go at positions pos..pos+T-1.
        Returns (y_BTC, the updated cache or None)."""
        cfg = self.config
        B, T, C = x_BTC.shape
        H, D = cfg.n_head, C // cfg.n_head
        # query, key, values for all heads in batch, heads split off the channels
        qkv_BT3C = Linear(3 * C, cfg.bias, name='c_attn')(x_BTC)
        q_BTHD, k_BTHD, v_BTHD = (a.reshape(B, T, H, D) for a in jnp.split(qkv_BT3C, 3, axis=-1))
        if kv is None and not (is_training and cfg.dropout > 0.0):
            # efficient attention (flash's role), in each device's fastest form
            y_BTHD = backends.causal_attention(q_BTHD, k_BTHD, v_BTHD)
        else:
            # manual implementation of attention: with attention dropout, or over the KV cache, which keeps
            # keys and values in the layouts the two products read (else XLA transposes the whole cache each step)
            k_BHDS, v_BHSD = k_BTHD.transpose(0, 2, 3, 1), v_BTHD.transpose(0, 2, 1, 3)
            if kv is not None:
                k_BHDS = jax.lax.dynamic_update_slice(kv[0], k_BHDS.astype(kv[0].dtype), (0, 0, 0, pos))
                v_BHSD = jax.lax.dynamic_update_slice(kv[1], v_BHSD.astype(kv[1].dtype), (0, 0, pos, 0))
                kv = (k_BHDS, v_BHSD)
            S = k_BHDS.shape[-1]
            mask_TS = jnp.arange(S)[None, :] <= (pos + jnp.arange(T))[:, None]  # query pos+t sees keys 0..pos+t
            att_BHTS = jnp.einsum('bthd,bhds->bhts', q_BTHD, k_BHDS.astype(q_BTHD.dtype)).astype(jnp.float32)
            att_BHTS = jax.nn.softmax(jnp.where(mask_TS, att_BHTS * (1.0 / math.sqrt(D)), -jnp.inf), axis=-1)
            att_BHTS = apply_dropout(att_BHTS.astype(q_BTHD.dtype), cfg.dropout, is_training)
            y_BTHD = jnp.einsum('bhts,bhsd->bthd', att_BHTS, v_BHSD.astype(q_BTHD.dtype))
        y_BTC = Linear(C, cfg.bias, std=residual_std(cfg), name='c_proj')(y_BTHD.reshape(B, T, C))
        return apply_dropout(y_BTC, cfg.dropout, is_training), kv


def gelu(x):
    """nn.GELU(), x * Phi(x) with erf as torch computes it (jax.nn.gelu's exact form uses erfc)."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))


@dataclass
class MLP(hk.Module):
    config: 'GPTConfig'
    name: str | None = None

    def __call__(self, x_BTC, is_training=False):
        cfg = self.config
        h_BTF = Linear(4 * cfg.n_embd, cfg.bias, name='c_fc')(x_BTC)
        h_BTF = gelu(h_BTF) if cfg.activation == 'gelu' else jax.nn.gelu(h_BTF, approximate=True)
        x_BTC = Linear(cfg.n_embd, cfg.bias, std=residual_std(cfg), name='c_proj')(h_BTF)
        return apply_dropout(x_BTC, cfg.dropout, is_training)


@dataclass
class Block(hk.Module):
    config: 'GPTConfig'
    name: str | None = None

    def __call__(self, x_BTC: Float[Array, "B T C"], is_training=False, kv: KV | None = None, pos=0):
        x_BTC = backends.residual(x_BTC)
        y_BTC, kv = CausalSelfAttention(self.config, name='attn')(
            LayerNorm(self.config.bias, name='ln_1')(x_BTC), is_training, kv, pos)
        x_BTC = backends.residual(x_BTC + y_BTC)
        x_BTC = x_BTC + MLP(self.config, name='mlp')(LayerNorm(self.config.bias, name='ln_2')(x_BTC), is_training)
        return x_BTC, kv


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2 vocab_size of 50257, padded up to nearest multiple of 64 for efficiency
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # True: bias in Linears and LayerNorms, like GPT-2. False: a bit better and faster
    activation: str = 'gelu'  # 'gelu' (exact, nanoGPT's nn.GELU) or 'gelu_new' (tanh form, GPT-2 checkpoints)
    remat: bool = False  # recompute each block's activations in the backward (hk.remat): less memory, ~1/3 more compute

    def __post_init__(self):
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.activation not in ('gelu', 'gelu_new'):
            raise ValueError(f"activation must be 'gelu' or 'gelu_new', got {self.activation!r}")


@dataclass
class GPT(hk.Module):
    """nanoGPT's GPT, named 'transformer' so that Haiku's paths read as state_dict names. The lm_head is
    wte itself (weight tying: one parameter, not two)."""
    config: GPTConfig
    name: str | None = 'transformer'

    def __call__(self, idx_BT: Int[Arrayish, "B T"], targets_BT: Int[Arrayish, "B T"] | None = None,
                 is_training=False, cache: list[KV] | None = None, pos=0):
        """Without cache: (logits, loss). With targets, logits_BTV and the mean cross-entropy over the
        targets that are not -1; without, the last position's logits (B, 1, V) and None.
        With cache (init_cache): a decoding step feeding T new tokens at positions pos..pos+T-1
        (pos + T <= block_size); returns (the last new token's logits_BV, the updated cache)."""
        cfg = self.config
        T = idx_BT.shape[1]
        if cache is None and T > cfg.block_size:
            raise ValueError(f"Cannot forward sequence of length {T}, block size is only {cfg.block_size}")
        wte_VC = Embedding(cfg.vocab_size, cfg.n_embd, name='wte')()
        wpe_TC = Embedding(cfg.block_size, cfg.n_embd, name='wpe')()
        x_BTC = jnp.take(wte_VC, idx_BT, axis=0) + jnp.take(wpe_TC, pos + jnp.arange(T), axis=0)
        x_BTC = apply_dropout(x_BTC, cfg.dropout, is_training)
        new_cache = []
        for i in range(cfg.n_layer):
            block = Block(cfg, name=f'h_{i}')
            if cache is None and cfg.remat:  # keeps only x_BTC per block (XLA:CPU: with its memory-optimized scheduler)
                x_BTC = hk.remat(lambda x_BTC, block=block: block(x_BTC, is_training)[0])(x_BTC)
                continue
            x_BTC, kv = block(x_BTC, is_training, None if cache is None else cache[i], pos)
            new_cache.append(kv)
        x_BTC = LayerNorm(cfg.bias, name='ln_f')(x_BTC)
        if cache is not None:
            return backends.lm_head(x_BTC[:, -1, :], wte_VC).astype(jnp.float32), new_cache
        if targets_BT is None:  # inference-time mini-optimization: only forward the lm_head on the very last position
            return backends.lm_head(x_BTC[:, -1:, :], wte_VC).astype(jnp.float32), None
        logits_BTV = backends.lm_head(x_BTC, wte_VC).astype(jnp.float32)
        return logits_BTV, cross_entropy(logits_BTV, targets_BT)


def cross_entropy(logits_BTV: Float[Array, "B T V"], targets_BT: Int[Arrayish, "B T"]) -> Float[Array, ""]:
    """F.cross_entropy(..., ignore_index=-1): the mean over the positions whose target is not -1."""
    valid_BT = targets_BT != -1
    lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    picked_BT = jnp.take_along_axis(logits_BTV, jnp.where(valid_BT, targets_BT, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(valid_BT, lse_BT - picked_BT, 0.0)) / jnp.sum(valid_BT)


# -----------------------------------------------------------------------------
# pure functions of the modules (hk.transform), and the model's bookkeeping

def gpt_forward(config):
    """hk.Transformed: init(rng, idx_BT) and apply(params, rng, idx_BT, targets_BT=None, is_training=False).
    rng may be None unless is_training with dropout > 0."""
    return hk.transform(lambda idx_BT, targets_BT=None, is_training=False: GPT(config)(idx_BT, targets_BT, is_training))


def gpt_decode(config):
    """hk.Transformed without rng: apply(params, idx_BT, cache, pos) -> (logits_BV, cache)."""
    return hk.without_apply_rng(hk.transform(lambda idx_BT, cache, pos: GPT(config)(idx_BT, cache=cache, pos=pos)))


def init_cache(config, batch_size: int, dtype=jnp.float32) -> list[KV]:
    """An empty KV cache: per layer (k_BHDS, v_BHSD) with S = block_size slots."""
    B, H, D, S = batch_size, config.n_head, config.n_embd // config.n_head, config.block_size
    return [(jnp.zeros((B, H, D, S), dtype), jnp.zeros((B, H, S, D), dtype)) for _ in range(config.n_layer)]


def init_params(config, rng):
    """nanoGPT's initialisation as one compiled call (op by op, each small op would compile on its own)."""
    return jax.jit(gpt_forward(config).init)(rng, jnp.zeros((1, 1), jnp.int32))


def param_shapes(config):
    """The parameters' shapes and dtypes, nothing allocated."""
    return jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))


def get_num_params(params, non_embedding=True):
    """Number of parameters (of arrays or shapes). The position embeddings are subtracted by default;
    the token embeddings stay, since they double as the lm_head's weights."""
    n = sum(math.prod(p.shape) for p in jax.tree.leaves(params))
    if non_embedding:
        n -= math.prod(params['transformer/wpe']['weight'].shape)
    return n


def crop_block_size(params, config, block_size):
    """Model surgery to decrease the block size: keep the first block_size position embeddings.
    Returns the new (params, config)."""
    if block_size > config.block_size:
        raise ValueError(f"cannot crop block_size {config.block_size} up to {block_size}")
    params = {m: dict(p) for m, p in params.items()}
    params['transformer/wpe']['weight'] = params['transformer/wpe']['weight'][:block_size]
    return params, GPTConfig(**{**asdict(config), 'block_size': block_size})


# parameter names: Haiku path <-> nanoGPT state_dict name, one rule each way.
# The weights that torch's nn.Linear stores (out, in), where ours and GPT-2's Conv1D are (in, out):
TRANSPOSED = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')


def to_torch_name(module, name):
    """('transformer/h_0/attn/c_attn', 'weight') -> 'transformer.h.0.attn.c_attn.weight'"""
    return re.sub(r'\bh_(\d+)\b', r'h.\1', module).replace('/', '.') + '.' + name


def from_torch_name(key):
    """'transformer.h.0.attn.c_attn.weight' -> ('transformer/h_0/attn/c_attn', 'weight')"""
    module, name = key.rsplit('.', 1)
    return re.sub(r'\bh\.(\d+)\b', r'h_\1', module).replace('.', '/'), name


def to_state_dict(params):
    """params -> nanoGPT's state_dict as numpy arrays in torch layout, lm_head.weight (tied) included."""
    sd = {}
    for module, p in params.items():
        for name, value in p.items():
            key = to_torch_name(module, name)
            sd[key] = np.asarray(value).T if key.endswith(TRANSPOSED) else np.asarray(value)
    sd['lm_head.weight'] = sd['transformer.wte.weight']
    return sd


def from_state_dict(sd):
    """nanoGPT's state_dict (torch layout, anything np.asarray takes) -> params. Skips torch.compile's
    '_orig_mod.' prefix, the tied lm_head.weight and the attention's mask buffers."""
    params = {}
    for key, value in sd.items():
        key = key.removeprefix('_orig_mod.')
        if key == 'lm_head.weight' or key.endswith(('.attn.bias', '.attn.masked_bias')):
            continue
        module, name = from_torch_name(key)
        value = np.asarray(value)
        params.setdefault(module, {})[name] = jnp.asarray(value.T if key.endswith(TRANSPOSED) else value)
    return params


PRETRAINED = {
    'gpt2': dict(n_layer=12, n_head=12, n_embd=768),  # 124M params
    'gpt2-medium': dict(n_layer=24, n_head=16, n_embd=1024),  # 350M params
    'gpt2-large': dict(n_layer=36, n_head=20, n_embd=1280),  # 774M params
    'gpt2-xl': dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M params
}


def from_pretrained(model_type, override_args=None):
    """GPT-2's weights: model_type 'gpt2' | 'gpt2-medium' | 'gpt2-large' | 'gpt2-xl' (from the Hugging
    Face hub) or a local directory with config.json + model.safetensors (what save_pretrained writes).
    Read with safetensors, no torch. Returns (config, params)."""
    from safetensors.numpy import load_file
    override_args = override_args or {}
    bad = [k for k in override_args if k != 'dropout']
    if bad:
        raise ValueError(f"only dropout can be overridden when loading pretrained weights, not {bad}")
    if os.path.isdir(model_type):
        config_path, weights_path = (os.path.join(model_type, f) for f in ('config.json', 'model.safetensors'))
        for path in (config_path, weights_path):
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path} not found: a GPT-2 directory needs config.json and model.safetensors")
    elif model_type in PRETRAINED:
        from huggingface_hub import hf_hub_download
        config_path, weights_path = (hf_hub_download(model_type, f) for f in ('config.json', 'model.safetensors'))
    else:
        raise ValueError(f"unknown pretrained model {model_type!r}: use one of {sorted(PRETRAINED)} or a local directory")
    print(f"loading weights from pretrained gpt: {model_type}")
    with open(config_path) as f:
        hf = json.load(f)
    config_args = dict(n_layer=hf['n_layer'], n_head=hf['n_head'], n_embd=hf['n_embd'], vocab_size=hf['vocab_size'],
                       block_size=hf['n_positions'], bias=True, activation=hf.get('activation_function', 'gelu_new'))
    if model_type in PRETRAINED:
        print("forcing vocab_size=50257, block_size=1024, bias=True")
        assert config_args['vocab_size'] == 50257 and config_args['block_size'] == 1024
    if 'dropout' in override_args:
        print(f"overriding dropout rate to {override_args['dropout']}")
        config_args['dropout'] = override_args['dropout']
    config = GPTConfig(**config_args)
    sd = {}
    for key, value in load_file(weights_path).items():
        key = key if key.startswith(('transformer.', 'lm_head.')) else 'transformer.' + key  # the hub's bare names
        sd[key] = value.T if key.endswith(TRANSPOSED) else value  # Conv1D (in, out) -> nn.Linear's layout
    params = from_state_dict(sd)
    if jax.tree.map(np.shape, params) != jax.tree.map(np.shape, param_shapes(config)):
        raise ValueError(f"{weights_path}: parameters do not match a GPT-2 of {config}")
    return config, params


def flops_per_iter(config, num_params, fwdbwd_per_iter):
    """Training FLOPs of an iteration of fwdbwd_per_iter sequences (PaLM paper, appendix B), as nanoGPT."""
    L, H, Q, T = config.n_layer, config.n_head, config.n_embd // config.n_head, config.block_size
    flops_per_token = 6 * num_params + 12 * L * H * Q * T
    return flops_per_token * T * fwdbwd_per_iter


def estimate_mfu(config, num_params, fwdbwd_per_iter, dt, peak_flops=312e12):
    """Model FLOPs utilization: achieved FLOP/s over peak_flops (default: A100 bf16, nanoGPT's unit).
    num_params: get_num_params(params)."""
    return flops_per_iter(config, num_params, fwdbwd_per_iter) / dt / peak_flops


# -----------------------------------------------------------------------------
# generate: nanoGPT's sampling loop, compiled, with a KV cache

def crop_top_k(logits_BV: Float[Array, "B V"], top_k) -> Float[Array, "B V"]:
    """nanoGPT's top-k cut: logits below the k-th largest of their row become -inf (ties at the k-th
    value all stay). top_k None or >= V keeps everything."""
    if top_k is None:
        return logits_BV
    v_BK, _ = jax.lax.top_k(logits_BV, min(top_k, logits_BV.shape[-1]))
    return jnp.where(logits_BV < v_BK[:, -1:], -jnp.inf, logits_BV)


def top_p_filter(logits_BV: Float[Array, "B V"], top_p) -> Float[Array, "B V"]:
    """Nucleus sampling's cut, as Hugging Face's TopPLogitsWarper: tokens sorted by probability, the least likely
    whose probabilities sum to at most 1 - top_p become -inf; the most likely token always stays."""
    order_BV = jnp.argsort(logits_BV, axis=-1)  # ascending
    sorted_BV = jnp.take_along_axis(logits_BV, order_BV, axis=-1)
    cut_BV = (jnp.cumsum(jax.nn.softmax(sorted_BV, axis=-1), axis=-1) <= 1.0 - top_p).at[:, -1].set(False)
    cut_BV = jnp.zeros_like(cut_BV).at[jnp.arange(logits_BV.shape[0])[:, None], order_BV].set(cut_BV)
    return jnp.where(cut_BV, -jnp.inf, logits_BV)


def sample_next(logits_BV: Float[Array, "B V"], keys_B: UInt32[Array, "B 2"], temperature, top_k,
                top_p=1.0) -> Int[Array, "B"]:
    """One draw of nanoGPT's rule, row b with its own key keys_B[b]: logits / temperature, cropped to the top k
    (then to the top p), softmax, one token. temperature 0.0 is greedy, the argmax (nanoGPT would divide by zero)."""
    if temperature == 0.0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = crop_top_k(logits_BV / temperature, top_k)
    logits_BV = top_p_filter(logits_BV, top_p) if top_p < 1.0 else logits_BV
    return jax.vmap(jax.random.categorical)(keys_B, logits_BV).astype(jnp.int32)


def check_sampling(max_new_tokens, temperature, top_k, top_p=1.0):
    """ValueError, one line, for settings make_generate cannot draw with."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0.0:
        raise ValueError(f"temperature must be >= 0.0 (0.0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be at least 1 (None or >= the vocabulary size keeps every token), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1.0 keeps every token), got {top_p}")


def make_generate(config, max_new_tokens, temperature=1.0, top_k=None, top_p=1.0, stop=(), on_tokens=None):
    """nanoGPT's GPT.generate as one compiled function (params, idx_BT, keys_B) -> idx_BN, N = T + max_new_tokens,
    idx_BN starting with the prompt. Row b's new token i is drawn with fold_in(keys_B[b], i): a row's tokens do
    not depend on the other rows. stop: token ids; a row is done once its new tokens end with them, and the loop
    ends when every row is done (what follows in a row is for the caller to cut). on_tokens(n, idx_BN): a host
    function, called from the loop once n new tokens are in; it returns at which n to be called next.

    While the sequence fits in block_size, the prompt is prefilled into the KV cache once and each further
    step feeds only the newest token. Past block_size nanoGPT crops the context to its last block_size
    tokens, which then sit at positions 0..block_size-1: every position shifts each step and cached keys
    go stale, so from there each step recomputes the cropped window, as nanoGPT does (the same tokens)."""
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    decode_step, forward = gpt_decode(config).apply, gpt_forward(config).apply
    block_size, stop_S = config.block_size, np.asarray(stop, np.int32)

    @jax.jit
    def generate_tokens(params, idx_BT: Int[Array, "B T"], keys_B: UInt32[Array, "B 2"]) -> Int[Array, "B N"]:
        B, T = idx_BT.shape
        idx_BN = jnp.zeros((B, T + max_new_tokens), jnp.int32).at[:, :T].set(idx_BT.astype(jnp.int32))

        def put_next(i, logits_BV, idx_BN, done_B, report):  # new token i, from the T + i tokens before it
            next_B = sample_next(logits_BV, jax.vmap(jax.random.fold_in, (0, None))(keys_B, i), temperature, top_k, top_p)
            idx_BN = jax.lax.dynamic_update_slice_in_dim(idx_BN, next_B[:, None], T + i, axis=1)
            if len(stop_S):
                tail_BS = jax.lax.dynamic_slice_in_dim(idx_BN, T + i + 1 - len(stop_S), len(stop_S), axis=1)
                done_B = done_B | ((i + 1 >= len(stop_S)) & jnp.all(tail_BS == stop_S, axis=1))
            if on_tokens is not None:
                call = lambda: io_callback(on_tokens, jax.ShapeDtypeStruct((), jnp.int32), i + 1, idx_BN, ordered=True)
                report = jax.lax.cond(i + 1 >= report, call, lambda: report)
            return idx_BN, done_B, report

        def cached_step(carry):  # the newest token joins the cache at position T + i - 1
            i, cache, *state = carry
            tok_B1 = jax.lax.dynamic_slice_in_dim(state[0], T + i - 1, 1, axis=1)
            logits_BV, cache = decode_step(params, tok_B1, cache, T + i - 1)
            return (i + 1, cache, *put_next(i, logits_BV, *state))

        def window_step(carry):  # nanoGPT's crop: the last block_size tokens, at positions 0..block_size-1
            i, *state = carry
            window_BT = jax.lax.dynamic_slice_in_dim(state[0], T + i - block_size, block_size, axis=1)
            return (i + 1, *put_next(i, forward(params, None, window_BT)[0][:, -1, :], *state))

        until = lambda end: lambda carry: (carry[0] < end) & ~jnp.all(carry[-2])  # carry[-2]: done_B
        # split at trace time (T is static): each loop body is straight-line code
        n_cached = min(max_new_tokens, block_size - T + 1) if T <= block_size else 0
        state = (idx_BN, jnp.zeros((B,), bool), jnp.int32(1))
        if T <= block_size:  # token 0: prefill the whole prompt at positions 0..T-1 in one pass
            cache = init_cache(config, B, params['transformer/wte']['weight'].dtype)
            logits_BV, cache = decode_step(params, idx_BT.astype(jnp.int32), cache, 0)
            _, _, *state = jax.lax.while_loop(until(n_cached), cached_step, (jnp.int32(1), cache, *put_next(0, logits_BV, *state)))
        else:
            _, *state = window_step((jnp.int32(0), *state))
        if max(n_cached, 1) < max_new_tokens:
            _, *state = jax.lax.while_loop(until(max_new_tokens), window_step, (jnp.int32(max(n_cached, 1)), *state))
        return state[0]

    return generate_tokens


def generate(params, config, idx_BT: Int[Arrayish, "B T"], max_new_tokens: int, temperature=1.0, top_k=None, key=None):
    """nanoGPT's model.generate(idx, max_new_tokens, temperature, top_k) with an explicit PRNG key (row b draws
    with fold_in(key, b); unused when temperature is 0). Compiles on every call: keep make_generate's function
    to sample repeatedly."""
    key = jax.random.PRNGKey(0) if key is None else key
    keys_B = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(len(idx_BT)))
    return make_generate(config, max_new_tokens, temperature, top_k)(params, jnp.asarray(idx_BT), keys_B)
