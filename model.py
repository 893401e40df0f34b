"""
Full definition of a GPT Language Model in JAX + Haiku, all of it in this single file.
A port of nanoGPT's model.py: same modules, same initialisation, same parameter names.

Shape glossary (suffixes on array names):
  B: batch size            T: sequence length (queries)    S: key/value length (cache slots)
  C: n_embd (channels)     H: n_head                       D: head size, C // H
  V: vocab size            F: MLP hidden size, 4 * C       L: n_layer
  I, O: a Linear's in and out features    N: any leading dims    M: all rows, N flattened
  t: the queries of one block (causal_attention_blocks)
e.g. x_BTC is (B, T, C), att_BHTS is (B, H, T, S), logits_BTV is (B, T, V).

Parameters live in a Haiku dict {module_path: {param_name: array}}. Module paths are built so
that one function maps each of them onto nanoGPT's state_dict name and back:
  'transformer/h_0/attn/c_attn'['weight']  <->  'transformer.h.0.attn.c_attn.weight'
Linear weights are stored (in, out) — GPT-2's Conv1D layout, the transpose of torch's nn.Linear.
"""
import functools
import json
import math
import os
import re
from dataclasses import dataclass, asdict

import numpy as np
import jax
import jax.numpy as jnp
import haiku as hk
import optax


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for efficiency
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # True: bias in Linears and LayerNorms, like GPT-2. False: a bit better and faster
    activation: str = 'gelu'  # 'gelu' (exact erf, nanoGPT's nn.GELU) or 'gelu_new' (tanh approx, GPT-2 checkpoints)

    def __post_init__(self):
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.activation not in ('gelu', 'gelu_new'):
            raise ValueError(f"activation must be 'gelu' or 'gelu_new', got {self.activation!r}")


# -----------------------------------------------------------------------------
# modules

@jax.custom_vjp
def matmul(x_NI, w_IO):
    """x @ w for a Linear, its weight gradient x^T g taken from a copy of x^T made behind an optimization
    barrier. Left to itself XLA folds the transpose into the dot (both operands contracted over their rows),
    a form XLA:CPU runs with Eigen instead of YNNPACK at ~2/3 of the speed on the README config's shapes
    (BENCHMARKS.md). Autodiff's own x^T g was worse still: XLA:CPU transposed g (N x O, the big one) inside
    the elementwise fusion that produces it (the GELU or LayerNorm backward), a strided write that took a
    third of the README CPU config's step. N stands for any leading dims. Used on CPU only (see dense): the
    GPU timings were taken with autodiff's form, and this one has not been timed there."""
    return x_NI @ w_IO


def _matmul_fwd(x_NI, w_IO):
    return x_NI @ w_IO, (x_NI, w_IO)


def _rows(a_N):
    """a as (M, last dim): all leading dims flattened into rows."""
    return a_N.reshape(-1, a_N.shape[-1])


def _matmul_bwd(res, g_NO):
    x_NI, w_IO = res
    return g_NO @ w_IO.T, jax.lax.optimization_barrier(_rows(x_NI).T) @ _rows(g_NO)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


@jax.custom_vjp
def matmul_tied(x_NI, w_IO):
    """matmul for the tied lm_head (w = wte^T), its weight gradient computed as (g^T x)^T: g^T x is wte's
    gradient in wte's own layout, where autodiff had XLA transpose the (N, V) logit gradient and x^T g
    would need the (C, V) result transposed; other layouts measured slower here (BENCHMARKS.md)."""
    return x_NI @ w_IO


def _matmul_tied_bwd(res, g_NO):
    x_NI, w_IO = res
    return g_NO @ w_IO.T, (_rows(g_NO).T @ _rows(x_NI)).T


matmul_tied.defvjp(_matmul_fwd, _matmul_tied_bwd)


def dense(x_NI, w_IO, tied=False):
    """x @ w for Linear, and with tied=True for the tied lm_head: model.matmul / matmul_tied on CPU, plain on
    GPU/TPU (as timed there)."""
    if jax.default_backend() != 'cpu':
        return x_NI @ w_IO
    return matmul_tied(x_NI, w_IO) if tied else matmul(x_NI, w_IO)


