"""
Builds tiny Hugging Face GPT2LMHeadModel references (random weights, no download) and writes
tests/fixtures/hf_gpt2_tiny.npz: their weights in nanoGPT's state_dict layout, inputs, targets with
ignore_index -1, and HF's logits, loss and gradients. tests/test_model.py compares our model against
that file when torch is absent, and imports the helpers below for its live-torch tests.

    python tests/make_reference.py          (needs torch and transformers)

Everything here is torch / transformers code written against their public API: nothing from
model.py is used, so the fixture is an independent reference.
"""
import json
import os

import numpy as np
import torch
import torch.nn.functional as F
import transformers

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'hf_gpt2_tiny.npz')

# GPT-2's Conv1D modules store weights (in, out); nanoGPT's nn.Linear state_dict holds (out, in)
CONV1D = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')

# two cases: GPT-2 as published (tanh GELU, biases) and nanoGPT's own options (exact GELU, no biases)
CASES = {
    'gelu_new_bias': dict(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32,
                          activation='gelu_new', bias=True, seed=1, B=2, T=16),
    'gelu_nobias': dict(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16,
                        activation='gelu', bias=False, seed=2, B=2, T=11),
}


def hf_model(vocab_size, block_size, n_layer, n_head, n_embd, activation='gelu_new', bias=True, seed=0,
             untie=False):
    """A GPT2LMHeadModel in eval mode, fp32, eager (explicit softmax) attention, with every parameter
    drawn at unit scale so that a wrong layout, a missing bias or a wrong GELU changes the logits by
    far more than the 1e-4 tolerance (HF's own 0.02 init leaves logits near zero).

    bias=False: HF has no bias-free GPT-2, so every bias (Linear and LayerNorm) is set to zero and
    kept out of the comparison. Adding a zero is exact in floating point, so this HF model computes
    precisely the function of nanoGPT's bias=False model with the same weights.

    untie=True gives lm_head its own copy of wte, so the two gradient contributions of GPT-2's tied
    weight (token embedding + output projection) can be read separately."""
    config = transformers.GPT2Config(
        vocab_size=vocab_size, n_positions=block_size, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        activation_function=activation, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        layer_norm_epsilon=1e-5, bos_token_id=0, eos_token_id=0, attn_implementation='eager')
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith('bias'):
                p.copy_(0.1 * torch.randn(p.shape, generator=g) if bias else torch.zeros(p.shape))
            elif 'ln_' in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(('wte.weight', 'wpe.weight')):
                # 0.3: logits of a few units, so the softmax (and its gradient) is neither flat nor one-hot
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            else:  # Conv1D (in, out): unit-variance outputs
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[0] ** 0.5)
    if untie:
        model.lm_head.weight = torch.nn.Parameter(model.transformer.wte.weight.detach().clone())
    return model.float().eval()


def nanogpt_state_dict(model, bias=True):
    """HF parameters as nanoGPT's state_dict: same names, nn.Linear (out, in) layout, lm_head kept.
    bias=False leaves out the (zero) biases, as nanoGPT's bias=False model has none."""
    sd = {}
    for name, p in model.state_dict().items():
        if name.endswith(('.attn.bias', '.attn.masked_bias')):
            continue  # causal-mask buffers of older transformers versions
        if not bias and name.endswith('.bias'):
            continue
        a = p.detach().cpu().numpy().astype(np.float32)
        sd[name] = a.T.copy() if name.endswith(CONV1D) else a
    return sd


def nanogpt_grads(model, bias=True):
    """HF .grad of every parameter, in nanoGPT's layout (as nanogpt_state_dict)."""
    out = {}
    for name, p in model.named_parameters():
        if not bias and name.endswith('.bias'):
            continue
        a = p.grad.detach().cpu().numpy().astype(np.float32)
        out[name] = a.T.copy() if name.endswith(CONV1D) else a
    return out


def logits_and_loss(model, idx_BT, targets_BT=None):
    """HF logits (B, T, V) and nanoGPT's loss: F.cross_entropy over all positions, ignore_index=-1."""
    logits_BTV = model(torch.as_tensor(idx_BT, dtype=torch.long)).logits
    loss = None
    if targets_BT is not None:
        loss = F.cross_entropy(logits_BTV.reshape(-1, logits_BTV.size(-1)),
                               torch.as_tensor(targets_BT, dtype=torch.long).reshape(-1), ignore_index=-1)
    return logits_BTV, loss


def make_inputs(vocab_size, B, T, seed):
    """Token ids and targets with some ignore_index (-1) positions, including a whole ignored row tail."""
    rng = np.random.default_rng(seed)
    idx_BT = rng.integers(0, vocab_size, size=(B, T)).astype(np.int32)
    targets_BT = rng.integers(0, vocab_size, size=(B, T)).astype(np.int32)
    targets_BT[rng.random((B, T)) < 0.25] = -1
    targets_BT[-1, T // 2:] = -1
    targets_BT[0, 0] = 3  # at least one counted position
    return idx_BT, targets_BT


def main():
    arrays = {}
    for case, c in CASES.items():
        dims = {k: c[k] for k in ('vocab_size', 'block_size', 'n_layer', 'n_head', 'n_embd', 'activation', 'bias')}
        model = hf_model(**dims, seed=c['seed'])
        idx_BT, targets_BT = make_inputs(c['vocab_size'], c['B'], c['T'], c['seed'])
        logits_BTV, loss = logits_and_loss(model, idx_BT, targets_BT)
        loss.backward()
        arrays[f'{case}/config'] = np.array(json.dumps(dims))
        arrays[f'{case}/idx'] = idx_BT
        arrays[f'{case}/targets'] = targets_BT
        arrays[f'{case}/logits'] = logits_BTV.detach().numpy().astype(np.float32)
        arrays[f'{case}/loss'] = np.float32(loss.item())
        for name, a in nanogpt_state_dict(model, c['bias']).items():
            arrays[f'{case}/sd/{name}'] = a
        for name, a in nanogpt_grads(model, c['bias']).items():
            arrays[f'{case}/grad/{name}'] = a
    os.makedirs(os.path.dirname(FIXTURE), exist_ok=True)
    np.savez_compressed(FIXTURE, **arrays)
    print(f"wrote {FIXTURE} ({os.path.getsize(FIXTURE) / 1024:.0f} KiB, transformers {transformers.__version__}, "
          f"torch {torch.__version__})")


if __name__ == '__main__':
    main()
