"""Our checkpoint file, out_dir/ckpt.safetensors: written atomically, read without running code.

Arrays in safetensors (no pickle): 'model.<nanoGPT state_dict name>' in torch layout (no lm_head:
it is wte), 'optimizer<pytree key path>'; the rest JSON in its metadata; a sha256 over both."""
import fcntl
import fnmatch
import hashlib
import json
import os
import tempfile

import numpy as np
import jax
from safetensors import safe_open

from model import GPTConfig, from_state_dict, to_state_dict

CKPT_NAME = 'ckpt.safetensors'


class CheckpointError(Exception):
    """A checkpoint that is missing, truncated, corrupted or not ours; the message names it."""


def _bytes(a):  # little-endian, in C order: a copy only where a is transposed
    return np.ascontiguousarray(a, a.dtype.newbyteorder('<')).reshape(-1).view(np.uint8)


def _digest(arrays, meta_json):
    h = hashlib.sha256()  # over meta too: a flipped digit in it can still be valid JSON
    for name in sorted(arrays):
        h.update(name.encode())
        h.update(_bytes(arrays[name]))
    h.update(b'\0meta\0' + meta_json.encode())
    return h.hexdigest()


def save_checkpoint(path, arrays, meta):
    """Atomically write arrays (name -> numpy-convertible) and meta (JSON-serialisable) to path."""
    arrays, meta_json = {k: np.asarray(v) for k, v in arrays.items()}, json.dumps(meta)
    header, end = {'__metadata__': {'sha256': _digest(arrays, meta_json), 'meta': meta_json}}, 0
    for name, a in sorted(arrays.items()):  # safetensors' dtype names: F32, BF16, I64, U8, BOOL...
        dtype = a.dtype.name.replace('float', 'F').replace('uint', 'U').replace('int', 'I').upper()
        header[name] = {'dtype': dtype, 'shape': a.shape, 'data_offsets': [end, end + a.nbytes]}
        end += a.nbytes
    head = json.dumps(header).encode()
    head += b' ' * (-len(head) % 8)  # the format pads it to 8 bytes with spaces
    folder = os.path.dirname(os.path.abspath(path))
    # first the temp files of writers that died mid-save: the new file may need their space
    for name in fnmatch.filter(os.listdir(folder), '.tmp-*.safetensors'):
        try:
            with open(os.path.join(folder, name), 'rb') as f:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a live writer holds its lock
                os.unlink(f.name)
        except OSError:
            pass  # still being written, or already gone
    umask = os.umask(0o022)
    os.umask(umask)  # a new file's mode is what open() would give; a replaced one keeps its own
    mode = os.stat(path).st_mode & 0o777 if os.path.exists(path) else 0o666 & ~umask
    fd, tmp = tempfile.mkstemp(prefix='.tmp-', suffix='.safetensors', dir=folder)
    try:
        os.fchmod(fd, mode)  # not mkstemp's 0600, which would hide it from the user's group
        with os.fdopen(fd, 'wb') as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # held until the rename, or until this process dies
            f.write(len(head).to_bytes(8, 'little') + head)
            for name in sorted(arrays):  # one at a time: safetensors' own writers copy them all
                f.write(_bytes(arrays[name]))
            f.flush()
            os.fsync(f.fileno())
            os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    os.fsync(dir_fd)  # the rename made durable
    os.close(dir_fd)


def resume_path(out_dir):
    """out_dir's checkpoint: ours, else a nanoGPT ckpt.pt (ours wins once a resumed run saved)."""
    ours, pt = os.path.join(out_dir, CKPT_NAME), os.path.join(out_dir, 'ckpt.pt')
    return pt if not os.path.exists(ours) and os.path.exists(pt) else ours


