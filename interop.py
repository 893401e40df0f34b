"""Checkpoints to and from nanoGPT's ckpt.pt (AdamW state as 'adamw.*'), HF GPT-2 and HF Llama."""
import os
import pickle
import re
import warnings
from dataclasses import replace

import numpy as np
import jax

from checkpoint import CheckpointError, load_model, load_vocab, model_config, params_from_arrays, \
    resume_path
from model import TRANSPOSED, GPTConfig, from_pretrained, from_state_dict, param_shapes, \
    to_torch_name, torch_layout

NANOGPT_MODEL_ARGS = ('n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'vocab_size', 'dropout')
_MOMENTS = {'mu': 'exp_avg', 'nu': 'exp_avg_sq'}  # optax's AdamW moments -> torch's
# our module names -> Llama's; c_attn stacks q_proj, k_proj and v_proj ({}: q, k or v)
LLAMA = {'wte': 'embed_tokens', 'ln_1': 'input_layernorm', 'attn.c_attn': 'self_attn.{}_proj',
         'attn.c_proj': 'self_attn.o_proj', 'ln_2': 'post_attention_layernorm',
         'mlp.c_gate': 'mlp.gate_proj', 'mlp.c_fc': 'mlp.up_proj', 'mlp.c_proj': 'mlp.down_proj',
         'ln_f': 'norm'}

def unsupported(config, target):
    """config's settings that target's architecture ('nanogpt', 'gpt2' or 'llama') lacks."""
    c, llama = config, target == 'llama'
    off = dict(rope=c.rope != llama, norm=c.norm != ('rmsnorm' if llama else 'layernorm'),
               activation=c.activation not in (('swiglu',) if llama else ('gelu', 'gelu_new')),
               qk_norm=c.qk_norm, softcap=c.softcap != 0.0, bias=llama and c.bias,
               n_kv_head=not llama and c.n_kv_head not in (0, c.n_head),
               tie_lm_head=not (llama or c.tie_lm_head),
               mlp_hidden=not llama and c.mlp_hidden not in (0, 4 * c.n_embd))
    return [f'{k}={getattr(c, k)!r}' for k, v in off.items() if v]

def load_weights(init_from, out_dir):
    """(config, params, data dir, vocabulary) of 'resume', a ckpt.pt or a from_pretrained name."""
    try:
        if init_from != 'resume' and not init_from.endswith('.pt'):  # export.py's vocabulary beside
            config, params = from_pretrained(init_from, dict(dropout=0.0))
            data_dir = init_from if os.path.isdir(init_from) else None
            return config, params, data_dir, load_vocab(data_dir, config)
        path = resume_path(out_dir) if init_from == 'resume' else init_from
        arrays, _, config, data_dir, vocab = load_model(path)
        return config, params_from_arrays(arrays), data_dir, vocab
    except (CheckpointError, ValueError, OSError):
        raise
    except Exception as e:  # e.g. no network for the Hugging Face hub
        first = (str(e).splitlines() or [''])[0]
        raise ValueError(f"could not load {init_from!r}: {type(e).__name__}: {first}") from None

def require_torch(what):
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"{what} needs PyTorch: pip install torch") from None
    return torch

def nanogpt_shapes(config):
    """{name: torch shape} in nanoGPT's named_parameters() order, its AdamW state's (wte once)."""
    shapes = {to_torch_name(m, n): s.shape for m, p in param_shapes(config).items()
              for n, s in p.items()}
    blocks = [f'h.{i}.{m}' for i in range(config.n_layer)
              for m in ('ln_1', 'attn.c_attn', 'attn.c_proj', 'ln_2', 'mlp.c_fc', 'mlp.c_proj')]
    names = ['transformer.wte.weight', 'transformer.wpe.weight'] + [f'transformer.{m}.{p}'
             for m in blocks + ['ln_f'] for p in ('weight', 'bias')[:1 + config.bias]]
    return {n: shapes[n][::-1] if n.endswith(TRANSPOSED) else shapes[n] for n in names}

