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

Moving checkpoints in and out (export.py is the script): to_hf gives a Hugging Face GPT-2
(config.json + model.safetensors), to_nanogpt nanoGPT's ckpt.pt dict, and load_checkpoint reads a
nanoGPT ckpt.pt with torch.load(weights_only=True), which unpickles only tensors and plain
containers. torch is imported only for ckpt.pt, lazily. Between the two formats AdamW's moments
travel as 'adamw.exp_avg.<name>', 'adamw.exp_avg_sq.<name>' (torch layout), 'adamw.step', 'adamw.lr'.
"""
import hashlib
import json
import os
import pickle
import re
import tempfile
import warnings
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


# safetensors' dtype names
DTYPE_NAMES = {'float64': 'F64', 'float32': 'F32', 'float16': 'F16', 'bfloat16': 'BF16', 'int64': 'I64', 'int32': 'I32',
               'int16': 'I16', 'int8': 'I8', 'uint64': 'U64', 'uint32': 'U32', 'uint16': 'U16', 'uint8': 'U8', 'bool': 'BOOL'}


def _write_safetensors(f, arrays, meta_json):
    """The safetensors format written one array at a time, with _digest(arrays, meta_json) in its metadata.
    safetensors' own writers take every array at once as a contiguous copy: with the transposed weights, a
    second copy of the parameters in memory, where this holds one array more than the caller's."""
    names = sorted(arrays)
    header, offset = {'__metadata__': {'sha256': '0' * 64, 'meta': meta_json}}, 0
    for name in names:
        a = arrays[name]
        header[name] = {'dtype': DTYPE_NAMES[a.dtype.name], 'shape': list(a.shape), 'data_offsets': [offset, offset + a.nbytes]}
        offset += a.nbytes
    head = json.dumps(header).encode()
    head += b' ' * (-len(head) % 8)  # the format pads the header to 8 bytes with spaces
    f.write(len(head).to_bytes(8, 'little') + head)
    digest = hashlib.sha256()
    for name in names:
        data = np.ascontiguousarray(arrays[name], arrays[name].dtype.newbyteorder('<')).reshape(-1).view(np.uint8)
        digest.update(name.encode())
        digest.update(data)
        f.write(data)
        del data  # before the next array's copy
    digest.update(b'\0meta\0' + meta_json.encode())
    f.seek(8 + head.index(b'"sha256": "') + len(b'"sha256": "'))  # the placeholder, the header's first value
    f.write(digest.hexdigest().encode())


def save_checkpoint(path, arrays, meta):
    """Atomically write arrays (name -> numpy-convertible) and meta (JSON-serialisable) to path."""
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    meta_json = json.dumps(meta)
    folder = os.path.dirname(os.path.abspath(path))
    _remove_stale_temps(folder)  # before writing: their space may be what the new file needs
    fd, tmp = tempfile.mkstemp(prefix='.tmp-', suffix='.safetensors', dir=folder)
    try:
        os.fchmod(fd, _file_mode(path))  # mkstemp's 0600 would hide the checkpoint from the user's group
        with os.fdopen(fd, 'wb') as f:
            if fcntl is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # held until the rename, or until this process dies
            _write_safetensors(f, arrays, meta_json)
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


def resume_path(out_dir):
    """The checkpoint in out_dir: ours, else a nanoGPT ckpt.pt (ours wins once a resumed run has saved)."""
    ours, pt = os.path.join(out_dir, CKPT_NAME), os.path.join(out_dir, 'ckpt.pt')
    return pt if not os.path.exists(ours) and os.path.exists(pt) else ours


def load_checkpoint(path):
    """Returns (arrays, meta) of ckpt.safetensors, or of a nanoGPT ckpt.pt (a path ending in .pt).
    Raises CheckpointError with one clear line for any bad file."""
    from safetensors import safe_open
    if path.endswith('.pt'):  # a nanoGPT checkpoint: resume_path names one only where it exists
        if not os.path.exists(path):
            raise CheckpointError(f"no checkpoint at {path}: check the path given to --init_from")
        return load_nanogpt(path)
    if not os.path.exists(path):
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


