"""nanoGPT's model.py in JAX + Haiku, its names as paths ('transformer/h_0/attn/c_attn' 'weight'
is 'transformer.h.0.attn.c_attn.weight'); Linear weights are (in, out) as GPT-2's Conv1D.

Shape glossary of array name suffixes (x_BTC is (B, T, C)), checked by jaxtyping in the tests:
  B batch  T sequence (queries)  S key/value slots  C n_embd  H n_head  G n_kv_head  D C // H
  V vocab  F MLP hidden  K eval batches  N prompt + new tokens  I, O Linear in, out  R micro-batches"""
import json
import math
import os
import re
from dataclasses import dataclass, replace

import numpy as np
import jax
import jax.numpy as jnp
import haiku as hk
from jax import lax
from jax.experimental import io_callback
from jaxtyping import Array, Float, Int, UInt32

import backends

Arrayish = Array | np.ndarray
KV = tuple[Float[Array, "B G D S"], Float[Array, "B G S D"]]  # a layer's cached keys, values

def apply_dropout(x, rate, is_training):
    return hk.dropout(hk.next_rng_key(), rate, x) if is_training and rate > 0.0 else x

def linear(x, out_features, bias, name, std=0.02):  # nn.Linear with nanoGPT's init, zero bias
    with hk.name_scope(name):
        init = hk.initializers.RandomNormal(std)
        y = backends.matmul(x, hk.get_parameter('weight', (x.shape[-1], out_features), init=init))
        return y + hk.get_parameter('bias', (out_features,), init=jnp.zeros) if bias else y

@dataclass
class LayerNorm(hk.Module):
    """LayerNorm but with an optional bias, or RMSNorm; statistics in fp32 whatever the dtype."""
    bias: bool
    kind: str = 'layernorm'
    eps: float = 1e-5
    name: str | None = None
    def __call__(self, x):
        C, x32 = x.shape[-1], x.astype(jnp.float32)
        if self.kind == 'layernorm':
            x32 = x32 - x32.mean(-1, keepdims=True)
        y = x32 * lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.eps)
        if self.kind != 'rmsnorm_noweight':
            y = y * hk.get_parameter('weight', (C,), init=jnp.ones)
            y = y + hk.get_parameter('bias', (C,), init=jnp.zeros) if self.bias else y
        return y.astype(x.dtype)

def rotary(x_BTHD, pos, theta):  # H or G heads
    """Rotary position embedding, Hugging Face Llama's layout: dims i and i + D/2 turn together."""
    T, D, x32 = x_BTHD.shape[1], x_BTHD.shape[-1], x_BTHD.astype(jnp.float32)
    freq = 1.0 / theta ** (jnp.arange(0, D, 2, dtype=jnp.float32) / D)
    angle_T1D = jnp.tile((pos + jnp.arange(T))[:, None] * freq, 2)[:, None]
    x1, x2 = jnp.split(x32, 2, -1)
    y = x32 * jnp.cos(angle_T1D) + jnp.concatenate([-x2, x1], -1) * jnp.sin(angle_T1D)
    return y.astype(x_BTHD.dtype)

