"""
Each backend's fast form of the four ops model.py calls here: matmul, lm_head, causal_attention
and residual. Each computes exactly its plain op, in the form that runs fast where it runs slowly:

- XLA:CPU (on_cpu()): the two products with hand-placed weight gradients, attention a block of
  queries at a time with a hand-written backward, the residual stream's gradient written out once;
- GPUs in half precision: cuDNN's fused (flash) attention.

Each gained at least 3% on a benchmark against its plain op (BENCHMARKS.md). Suffixes follow
model.py's shape glossary; N stands for any leading dims, M for all of them flattened.
"""
import ctypes
import importlib.metadata
import importlib.util
import math
import os

import jax
import jax.numpy as jnp

ATTENTION_BLOCK = 128  # query rows per block of the CPU's causal attention
HOST_DEVICES_MAX_PARAMS = 30_000_000  # above this one CPU device is faster (each runs AdamW)


def setup_cpu(device, n_layer, n_embd, rows):
    """Before JAX starts: a small model on two host devices, one a core (if the iteration's rows
    are even and the environment sets no count); a big model's freed buffers kept (returns if)."""
    small = 12 * n_layer * n_embd ** 2 <= HOST_DEVICES_MAX_PARAMS
    explicit = 'xla_force_host_platform_device_count' in os.environ.get('XLA_FLAGS', '')
    if not explicit and 'JAX_NUM_CPU_DEVICES' not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
        two = small and rows % 2 == 0 and cores >= 2
        jax.config.update('jax_num_cpu_devices', 2 if two else 1)
    if small or device.partition(':')[0] != 'cpu' and (
            any(True for _ in importlib.metadata.entry_points(group='jax_plugins'))
            or any(importlib.util.find_spec(m) for m in ('jax_plugins', 'libtpu'))):
        return False  # an accelerator may take the run
    # glibc serves a block over 32 MB with a fresh mmap and unmaps it when freed, so every step
    # would page-fault its big buffers in again: one arena, no mmap, no trimming
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8  # glibc's malloc.h
    settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))
    return all(mallopt(k, v) == 1 for k, v in settings)


def on_cpu():
    """Whether the XLA:CPU paths apply: JAX's default backend, which parallel.select_devices makes
    the CPU when a run asks for --device=cpu."""
    return jax.default_backend() == 'cpu'


def _custom_grad(fn, grad):
    """fn, differentiated by grad(*args, g) -> the args' gradients instead of by autodiff."""
    fn_with_grad = jax.custom_vjp(fn)
    fn_with_grad.defvjp(lambda *args: (fn(*args), args), lambda args, g: grad(*args, g))
    return fn_with_grad


def _rows(a_N):
    return a_N.reshape(-1, a_N.shape[-1])


# the weight gradient x^T g from a copy of x^T made behind a barrier: left alone, XLA folds the
# transpose into the dot (a form XLA:CPU runs slower) or transposes g, the bigger operand, inside
# the fusion making it
_cpu_matmul = _custom_grad(lambda x_NI, w_IO: x_NI @ w_IO, lambda x_NI, w_IO, g_NO: (
    g_NO @ w_IO.T, jax.lax.optimization_barrier(_rows(x_NI).T) @ _rows(g_NO)))
# wte's gradient g^T x straight in its (V, C) layout: autodiff transposed the big (M, V) g
_cpu_lm_head = _custom_grad(lambda x_NC, w_VC: x_NC @ w_VC.T, lambda x_NC, w_VC, g_NV: (
    g_NV @ w_VC, _rows(g_NV).T @ _rows(x_NC)))


def matmul(x_NI, w_IO):
    """x @ w, a Linear's product."""
    return _cpu_matmul(x_NI, w_IO) if on_cpu() else x_NI @ w_IO


def lm_head(x_NC, w_VC):
    """x @ w^T, the tied lm_head's product with the token embedding table w."""
    return _cpu_lm_head(x_NC, w_VC) if on_cpu() else x_NC @ w_VC.T


def _written_out(y, like):
    """y divided by an exact 1 made elementwise from `like` (1 whether like is NaN or not): XLA:CPU
    fuses cheap elementwise ops into each consumer, recomputing them there, but not a divide, so y
    is written to memory once. A divide by a scalar 1 would become a multiply and be fused."""
    return y / ((like == like).astype(y.dtype) + (like != like).astype(y.dtype))


_cpu_residual = _custom_grad(lambda x: x, lambda x, g: (_written_out(g, x),))


def residual(x):
    """x itself, a point on the residual stream. On the CPU its gradient, the backward's running sum
    over the layers above, is written out once: XLA:CPU recomputed it in each LayerNorm backward."""
    return _cpu_residual(x) if on_cpu() else x