def written_out(y, like):
    """y, divided by an exact 1 built from `like` (same shape; 1 whether like is NaN or not). A float divide is
    an expensive op to XLA:CPU's fusion, so y is computed once and written to memory, where XLA would
    otherwise recompute a chain of cheap elementwise ops inside every consumer (BENCHMARKS.md). The 1 is a
    whole array because XLA turns a divide by a broadcast scalar into a multiply, which it recomputes."""
    return y / ((like == like).astype(y.dtype) + (like != like).astype(y.dtype))


@jax.custom_vjp
def _grad_written_out(x):
    return x


def _grad_written_out_fwd(x):
    return x, x


def _grad_written_out_bwd(x, g):
    return (written_out(g, x),)


_grad_written_out.defvjp(_grad_written_out_fwd, _grad_written_out_bwd)


def residual(x):
    """A point on the residual stream: x itself, whose gradient is written out once on CPU. Without this
    XLA:CPU fused the backward's running sum of residual-stream gradients into each of its consumers:
    every layer's LayerNorm backward recomputed those of all the layers above it (fusions of ~800 ops in
    GPT-2 124M's step, BENCHMARKS.md). CPU only, as dense."""
    return _grad_written_out(x) if jax.default_backend() == 'cpu' else x


class Linear(hk.Module):
    """nn.Linear with nanoGPT's init; weight stored (in, out)."""

    def __init__(self, out_features, bias=True, std=0.02, name=None):
        super().__init__(name=name)
        self.out_features = out_features
        self.use_bias = bias
        self.std = std

    def __call__(self, x):
        w = hk.get_parameter('weight', (x.shape[-1], self.out_features), init=hk.initializers.RandomNormal(self.std))
        y = dense(x, w.astype(x.dtype))
        if self.use_bias:
            y = y + hk.get_parameter('bias', (self.out_features,), init=jnp.zeros).astype(x.dtype)
        return y


class Embedding(hk.Module):
    """nn.Embedding with N(0, 0.02) init; `attend` is the tied lm_head (x @ weight.T)."""

    def __init__(self, num_embeddings, embedding_dim, name=None):
        super().__init__(name=name)
        self.shape = (num_embeddings, embedding_dim)

    def _weight(self):
        return hk.get_parameter('weight', self.shape, init=hk.initializers.RandomNormal(0.02))

    def __call__(self, idx):
        return jnp.take(self._weight(), idx, axis=0)

    def attend(self, x):
        return dense(x, self._weight().astype(x.dtype).T, tied=True)


class LayerNorm(hk.Module):
    """LayerNorm with an optional bias (eps 1e-5, as F.layer_norm)."""

    def __init__(self, bias, name=None):
        super().__init__(name=name)
        self.use_bias = bias

    def __call__(self, x):
        C = x.shape[-1]
        x32 = x.astype(jnp.float32)  # statistics in fp32 whatever the compute dtype
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + 1e-5) * hk.get_parameter('weight', (C,), init=jnp.ones)
        if self.use_bias:
            y = y + hk.get_parameter('bias', (C,), init=jnp.zeros)
        return y.astype(x.dtype)