def load_nanogpt(path):
    """(arrays, meta) of nanoGPT's ckpt.pt; load_checkpoint words a torn file's errors."""
    torch = require_torch("reading a nanoGPT ckpt.pt")
    try:
        with warnings.catch_warnings(action='ignore'):  # a pickle-protocol warning: a second line
            ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        m = re.search(r'GLOBAL ([\w.]+)|Unsupported operand (\d+)', str(e))
        why = (f"it names {m[1]}" if m and m[1] else f"it holds pickle opcode {m[2]}" if m
               else "it holds more than tensors and plain containers")
        raise CheckpointError(f"refusing to load {path}: {why}, which torch.load(weights_only="
                              f"True) does not take; nothing in it was run") from None
    args = ckpt.get('model_args') if isinstance(ckpt, dict) and 'model' in ckpt else None
    if not (isinstance(args, dict) and isinstance(ckpt['model'], dict) and all(type(args.get(k))
            is (bool if k == 'bias' else int) for k in NANOGPT_MODEL_ARGS if k != 'dropout')):
        raise CheckpointError(f"{path} is not nanoGPT's: no 'model' and 'model_args' with int "
                              f"n_layer, n_head, n_embd, block_size, vocab_size and bool bias")
    given = {k: args[k] for k in NANOGPT_MODEL_ARGS if k in args}
    model_args = {'dropout': 0.0, **given, 'activation': 'gelu'}  # nanoGPT's GELU is exact
    shapes, gpt = nanogpt_shapes(model_config(model_args, path)), f"nanoGPT's GPT of {given}"
    weights = {k.removeprefix('_orig_mod.'): v for k, v in ckpt['model'].items()  # torch.compile's
               if not k.endswith(('.attn.bias', '.attn.masked_bias'))}  # torch < 2's causal mask
    lm_head = weights.pop('lm_head.weight', None)
    for name in [*shapes, *(n for n in weights if n not in shapes)]:  # a bad n_embd named at wte
        w = weights.get(name)
        got = f'shape {tuple(w.shape)}' if torch.is_tensor(w) else 'no tensor'
        want = f'shape {shapes[name]}' if name in shapes else 'no such weight'
        if got != want:
            raise CheckpointError(f"{path}: {name} has {got}; {gpt} has {want}")
    if lm_head is not None and not torch.equal(lm_head, weights['transformer.wte.weight']):
        raise CheckpointError(f"{path}: lm_head.weight differs from wte's (nanoGPT ties them)")
    arrays = {'model.' + k: v.detach().float().numpy() for k, v in weights.items()}
    if ckpt.get('optimizer'):
        arrays.update(adamw_from_torch(torch, ckpt['optimizer'], shapes, path))
    cfg = ckpt['config'] if isinstance(ckpt.get('config'), dict) else {}
    meta = {'model_args': model_args, 'iter_num': int(ckpt.get('iter_num', 0)),
            'best_val_loss': float(ckpt.get('best_val_loss', 1e9)), 'config': cfg}  # a 0-d tensor
    if isinstance(cfg.get('seed'), int):  # one exported from here: its batches continue the same
        meta['seed'] = cfg['seed']
    return arrays, meta

def adamw_from_torch(torch, state_dict, shapes, path):
    """'adamw.*' of torch AdamW's state_dict over nanoGPT's two groups; {} if it never stepped."""
    groups = [[n for n, s in shapes.items() if (len(s) >= 2) == d] for d in (True, False)]
    ids = [list(g['params']) for g in state_dict['param_groups']]  # else load_checkpoint says so
    state, lr = state_dict['state'], float(state_dict['param_groups'][0]['lr'])
    if [len(i) for i in ids] != [len(g) for g in groups]:
        raise CheckpointError(f"{path}: its optimizer's groups have {[len(i) for i in ids]} "
                              f"parameters, not nanoGPT's {[len(g) for g in groups]}")
    if not state:
        return {}
    out, steps = {}, set()
    for name, i in zip(groups[0] + groups[1], ids[0] + ids[1]):
        s = state.get(i, {})
        moments = {k: s.get(k) for k in _MOMENTS.values()}
        if 'step' not in s or not all(torch.is_tensor(m) and m.shape == shapes[name]
                                      for m in moments.values()):
            raise CheckpointError(f"{path}: its optimizer has no AdamW state (step, exp_avg, "
                                  f"exp_avg_sq of shape {shapes[name]}) for {name}")
        out.update({f'adamw.{k}.{name}': m.float().numpy() for k, m in moments.items()})
        steps.add(float(s['step']))
    step = steps.pop()
    if steps or not step.is_integer():
        raise CheckpointError(f"{path}: its AdamW parameters differ in step count: not resumable")
    return {**out, 'adamw.step': np.asarray(int(step), np.int64), 'adamw.lr': np.asarray(lr)}

def _adamw_name(key):  # an optax AdamW state key's 'adamw.*' name, None for others
    if m := re.match(r"optimizer.*\.(mu|nu)\['([^']+)'\]\['([^']+)'\]$", key):
        return f'adamw.{_MOMENTS[m[1]]}.{to_torch_name(m[2], m[3])}'
    if key == "optimizer.hyperparams['learning_rate']":
        return 'adamw.lr'
    return 'adamw.step' if key.endswith('.count') else None  # inject_hyperparams' and AdamW's