@dataclass
class CausalSelfAttention(hk.Module):
    config: 'GPTConfig'
    name: str | None = None
    def __call__(self, x_BTC: Float[Array, "B T C"], is_training, kv: KV | None, pos):
        (B, T, C), cfg = x_BTC.shape, self.config
        H, G, D = cfg.n_head, cfg.n_kv_head or cfg.n_head, C // cfg.n_head
        q_BTHD, k_BTGD, v_BTGD = jnp.split(linear(x_BTC, (H + 2 * G) * D, cfg.bias, 'c_attn')
                                           .reshape(B, T, H + 2 * G, D), [H, H + G], 2)
        if cfg.qk_norm:
            q_BTHD, k_BTGD = (LayerNorm(False, 'rmsnorm_noweight', cfg.norm_eps)(a)
                              for a in (q_BTHD, k_BTGD))
        if cfg.rope:
            q_BTHD, k_BTGD = (rotary(a, pos, cfg.rope_theta) for a in (q_BTHD, k_BTGD))
        share = lambda a, axis: jnp.repeat(a, H // G, axis)  # each key/value head serves H // G
        if kv is None and not (is_training and cfg.dropout > 0.0):  # flash attention
            y_BTHD = backends.causal_attention(q_BTHD, share(k_BTGD, 2), share(v_BTGD, 2))
        else:  # manual attention; the cache in its products' layouts
            k_BGDS, v_BGSD = k_BTGD.transpose(0, 2, 3, 1), v_BTGD.transpose(0, 2, 1, 3)
            if kv is not None:  # into slots pos..pos+T-1 (mod S)
                slot = pos % kv[0].shape[-1]  # past S, a RoPE cache overwrites its oldest keys
                kv = k_BGDS, v_BGSD = (
                    lax.dynamic_update_slice_in_dim(kv[0], k_BGDS.astype(kv[0].dtype), slot, 3),
                    lax.dynamic_update_slice_in_dim(kv[1], v_BGSD.astype(kv[1].dtype), slot, 2))
            k_BHDS, v_BHSD = share(k_BGDS, 1), share(v_BGSD, 1)
            dt, S, query_T1 = q_BTHD.dtype, k_BHDS.shape[-1], (pos + jnp.arange(T))[:, None]
            held_S = pos + T - 1 - (pos + T - 1 - jnp.arange(S)) % S  # slot s's position, or < 0
            mask_TS = (held_S >= 0) & (held_S <= query_T1) & (held_S > query_T1 - S)
            att_BHTS = jnp.einsum('bthd,bhds->bhts', q_BTHD, k_BHDS.astype(dt)).astype(jnp.float32)
            att_BHTS = jnp.where(mask_TS, att_BHTS * (1.0 / math.sqrt(D)), -jnp.inf)
            att_BHTS = jax.nn.softmax(att_BHTS, -1).astype(dt)
            att_BHTS = apply_dropout(att_BHTS, cfg.dropout, is_training)
            y_BTHD = jnp.einsum('bhts,bhsd->bthd', att_BHTS, v_BHSD.astype(dt))
        std = 0.02 / math.sqrt(2 * cfg.n_layer)  # GPT-2's scaled init of the residual projections
        y_BTC = linear(y_BTHD.reshape(B, T, C), C, cfg.bias, 'c_proj', std)
        return apply_dropout(y_BTC, cfg.dropout, is_training), kv

@dataclass
class MLP(hk.Module):
    config: 'GPTConfig'
    name: str | None = None
    def __call__(self, x_BTC, is_training):
        cfg = self.config
        h_BTF = linear(x_BTC, cfg.mlp_hidden or 4 * cfg.n_embd, cfg.bias, 'c_fc')
        if cfg.activation == 'swiglu':  # Llama's: c_fc is up_proj, c_gate gate_proj
            h_BTF = jax.nn.silu(linear(x_BTC, h_BTF.shape[-1], cfg.bias, 'c_gate')) * h_BTF
        elif cfg.activation == 'relu2':
            h_BTF = jnp.square(jax.nn.relu(h_BTF))
        elif cfg.activation == 'gelu':  # torch's nn.GELU
            h_BTF = 0.5 * h_BTF * (1.0 + lax.erf(h_BTF * (1.0 / math.sqrt(2.0))))
        else:
            h_BTF = jax.nn.gelu(h_BTF, approximate=True)
        x_BTC = linear(h_BTF, cfg.n_embd, cfg.bias, 'c_proj', 0.02 / math.sqrt(2 * cfg.n_layer))
        return apply_dropout(x_BTC, cfg.dropout, is_training)

@dataclass
class Block(hk.Module):
    config: 'GPTConfig'
    name: str | None = None
    def __call__(self, x_BTC: Float[Array, "B T C"], is_training, kv: KV | None, pos):
        cfg, x_BTC = self.config, backends.residual(x_BTC)
        y_BTC, kv = CausalSelfAttention(cfg, name='attn')(
            LayerNorm(cfg.bias, cfg.norm, cfg.norm_eps, name='ln_1')(x_BTC), is_training, kv, pos)
        x_BTC = backends.residual(x_BTC + y_BTC)
        y_BTC = LayerNorm(cfg.bias, cfg.norm, cfg.norm_eps, name='ln_2')(x_BTC)
        x_BTC = x_BTC + MLP(cfg, name='mlp')(y_BTC, is_training)
        return x_BTC, kv

@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257, padded up to a multiple of 64 for efficiency
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # in Linears and LayerNorms, like GPT-2. False: a bit better and faster
    activation: str = 'gelu'  # 'gelu_new' (GPT-2 checkpoints' tanh form), 'relu2', 'swiglu'
    mlp_hidden: int = 0  # F; 0: 4 * n_embd
    n_kv_head: int = 0  # grouped-query attention's key/value heads; 0: n_head
    rope: bool = False  # rotary position embeddings instead of the learned wpe
    rope_theta: float = 10000.0
    norm: str = 'layernorm'  # 'rmsnorm' (with a weight, Llama's) or 'rmsnorm_noweight'
    norm_eps: float = 1e-5
    qk_norm: bool = False  # RMSNorm (no weight) on each head's q and k
    tie_lm_head: bool = True  # False: its own (V, C) 'transformer/lm_head'
    softcap: float = 0.0  # logits as softcap * tanh(logits / softcap); 0.0: off
    remat: bool = False  # recompute each block in the backward: less memory
    def __post_init__(self):
        if self.n_embd % self.n_head or self.n_head % (self.n_kv_head or self.n_head):
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}, "
                             f"n_head by n_kv_head={self.n_kv_head}")
        if self.rope and self.n_embd // self.n_head % 2:
            raise ValueError(f"rope turns pairs of dims: n_embd // n_head must be even, got "
                             f"{self.n_embd} // {self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        for name, allowed in (('activation', ('gelu', 'gelu_new', 'relu2', 'swiglu')),
                              ('norm', ('layernorm', 'rmsnorm', 'rmsnorm_noweight'))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")

@dataclass
class GPT(hk.Module):
    """Named 'transformer' so that Haiku's paths are nanoGPT's names; a tied lm_head is wte."""
    config: GPTConfig
    name: str | None = 'transformer'
    def __call__(self, idx_BT: Int[Arrayish, "B T"],
                 targets_BT: Int[Arrayish, "B T"] | None = None, is_training=False,
                 cache: list[KV] | None = None, pos=0):
        """With a cache, a decoding step of T tokens at pos..pos+T-1: (last logits_BV, cache)."""
        cfg, T, init = self.config, idx_BT.shape[1], hk.initializers.RandomNormal(0.02)
        if cache is None and T > cfg.block_size:
            raise ValueError(f"cannot forward {T} tokens, block size is only {cfg.block_size}")
        with hk.name_scope('wte'):  # nn.Embedding's table
            wte_VC = hk.get_parameter('weight', (cfg.vocab_size, cfg.n_embd), init=init)
        x_BTC = jnp.take(wte_VC, idx_BT, axis=0)
        if not cfg.rope:
            with hk.name_scope('wpe'):
                wpe_TC = hk.get_parameter('weight', (cfg.block_size, cfg.n_embd), init=init)
            x_BTC = x_BTC + jnp.take(wpe_TC, pos + jnp.arange(T), axis=0)
        x_BTC, new_cache = apply_dropout(x_BTC, cfg.dropout, is_training), []
        for i in range(cfg.n_layer):
            block = Block(cfg, name=f'h_{i}')
            if cache is None and cfg.remat:
                block = hk.remat(block, static_argnums=(1, 2, 3))
            x_BTC, kv = block(x_BTC, is_training, None if cache is None else cache[i], pos)
            new_cache.append(kv)
        x_BTC = LayerNorm(cfg.bias, cfg.norm, cfg.norm_eps, name='ln_f')(x_BTC)
        head_VC = wte_VC
        if not cfg.tie_lm_head:
            with hk.name_scope('lm_head'):  # nn.Linear's (out, in) weight
                head_VC = hk.get_parameter('weight', (cfg.vocab_size, cfg.n_embd), init=init)
        def lm_head(x):
            logits = backends.lm_head(x, head_VC).astype(jnp.float32)
            return cfg.softcap * jnp.tanh(logits / cfg.softcap) if cfg.softcap else logits
        if cache is not None:
            return lm_head(x_BTC[:, -1]), new_cache
        if targets_BT is None:  # inference-time mini-optimization: the last position only
            return lm_head(x_BTC[:, -1:]), None
        logits_BTV = lm_head(x_BTC)
        return logits_BTV, cross_entropy(logits_BTV, targets_BT)

def cross_entropy(logits_BTV: Float[Array, "B T V"],
                  targets_BT: Int[Arrayish, "B T"]) -> Float[Array, ""]:  # ignore_index=-1
    valid_BT = targets_BT != -1
    lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    safe_BT1 = jnp.where(valid_BT, targets_BT, 0)[..., None]
    picked_BT = jnp.take_along_axis(logits_BTV, safe_BT1, axis=-1)[..., 0]
    return jnp.sum(jnp.where(valid_BT, lse_BT - picked_BT, 0.0)) / jnp.sum(valid_BT)

def gpt_forward(config):  # rng may be None unless is_training with dropout
    return hk.transform(lambda idx_BT, targets_BT=None, is_training=False:
                        GPT(config)(idx_BT, targets_BT, is_training))

def gpt_decode(config):  # apply(params, idx_BT, cache, pos) -> (logits_BV, cache)
    return hk.without_apply_rng(hk.transform(
        lambda idx_BT, cache, pos: GPT(config)(idx_BT, cache=cache, pos=pos)))

def init_cache(config, batch_size: int, dtype=jnp.float32, size=None) -> list[KV]:
    B, G, D = batch_size, config.n_kv_head or config.n_head, config.n_embd // config.n_head
    S = size or config.block_size
    return [(jnp.zeros((B, G, D, S), dtype), jnp.zeros((B, G, S, D), dtype))
            for _ in range(config.n_layer)]

def init_params(config, rng):  # jitted: else each small op compiles on its own
    return jax.jit(gpt_forward(config).init)(rng, jnp.zeros((1, 1), jnp.int32))

def param_shapes(config):
    return jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))