def gelu(x):
    """nn.GELU(): x * Phi(x) written with erf, as torch computes it. jax.nn.gelu's exact form uses erfc,
    which XLA:CPU expands into exponentials and selects (~5% of the CPU training step)."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))


def _dropout(x, rate, is_training):
    if is_training and rate > 0.0:
        return hk.dropout(hk.next_rng_key(), rate, x)
    return x


def masked_softmax(att_BHTS, mask_TS, D):
    """Attention's probabilities from its raw scores q k^T (any dtype): in fp32, scaled by 1/sqrt(D), query t
    seeing key s where mask_TS[t, s]."""
    return jax.nn.softmax(jnp.where(mask_TS, att_BHTS.astype(jnp.float32) * (1.0 / math.sqrt(D)), -jnp.inf), axis=-1)


def softmax_attention(q_BTHD, k_BSHD, v_BSHD, mask_TS, dropout=0.0, is_training=False):
    """Attention written out (nanoGPT's masked-softmax path): scores and softmax in fp32, query t
    sees key s where mask_TS[t, s]. Used where the fused call cannot go: attention dropout, the
    KV cache's mask, and float16 without cuDNN's kernel (XLA cannot compile the fused call's float16
    dot with fp32 accumulation on CPU, nor with a mask on GPU)."""
    att_BHTS = masked_softmax(jnp.einsum('bthd,bshd->bhts', q_BTHD, k_BSHD), mask_TS, q_BTHD.shape[-1])
    att_BHTS = att_BHTS.astype(q_BTHD.dtype)
    att_BHTS = _dropout(att_BHTS, dropout, is_training)
    return jnp.einsum('bhts,bshd->bthd', att_BHTS, v_BSHD)


ATTENTION_BLOCK = 128  # query rows per block of causal_attention_blocks (CPU); 64 and 32 timed no better


def causal_attention(q_BTHD, k_BTHD, v_BTHD):
    """Causal softmax attention, scaled by 1/sqrt(D). On a GPU in half precision, cuDNN's fused
    (flash) kernel: XLA's default writes out the (T, T) scores, and made the whole GPT-2 124M
    training step 1.7x slower on an H100 (BENCHMARKS.md). On the CPU, causal_attention_blocks.
    Elsewhere, or where cuDNN refuses the shapes or is missing, XLA's implementation."""
    if q_BTHD.dtype in (jnp.bfloat16, jnp.float16) and jax.default_backend() == 'gpu':
        try:
            return jax.nn.dot_product_attention(q_BTHD, k_BTHD, v_BTHD, is_causal=True, implementation='cudnn')
        except (ValueError, NotImplementedError, RuntimeError):
            pass
    if jax.default_backend() == 'cpu':
        return causal_attention_blocks(q_BTHD, k_BTHD, v_BTHD, ATTENTION_BLOCK)
    if q_BTHD.dtype == jnp.float16:
        T = q_BTHD.shape[1]
        return softmax_attention(q_BTHD, k_BTHD, v_BTHD, jnp.tril(jnp.ones((T, T), dtype=bool)))
    return jax.nn.dot_product_attention(q_BTHD, k_BTHD, v_BTHD, is_causal=True)


def causal_attention_blocks(q_BTHD, k_BTHD, v_BTHD, block):
    """Causal attention a block of queries at a time: queries i..i+block-1 meet keys 0..i+block-1
    only, because every later key would get weight exp(-inf) = 0. The same result as the full (T, T)
    scores without computing the masked upper blocks (GPT-2 124M's CPU step at T=256: ~2% faster),
    and a backward written by hand (one layer at GPT-2 124M's shapes, forward and backward: 12.4 ms with
    autodiff's, ~10 ms with this one; BENCHMARKS.md)."""
    def heads_first(a_BTHD):
        return a_BTHD.transpose(0, 2, 1, 3)
    y_BHTD = _blocked_attention(heads_first(q_BTHD), heads_first(k_BTHD), heads_first(v_BTHD), block)
    return heads_first(y_BHTD)


def _blocks(T, block):
    """(first query, number of keys) of each block of queries."""
    return [(i, min(i + block, T)) for i in range(0, T, block)]


def _blocked_attention_fwd(q_BHTD, k_BHTD, v_BHTD, block):
    y, probs = [], []
    for i, S in _blocks(q_BHTD.shape[2], block):
        causal_tS = jnp.arange(S)[None, :] <= jnp.arange(i, S)[:, None]
        att_BHtS = masked_softmax(jnp.einsum('bhtd,bhsd->bhts', q_BHTD[:, :, i:S], k_BHTD[:, :, :S]), causal_tS,
                                  q_BHTD.shape[-1])
        probs.append(att_BHtS)
        y.append(jnp.einsum('bhts,bhsd->bhtd', att_BHtS.astype(v_BHTD.dtype), v_BHTD[:, :, :S]))
    return jnp.concatenate(y, axis=2), (q_BHTD, k_BHTD, v_BHTD, probs)


def _blocked_attention_bwd(block, res, dy_BHTD):
    """Softmax attention's gradient for each block: with P the probabilities and dP = dy V^T,
    dS = P * (dP - rowsum(dP * P)) / sqrt(D); dQ = dS K, dK = dS^T Q, dV = P^T dy."""
    q_BHTD, k_BHTD, v_BHTD, probs = res
    scale = 1.0 / math.sqrt(q_BHTD.shape[-1])
    dq, dk_BHTD, dv_BHTD = [], jnp.zeros_like(k_BHTD), jnp.zeros_like(v_BHTD)
    for (i, S), p_BHtS in zip(_blocks(q_BHTD.shape[2], block), probs):
        dy_BHtD = dy_BHTD[:, :, i:S]
        dv_BHTD = dv_BHTD.at[:, :, :S].add(jnp.einsum('bhts,bhtd->bhsd', p_BHtS.astype(dy_BHtD.dtype), dy_BHtD))
        dp_BHtS = jnp.einsum('bhtd,bhsd->bhts', dy_BHtD, v_BHTD[:, :, :S]).astype(jnp.float32)
        ds_BHtS = (p_BHtS * (dp_BHtS - jnp.sum(dp_BHtS * p_BHtS, axis=-1, keepdims=True)) * scale).astype(q_BHTD.dtype)
        dq.append(jnp.einsum('bhts,bhsd->bhtd', ds_BHtS, k_BHTD[:, :, :S]))
        dk_BHTD = dk_BHTD.at[:, :, :S].add(jnp.einsum('bhts,bhtd->bhsd', ds_BHtS, q_BHTD[:, :, i:S]))
    return jnp.concatenate(dq, axis=2), dk_BHTD, dv_BHTD


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _blocked_attention(q_BHTD, k_BHTD, v_BHTD, block):
    return _blocked_attention_fwd(q_BHTD, k_BHTD, v_BHTD, block)[0]


_blocked_attention.defvjp(_blocked_attention_fwd, _blocked_attention_bwd)


class CausalSelfAttention(hk.Module):

    def __init__(self, config, name=None):
        super().__init__(name=name)
        self.config = config

    def __call__(self, x_BTC, is_training=False, kv=None, pos=None):
        """kv: optional (k_BSHD, v_BSHD) cache; the T new tokens sit at positions pos..pos+T-1.
        Returns (y_BTC, new kv or None)."""
        cfg = self.config
        B, T, C = x_BTC.shape
        H, D = cfg.n_head, C // cfg.n_head
        c_proj_std = 0.02 / math.sqrt(2 * cfg.n_layer)  # GPT-2's scaled init of residual projections
        qkv_BT3C = Linear(3 * C, bias=cfg.bias, name='c_attn')(x_BTC)
        q_BTHD, k_BTHD, v_BTHD = (a.reshape(B, T, H, D) for a in jnp.split(qkv_BT3C, 3, axis=-1))

        if kv is not None:
            k_BSHD = jax.lax.dynamic_update_slice(kv[0], k_BTHD.astype(kv[0].dtype), (0, pos, 0, 0))
            v_BSHD = jax.lax.dynamic_update_slice(kv[1], v_BTHD.astype(kv[1].dtype), (0, pos, 0, 0))
            S = k_BSHD.shape[1]
            # query t (absolute position pos+t) sees cache slots 0..pos+t
            mask_TS = jnp.arange(S)[None, :] <= (pos + jnp.arange(T))[:, None]
            y_BTHD = softmax_attention(q_BTHD, k_BSHD.astype(q_BTHD.dtype), v_BSHD.astype(q_BTHD.dtype), mask_TS)
            new_kv = (k_BSHD, v_BSHD)
        elif is_training and cfg.dropout > 0.0:
            # fused attention has no dropout: the explicit masked-softmax path
            causal_TT = jnp.tril(jnp.ones((T, T), dtype=bool))
            y_BTHD = softmax_attention(q_BTHD, k_BTHD, v_BTHD, causal_TT, cfg.dropout, is_training)
            new_kv = None
        else:
            y_BTHD = causal_attention(q_BTHD, k_BTHD, v_BTHD)
            new_kv = None

        y_BTC = y_BTHD.reshape(B, T, C)
        y_BTC = Linear(C, bias=cfg.bias, std=c_proj_std, name='c_proj')(y_BTC)
        return _dropout(y_BTC, cfg.dropout, is_training), new_kv


class MLP(hk.Module):

    def __init__(self, config, name=None):
        super().__init__(name=name)
        self.config = config

    def __call__(self, x_BTC, is_training=False):
        cfg = self.config
        h_BTF = Linear(4 * cfg.n_embd, bias=cfg.bias, name='c_fc')(x_BTC)
        h_BTF = gelu(h_BTF) if cfg.activation == 'gelu' else jax.nn.gelu(h_BTF, approximate=True)
        x_BTC = Linear(cfg.n_embd, bias=cfg.bias, std=0.02 / math.sqrt(2 * cfg.n_layer), name='c_proj')(h_BTF)
        return _dropout(x_BTC, cfg.dropout, is_training)


class Block(hk.Module):

    def __init__(self, config, name=None):
        super().__init__(name=name)
        self.config = config

    def __call__(self, x_BTC, is_training=False, kv=None, pos=None):
        x_BTC = residual(x_BTC)
        y_BTC, new_kv = CausalSelfAttention(self.config, name='attn')(
            LayerNorm(self.config.bias, name='ln_1')(x_BTC), is_training, kv, pos)
        x_BTC = residual(x_BTC + y_BTC)
        x_BTC = x_BTC + MLP(self.config, name='mlp')(LayerNorm(self.config.bias, name='ln_2')(x_BTC), is_training)
        return x_BTC, new_kv


class GPT(hk.Module):
    """nanoGPT's GPT. The module is named 'transformer' so Haiku paths read like state_dict names;
    lm_head is wte itself (weight tying: one parameter, not two)."""

    def __init__(self, config, name='transformer'):
        super().__init__(name=name)
        self.config = config

    def __call__(self, idx_BT, targets_BT=None, is_training=False, cache=None, pos=0):
        """Without cache: returns (logits, loss). With targets, logits_BTV and the mean cross-entropy
        over targets != -1; without, logits of the last position only, (B, 1, V), and loss None.
        With cache (see init_cache): a KV-cache step feeding T new tokens at positions
        pos..pos+T-1 (pos + T <= block_size); returns (logits_BV of the last new token, new cache)."""
        cfg = self.config
        T = idx_BT.shape[1]
        if cache is None and T > cfg.block_size:
            raise ValueError(f"Cannot forward sequence of length {T}, block size is only {cfg.block_size}")
        wte = Embedding(cfg.vocab_size, cfg.n_embd, name='wte')
        wpe = Embedding(cfg.block_size, cfg.n_embd, name='wpe')
        x_BTC = _dropout(wte(idx_BT) + wpe(pos + jnp.arange(T)), cfg.dropout, is_training)
        new_cache = []
        for i in range(cfg.n_layer):
            x_BTC, kv = Block(cfg, name=f'h_{i}')(x_BTC, is_training, None if cache is None else cache[i], pos)
            new_cache.append(kv)
        x_BTC = LayerNorm(cfg.bias, name='ln_f')(x_BTC)
        if cache is not None:
            return wte.attend(x_BTC[:, -1, :]).astype(jnp.float32), new_cache
        if targets_BT is None:
            return wte.attend(x_BTC[:, -1:, :]).astype(jnp.float32), None
        logits_BTV = wte.attend(x_BTC).astype(jnp.float32)
        return logits_BTV, cross_entropy(logits_BTV, targets_BT)


def cross_entropy(logits_BTV, targets_BT):
    """F.cross_entropy(..., ignore_index=-1): mean over the positions whose target is not -1."""
    logits_BTV = logits_BTV.astype(jnp.float32)
    valid_BT = targets_BT != -1
    lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    picked_BT = jnp.take_along_axis(logits_BTV, jnp.where(valid_BT, targets_BT, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(valid_BT, lse_BT - picked_BT, 0.0)) / jnp.sum(valid_BT)


# -----------------------------------------------------------------------------
# pure functions (hk.transform) and helpers

def gpt_forward(config):
    """hk.Transformed: init(rng, idx_BT) and apply(params, rng, idx_BT, targets_BT=None, is_training=False).
    rng may be None unless is_training with dropout > 0."""
    def forward(idx_BT, targets_BT=None, is_training=False):
        return GPT(config)(idx_BT, targets_BT, is_training)
    return hk.transform(forward)


def gpt_decode(config):
    """hk.Transformed (no rng): apply(params, idx_BT, cache, pos) -> (logits_BV, cache)."""
    def decode(idx_BT, cache, pos):
        return GPT(config)(idx_BT, cache=cache, pos=pos)
    return hk.without_apply_rng(hk.transform(decode))


def init_cache(config, batch_size, dtype=jnp.float32):
    """An empty KV cache: per layer (k_BSHD, v_BSHD) with S = block_size slots."""
    shape = (batch_size, config.block_size, config.n_head, config.n_embd // config.n_head)
    return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.n_layer)]


def init_params(config, rng):
    """nanoGPT's initialisation, as one compiled call: run op by op, each of its many small ops would be
    compiled on its own (twice as slow for the README CPU model)."""
    return jax.jit(gpt_forward(config).init)(rng, jnp.zeros((1, 1), jnp.int32))


def param_shapes(config):
    """Parameter shapes without allocating anything (jax.eval_shape)."""
    return jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))


