"""Our checkpoint: safetensors arrays, the rest JSON, a sha256 over both, written atomically."""
import contextlib
import fcntl
import fnmatch
import hashlib
import json
import os
import tempfile
import threading

import numpy as np
import jax
from safetensors import safe_open

from model import GPTConfig, from_state_dict, param_shapes, to_state_dict
import training

CKPT_NAME = 'ckpt.safetensors'
_renaming = threading.Lock()  # held for good by describe()

class CheckpointError(Exception):
    """A checkpoint that is missing, damaged or not ours."""

def _bytes(a):  # little-endian, C order: a copy only where a is transposed
    return np.ascontiguousarray(a, a.dtype.newbyteorder('<')).reshape(-1).view(np.uint8)

def _digest(arrays, meta_json):
    h = hashlib.sha256()  # over meta too: a flipped digit can still be valid JSON
    for name in sorted(arrays):
        h.update(name.encode())
        h.update(_bytes(arrays[name]))
    h.update(b'\0meta\0' + meta_json.encode())
    return h.hexdigest()

def save_checkpoint(path, arrays, meta):
    arrays, meta_json = {k: np.asarray(v) for k, v in arrays.items()}, json.dumps(meta)
    header, end = {'__metadata__': {'sha256': _digest(arrays, meta_json), 'meta': meta_json}}, 0
    for name, a in sorted(arrays.items()):  # F32, BF16, I64, U8, BOOL...
        dtype = a.dtype.name.replace('float', 'F').replace('uint', 'U').replace('int', 'I').upper()
        header[name] = {'dtype': dtype, 'shape': a.shape, 'data_offsets': [end, end + a.nbytes]}
        end += a.nbytes
    head = json.dumps(header).encode()
    head += b' ' * (-len(head) % 8)
    folder = os.path.dirname(os.path.abspath(path))
    for name in fnmatch.filter(os.listdir(folder), '.tmp-*.safetensors'):  # dead writers' files
        with contextlib.suppress(OSError), open(os.path.join(folder, name), 'rb') as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while its writer lives
            os.unlink(f.name)
    umask = os.umask(0o022)
    os.umask(umask)  # a new file gets open()'s mode, a replaced one keeps its own
    mode = os.stat(path).st_mode & 0o777 if os.path.exists(path) else 0o666 & ~umask
    fd, tmp = tempfile.mkstemp(prefix='.tmp-', suffix='.safetensors', dir=folder)
    try:
        os.fchmod(fd, mode)  # not mkstemp's 0600
        with os.fdopen(fd, 'wb') as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # held until the rename or this process's end
            f.write(len(head).to_bytes(8, 'little') + head)
            for name in sorted(arrays):  # one at a time: safetensors' writers copy them all
                f.write(_bytes(arrays[name]))
            f.flush()
            os.fsync(f.fileno())
            with _renaming:
                os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    dir_fd = os.open(folder, os.O_RDONLY)
    os.fsync(dir_fd)  # the rename made durable
    os.close(dir_fd)

def check_writable(out_dir):
    try:
        os.makedirs(out_dir, exist_ok=True)
        tempfile.TemporaryFile(dir=out_dir).close()
    except OSError as e:
        raise ValueError(f"out_dir {out_dir!r} is not writable ({e.strerror}): choose another "
                         f"--out_dir") from None

def resume_path(out_dir):
    ours, pt = os.path.join(out_dir, CKPT_NAME), os.path.join(out_dir, 'ckpt.pt')
    return pt if not os.path.exists(ours) and os.path.exists(pt) else ours

def load_checkpoint(path):  # (arrays, meta) of our checkpoint or of a nanoGPT ckpt.pt
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path}: check the path, or train one first")
    try:
        if path.endswith('.pt'):
            from interop import load_nanogpt
            return load_nanogpt(path)
        with safe_open(path, framework='numpy') as f:
            header, arrays = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except CheckpointError:
        raise
    except OSError as e:  # permissions, a directory, I/O: not damage
        raise CheckpointError(f"cannot read {path} ({e}): check it is a readable file") from None
    except Exception as e:  # the readers' errors for a torn or foreign file
        why = ' '.join(f'{type(e).__name__}: {e}'.split()).rstrip(':')[:200]
        raise CheckpointError(f"{path} is truncated or not a checkpoint ({why}): restore it or "
                              f"train again") from None
    if _digest(arrays, header.get('meta', '')) != header.get('sha256'):  # then meta is our JSON
        raise CheckpointError(f"{path} is corrupted (checksum mismatch) or not a checkpoint "
                              f"written by this project: restore it or train again")
    return arrays, json.loads(header['meta'])