def get_num_params(params, non_embedding=True):  # of arrays or shapes; a tied wte is the lm_head
    n = sum(math.prod(p.shape) for p in jax.tree.leaves(params))
    wpe = params.get('transformer/wpe') if non_embedding else None  # none with RoPE
    return n - math.prod(wpe['weight'].shape) if wpe else n

def crop_block_size(params, config, block_size):
    if block_size > config.block_size:
        raise ValueError(f"cannot crop block_size {config.block_size} up to {block_size}")
    params = {m: dict(p) for m, p in params.items()}
    if 'transformer/wpe' in params:  # RoPE has no table to crop
        params['transformer/wpe']['weight'] = params['transformer/wpe']['weight'][:block_size]
    return params, replace(config, block_size=block_size)

# torch's nn.Linear weights, (out, in) where ours and GPT-2's Conv1D are (in, out):
TRANSPOSED = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight',
              'mlp.c_gate.weight')

def torch_layout(name, a):  # its own inverse
    return a.T if name.endswith(TRANSPOSED) else a

def to_torch_name(module, name):
    return re.sub(r'\bh_(\d+)\b', r'h.\1', module).replace('/', '.') + '.' + name

def from_torch_name(key):
    module, name = key.rsplit('.', 1)
    return re.sub(r'\bh\.(\d+)\b', r'h_\1', module).replace('.', '/'), name