def get_num_params(params, non_embedding=True):
    """Number of parameters (arrays or shape structs). The position embeddings are subtracted by
    default; the token embeddings stay because they double as the lm_head weights."""
    n = sum(math.prod(p.shape) for p in jax.tree.leaves(params))
    if non_embedding:
        n -= math.prod(params['transformer/wpe']['weight'].shape)
    return n


def crop_block_size(params, config, block_size):
    """Model surgery: keep the first block_size position embeddings. Returns (params, config)."""
    if block_size > config.block_size:
        raise ValueError(f"cannot crop block_size {config.block_size} up to {block_size}")
    params = {m: dict(p) for m, p in params.items()}
    params['transformer/wpe']['weight'] = params['transformer/wpe']['weight'][:block_size]
    return params, GPTConfig(**{**asdict(config), 'block_size': block_size})


# -----------------------------------------------------------------------------
# parameter names: Haiku path <-> nanoGPT state_dict name (one rule each way)

# weights that torch's nn.Linear stores (out, in); ours (and GPT-2 Conv1D's) are (in, out)
TRANSPOSED = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')


def to_torch_name(module, name):
    """('transformer/h_0/attn/c_attn', 'weight') -> 'transformer.h.0.attn.c_attn.weight'"""
    return re.sub(r'\bh_(\d+)\b', r'h.\1', module).replace('/', '.') + '.' + name