def model_config(model_args, path='the checkpoint'):
    try:
        return GPTConfig(**model_args)
    except (TypeError, ValueError) as e:  # None too
        raise CheckpointError(f"{path}: bad model_args {model_args} ({e})") from None

def load_model(path):  # (arrays, meta, config, data dir, vocabulary or None)
    arrays, meta = load_checkpoint(path)
    config = model_config(meta.get('model_args'), path)
    dataset = meta.get('config', {}).get('dataset')
    data_dir = os.path.join('data', dataset) if dataset else None
    return arrays, meta, config, data_dir, load_vocab(data_dir, config)

def load_vocab(data_dir, config):  # data_dir's vocabulary, None if it has none
    vocab = training.load_meta(data_dir) if data_dir else None
    if vocab and vocab['vocab_size'] != config.vocab_size:
        raise ValueError(f"the vocabulary in {data_dir} has {vocab['vocab_size']} tokens but the "
                         f"model has {config.vocab_size}: run where train.py ran")
    return vocab

def describe(out_dir, state):  # 'the checkpoint in out (iter 250) is <state>'
    _renaming.acquire()
    path = os.path.join(out_dir, CKPT_NAME)
    if not os.path.exists(path):
        return "no checkpoint was written"
    with contextlib.suppress(Exception), safe_open(path, framework='numpy') as f:
        it = json.loads(f.metadata()['meta'])['iter_num']
        return f"the checkpoint in {out_dir} (iter {it}) is {state}"
    return f"the checkpoint in {out_dir} is {state}"

def flatten(tree, prefix):
    """Pytree -> {prefix + key path: leaf}, e.g. "optimizer.mu['transformer/wte']['weight']"."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {prefix + jax.tree_util.keystr(kp): np.asarray(leaf) for kp, leaf in leaves}

def unflatten_like(template, arrays, prefix, path):
    def restore(kp, leaf):
        name = prefix + jax.tree_util.keystr(kp)
        if name not in arrays:
            raise CheckpointError(f"{path} lacks {name}: written for another model or optimizer")
        value, shape = arrays[name], np.shape(leaf)
        if np.shape(value) != shape and not np.size(value) == np.size(leaf) == 1:  # () or (1,)
            raise CheckpointError(f"{path}: {name} has shape {np.shape(value)}, not {shape}")
        return np.reshape(value, shape).astype(leaf.dtype)
    return jax.tree_util.tree_map_with_path(restore, template)

def params_to_arrays(params):
    return {'model.' + k: v for k, v in to_state_dict(params).items() if k != 'lm_head.weight'}

def params_from_arrays(arrays, model_args=None, path=None):  # checked against model_args if given
    params = from_state_dict({k[6:]: v for k, v in arrays.items() if k.startswith('model.')})
    shapes = lambda tree: jax.tree.map(np.shape, tree)
    if model_args and shapes(params) != shapes(param_shapes(model_config(model_args, path))):
        raise CheckpointError(f"{path}: its parameters do not match its model_args {model_args}")
    return params

def state_arrays(state):
    return {**params_to_arrays(state.params), **flatten(state.opt_state, 'optimizer'),
            **flatten(state.loss_scale, 'loss_scale')}

def restore_state(state, arrays, path):  # the checkpoint's optimizer state and loss scale
    if 'adamw.step' in arrays:  # a ckpt.pt's torch AdamW
        from interop import adamw_to_optax
        arrays = adamw_to_optax(state.opt_state, arrays, path)
    elif path.endswith('.pt'):
        print(f"{path} holds no AdamW state (saved before a step): the optimizer starts at zero")
        return state
    restored = {'opt_state': unflatten_like(state.opt_state, arrays, 'optimizer', path)}
    if any(k.startswith('loss_scale') for k in arrays):  # float16's; else a fresh one
        restored['loss_scale'] = unflatten_like(state.loss_scale, arrays, 'loss_scale', path)
    return state._replace(**restored)