def to_state_dict(params):  # numpy, torch's layout, a tied lm_head.weight
    sd = {to_torch_name(m, n): np.asarray(v) for m, p in params.items() for n, v in p.items()}
    sd = {k: torch_layout(k, v) for k, v in sd.items()}
    tied = 'transformer/lm_head' not in params
    return {**sd, 'lm_head.weight': sd['transformer.wte.weight']} if tied else sd

def from_state_dict(sd):
    """Skips torch.compile's '_orig_mod.' prefix, the tied lm_head and attention mask buffers."""
    params = {}
    for k, v in sd.items():
        k, v = k.removeprefix('_orig_mod.'), np.asarray(v)
        if k != 'lm_head.weight' and not k.endswith(('.attn.bias', '.attn.masked_bias')):
            m, n = from_torch_name(k)
            params.setdefault(m, {})[n] = jnp.asarray(torch_layout(k, v))
    return params

def from_pretrained(model_type, override_args=None):
    """GPT-2 from the Hugging Face hub, or a save_pretrained GPT-2 or Llama; read without torch."""
    from safetensors.numpy import load_file
    pretrained = ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl')
    override_args, files = override_args or {}, ('config.json', 'model.safetensors')
    if bad := [k for k in override_args if k != 'dropout']:
        raise ValueError(f"only dropout can be overridden in a pretrained model, not {bad}")
    if os.path.isdir(model_type):
        paths = [os.path.join(model_type, f) for f in files]
        if absent := [p for p in paths if not os.path.exists(p)]:
            raise FileNotFoundError(f"{absent[0]} not found: give a save_pretrained directory")
    elif model_type in pretrained:
        from huggingface_hub import hf_hub_download
        try:
            paths = [hf_hub_download(model_type, f) for f in files]
        except Exception as e:  # offline, no cached copy, the hub refusing
            raise OSError(f"cannot download {model_type} from the Hugging Face hub ({type(e).__name__}): "
                          f"check the network, or give a save_pretrained directory") from None
    else:
        raise ValueError(f"unknown pretrained model {model_type!r}: "
                         f"use one of {sorted(pretrained)} or a local directory")
    print(f"loading weights from pretrained gpt: {model_type}")
    with open(paths[0]) as f:
        hf = json.load(f)
    if model_type in pretrained:
        print("forcing vocab_size=50257, block_size=1024, bias=True")
        assert hf['vocab_size'] == 50257 and hf['n_positions'] == 1024
    if 'dropout' in override_args:
        print(f"overriding dropout rate to {override_args['dropout']}")
    if hf.get('model_type', 'gpt2') != 'gpt2':
        from interop import from_llama
        return from_llama(hf, paths[1], override_args)
    config = GPTConfig(n_layer=hf['n_layer'], n_head=hf['n_head'], n_embd=hf['n_embd'],
                       vocab_size=hf['vocab_size'], block_size=hf['n_positions'], bias=True,
                       activation=hf.get('activation_function', 'gelu_new'), **override_args)
    sd = {k if k.startswith(('transformer.', 'lm_head.')) else 'transformer.' + k: v
          for k, v in load_file(paths[1]).items()}  # the hub's names lack 'transformer.'
    params = from_state_dict({k: torch_layout(k, v) for k, v in sd.items()})  # Conv1D: (in, out)
    if jax.tree.map(np.shape, params) != jax.tree.map(np.shape, param_shapes(config)):
        raise ValueError(f"{paths[1]}: parameters do not match a GPT-2 of {config}")
    return config, params

