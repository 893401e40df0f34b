"""
The backend-specific speed paths, behind one seam. model.py calls four functions here: matmul
(a Linear's x @ w), lm_head (the tied x @ wte^T), causal_attention (the role of
F.scaled_dot_product_attention(is_causal=True)) and residual (a point on the residual stream). Each
computes exactly what its plain op computes; on a backend that runs the plain op slowly it takes the
form that backend runs fast:

- XLA:CPU, when on_cpu(): the two products with hand-placed weight gradients (custom VJPs), attention
  a block of queries at a time with a hand-written backward, and the residual stream's gradient
  written to memory once;
- GPUs in half precision: cuDNN's fused (flash) attention.

Elsewhere each is the plain op. Every path here gained at least 3% on a benchmark when it was
measured against its plain op, side by side; BENCHMARKS.md has the table and the commands. Array
suffixes follow model.py's shape glossary; N stands for any leading dims, M for all of them flattened.
"""
import functools
import math

import jax
import jax.numpy as jnp

ATTENTION_BLOCK = 128  # query rows per block of the CPU's causal attention


def on_cpu():
    """Whether the XLA:CPU paths apply: the model and the optimizer are traced for JAX's default backend,
    which parallel.select_devices makes the CPU when a run asks for --device=cpu."""
    return jax.default_backend() == 'cpu'


# -----------------------------------------------------------------------------
# the Linear and lm_head products

def _rows(a_N):
    return a_N.reshape(-1, a_N.shape[-1])


@jax.custom_vjp
def _cpu_matmul(x_NI, w_IO):
    return x_NI @ w_IO


def _cpu_matmul_fwd(x_NI, w_IO):
    return x_NI @ w_IO, (x_NI, w_IO)


def _cpu_matmul_bwd(res, g_NO):
    # the weight gradient x^T g from a copy of x^T made behind a barrier: left alone, XLA folds the transpose
    # into the dot (a form XLA:CPU runs slower) or transposes g, the bigger operand, inside the fusion making it
    x_NI, w_IO = res
    return g_NO @ w_IO.T, jax.lax.optimization_barrier(_rows(x_NI).T) @ _rows(g_NO)


_cpu_matmul.defvjp(_cpu_matmul_fwd, _cpu_matmul_bwd)


@jax.custom_vjp
def _cpu_lm_head(x_NC, w_VC):
    return x_NC @ w_VC.T


def _cpu_lm_head_fwd(x_NC, w_VC):
    return x_NC @ w_VC.T, (x_NC, w_VC)


def _cpu_lm_head_bwd(res, g_NV):
    # wte's gradient g^T x straight in wte's (V, C) layout: autodiff transposed the big (M, V) logit gradient
    x_NC, w_VC = res
    return g_NV @ w_VC, _rows(g_NV).T @ _rows(x_NC)


_cpu_lm_head.defvjp(_cpu_lm_head_fwd, _cpu_lm_head_bwd)


def matmul(x_NI, w_IO):
    """x @ w, a Linear's product."""
    return _cpu_matmul(x_NI, w_IO) if on_cpu() else x_NI @ w_IO


def lm_head(x_NC, w_VC):
    """x @ w^T, the tied lm_head's product with the token embedding table w."""
    return _cpu_lm_head(x_NC, w_VC) if on_cpu() else x_NC @ w_VC.T


# -----------------------------------------------------------------------------
# the residual stream

def _written_out(y, like):
    """y divided by an exact 1 built elementwise from `like` (1 whether like is NaN or not). XLA:CPU fuses a
    chain of cheap elementwise ops into each of its consumers, recomputing it there, but not a divide: so y is
    computed once and written to memory. A divide by a scalar 1 would be turned into a multiply and fused."""
    return y / ((like == like).astype(y.dtype) + (like != like).astype(y.dtype))


@jax.custom_vjp
def _cpu_residual(x):
    return x


_cpu_residual.defvjp(lambda x: (x, x), lambda x, g: (_written_out(g, x),))


def residual(x):
    """x itself, a point on the residual stream. On the CPU its gradient, the backward's running sum over the
    layers above, is written out once: XLA:CPU otherwise recomputed it inside every layer's LayerNorm backward."""
    return _cpu_residual(x) if on_cpu() else x


# -----------------------------------------------------------------------------
# causal attention

def causal_attention(q_BTHD, k_BTHD, v_BTHD):
    """softmax(q k^T / sqrt(D), causal) v: on the CPU a block of queries at a time; on a GPU in half
    precision cuDNN's fused kernel (XLA's default writes out the (T, T) scores); else XLA's own."""
    if on_cpu():
        return blocked_causal_attention(q_BTHD, k_BTHD, v_BTHD, ATTENTION_BLOCK)
    if q_BTHD.dtype in (jnp.bfloat16, jnp.float16) and jax.default_backend() == 'gpu':
        try:
            return jax.nn.dot_product_attention(q_BTHD, k_BTHD, v_BTHD, is_causal=True, implementation='cudnn')
        except (ValueError, NotImplementedError, RuntimeError):  # no cuDNN, or shapes it refuses
            pass
    if q_BTHD.dtype == jnp.float16:  # XLA has no float16 form of the fused call with fp32 scores: one block
        return blocked_causal_attention(q_BTHD, k_BTHD, v_BTHD, q_BTHD.shape[1])
    return jax.nn.dot_product_attention(q_BTHD, k_BTHD, v_BTHD, is_causal=True)


def blocked_causal_attention(q_BTHD, k_BTHD, v_BTHD, block):
    """Causal attention `block` queries at a time: queries i..i+block-1 meet keys 0..i+block-1 only, since
    every later key gets weight exp(-inf) = 0, so the masked upper blocks of the scores are never computed.
    Scores and softmax in fp32, as model.py's attention."""
    heads_first = lambda a_BTHD: a_BTHD.transpose(0, 2, 1, 3)
    y_BHTD = _blocked_attention(heads_first(q_BTHD), heads_first(k_BTHD), heads_first(v_BTHD), block)
    return heads_first(y_BHTD)


def _blocks(T, block):
    """(first query, number of keys) of each block of queries."""
    return [(i, min(i + block, T)) for i in range(0, T, block)]


def _blocked_attention_fwd(q_BHTD, k_BHTD, v_BHTD, block):
    y, probs = [], []
    scale = 1.0 / math.sqrt(q_BHTD.shape[-1])
    for i, S in _blocks(q_BHTD.shape[2], block):
        causal_tS = jnp.arange(S)[None, :] <= jnp.arange(i, S)[:, None]  # t: the block's queries
        att_BHtS = jnp.einsum('bhtd,bhsd->bhts', q_BHTD[:, :, i:S], k_BHTD[:, :, :S]).astype(jnp.float32) * scale
        att_BHtS = jax.nn.softmax(jnp.where(causal_tS, att_BHtS, -jnp.inf), axis=-1)
        probs.append(att_BHtS)
        y.append(jnp.einsum('bhts,bhsd->bhtd', att_BHtS.astype(v_BHTD.dtype), v_BHTD[:, :, :S]))
    return jnp.concatenate(y, axis=2), (q_BHTD, k_BHTD, v_BHTD, probs)


def _blocked_attention_bwd(block, res, dy_BHTD):
    """Softmax attention's gradient, block by block: with P the probabilities and dP = dy V^T,
    dS = P * (dP - rowsum(dP * P)) / sqrt(D); dQ = dS K, dK = dS^T Q, dV = P^T dy. Autodiff's ran slower."""
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