def from_torch_name(key):
    """'transformer.h.0.attn.c_attn.weight' -> ('transformer/h_0/attn/c_attn', 'weight')"""
    module, name = key.rsplit('.', 1)
    return re.sub(r'\bh\.(\d+)\b', r'h_\1', module).replace('.', '/'), name


def to_state_dict(params):
    """Params -> nanoGPT state_dict as numpy arrays, torch layout (lm_head.weight included, tied)."""
    sd = {}
    for module, p in params.items():
        for name, value in p.items():
            key = to_torch_name(module, name)
            value = np.asarray(value)
            sd[key] = value.T if key.endswith(TRANSPOSED) else value
    sd['lm_head.weight'] = sd['transformer.wte.weight']
    return sd


def from_state_dict(sd):
    """nanoGPT state_dict (numpy or anything np.asarray takes, torch layout) -> params.
    Tolerates torch.compile's '_orig_mod.' prefix and the non-parameter attn.bias buffer."""
    params = {}
    for key, value in sd.items():
        key = key.removeprefix('_orig_mod.')
        if key == 'lm_head.weight' or key.endswith(('.attn.bias', '.attn.masked_bias')):
            continue  # tied to wte / causal-mask buffers
        value = np.asarray(value)
        module, name = from_torch_name(key)
        params.setdefault(module, {})[name] = jnp.asarray(value.T if key.endswith(TRANSPOSED) else value)
    return params