def load_checkpoint(path):
    """(arrays, meta) of our checkpoint or of a nanoGPT ckpt.pt; CheckpointError for a bad file."""
    if not os.path.exists(path):
        hint = ("check the path given to --init_from" if path.endswith('.pt')
                else "train one first (python train.py ...) or check --out_dir")
        raise CheckpointError(f"no checkpoint at {path}: {hint}")
    if path.endswith('.pt'):
        from interop import load_nanogpt
        return load_nanogpt(path)
    try:
        with safe_open(path, framework='numpy') as f:
            header, arrays = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except OSError as e:  # permissions, a directory, I/O: not damage as far as we know
        raise CheckpointError(f"cannot read {path} ({e}): check it is a readable file") from None
    except Exception as e:  # safetensors' own errors for torn or foreign files
        raise CheckpointError(f"{path} is truncated or not a checkpoint ({type(e).__name__}: {e}); "
                              f"restore it or train again") from None
    if 'meta' not in header or 'sha256' not in header:
        raise CheckpointError(f"{path} is not a checkpoint written by this project (no metadata)")
    if _digest(arrays, header['meta']) != header['sha256']:
        raise CheckpointError(f"{path} is corrupted (checksum mismatch); restore it or train again")
    try:
        return arrays, json.loads(header['meta'])
    except ValueError:
        raise CheckpointError(f"{path} has unreadable metadata; restore it or retrain") from None


def model_config(model_args, path='the checkpoint'):
    """The GPTConfig of a checkpoint's model_args (None where it has none)."""
    if model_args is None:
        raise CheckpointError(f"{path} has no model_args: not written by train.py")
    try:
        return GPTConfig(**model_args)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad model_args {model_args} ({e})") from None


def describe(out_dir, state):
    """A stopping run's last words: 'the checkpoint in out (iter 250) is <state>'."""
    path = os.path.join(out_dir, CKPT_NAME)
    if not os.path.exists(path):
        return "no checkpoint was written"
    try:
        with safe_open(path, framework='numpy') as f:
            it = json.loads(f.metadata()['meta'])['iter_num']
        return f"the checkpoint in {out_dir} (iter {it}) is {state}"
    except Exception:
        return f"the checkpoint in {out_dir} is {state}"


def flatten(tree, prefix):
    """Pytree -> {prefix + key path: leaf}, e.g. "optimizer.mu['transformer/wte']['weight']"."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {prefix + jax.tree_util.keystr(kp): np.asarray(leaf) for kp, leaf in leaves}


def unflatten_like(template, arrays, prefix, path='checkpoint'):
    """template's structure filled with arrays[prefix + key path]; shapes must agree."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    out = []
    for kp, leaf in leaves:
        name = prefix + jax.tree_util.keystr(kp)
        if name not in arrays:
            raise CheckpointError(f"{path} lacks {name}: written for another model or optimizer")
        value, shape = arrays[name], np.shape(leaf)
        if np.size(value) == np.size(leaf) == 1:
            value = np.reshape(value, shape)  # a 0-d array may come back as (1,)
        if np.shape(value) != shape:
            raise CheckpointError(f"{path}: {name} has shape {np.shape(value)}, not {shape}")
        out.append(value.astype(leaf.dtype) if hasattr(leaf, 'dtype') else value)
    return jax.tree_util.tree_unflatten(treedef, out)


def params_to_arrays(params):
    return {'model.' + k: v for k, v in to_state_dict(params).items() if k != 'lm_head.weight'}


def params_from_arrays(arrays):
    sd = {k.removeprefix('model.'): v for k, v in arrays.items() if k.startswith('model.')}
    return from_state_dict(sd)


def restore_optimizer(template, arrays, path='checkpoint'):
    """The optimizer state in template's structure (optimizer.init's), ours or a ckpt.pt's AdamW."""
    if 'adamw.step' in arrays:
        from interop import adamw_to_optax
        arrays = adamw_to_optax(template, arrays, path)
    elif path.endswith('.pt'):
        print(f"{path} holds no AdamW state (saved before the first step): "
              "the optimizer starts from zeros")
        return template
    return unflatten_like(template, arrays, 'optimizer', path)