def causal_attention(q_BTHD, k_BTHD, v_BTHD):
    """softmax(q k^T / sqrt(D), causal) v: on the CPU a block of queries at a time; on a GPU in half
    precision cuDNN's fused kernel (XLA's default writes out the (T, T) scores); else XLA's own."""
    if on_cpu():
        return blocked_causal_attention(q_BTHD, k_BTHD, v_BTHD, ATTENTION_BLOCK)
    if q_BTHD.dtype in (jnp.bfloat16, jnp.float16) and jax.default_backend() == 'gpu':
        try:
            return jax.nn.dot_product_attention(q_BTHD, k_BTHD, v_BTHD, is_causal=True,
                                                implementation='cudnn')
        except (ValueError, NotImplementedError, RuntimeError):  # no cuDNN, or shapes it refuses
            pass
    if q_BTHD.dtype == jnp.float16:  # XLA's fused call has no float16 form with fp32 scores
        return blocked_causal_attention(q_BTHD, k_BTHD, v_BTHD, q_BTHD.shape[1])
    return jax.nn.dot_product_attention(q_BTHD, k_BTHD, v_BTHD, is_causal=True)


def blocked_causal_attention(q_BTHD, k_BTHD, v_BTHD, block):
    """Causal attention `block` queries at a time: queries i..i+block-1 meet keys 0..i+block-1 only
    (every later key weighs exp(-inf) = 0), so the masked blocks are never computed. fp32 scores."""
    heads_first = lambda a: a.transpose(0, 2, 1, 3)  # BTHD <-> BHTD
    return heads_first(_blocked_attention(*map(heads_first, (q_BTHD, k_BTHD, v_BTHD)), block))


def _blocked_attention_fwd(q_BHTD, k_BHTD, v_BHTD, block):
    y, probs, T, scale = [], [], q_BHTD.shape[2], 1.0 / math.sqrt(q_BHTD.shape[-1])
    for i in range(0, T, block):  # queries i..S-1 (t) meet keys 0..S-1
        S = min(i + block, T)
        causal_tS = jnp.arange(S)[None, :] <= jnp.arange(i, S)[:, None]
        att_BHtS = jnp.einsum('bhtd,bhsd->bhts', q_BHTD[:, :, i:S], k_BHTD[:, :, :S])
        att_BHtS = att_BHtS.astype(jnp.float32)
        att_BHtS = jax.nn.softmax(jnp.where(causal_tS, att_BHtS * scale, -jnp.inf), axis=-1)
        probs.append(att_BHtS)
        y.append(jnp.einsum('bhts,bhsd->bhtd', att_BHtS.astype(v_BHTD.dtype), v_BHTD[:, :, :S]))
    return jnp.concatenate(y, axis=2), (q_BHTD, k_BHTD, v_BHTD, probs)


def _blocked_attention_bwd(block, res, dy_BHTD):
    """With P the probabilities and dP = dy V^T, block by block: dS = P * (dP - rowsum(dP * P)) /
    sqrt(D); dQ = dS K, dK = dS^T Q, dV = P^T dy. Autodiff's ran slower."""
    q_BHTD, k_BHTD, v_BHTD, probs = res
    dq, dk_BHTD, dv_BHTD = [], jnp.zeros_like(k_BHTD), jnp.zeros_like(v_BHTD)
    T, scale = q_BHTD.shape[2], 1.0 / math.sqrt(q_BHTD.shape[-1])
    for i, p_BHtS in zip(range(0, T, block), probs):
        S = min(i + block, T)
        dy_BHtD = dy_BHTD[:, :, i:S]
        dv_BHSD = jnp.einsum('bhts,bhtd->bhsd', p_BHtS.astype(dy_BHtD.dtype), dy_BHtD)
        dv_BHTD = dv_BHTD.at[:, :, :S].add(dv_BHSD)
        dp_BHtS = jnp.einsum('bhtd,bhsd->bhts', dy_BHtD, v_BHTD[:, :, :S]).astype(jnp.float32)
        ds_BHtS = p_BHtS * (dp_BHtS - jnp.sum(dp_BHtS * p_BHtS, -1, keepdims=True)) * scale
        ds_BHtS = ds_BHtS.astype(q_BHTD.dtype)
        dq.append(jnp.einsum('bhts,bhsd->bhtd', ds_BHtS, k_BHTD[:, :, :S]))
        dk_BHTD = dk_BHTD.at[:, :, :S].add(
            jnp.einsum('bhts,bhtd->bhsd', ds_BHtS, q_BHTD[:, :, i:S]))
    return jnp.concatenate(dq, axis=2), dk_BHTD, dv_BHTD


_blocked_attention = jax.custom_vjp(lambda *args: _blocked_attention_fwd(*args)[0], (3,))
_blocked_attention.defvjp(_blocked_attention_fwd, _blocked_attention_bwd)