def restore_optimizer(template, arrays, path='checkpoint'):
    """The optimizer state of a checkpoint in template's structure (optimizer.init(params)): ours as saved,
    or a nanoGPT ckpt.pt's torch AdamW state converted; a ckpt.pt saved before any step leaves template."""
    if 'adamw.step' in arrays:
        names = ['optimizer' + jax.tree_util.keystr(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(template)[0]]
        arrays = _adamw_to_optax(names, arrays, path)
    elif path.endswith('.pt'):
        print(f"{path} holds no AdamW state (saved before the first step): the optimizer starts from zeros")
        return template
    return unflatten_like(template, arrays, 'optimizer', path)


# -----------------------------------------------------------------------------
# nanoGPT's ckpt.pt and Hugging Face's GPT-2 (export.py, and the ckpt.pt import)

NANOGPT_MODEL_ARGS = ('n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'vocab_size', 'dropout')
GPT2_EOT = 50256  # <|endoftext|>, GPT-2's bos and eos token
_MOMENTS = {'mu': 'exp_avg', 'nu': 'exp_avg_sq'}  # optax's AdamW moments -> torch.optim.AdamW's
_OPTAX_MOMENT = re.compile(r"^(optimizer.*)\.(mu|nu)\['([^']+)'\]\['([^']+)'\]$")


def require_torch(what):
    """torch, imported only where a ckpt.pt is read or written: it is not a runtime requirement."""
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"{what} needs PyTorch: pip install torch") from None
    return torch


def _config(model_args, path):
    from model import GPTConfig
    try:
        return GPTConfig(**model_args)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad model_args {model_args} ({e})") from None


def nanogpt_names(config):
    """nanoGPT's named_parameters() order: wte once (lm_head is tied to it), wpe, each block's ln_1, attn,
    ln_2, mlp, then ln_f; weight before bias. Its AdamW groups, and so the state's indices, follow it."""
    params = ('weight', 'bias') if config.bias else ('weight',)
    names = ['transformer.wte.weight', 'transformer.wpe.weight']
    for i in range(config.n_layer):
        for module in ('ln_1', 'attn.c_attn', 'attn.c_proj', 'ln_2', 'mlp.c_fc', 'mlp.c_proj'):
            names += [f'transformer.h.{i}.{module}.{p}' for p in params]
    return names + [f'transformer.ln_f.{p}' for p in params]


def _torch_shapes(config):
    """{nanoGPT name: shape in torch layout} of config's parameters."""
    from model import param_shapes, to_torch_name, TRANSPOSED
    shapes = {to_torch_name(m, n): s.shape for m, p in param_shapes(config).items() for n, s in p.items()}
    return {k: s[::-1] if k.endswith(TRANSPOSED) else s for k, s in shapes.items()}


def _refusal(path, err):
    """One line for a ckpt.pt that torch.load(weights_only=True) would not unpickle."""
    text = str(err)
    named, opcode = re.search(r'GLOBAL ([\w.]+)', text), re.search(r'Unsupported operand (\d+)', text)
    why = (f"it names {named[1]}" if named else f"it holds pickle opcode {opcode[1]}" if opcode
           else "it holds more than tensors and plain containers")
    return (f"refusing to load {path}: {why}, and a ckpt.pt is read with torch.load(weights_only=True), which "
            f"unpickles only tensors, dicts, lists, strings and numbers; nothing in it was run")


def load_nanogpt(path):
    """(arrays, meta) of nanoGPT's ckpt.pt: the weights as 'model.<name>', its AdamW state as 'adamw.*', and
    meta with model_args (plus activation 'gelu': nanoGPT's GPT uses the exact GELU), iter_num,
    best_val_loss and config. Read with torch.load(weights_only=True): a pickle naming anything but tensors
    and plain containers is refused before any of it runs."""
    torch = require_torch("reading a nanoGPT ckpt.pt")
    try:
        with warnings.catch_warnings():  # its pickle-protocol warning would be a second line on stderr
            warnings.simplefilter('ignore')
            ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(_refusal(path, e)) from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path} ({e}): check that it is a readable file") from None
    except Exception as e:  # EOFError for an empty file, RuntimeError for a torn zip archive, ...
        first = (str(e).strip().splitlines() or [''])[0][:160]
        raise CheckpointError(f"{path} is truncated or not a PyTorch checkpoint "
                              f"({type(e).__name__}{': ' + first if first else ''})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get('model'), dict) or not isinstance(ckpt.get('model_args'), dict):
        raise CheckpointError(f"{path} is not a nanoGPT checkpoint: it has no 'model' and 'model_args'")
    args = ckpt['model_args']
    ints = ('n_layer', 'n_head', 'n_embd', 'block_size', 'vocab_size')
    if not all(isinstance(args.get(k), int) for k in ints) or not isinstance(args.get('bias'), bool):
        raise CheckpointError(f"{path}: its model_args {args} lack nanoGPT's integer {', '.join(ints)} and bool bias")
    model_args = {'dropout': 0.0, **{k: args[k] for k in NANOGPT_MODEL_ARGS if k in args}, 'activation': 'gelu'}
    config = _config(model_args, path)

    sd = {k.removeprefix('_orig_mod.'): v for k, v in ckpt['model'].items()}  # torch.compile'd models' prefix
    bad = [k for k, v in sd.items() if not torch.is_tensor(v)]
    if bad:
        raise CheckpointError(f"{path}: model[{bad[0]!r}] is not a tensor")
    wte = sd.get('transformer.wte.weight')
    if wte is not None and 'lm_head.weight' in sd and not torch.equal(sd['lm_head.weight'], wte):
        raise CheckpointError(f"{path}: lm_head.weight differs from transformer.wte.weight (nanoGPT ties them)")
    weights = {k: v for k, v in sd.items() if k != 'lm_head.weight' and not k.endswith(('.attn.bias', '.attn.masked_bias'))}
    shapes, given = _torch_shapes(config), {k: args[k] for k in NANOGPT_MODEL_ARGS if k in args}
    for name in weights:
        if name not in shapes:
            raise CheckpointError(f"{path}: {name} is not a weight of nanoGPT's GPT with its model_args {given}")
    for name in nanogpt_names(config):  # in nanoGPT's order: a wrong n_embd is named at wte, not deep inside
        shape = shapes[name]
        if name not in weights:
            raise CheckpointError(f"{path} lacks {name}, a weight of nanoGPT's GPT with its model_args {given}")
        if tuple(weights[name].shape) != shape:
            raise CheckpointError(f"{path}: {name} has shape {tuple(weights[name].shape)}, but its model_args {given} "
                                  f"give {shape}")
    arrays = {'model.' + k: v.detach().to(torch.float32).numpy() for k, v in weights.items()}
    if ckpt.get('optimizer'):
        arrays.update(_adamw_from_torch(torch, ckpt['optimizer'], config, shapes, path))

    try:
        meta = {'model_args': model_args, 'iter_num': int(ckpt.get('iter_num', 0)),
                'best_val_loss': float(ckpt.get('best_val_loss', 1e9)),  # nanoGPT saves a 0-d tensor here
                'config': ckpt['config'] if isinstance(ckpt.get('config'), dict) else {}}
    except (TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: unreadable iter_num or best_val_loss ({e})") from None
    if isinstance(meta['config'].get('seed'), int):  # one exported from here: its batches continue the same
        meta['seed'] = meta['config']['seed']
    return arrays, meta


def _adamw_from_torch(torch, state_dict, config, shapes, path):
    """torch.optim.AdamW's state_dict over nanoGPT's two groups (decayed: the >= 2-D parameters in
    named_parameters order; then the rest) -> 'adamw.*' arrays; {} when it never stepped."""
    names = nanogpt_names(config)
    groups = [[n for n in names if len(shapes[n]) >= 2], [n for n in names if len(shapes[n]) < 2]]
    try:
        ids = [list(g['params']) for g in state_dict['param_groups']]
        state, lr = state_dict['state'], float(state_dict['param_groups'][0]['lr'])
    except (TypeError, KeyError, IndexError, ValueError):
        raise CheckpointError(f"{path}: its optimizer is not a torch optimizer's state_dict") from None
    if [len(i) for i in ids] != [len(g) for g in groups]:
        raise CheckpointError(f"{path}: its optimizer has groups of {[len(i) for i in ids]} parameters, not nanoGPT's "
                              f"AdamW groups of {len(groups[0])} decayed and {len(groups[1])} other parameters")
    if not state:
        return {}
    out, steps = {}, set()
    for name, i in zip(groups[0] + groups[1], ids[0] + ids[1]):
        s = state.get(i)
        if not isinstance(s, dict) or not all(torch.is_tensor(s.get(k)) for k in ('exp_avg', 'exp_avg_sq')) or 'step' not in s:
            raise CheckpointError(f"{path}: its optimizer has no AdamW state (step, exp_avg, exp_avg_sq) for {name}")
        for k in ('exp_avg', 'exp_avg_sq'):
            if tuple(s[k].shape) != shapes[name]:
                raise CheckpointError(f"{path}: the optimizer's {k} of {name} is {tuple(s[k].shape)}, not {shapes[name]}")
            out[f'adamw.{k}.{name}'] = s[k].detach().to(torch.float32).numpy()
        steps.add(float(s['step']))
    step = steps.pop()
    if steps or not step.is_integer():
        raise CheckpointError(f"{path}: its AdamW parameters have different step counts; cannot resume them as one")
    out['adamw.step'], out['adamw.lr'] = np.asarray(int(step), np.int64), np.asarray(lr)
    return out


def _adamw_from_optax(arrays):
    """Our flattened optax AdamW state -> 'adamw.*' arrays (moments in torch layout)."""
    from model import to_torch_name, TRANSPOSED
    out = {}
    for key, value in arrays.items():
        m = _OPTAX_MOMENT.match(key)
        if m:
            name = to_torch_name(m[3], m[4])
            out[f'adamw.{_MOMENTS[m[2]]}.{name}'] = value.T if name.endswith(TRANSPOSED) else value
            out['adamw.step'] = arrays.get(m[1] + '.count')  # AdamW's own count of steps (bias correction)
    if out:
        out['adamw.lr'] = arrays.get("optimizer.hyperparams['learning_rate']")
        if out['adamw.step'] is None or out['adamw.lr'] is None:
            raise CheckpointError("the checkpoint's AdamW state has no step count or learning rate")
    return out


def _adamw_to_optax(names, arrays, path):
    """'adamw.*' arrays -> the flattened optax state whose names are names (optimizer.init's, flattened)."""
    from model import to_torch_name, TRANSPOSED
    out = {}
    for key in names:
        m = _OPTAX_MOMENT.match(key)
        if m:
            name = to_torch_name(m[3], m[4])
            value = arrays[f'adamw.{_MOMENTS[m[2]]}.{name}']
            out[key] = value.T if name.endswith(TRANSPOSED) else value
        elif key.endswith('.count'):  # inject_hyperparams' count and AdamW's: both count the steps taken
            out[key] = arrays['adamw.step']
        elif key == "optimizer.hyperparams['learning_rate']":
            out[key] = arrays['adamw.lr']
        else:
            raise CheckpointError(f"{path}: torch's AdamW state has nothing for {key} of this optimizer")
    return out


def to_nanogpt(arrays, meta):
    """nanoGPT's checkpoint dict, for torch.save: model (its state_dict; lm_head.weight is the wte tensor),
    optimizer (torch.optim.AdamW's state_dict over nanoGPT's two groups, built by torch itself), model_args
    (nanoGPT's keys), iter_num, best_val_loss, config."""
    torch = require_torch("writing nanoGPT's ckpt.pt")
    config = _config(meta['model_args'], 'the checkpoint')
    names = nanogpt_names(config)
    missing = [n for n in names if 'model.' + n not in arrays]
    if missing:
        raise CheckpointError(f"the checkpoint lacks the weight {missing[0]}")
    tensor = lambda a: torch.from_numpy(np.array(a, np.float32))  # a copy: torch wants writable memory
    model = {n: tensor(arrays['model.' + n]) for n in names}
    model['lm_head.weight'] = model['transformer.wte.weight']  # tied: one tensor, stored once by torch.save
    cfg = meta.get('config', {})
    if cfg.get('optimizer', 'adamw') != 'adamw':  # nanoGPT has AdamW only
        print(f"note: nanoGPT has no {cfg['optimizer']}: the ckpt.pt carries the weights and a fresh AdamW state")
        adamw, cfg = {}, {**cfg, 'optimizer': 'adamw'}
    else:
        adamw = arrays if 'adamw.step' in arrays else _adamw_from_optax(arrays)
    scalar = lambda a: np.asarray(a).reshape(()).item()  # safetensors keeps 0-d arrays as (1,)
    groups = [{'params': [model[n] for n in names if model[n].dim() >= 2], 'weight_decay': cfg.get('weight_decay', 0.1)},
              {'params': [model[n] for n in names if model[n].dim() < 2], 'weight_decay': 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=float(scalar(adamw['adamw.lr'])) if adamw else cfg.get('learning_rate', 6e-4),
                                  betas=(cfg.get('beta1', 0.9), cfg.get('beta2', 0.95)))
    if adamw and scalar(adamw['adamw.step']) > 0:  # torch keeps no state for a parameter never stepped
        for n in names:
            optimizer.state[model[n]] = {'step': torch.tensor(float(scalar(adamw['adamw.step'])), dtype=torch.float32),
                                         'exp_avg': tensor(adamw[f'adamw.exp_avg.{n}']),
                                         'exp_avg_sq': tensor(adamw[f'adamw.exp_avg_sq.{n}'])}
    return {'model': model, 'optimizer': optimizer.state_dict(),
            'model_args': {k: meta['model_args'][k] for k in NANOGPT_MODEL_ARGS},
            'iter_num': int(meta.get('iter_num', 0)), 'best_val_loss': float(meta.get('best_val_loss', 1e9)),
            'config': dict(cfg)}


def to_hf(arrays, meta):
    """(config.json as a dict, model.safetensors' arrays) of a transformers GPT2LMHeadModel that computes
    this model: the exact GELU is "gelu", the tanh form "gelu_new"; a bias=False model gets zero biases (a
    GPT-2 always has them: the same function); the vocabulary kept as it is, padded or not; lm_head.weight
    left out, as save_pretrained does (tied to wte)."""
    from model import TRANSPOSED
    config = _config(meta['model_args'], 'the checkpoint')
    tensors = {}
    for name, shape in _torch_shapes(_config({**meta['model_args'], 'bias': True}, 'the checkpoint')).items():
        value = arrays.get('model.' + name)
        if value is None and name.endswith('.bias') and not config.bias:
            value = np.zeros(shape, np.float32)
        if value is None or np.shape(value) != shape:
            raise CheckpointError(f"the checkpoint's {name} is {np.shape(value) if value is not None else 'missing'}, "
                                  f"not {shape}")
        value = np.asarray(value, np.float32)
        tensors[name] = np.ascontiguousarray(value.T if name.endswith(TRANSPOSED) else value)  # Conv1D: (in, out)
    eot = GPT2_EOT if config.vocab_size > GPT2_EOT else None  # a character vocabulary has no <|endoftext|>
    hf = {'architectures': ['GPT2LMHeadModel'], 'model_type': 'gpt2', 'vocab_size': config.vocab_size,
          'n_positions': config.block_size, 'n_embd': config.n_embd, 'n_layer': config.n_layer, 'n_head': config.n_head,
          'n_inner': None, 'activation_function': config.activation, 'resid_pdrop': config.dropout,
          'embd_pdrop': config.dropout, 'attn_pdrop': config.dropout, 'layer_norm_epsilon': 1e-5,
          'initializer_range': 0.02, 'scale_attn_weights': True, 'tie_word_embeddings': True,
          'bos_token_id': eot, 'eos_token_id': eot, 'dtype': 'float32'}
    return hf, tensors


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