def flops_per_iter(config, num_params, fwdbwd_per_iter):  # PaLM paper, appendix B, as nanoGPT
    L, H, Q, T = config.n_layer, config.n_head, config.n_embd // config.n_head, config.block_size
    return (6 * num_params + 12 * L * H * Q * T) * T * fwdbwd_per_iter

def estimate_mfu(config, num_params, fwdbwd_per_iter, dt, peak_flops=312e12):  # A100 bf16 peak
    return flops_per_iter(config, num_params, fwdbwd_per_iter) / dt / peak_flops

def crop_top_k(logits_BV: Float[Array, "B V"], top_k) -> Float[Array, "B V"]:  # ties at k-th stay
    if top_k is None:
        return logits_BV
    v_BK, _ = lax.top_k(logits_BV, min(top_k, logits_BV.shape[-1]))
    return jnp.where(logits_BV < v_BK[:, -1:], -jnp.inf, logits_BV)

def top_p_filter(logits_BV: Float[Array, "B V"], top_p) -> Float[Array, "B V"]:
    """Nucleus sampling, as Hugging Face's TopPLogitsWarper: the most likely token always stays."""
    order_BV = jnp.argsort(logits_BV, -1)  # ascending
    probs_BV = jax.nn.softmax(jnp.take_along_axis(logits_BV, order_BV, -1), -1)
    cut_BV = (jnp.cumsum(probs_BV, -1) <= 1.0 - top_p).at[:, -1].set(False)
    cut_BV = jnp.zeros_like(cut_BV).at[jnp.arange(len(cut_BV))[:, None], order_BV].set(cut_BV)
    return jnp.where(cut_BV, -jnp.inf, logits_BV)

def sample_next(logits_BV: Float[Array, "B V"], keys_B: UInt32[Array, "B 2"], temperature, top_k,
                top_p=1.0) -> Int[Array, "B"]:
    """temperature 0.0 is greedy, where nanoGPT would divide by zero."""
    if temperature == 0.0:
        return jnp.argmax(logits_BV, -1).astype(jnp.int32)
    logits_BV = crop_top_k(logits_BV / temperature, top_k)
    logits_BV = top_p_filter(logits_BV, top_p) if top_p < 1.0 else logits_BV
    return jax.vmap(jax.random.categorical)(keys_B, logits_BV).astype(jnp.int32)

