"""
Checkpoints that load without executing code (nanoGPT's torch.save / torch.load role).

One file, out_dir/ckpt.safetensors: every array in safetensors (a flat name -> tensor table, no
pickle) and everything else as JSON in the safetensors metadata. Written atomically: a temp file
in the same directory, fsync, rename, fsync of the directory — so a crash at any moment leaves
either the old checkpoint or the new one, never a torn file. A sha256 over the array bytes and
the JSON metadata catches corruption that the safetensors header alone would not. The temp file
of a writer that was killed is deleted by the next save (a lock tells live writers from dead).

Array names:
  model.<nanoGPT state_dict name>   parameters in torch layout (model.to_state_dict), so the weights
                                    move to nanoGPT by name; lm_head.weight is omitted (tied to wte)
  optimizer<pytree key path>        optax state, restored into the structure of optimizer.init(params)
  <anything else>                   e.g. PRNG state, as the caller chooses
"""
import hashlib
import json
import os
import tempfile
try:
    import fcntl
except ImportError:  # not on Windows: stale temp files are then left for the user to delete
    fcntl = None

import numpy as np
import jax

CKPT_NAME = 'ckpt.safetensors'


class CheckpointError(Exception):
    """A checkpoint that is missing, truncated, corrupted or not ours. The message names the file."""


def _digest(arrays, meta_json):
    # the metadata is covered too: a flipped digit in model_args or iter_num can still be valid JSON
    h = hashlib.sha256()
    for name in sorted(arrays):
        h.update(name.encode())
        h.update(np.ascontiguousarray(arrays[name]).tobytes())
    h.update(b'\0meta\0' + meta_json.encode())
    return h.hexdigest()


def _remove_stale_temps(folder):
    """Delete temp files left by writers that died mid-save (each can be as large as a checkpoint).
    A live writer holds an exclusive flock on its temp file; a dead one's lock is gone."""
    if fcntl is None:
        return
    for name in os.listdir(folder):
        if not (name.startswith('.tmp-') and name.endswith('.safetensors')):
            continue
        path = os.path.join(folder, name)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.unlink(path)
        except OSError:
            pass  # still being written, or already gone
        finally:
            os.close(fd)


def _file_mode(path):
    """The mode the replaced file had, else what open() would give a new file under the umask."""
    try:
        return os.stat(path).st_mode & 0o777
    except OSError:
        umask = os.umask(0o022)
        os.umask(umask)
        return 0o666 & ~umask


def save_checkpoint(path, arrays, meta):
    """Atomically write arrays (name -> numpy-convertible) and meta (JSON-serialisable) to path."""
    from safetensors.numpy import save
    arrays = {k: np.ascontiguousarray(np.asarray(v)) for k, v in arrays.items()}
    meta_json = json.dumps(meta)
    blob = save(arrays, metadata={'meta': meta_json, 'sha256': _digest(arrays, meta_json)})
    folder = os.path.dirname(os.path.abspath(path))
    _remove_stale_temps(folder)  # before writing: their space may be what the new file needs
    fd, tmp = tempfile.mkstemp(prefix='.tmp-', suffix='.safetensors', dir=folder)
    try:
        os.fchmod(fd, _file_mode(path))  # mkstemp's 0600 would hide the checkpoint from the user's group
        with os.fdopen(fd, 'wb') as f:
            if fcntl is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # held until the rename, or until this process dies
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
            os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path):
    """Returns (arrays, meta). Raises CheckpointError with one clear line for any bad file."""
    from safetensors import safe_open
    if not os.path.exists(path):
        pt = os.path.join(os.path.dirname(path), 'ckpt.pt')
        if os.path.exists(pt):
            raise CheckpointError(f"no checkpoint at {path}; {pt} is a PyTorch (nanoGPT) checkpoint, which this port "
                                  f"never loads because unpickling it can run arbitrary code: train again here")
        raise CheckpointError(f"no checkpoint at {path}: train one first (python train.py ...) or check --out_dir")
    try:
        with safe_open(path, framework='numpy') as f:
            header = f.metadata() or {}
            arrays = {k: f.get_tensor(k) for k in f.keys()}
    except OSError as e:  # the file is fine as far as we know; reading it is not (permissions, a directory, I/O)
        raise CheckpointError(f"cannot read {path} ({e}): check that it is a readable file") from None
    except Exception as e:  # safetensors raises its own error types for torn or foreign files
        raise CheckpointError(f"{path} is truncated or not a checkpoint ({type(e).__name__}: {e}); "
                              f"restore it or train again") from None
    if 'meta' not in header or 'sha256' not in header:
        raise CheckpointError(f"{path} is not a checkpoint written by this project (no metadata)")
    if _digest(arrays, header['meta']) != header['sha256']:
        raise CheckpointError(f"{path} is corrupted (checksum mismatch); restore it or train again")
    try:
        meta = json.loads(header['meta'])
    except ValueError:
        raise CheckpointError(f"{path} has unreadable metadata; restore it or train again") from None
    return arrays, meta


