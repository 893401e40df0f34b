"""Converts checkpoints to and from nanoGPT's ckpt.pt and Hugging Face's GPT-2, AdamW state too.

AdamW's state travels as 'adamw.exp_avg.<name>', 'adamw.exp_avg_sq.<name>' (torch layout),
'adamw.step' and 'adamw.lr'; torch is imported only where a ckpt.pt is read or written."""
import pickle
import re
import warnings

import numpy as np
import jax

from checkpoint import CheckpointError, model_config
from model import TRANSPOSED, param_shapes, to_torch_name

NANOGPT_MODEL_ARGS = ('n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'vocab_size', 'dropout')
GPT2_EOT = 50256  # <|endoftext|>, GPT-2's bos and eos token
_MOMENTS = {'mu': 'exp_avg', 'nu': 'exp_avg_sq'}  # optax's AdamW moments -> torch.optim.AdamW's
_OPTAX_MOMENT = re.compile(r"^(optimizer.*)\.(mu|nu)\['([^']+)'\]\['([^']+)'\]$")
_LR = "optimizer.hyperparams['learning_rate']"


def require_torch(what):
    try:
        import torch
    except ImportError:  # torch is needed for a ckpt.pt only, not at run time
        raise CheckpointError(f"{what} needs PyTorch: pip install torch") from None
    return torch


def _torch_layout(name, a):  # torch's nn.Linear is (out, in); Haiku's and HF's Conv1D (in, out)
    return a.T if name.endswith(TRANSPOSED) else a


def nanogpt_names(config):
    """nanoGPT's named_parameters() order (wte once: lm_head is tied), its AdamW state's too."""
    blocks = [f'h.{i}.{m}' for i in range(config.n_layer)
              for m in ('ln_1', 'attn.c_attn', 'attn.c_proj', 'ln_2', 'mlp.c_fc', 'mlp.c_proj')]
    params = ('weight', 'bias') if config.bias else ('weight',)
    return (['transformer.wte.weight', 'transformer.wpe.weight']
            + [f'transformer.{m}.{p}' for m in blocks + ['ln_f'] for p in params])


def _torch_shapes(config):
    """{nanoGPT name: shape in torch layout} of config's parameters."""
    shapes = {to_torch_name(m, n): s.shape for m, p in param_shapes(config).items()
              for n, s in p.items()}
    return {k: s[::-1] if k.endswith(TRANSPOSED) else s for k, s in shapes.items()}


def load_nanogpt(path):
    """(arrays, meta) of nanoGPT's ckpt.pt: weights 'model.<name>', AdamW state 'adamw.*'; its
    model_args get activation 'gelu', since nanoGPT's GPT computes the exact GELU."""
    torch = require_torch("reading a nanoGPT ckpt.pt")
    try:
        with warnings.catch_warnings():  # its pickle-protocol warning would be a second line
            warnings.simplefilter('ignore')
            ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:  # say why, in one line
        named = re.search(r'GLOBAL ([\w.]+)', str(e))
        op = re.search(r'Unsupported operand (\d+)', str(e))
        why = (f"it names {named[1]}" if named else f"it holds pickle opcode {op[1]}" if op
               else "it holds more than tensors and plain containers")
        why += ", and torch.load(weights_only=True) takes only tensors and plain containers"
        raise CheckpointError(f"refusing to load {path}: {why}; nothing in it was run") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path} ({e}): check it is a readable file") from None
    except Exception as e:  # EOFError for an empty file, RuntimeError for a torn zip archive, ...
        why = ' '.join(str(e).split())[:160]
        raise CheckpointError(f"{path} is truncated or not a PyTorch checkpoint "
                              f"({type(e).__name__}{': ' + why if why else ''})") from None
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get('model'), dict)
            and isinstance(ckpt.get('model_args'), dict)):
        raise CheckpointError(f"{path} is not nanoGPT's: it has no 'model' and 'model_args'")
    args = ckpt['model_args']
    ints = ('n_layer', 'n_head', 'n_embd', 'block_size', 'vocab_size')
    if any(type(args.get(k)) is not int for k in ints) or not isinstance(args.get('bias'), bool):
        raise CheckpointError(f"{path}: its model_args {args} lack nanoGPT's integer "
                              f"{', '.join(ints)} and bool bias")
    given = {k: args[k] for k in NANOGPT_MODEL_ARGS if k in args}
    model_args = {'dropout': 0.0, **given, 'activation': 'gelu'}
    config = model_config(model_args, path)
    names, shapes, gpt = nanogpt_names(config), _torch_shapes(config), f"nanoGPT's GPT of {given}"
    sd = {k.removeprefix('_orig_mod.'): v for k, v in ckpt['model'].items()}  # torch.compile's
    weights = {k: v for k, v in sd.items() if not k.endswith(('.attn.bias', '.attn.masked_bias'))}
    for name, w in weights.items():
        if name not in shapes and name != 'lm_head.weight' or not torch.is_tensor(w):
            raise CheckpointError(f"{path}: {name} is not a weight tensor of {gpt}")
    lm_head = weights.pop('lm_head.weight', None)
    for name in names:  # in nanoGPT's order: a wrong n_embd is named at wte
        if name not in weights:
            raise CheckpointError(f"{path} lacks {name}, a weight of {gpt}")
        if tuple(weights[name].shape) != shapes[name]:
            raise CheckpointError(f"{path}: {name} has shape {tuple(weights[name].shape)}, "
                                  f"but {shapes[name]} in {gpt}")
    if lm_head is not None and not torch.equal(lm_head, weights['transformer.wte.weight']):
        raise CheckpointError(f"{path}: lm_head.weight differs from wte's (nanoGPT ties them)")
    arrays = {'model.' + k: v.detach().float().numpy() for k, v in weights.items()}
    if ckpt.get('optimizer'):
        arrays.update(adamw_from_torch(torch, ckpt['optimizer'], names, shapes, path))
    cfg = ckpt['config'] if isinstance(ckpt.get('config'), dict) else {}
    try:  # nanoGPT saves best_val_loss as a 0-d tensor
        meta = {'model_args': model_args, 'iter_num': int(ckpt.get('iter_num', 0)),
                'best_val_loss': float(ckpt.get('best_val_loss', 1e9)), 'config': cfg}
    except (TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: unreadable iter_num or best_val_loss ({e})") from None
    if isinstance(cfg.get('seed'), int):  # one exported from here: its batches continue the same
        meta['seed'] = cfg['seed']
    return arrays, meta


def adamw_from_torch(torch, state_dict, names, shapes, path):
    """torch.optim.AdamW's state_dict over nanoGPT's two groups (the >= 2-D parameters, decayed,
    then the rest, each in named_parameters order) -> 'adamw.*' arrays; {} if it never stepped."""
    groups = [[n for n in names if len(shapes[n]) >= 2], [n for n in names if len(shapes[n]) < 2]]
    try:
        ids = [list(g['params']) for g in state_dict['param_groups']]
        state, lr = state_dict['state'], float(state_dict['param_groups'][0]['lr'])
    except (TypeError, KeyError, IndexError, ValueError):
        raise CheckpointError(f"{path}: its optimizer is not a torch state_dict") from None
    if [len(i) for i in ids] != [len(g) for g in groups]:
        raise CheckpointError(f"{path}: its optimizer's groups have {[len(i) for i in ids]} "
                              f"parameters, not nanoGPT's {[len(g) for g in groups]}")
    if not state:
        return {}
    out, steps = {}, set()
    for name, i in zip(groups[0] + groups[1], ids[0] + ids[1]):
        s = state.get(i) if isinstance(state.get(i), dict) else {}
        fits = [torch.is_tensor(s.get(k)) and tuple(s[k].shape) == shapes[name]
                for k in ('exp_avg', 'exp_avg_sq')]
        if 'step' not in s or not all(fits):
            raise CheckpointError(f"{path}: its optimizer has no AdamW state (step, exp_avg, "
                                  f"exp_avg_sq of shape {shapes[name]}) for {name}")
        out.update({f'adamw.{k}.{name}': s[k].detach().float().numpy() for k in _MOMENTS.values()})
        steps.add(float(s['step']))
    step = steps.pop()
    if steps or not step.is_integer():
        raise CheckpointError(f"{path}: its AdamW parameters differ in step count: not resumable")
    return {**out, 'adamw.step': np.asarray(int(step), np.int64), 'adamw.lr': np.asarray(lr)}


def adamw_from_optax(arrays):
    """Our flattened optax AdamW state -> 'adamw.*' arrays."""
    out = {}
    for key, value in arrays.items():
        m = _OPTAX_MOMENT.match(key)
        if m:
            name = to_torch_name(m[3], m[4])
            out[f'adamw.{_MOMENTS[m[2]]}.{name}'] = _torch_layout(name, value)
            out['adamw.step'] = arrays.get(m[1] + '.count')  # AdamW's own count (bias correction)
    if out:
        out['adamw.lr'] = arrays.get(_LR)
        if out['adamw.step'] is None or out['adamw.lr'] is None:
            raise CheckpointError("the checkpoint's AdamW state lacks step count or learning rate")
    return out


def adamw_to_optax(template, arrays, path):
    """'adamw.*' arrays -> the flattened optax state of template (optimizer.init's)."""
    out = {}
    for kp, _ in jax.tree_util.tree_flatten_with_path(template)[0]:
        key = 'optimizer' + jax.tree_util.keystr(kp)
        m = _OPTAX_MOMENT.match(key)
        if m:
            name = to_torch_name(m[3], m[4])
            out[key] = _torch_layout(name, arrays[f'adamw.{_MOMENTS[m[2]]}.{name}'])
        elif key.endswith('.count'):  # inject_hyperparams' and AdamW's: both count the steps taken
            out[key] = arrays['adamw.step']
        elif key == _LR:
            out[key] = arrays['adamw.lr']
        else:
            raise CheckpointError(f"{path}: torch's AdamW state has nothing for {key}")
    return out


def to_nanogpt(arrays, meta):
    """nanoGPT's checkpoint dict for torch.save: state_dict (lm_head.weight the wte tensor), AdamW
    state_dict over its two groups (made by torch), model_args, iter_num, best_val_loss, config."""
    torch = require_torch("writing nanoGPT's ckpt.pt")
    names = nanogpt_names(model_config(meta.get('model_args')))
    missing = [n for n in names if 'model.' + n not in arrays]
    if missing:
        raise CheckpointError(f"the checkpoint lacks the weight {missing[0]}")
    tensor = lambda a: torch.from_numpy(np.array(a, np.float32))  # a copy: torch wants it writable
    model = {n: tensor(arrays['model.' + n]) for n in names}
    model['lm_head.weight'] = model['transformer.wte.weight']  # tied: stored once by torch.save
    cfg = meta.get('config', {})
    if cfg.get('optimizer', 'adamw') != 'adamw':  # nanoGPT has AdamW only
        print(f"note: nanoGPT has no {cfg['optimizer']}: the ckpt.pt gets a fresh AdamW state")
        adamw, cfg = {}, {**cfg, 'optimizer': 'adamw'}
    else:
        adamw = arrays if 'adamw.step' in arrays else adamw_from_optax(arrays)
    scalar = lambda key, default: float(np.asarray(adamw[key]).reshape(())) if adamw else default
    groups = [{'params': [model[n] for n in names if model[n].dim() >= 2],
               'weight_decay': cfg.get('weight_decay', 0.1)},
              {'params': [model[n] for n in names if model[n].dim() < 2], 'weight_decay': 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=scalar('adamw.lr', cfg.get('learning_rate', 6e-4)),
                                  betas=(cfg.get('beta1', 0.9), cfg.get('beta2', 0.95)))
    if scalar('adamw.step', 0) > 0:  # torch keeps no state for a parameter never stepped
        for n in names:
            optimizer.state[model[n]] = {'step': torch.tensor(scalar('adamw.step', 0)),
                                         'exp_avg': tensor(adamw[f'adamw.exp_avg.{n}']),
                                         'exp_avg_sq': tensor(adamw[f'adamw.exp_avg_sq.{n}'])}
    return {'model': model, 'optimizer': optimizer.state_dict(), 'config': dict(cfg),
            'model_args': {k: meta['model_args'][k] for k in NANOGPT_MODEL_ARGS},
            'iter_num': int(meta.get('iter_num', 0)),
            'best_val_loss': float(meta.get('best_val_loss', 1e9))}


def to_hf(arrays, meta):
    """(config.json, model.safetensors' arrays) of a transformers GPT2LMHeadModel computing this
    model: zero biases where bias=False (GPT-2 always has them), the vocabulary kept, padded or
    not, no lm_head.weight (tied to wte), as save_pretrained writes."""
    config = model_config(meta.get('model_args'))
    tensors = {}
    for name, shape in _torch_shapes(model_config({**meta['model_args'], 'bias': True})).items():
        value = arrays.get('model.' + name)
        if value is None and name.endswith('.bias') and not config.bias:
            value = np.zeros(shape, np.float32)
        if value is None or np.shape(value) != shape:
            got = 'missing' if value is None else np.shape(value)
            raise CheckpointError(f"the checkpoint's {name} is {got}, not {shape}")
        tensors[name] = np.ascontiguousarray(_torch_layout(name, np.asarray(value, np.float32)))
    eot = GPT2_EOT if config.vocab_size > GPT2_EOT else None  # a character vocabulary has none
    hf = dict(architectures=['GPT2LMHeadModel'], model_type='gpt2', vocab_size=config.vocab_size,
              n_positions=config.block_size, n_embd=config.n_embd, n_layer=config.n_layer,
              n_head=config.n_head, activation_function=config.activation,  # gelu or gelu_new
              resid_pdrop=config.dropout, embd_pdrop=config.dropout, attn_pdrop=config.dropout,
              layer_norm_epsilon=1e-5, tie_word_embeddings=True, bos_token_id=eot,
              eos_token_id=eot)
    return hf, tensors
