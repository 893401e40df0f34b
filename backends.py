"""Device ops of model and step: each its plain op, or a form measured 3% faster (BENCHMARKS.md)."""
import ctypes
import importlib.metadata
import importlib.util
import math
import os

import jax
import jax.flatten_util
import jax.numpy as jnp
from jax import shard_map
from jax.sharding import PartitionSpec as P

ATTENTION_BLOCK = 128  # query rows per block of the CPU's causal attention
HOST_DEVICES_MAX_PARAMS = 30_000_000  # above this one CPU device is faster (each runs AdamW)

def setup_cpu(device, n_layer, n_embd, rows):
    """Before JAX starts: two host devices for small models; big ones keep freed memory (True)."""
    small = 12 * n_layer * n_embd ** 2 <= HOST_DEVICES_MAX_PARAMS
    explicit = 'xla_force_host_platform_device_count' in os.environ.get('XLA_FLAGS', '')
    if not explicit and 'JAX_NUM_CPU_DEVICES' not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
        two = small and rows % 2 == 0 and cores >= 2
        jax.config.update('jax_num_cpu_devices', 2 if two else 1)
    if small or device.partition(':')[0] != 'cpu' and (
            any(importlib.metadata.entry_points(group='jax_plugins'))
            or any(importlib.util.find_spec(m) for m in ('jax_plugins', 'libtpu'))):
        return False  # an accelerator may take the run
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    # M_ARENA_MAX 1, M_MMAP_MAX 0, M_TRIM_THRESHOLD -1: else each step page-faults big buffers in
    return all(mallopt(k, v) == 1 for k, v in ((-8, 1), (-4, 0), (-1, -1)))

def on_cpu():
    return jax.default_backend() == 'cpu'

def _cpu_grad(fn, grad):  # fn; on the CPU differentiated by grad(*args, g), not by autodiff
    custom = jax.custom_vjp(fn)
    custom.defvjp(lambda *args: (fn(*args), args), lambda args, g: grad(*args, g))
    return lambda *args: custom(*args) if on_cpu() else fn(*args)

_rows = lambda a_N: a_N.reshape(-1, a_N.shape[-1])  # N: any leading dims
# a Linear's x @ w; x^T behind a barrier: else XLA folds it into the dot or transposes the bigger g
matmul = _cpu_grad(lambda x_NI, w_IO: x_NI @ w_IO, lambda x_NI, w_IO, g_NO: (
    g_NO @ w_IO.T, jax.lax.optimization_barrier(_rows(x_NI).T) @ _rows(g_NO)))
# x @ w^T, w the tied wte: its gradient g^T x straight in its (V, C) layout, not a transposed big g
lm_head = _cpu_grad(lambda x_NC, w_VC: x_NC @ w_VC.T, lambda x_NC, w_VC, g_NV: (
    g_NV @ w_VC, _rows(g_NV).T @ _rows(x_NC)))
# x; its gradient (the layers above's sum) written out once, not per LayerNorm: XLA:CPU fuses
# no divide by an array of exact 1s (NaN or not)
residual = _cpu_grad(lambda x: x, lambda x, g: (
    g / ((x == x).astype(g.dtype) + (x != x).astype(g.dtype)),))

def all_reduce_once(accumulate, mesh, rows):
    """accumulate(params, x, y, keys_MR, scaler) -> (grads, loss) on each CPU device's rows, their
    gradients then summed in one all-reduce of one flat array (DDP's buckets, no_sync's timing):
    XLA:CPU's devices meet once per array of an all-reduce."""
    if mesh.devices.flat[0].platform != 'cpu':
        return accumulate  # elsewhere XLA's all-reduces, one per array, overlap the backward
    D, axes = mesh.size, rows[1]

    def local(params, x, y, keys_M1, scaler):  # equal rows, no -1 targets: mean of the means
        grads, loss = accumulate(params, x, y, keys_M1, scaler)
        flat, unflatten = jax.flatten_util.ravel_pytree(grads)
        return unflatten(jax.lax.psum(flat, axes) / D), jax.lax.psum(loss, axes) / D

    def run(params, x, y, keys_MR, scaler):
        (M, R, _), per_rank = keys_MR.shape, D // keys_MR.shape[1]
        keys_MD = jnp.repeat(keys_MR, per_rank, 1)
        if per_rank > 1:  # a rank's rows over several devices: each folds in its place among them
            place_MD = jnp.tile(jnp.arange(per_rank), (M, R))
            keys_MD = jax.vmap(jax.vmap(jax.random.fold_in))(keys_MD, place_MD)
        return shard_map(local, mesh=mesh, in_specs=(P(), rows, rows, rows, P()), out_specs=P(),
                         check_vma=False)(params, x, y, keys_MD, scaler)
    return run

def causal_attention(q_BTHD, k_BTHD, v_BTHD):  # softmax(q k^T / sqrt(D), causal) v
    qkv = (q_BTHD, k_BTHD, v_BTHD)
    if on_cpu():
        return blocked_causal_attention(*qkv, ATTENTION_BLOCK)
    if q_BTHD.dtype in (jnp.bfloat16, jnp.float16) and jax.default_backend() == 'gpu':
        try:  # cuDNN's fused kernel: XLA's own writes out the (T, T) scores
            return jax.nn.dot_product_attention(*qkv, is_causal=True, implementation='cudnn')
        except (ValueError, NotImplementedError, RuntimeError):  # no cuDNN, or shapes it refuses
            pass
    if q_BTHD.dtype == jnp.float16:  # XLA's fused call has no float16 form with fp32 scores
        return blocked_causal_attention(*qkv, q_BTHD.shape[1])
    return jax.nn.dot_product_attention(*qkv, is_causal=True)

def blocked_causal_attention(q_BTHD, k_BTHD, v_BTHD, block):
    """`block` queries at a time, masked blocks skipped; fp32 scores."""
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
    """By hand, faster than autodiff: dS = P * (dP - rowsum(dP * P)) / sqrt(D) with dP = dy V^T."""
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