def adamw_to_optax(template, arrays, path):
    """'adamw.*' as flattened optax state in template's structure (optimizer.init's)."""
    out = {}
    for kp, _ in jax.tree_util.tree_flatten_with_path(template)[0]:
        key = 'optimizer' + jax.tree_util.keystr(kp)
        if not (name := _adamw_name(key)):
            raise CheckpointError(f"{path}: torch's AdamW state has nothing for {key}")
        out[key] = torch_layout(name, arrays[name])
    return out

def _weights(arrays, config, zero_bias=False):
    """{nanoGPT name: float32 array}; zero_bias: GPT-2's, which always has biases."""
    out = {}
    for name, shape in nanogpt_shapes(replace(config, bias=config.bias or zero_bias)).items():
        value = arrays.get('model.' + name)
        if value is None and name.endswith('.bias') and not config.bias:
            value = np.zeros(shape, np.float32)
        if np.shape(value) != shape:
            got = 'missing' if value is None else np.shape(value)
            raise CheckpointError(f"the checkpoint's {name} is {got}, not {shape}")
        out[name] = np.array(value, np.float32)  # a copy: torch wants it writable
    return out

def to_nanogpt(arrays, meta):
    """nanoGPT's checkpoint dict for torch.save, its AdamW state_dict made by torch."""
    config = model_config(meta.get('model_args'))
    if bad := unsupported(config, 'nanogpt'):
        raise ValueError(f"format=nanogpt writes nanoGPT's GPT, which has no {', '.join(bad)}")
    torch = require_torch("writing nanoGPT's ckpt.pt")
    params = {n: torch.from_numpy(a) for n, a in _weights(arrays, config).items()}
    cfg = meta.get('config', {})
    if cfg.get('optimizer', 'adamw') != 'adamw':  # nanoGPT has AdamW only
        print(f"note: nanoGPT has no {cfg['optimizer']}: the ckpt.pt gets a fresh AdamW state")
        adamw, cfg = {}, {**cfg, 'optimizer': 'adamw'}
    else:  # a ckpt.pt's 'adamw.*', or ours under optax's names
        ours = {k: _adamw_name(k) for k in arrays}
        adamw = {**arrays, **{n: torch_layout(n, arrays[k]) for k, n in ours.items() if n}}
    lr, step = ([float(np.asarray(adamw[k]).reshape(())) for k in ('adamw.lr', 'adamw.step')]
                if 'adamw.step' in adamw else (cfg.get('learning_rate', 6e-4), 0))
    decay, rest = ([p for p in params.values() if (p.dim() >= 2) == d] for d in (True, False))
    optimizer = torch.optim.AdamW([{'params': decay, 'weight_decay': cfg.get('weight_decay', 0.1)},
                                   {'params': rest, 'weight_decay': 0.0}], lr=lr,
                                  betas=(cfg.get('beta1', 0.9), cfg.get('beta2', 0.95)))
    moment = lambda k, n: torch.from_numpy(np.array(adamw[f'adamw.{k}.{n}'], np.float32))
    if step > 0:  # torch keeps no state for a parameter never stepped
        for n, p in params.items():
            optimizer.state[p] = {'step': torch.tensor(step),
                                  **{k: moment(k, n) for k in _MOMENTS.values()}}
    model = {**params, 'lm_head.weight': params['transformer.wte.weight']}  # tied: saved once
    return {'model': model, 'optimizer': optimizer.state_dict(), 'config': dict(cfg),
            'model_args': {k: meta['model_args'][k] for k in NANOGPT_MODEL_ARGS},
            'iter_num': int(meta.get('iter_num', 0)),
            'best_val_loss': float(meta.get('best_val_loss', 1e9))}

def to_hf(arrays, meta):
    """(config.json, model.safetensors) as a GPT-2's or a Llama's save_pretrained writes them."""
    config = model_config(meta.get('model_args'))
    arch = 'llama' if config.rope else 'gpt2'
    if bad := unsupported(config, arch):
        raise ValueError(f"format=hf writes a GPT-2 or a Llama (rope=True): {arch} has no "
                         f"{', '.join(bad)}")
    if arch == 'llama':
        return to_llama(config, {k[6:]: v for k, v in arrays.items() if k.startswith('model.')})
    weights = _weights(arrays, config, zero_bias=True)
    tensors = {n: np.ascontiguousarray(torch_layout(n, a)) for n, a in weights.items()}
    eot = 50256 if config.vocab_size > 50256 else None  # GPT-2's <|endoftext|>, if it has one
    c, p = config, config.dropout
    return dict(architectures=['GPT2LMHeadModel'], model_type='gpt2', vocab_size=c.vocab_size,
                n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
                activation_function=c.activation, resid_pdrop=p, embd_pdrop=p, attn_pdrop=p,
                layer_norm_epsilon=c.norm_eps, tie_word_embeddings=True, bos_token_id=eot,
                eos_token_id=eot), tensors