# -----------------------------------------------------------------------------
# pretrained GPT-2 (Hugging Face safetensors; no torch needed)

PRETRAINED = {
    'gpt2': dict(n_layer=12, n_head=12, n_embd=768),  # 124M params
    'gpt2-medium': dict(n_layer=24, n_head=16, n_embd=1024),  # 350M params
    'gpt2-large': dict(n_layer=36, n_head=20, n_embd=1280),  # 774M params
    'gpt2-xl': dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M params
}


def from_pretrained(model_type, override_args=None):
    """Load GPT-2 weights: model_type is 'gpt2' | 'gpt2-medium' | 'gpt2-large' | 'gpt2-xl'
    (from the Hugging Face hub) or a local directory holding config.json + model.safetensors
    (what GPT2LMHeadModel.save_pretrained writes). Returns (config, params)."""
    from safetensors.numpy import load_file
    override_args = override_args or {}
    bad = [k for k in override_args if k != 'dropout']
    if bad:
        raise ValueError(f"only dropout can be overridden when loading pretrained weights, not {bad}")
    if os.path.isdir(model_type):
        folder = model_type
        config_path, weights_path = os.path.join(folder, 'config.json'), os.path.join(folder, 'model.safetensors')
        for path in (config_path, weights_path):
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path} not found: a GPT-2 directory needs config.json and model.safetensors")
    elif model_type in PRETRAINED:
        from huggingface_hub import hf_hub_download
        config_path = hf_hub_download(model_type, 'config.json')
        weights_path = hf_hub_download(model_type, 'model.safetensors')
    else:
        raise ValueError(f"unknown pretrained model {model_type!r}: use one of {sorted(PRETRAINED)} or a local directory")
    print(f"loading weights from pretrained gpt: {model_type}")
    with open(config_path) as f:
        hf = json.load(f)
    config_args = dict(n_layer=hf['n_layer'], n_head=hf['n_head'], n_embd=hf['n_embd'],
                       vocab_size=hf['vocab_size'], block_size=hf['n_positions'], bias=True,
                       activation=hf.get('activation_function', 'gelu_new'))
    if model_type in PRETRAINED:
        print("forcing vocab_size=50257, block_size=1024, bias=True")
        assert config_args['vocab_size'] == 50257 and config_args['block_size'] == 1024
    if 'dropout' in override_args:
        print(f"overriding dropout rate to {override_args['dropout']}")
        config_args['dropout'] = override_args['dropout']
    config = GPTConfig(**config_args)

    hf_sd = load_file(weights_path)
    sd = {}
    for key, value in hf_sd.items():
        key = key if key.startswith(('transformer.', 'lm_head.')) else 'transformer.' + key
        # GPT-2's Conv1D stores (in, out): transpose into torch nn.Linear layout, as nanoGPT does
        sd[key] = value.T if key.endswith(TRANSPOSED) else value
    params = from_state_dict(sd)
    expected = param_shapes(config)
    got = jax.tree.map(lambda a: a.shape, params)
    want = jax.tree.map(lambda a: a.shape, expected)
    if got != want:
        raise ValueError(f"{weights_path}: parameters do not match a GPT-2 of {config}")
    return config, params