def describe(out_dir, state):
    """What a run that stops leaves behind, for its last line: 'the checkpoint in out (iter 250) is <state>',
    read from the file's header (its arrays are not read), or 'no checkpoint was written'."""
    path = os.path.join(out_dir, CKPT_NAME)
    if not os.path.exists(path):
        return "no checkpoint was written"
    try:
        from safetensors import safe_open
        with safe_open(path, framework='numpy') as f:
            return f"the checkpoint in {out_dir} (iter {json.loads(f.metadata()['meta'])['iter_num']}) is {state}"
    except Exception:
        return f"the checkpoint in {out_dir} is {state}"


def flatten(tree, prefix):
    """Pytree -> {prefix + key path: leaf}, e.g. flatten(opt_state, 'optimizer') gives
    'optimizer.count', "optimizer.hyperparams['learning_rate']", ..."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {prefix + jax.tree_util.keystr(kp): np.asarray(leaf) for kp, leaf in leaves}


def unflatten_like(template, arrays, prefix, path='checkpoint'):
    """Fill template's structure with arrays[prefix + key path]; shapes must agree."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    out = []
    for kp, leaf in leaves:
        name = prefix + jax.tree_util.keystr(kp)
        if name not in arrays:
            raise CheckpointError(f"{path} lacks {name}: it was written for a different model or optimizer")
        value = arrays[name]
        if np.size(value) == np.size(leaf) == 1:
            value = np.reshape(value, np.shape(leaf))  # safetensors stores 0-d arrays as (1,)
        if np.shape(value) != np.shape(leaf):
            raise CheckpointError(f"{path}: {name} has shape {np.shape(value)}, expected {np.shape(leaf)}")
        out.append(value.astype(np.asarray(leaf).dtype) if hasattr(leaf, 'dtype') else value)
    return jax.tree_util.tree_unflatten(treedef, out)


def params_to_arrays(params):
    """Parameters -> 'model.<state_dict name>' arrays (torch layout, lm_head omitted: it is wte)."""
    from model import to_state_dict
    return {'model.' + k: v for k, v in to_state_dict(params).items() if k != 'lm_head.weight'}


def params_from_arrays(arrays):
    from model import from_state_dict
    return from_state_dict({k[len('model.'):]: v for k, v in arrays.items() if k.startswith('model.')})


# -----------------------------------------------------------------------------
# dataset vocabulary metadata (data/<dataset>/meta.json, or nanoGPT's meta.pkl)

class _PlainUnpickler(__import__('pickle').Unpickler):
    """Unpickles plain data only: a pickle that names any class or function is refused, so a
    crafted meta.pkl cannot run code. nanoGPT's meta.pkl is a dict of str/int, which passes."""

    def find_class(self, module, name):
        raise CheckpointError(f"refusing to load {module}.{name}: meta.pkl may only hold plain dicts, strings and ints")


def load_meta(data_dir):
    """The vocabulary of data_dir as {'vocab_size': int, 'stoi': {str: int}, 'itos': {int: str}},
    from meta.json (what our prepare.py writes) or nanoGPT's meta.pkl; None when neither exists."""
    json_path, pkl_path = os.path.join(data_dir, 'meta.json'), os.path.join(data_dir, 'meta.pkl')
    try:
        if os.path.exists(json_path):
            path = json_path
            with open(json_path) as f:
                meta = json.load(f)
        elif os.path.exists(pkl_path):
            path = pkl_path
            with open(pkl_path, 'rb') as f:
                meta = _PlainUnpickler(f).load()
        else:
            return None
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except Exception as e:
        raise CheckpointError(f"{path} is unreadable ({type(e).__name__}: {e}); run prepare.py again") from None
    if not isinstance(meta, dict) or not isinstance(meta.get('vocab_size'), int):
        raise CheckpointError(f"{path} has no integer vocab_size; run prepare.py again")
    if 'itos' in meta:  # JSON object keys are strings
        meta['itos'] = {int(i): s for i, s in meta['itos'].items()}
    return meta