def check_sampling(max_new_tokens, temperature, top_k, top_p=1.0):
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0.0:
        raise ValueError(f"temperature must be >= 0.0 (0.0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be at least 1 (None keeps every token), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1.0 keeps every token), got {top_p}")

def make_generate(config, max_new_tokens, temperature=1.0, top_k=None, top_p=1.0, stop=(),
                  on_tokens=None):
    """nanoGPT's generate, compiled once: (idx_BN, new tokens made per row); row b's token i draws
    with fold_in(keys_B[b], i)."""
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    decode, forward = gpt_decode(config).apply, gpt_forward(config).apply
    block_size, stop_S, n_stop = config.block_size, np.asarray(stop, np.int32), len(stop)
    n_stop = n_stop if n_stop <= max_new_tokens else 0  # longer than the new text: never met
    @jax.jit
    def generate_tokens(params, idx_BT: Int[Array, "B T"], keys_B: UInt32[Array, "B 2"]
                        ) -> tuple[Int[Array, "B N"], Int[Array, ""]]:
        (B, T), idx_BT = idx_BT.shape, idx_BT.astype(jnp.int32)
        idx_BN = jnp.zeros((B, T + max_new_tokens), jnp.int32).at[:, :T].set(idx_BT)
        def put_next(i, logits_BV, idx_BN, done_B, report):
            keys_i = jax.vmap(jax.random.fold_in, (0, None))(keys_B, i)
            next_B1 = sample_next(logits_BV, keys_i, temperature, top_k, top_p)[:, None]
            idx_BN = lax.dynamic_update_slice_in_dim(idx_BN, next_B1, T + i, 1)
            if n_stop:  # a row is done once it ends with stop
                tail_BS = lax.dynamic_slice_in_dim(idx_BN, T + i + 1 - n_stop, n_stop, 1)
                done_B = done_B | ((i + 1 >= n_stop) & jnp.all(tail_BS == stop_S, 1))
            if on_tokens is not None:  # on_tokens(n, idx_BN) runs on the host: when to call next
                out = jax.ShapeDtypeStruct((), jnp.int32)
                call = lambda: io_callback(on_tokens, out, i + 1, idx_BN, ordered=True)
                report = lax.cond(i + 1 >= report, call, lambda: report)
            return idx_BN, done_B, report
        def step(carry):  # token i; past block_size every position shifts: no cache
            i, cache, idx_BN, *state = carry
            if cache is None:  # nanoGPT's crop: the last block_size tokens, at positions from 0
                window_BT = lax.dynamic_slice_in_dim(idx_BN, T + i - block_size, block_size, 1)
                logits_BV = forward(params, None, window_BT)[0][:, -1]
            else:
                tok_B1 = lax.dynamic_slice_in_dim(idx_BN, T + i - 1, 1, 1)
                logits_BV, cache = decode(params, tok_B1, cache, T + i - 1)
            return (i + 1, cache, *put_next(i, logits_BV, idx_BN, *state))
        def loop(end, *carry):  # until token end or every row is done (c[3]: done_B)
            i, _, *state = lax.while_loop(lambda c: (c[0] < end) & ~jnp.all(c[3]), step, carry)
            return i, state
        i, state, n_cached = jnp.int32(0), (idx_BN, jnp.zeros((B,), bool), jnp.int32(1)), 0
        if T <= block_size:  # prefill the prompt in one pass, then a token a step while it fits
            # past S, RoPE's cache rolls: a sliding window, not nanoGPT's crop
            S = min(block_size, T + max_new_tokens)
            cache = init_cache(config, B, params['transformer/wte']['weight'].dtype, S)
            logits_BV, cache = decode(params, idx_BT, cache, 0)
            n_cached = max_new_tokens if config.rope else min(max_new_tokens, block_size - T + 1)
            i, state = loop(n_cached, jnp.int32(1), cache, *put_next(0, logits_BV, *state))
        if n_cached < max_new_tokens:  # from i: the cached loop may have stopped early
            i, state = loop(max_new_tokens, i, None, *state)
        return state[0], i
    return generate_tokens