# -----------------------------------------------------------------------------
# optimizer and MFU

def configure_optimizers(params, weight_decay, learning_rate, betas, device_type=None, grad_clip=0.0):
    """optax AdamW (torch.optim.AdamW semantics, eps 1e-8) with weight decay on >=2-D parameters
    only, after global-norm clipping when grad_clip > 0. The learning rate is an injected
    hyperparameter: set opt_state.hyperparams['learning_rate'] each step, as nanoGPT sets
    param_group['lr']. device_type picks the implementation, as nanoGPT's picks fused AdamW on cuda: on
    'cpu' scale_by_adam_written_out (optax.adamw's state, torch's arrangement of the bias corrections),
    elsewhere optax.adamw. Clipping is torch's formula (clip_grad_norm) on every device."""
    leaves = jax.tree.leaves(params)
    decay = [p for p in leaves if p.ndim >= 2]
    nodecay = [p for p in leaves if p.ndim < 2]
    print(f"num decayed parameter tensors: {len(decay)}, with {sum(p.size for p in decay):,} parameters")
    print(f"num non-decayed parameter tensors: {len(nodecay)}, with {sum(p.size for p in nodecay):,} parameters")

    def make(learning_rate):
        mask = lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)
        if device_type == 'cpu':  # optax.adamw's chain, its moments written out once (scale_by_adam_written_out)
            adamw = optax.chain(scale_by_adam_written_out(betas[0], betas[1], 1e-8),
                                optax.add_decayed_weights(weight_decay, mask), optax.scale_by_learning_rate(learning_rate))
        else:
            adamw = optax.adamw(learning_rate, b1=betas[0], b2=betas[1], eps=1e-8, weight_decay=weight_decay, mask=mask)
        return optax.chain(clip_grad_norm(grad_clip), adamw) if grad_clip > 0.0 else adamw
    return optax.inject_hyperparams(make)(learning_rate=learning_rate)