def llama_name(name):  # our state_dict name -> Llama's
    m = re.fullmatch(r'transformer\.(?:h\.(\d+)\.)?([\w.]+)\.weight', name)
    layer = f'layers.{m[1]}.' if m[1] else ''
    return 'lm_head.weight' if m[2] == 'lm_head' else f'model.{layer}{LLAMA[m[2]]}.weight'

def to_llama(config, state_dict):
    """(config.json, model.safetensors) of a Llama-architecture model's state_dict."""
    c, tensors = config, {}
    H, G, D = c.n_head, c.n_kv_head or c.n_head, c.n_embd // c.n_head
    for name, a in state_dict.items():  # c_attn's (out, in) rows: q_proj's, k_proj's, v_proj's
        parts = np.split(a, [H * D, (H + G) * D]) if '.c_attn.' in name else [a]
        tensors.update({llama_name(name).format(x): np.ascontiguousarray(p, np.float32)
                        for x, p in zip('qkv', parts)})
    eot = 50256 if c.vocab_size > 50256 else None
    return dict(architectures=['LlamaForCausalLM'], model_type='llama', vocab_size=c.vocab_size,
                hidden_size=c.n_embd, intermediate_size=c.mlp_hidden or 4 * c.n_embd,
                num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=G,
                max_position_embeddings=c.block_size, hidden_act='silu', rms_norm_eps=c.norm_eps,
                rope_theta=c.rope_theta, tie_word_embeddings=c.tie_lm_head, bos_token_id=eot,
                eos_token_id=eot), tensors

def from_llama(hf, path, override_args):
    """(config, params) of a Llama's config.json (a dict) and safetensors file."""
    from safetensors.flax import load_file  # numpy has no bfloat16, Llamas' usual dtype
    rope = hf.get('rope_parameters') or hf.get('rope_scaling') or {}
    got = dict(model_type=hf.get('model_type'), hidden_act=hf.get('hidden_act', 'silu'),
               rope_type=rope.get('rope_type', rope.get('type', 'default')),
               attention_bias=hf.get('attention_bias', False), mlp_bias=hf.get('mlp_bias', False))
    if bad := [f'{k}={v!r}' for k, v in got.items() if v not in ('llama', 'silu', 'default', 0)]:
        raise ValueError(f"the config.json beside {path} has {bad[0]}: not a GPT-2 or a Llama")
    config = GPTConfig(
        n_layer=hf['num_hidden_layers'], n_embd=hf['hidden_size'], vocab_size=hf['vocab_size'],
        n_head=hf['num_attention_heads'], n_kv_head=hf.get('num_key_value_heads') or 0,
        block_size=hf['max_position_embeddings'], bias=False, activation='swiglu',
        mlp_hidden=hf['intermediate_size'], rope=True, norm='rmsnorm',
        rope_theta=rope.get('rope_theta', hf.get('rope_theta', 10000.0)),
        norm_eps=hf.get('rms_norm_eps', 1e-6), tie_lm_head=hf.get('tie_word_embeddings', False),
        **override_args)  # absent keys: LlamaConfig's defaults
    return config, params_from_llama(config, load_file(path), path)

def params_from_llama(config, tensors, path):
    """config's params from tensors of Llama's names (others left out)."""
    state_dict = {}
    for m, p in param_shapes(config).items():
        for n in p:
            name = to_torch_name(m, n)
            names = [llama_name(name).format(x) for x in ('qkv' if '.c_attn.' in name else 'q')]
            if absent := [k for k in names if k not in tensors]:
                raise ValueError(f"{path} has no {absent[0]}, which a Llama of {config} has")
            state_dict[name] = np.concatenate([np.asarray(tensors[k], np.float32) for k in names])
    params = from_state_dict(state_dict)
    if jax.tree.map(np.shape, params) != jax.tree.map(np.shape, param_shapes(config)):
        raise ValueError(f"{path}: parameters do not match a Llama of {config}")
    return params