def clip_grad_norm(max_norm):
    """torch.nn.utils.clip_grad_norm_ as an optax transformation: every gradient times
    min(1, max_norm / (global norm + 1e-6)). optax.clip_by_global_norm's select of g or g / norm has
    XLA:CPU write the clipped gradient out (a divide); a multiply fuses into the moments' updates."""
    def update(updates, state, params=None):
        coef = jnp.minimum(1.0, max_norm / (optax.tree.norm(updates) + 1e-6))
        return jax.tree.map(lambda g: g * coef.astype(g.dtype), updates), state
    return optax.GradientTransformation(optax.clip_by_global_norm(max_norm).init, update)


def scale_by_adam_written_out(b1, b2, eps):
    """optax.scale_by_adam's moments and state, with the new moments written out (written_out) before the
    update reads them, and torch AdamW's arrangement of the bias corrections. optax's form has XLA:CPU
    recompute the new moments from the old ones inside the update's fusion, so the old moments must outlive
    the in-place write of the new ones: XLA copies both every step, and the update reads g, m and v again."""
    adam = optax.scale_by_adam(b1, b2, eps)

    def update(updates, state, params=None):
        mu = jax.tree.map(written_out, optax.tree.update_moment(updates, state.mu, b1, 1), state.mu)
        nu = jax.tree.map(written_out, optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2), state.nu)
        count = optax.safe_increment(state.count)
        bc1, bc2 = 1 - b1 ** count.astype(jnp.float32), 1 - b2 ** count.astype(jnp.float32)
        # torch's arrangement: dividing the moments themselves by the bias corrections, XLA's simplifier
        # merged that divide with written_out's, and the update recomputed the moments again
        updates = jax.tree.map(lambda m, v: (m * (1 / bc1)) / (jnp.sqrt(v) / jnp.sqrt(bc2) + eps), mu, nu)
        return updates, optax.ScaleByAdamState(count, mu, nu)
    return optax.GradientTransformation(adam.init, update)


# dense bf16 peak FLOP/s by device kind (substring of jax's device_kind)
PEAK_FLOPS = {
    'H200': 989e12, 'H100': 989e12, 'A100': 312e12, 'A10G': 125e12, 'L4': 121e12, 'V100': 125e12,
    'RTX 4090': 165e12, 'RTX 3090': 71e12,
    'TPU v6': 918e12, 'TPU v5p': 459e12, 'TPU v5 lite': 197e12, 'TPU v5e': 197e12, 'TPU v4': 275e12,
}


def device_peak_flops(device=None):
    """Peak FLOP/s for a device from the table above, or None when unknown (e.g. a CPU: measure it)."""
    kind = (device or jax.devices()[0]).device_kind
    for name, flops in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return flops
    return None


def flops_per_iter(config, num_params, fwdbwd_per_iter):
    """Training FLOPs of an iteration of fwdbwd_per_iter sequences (PaLM appendix B, as nanoGPT)."""
    L, H, Q, T = config.n_layer, config.n_head, config.n_embd // config.n_head, config.block_size
    flops_per_token = 6 * num_params + 12 * L * H * Q * T
    return flops_per_token * T * fwdbwd_per_iter


def estimate_mfu(config, num_params, fwdbwd_per_iter, dt, peak_flops=312e12):
    """Model FLOPs utilization (PaLM appendix B), as nanoGPT: the ratio of achieved FLOP/s to
    peak_flops (default A100 bf16, nanoGPT's unit). num_params: get_num_params(params)."""
    return flops_per_iter(config, num_params, fwdbwd_per_iter) / dt / peak_flops
