"""Moving checkpoints in and out (issue 21): export.py to Hugging Face transformers and to nanoGPT's
ckpt.pt, and train.py / sample.py reading nanoGPT's ckpt.pt.

The references are code nobody here wrote: transformers' GPT2LMHeadModel (logits, generate) and
torch.optim.AdamW (the moments a resumed run must continue from). nanoGPT's module tree is written
out below from its model.py, parameters only, so that torch itself names and orders a nanoGPT
state_dict and AdamW state; the forward and backward of that torch model are transformers'."""
import json
import os
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import jax
import jax.numpy as jnp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import checkpoint  # noqa: E402
import interop  # noqa: E402
import model  # noqa: E402
import training  # noqa: E402
from checkpoint import CKPT_NAME, load_checkpoint  # noqa: E402

from tests.tinydata import tiny_text, write_char_dataset  # noqa: E402

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

K = 4  # iterations between checkpoints; a torch run of K steps is resumed for K more
LR, WD, BETAS, CLIP, SEED = 1e-3, 0.1, (0.9, 0.95), 1.0, 1337
TINY = ['--device=cpu', '--dtype=float32', '--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32',
        '--bias=True', '--batch_size=4', '--gradient_accumulation_steps=1', '--eval_iters=2', '--log_interval=1',
        '--dropout=0.0', f'--learning_rate={LR}', '--decay_lr=False', f'--eval_interval={K}',
        '--always_save_checkpoint=True']
# nanoGPT's model_args keys, from its train.py
NANOGPT_ARGS = {'n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'vocab_size', 'dropout'}
# runs a script with `import torch` failing, as where torch is not installed
NO_TORCH = ("import os, runpy, sys; sys.modules['torch'] = None; sys.argv = sys.argv[1:]; "
            "sys.path.insert(0, os.path.dirname(sys.argv[0])); runpy.run_path(sys.argv[0], run_name='__main__')")


@pytest.fixture(scope='module')
def env(tmp_path_factory):
    e = dict(os.environ)
    e.update(PYTHONUNBUFFERED='1', JAX_PLATFORMS='cpu', PYTHONIOENCODING='utf-8')
    return e


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
    return write_char_dataset(str(tmp_path_factory.mktemp('data') / 'tiny'), tiny_text(20000))


def script(name, *args, env, cwd, no_torch=False, timeout=300):
    cmd = [sys.executable, *(['-c', NO_TORCH] if no_torch else []), os.path.join(REPO, name), *args]
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def train(dataset, out_dir, *extra, env, cwd):
    return ok(script('train.py', f'--dataset={dataset}', f'--out_dir={out_dir}', *TINY, *extra, env=env, cwd=cwd))


@pytest.fixture(scope='module')
def trained(tmp_path_factory, dataset, env):
    """K iterations of train.py from scratch: out_dir/ckpt.safetensors at iter K, AdamW state and all."""
    out = str(tmp_path_factory.mktemp('trained') / 'out')
    train(dataset, out, f'--max_iters={K}', env=env, cwd=os.path.dirname(out))
    return out


def vocab_of(dataset):
    with open(os.path.join(dataset, 'meta.json')) as f:
        return json.load(f)['vocab_size']


# -----------------------------------------------------------------------------
# nanoGPT's module tree in torch (parameters only), and transformers' GPT-2 computing with them

def nanogpt_skeleton(n_layer, n_embd, vocab_size, block_size, bias=True, flash=True):
    """nanoGPT's GPT.__init__ without forward: the same modules registered in the same order, lm_head
    tied to wte, so that named_parameters() and state_dict() are the ones nanoGPT's train.py saves.
    flash=False registers the causal-mask buffers that nanoGPT keeps where torch < 2.0."""
    nn = torch.nn

    class LayerNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(n_embd))
            self.bias = nn.Parameter(torch.zeros(n_embd)) if bias else None

    def block():
        b = nn.Module()
        b.ln_1 = LayerNorm()
        b.attn = nn.Module()
        b.attn.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        b.attn.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        if not flash:
            b.attn.register_buffer('bias', torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))
        b.ln_2 = LayerNorm()
        b.mlp = nn.Module()
        b.mlp.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        b.mlp.c_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
        return b

    gpt = nn.Module()
    gpt.transformer = nn.ModuleDict(dict(wte=nn.Embedding(vocab_size, n_embd), wpe=nn.Embedding(block_size, n_embd),
                                         drop=nn.Dropout(0.0), h=nn.ModuleList([block() for _ in range(n_layer)]),
                                         ln_f=LayerNorm()))
    gpt.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
    gpt.transformer.wte.weight = gpt.lm_head.weight
    return gpt


def nanogpt_adamw(skeleton):
    """nanoGPT's configure_optimizers: decay on the >= 2-D parameters, in named_parameters order."""
    params = [p for _, p in skeleton.named_parameters()]
    groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': WD},
              {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
    return torch.optim.AdamW(groups, lr=LR, betas=BETAS)


def hf_model(vocab_size, activation='gelu'):
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=32, vocab_size=vocab_size,
                                  activation_function=activation, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  bos_token_id=None, eos_token_id=None)
    return transformers.GPT2LMHeadModel(cfg).eval()


def hf_layout(name, tensor):
    """nanoGPT (nn.Linear, (out, in)) <-> transformers (Conv1D, (in, out)): the same names, four transposed."""
    return tensor.t() if name.endswith(model.TRANSPOSED) else tensor


def torch_step(skeleton, hf, optimizer, x, y):
    """One nanoGPT iteration: the loss and gradients computed by transformers with the skeleton's weights,
    then clip_grad_norm_ and AdamW on the skeleton, as nanoGPT's train.py steps."""
    hf_params = dict(hf.named_parameters())
    with torch.no_grad():
        for name, p in skeleton.named_parameters():
            hf_params[name].copy_(hf_layout(name, p))
    hf.zero_grad(set_to_none=True)
    logits = hf(torch.tensor(x)).logits
    torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), torch.tensor(y).view(-1).long()).backward()
    for name, p in skeleton.named_parameters():
        p.grad = hf_layout(name, hf_params[name].grad).contiguous()
    torch.nn.utils.clip_grad_norm_(skeleton.parameters(), CLIP)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def train_batch(dataset, it):
    """The batch train.py draws at iteration it with TINY's flags (one micro-batch of 4 rows)."""
    n = training.count_tokens(dataset, 'train', 32)
    starts = training.batch_indices(SEED, 'train', it, n, 32, (1, 4))
    x, y = training.windows(np.memmap(os.path.join(dataset, 'train.bin'), dtype=np.uint16, mode='r'), starts, 32)
    return x[0], y[0]


def our_logits(config, params, idx):
    return np.asarray(model.gpt_forward(config).apply(params, None, jnp.asarray(idx), jnp.zeros(idx.shape, jnp.int32))[0])


def random_params(config, seed):
    """Every parameter random (biases and gains too), so a misplaced or untransposed one shows."""
    leaves, treedef = jax.tree.flatten(model.init_params(config, jax.random.PRNGKey(seed)))
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(treedef, [np.asarray(rng.normal(0, 0.3, p.shape), np.float32) for p in leaves])


def write_hf(folder, arrays, meta):
    """What export.py writes for --format=hf."""
    from safetensors.numpy import save_file
    config, tensors = interop.to_hf(arrays, meta)
    os.makedirs(folder)
    with open(os.path.join(folder, 'config.json'), 'w') as f:
        json.dump(config, f)
    save_file(tensors, os.path.join(folder, 'model.safetensors'), metadata={'format': 'pt'})


def load_hf(folder):
    """GPT2LMHeadModel.from_pretrained, asserting transformers found every weight and nothing more."""
    hf, info = transformers.GPT2LMHeadModel.from_pretrained(folder, output_loading_info=True)
    assert not any(info[k] for k in ('missing_keys', 'unexpected_keys', 'mismatched_keys', 'error_msgs')), info
    return hf.eval()


# -----------------------------------------------------------------------------
# to Hugging Face

@pytest.mark.parametrize('bias,activation,vocab_size', [(True, 'gelu', 65), (True, 'gelu_new', 65),
                                                         (False, 'gelu', 50304), (False, 'gelu_new', 65)])
def test_hf_export_computes_our_logits(tmp_path, bias, activation, vocab_size):
    config = model.GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=vocab_size, bias=bias,
                             activation=activation)
    params = random_params(config, seed=int(bias) + 2 * (activation == 'gelu'))
    meta = {'model_args': asdict(config), 'iter_num': 0, 'best_val_loss': 1e9, 'config': {}}
    write_hf(str(tmp_path / 'hf'), checkpoint.params_to_arrays(params), meta)
    hf = load_hf(str(tmp_path / 'hf'))
    assert hf.config.activation_function == activation and hf.config.vocab_size == vocab_size  # padding kept
    assert (hf.config.eos_token_id == 50256) == (vocab_size > 50256)
    if not bias:  # zero biases: GPT-2 always has them
        assert all(float(p.detach().abs().max()) == 0.0 for n, p in hf.named_parameters() if n.endswith('.bias'))
    idx = np.random.default_rng(0).integers(0, vocab_size, (2, 16))
    with torch.no_grad():
        want = hf(torch.tensor(idx)).logits.numpy()
    got = our_logits(config, params, idx)
    assert np.abs(got - want).max() <= 1e-4, np.abs(got - want).max()
    assert np.abs(want).max() > 1.0  # the logits are not all near zero: there was something to compare


def test_export_script_hf_greedy_equals_sample_script(tmp_path, dataset, env):
    """export.py --format=hf on a character-level checkpoint (run with torch blocked: the HF format needs
    none); transformers loads it, and its greedy generate is sample.py --temperature=0's text."""
    vocab_size = vocab_of(dataset)
    config = model.GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=vocab_size)
    # random weights of std 0.3 spread the logits by whole units: float rounding between two correct
    # implementations cannot flip a greedy argmax (nanoGPT's init leaves them within ~0.1)
    params = random_params(config, seed=5)
    out = tmp_path / 'out'
    out.mkdir()
    checkpoint.save_checkpoint(str(out / CKPT_NAME), checkpoint.params_to_arrays(params),
                               {'model_args': asdict(config), 'iter_num': 0, 'best_val_loss': 1e9,
                                'config': {'dataset': dataset}, 'seed': SEED, 'dtype': 'float32'})
    log = ok(script('export.py', f'--out_dir={out}', '--format=hf', f'--export_dir={tmp_path / "hf"}', env=env,
                    cwd=str(tmp_path), no_torch=True))
    assert sorted(os.listdir(tmp_path / 'hf')) == ['config.json', 'meta.json', 'model.safetensors'], log
    assert (tmp_path / 'hf' / 'meta.json').read_bytes() == open(os.path.join(dataset, 'meta.json'), 'rb').read()
    hf = load_hf(str(tmp_path / 'hf'))
    assert hf.config.activation_function == 'gelu'

    prompt, new = 'First Citizen', 12
    sample = ok(script('sample.py', f'--out_dir={out}', f'--start={prompt}', '--num_samples=1',
                       f'--max_new_tokens={new}', '--temperature=0', '--device=cpu', '--dtype=float32', env=env,
                       cwd=str(tmp_path)))
    ours = sample[sample.index('Loading meta from'):].split('\n', 1)[1].split('\n---------------\n')[0]
    # the exported directory alone: sample.py finds the vocabulary export.py put beside the weights
    alone = ok(script('sample.py', f'--init_from={tmp_path / "hf"}', f'--start={prompt}', '--num_samples=1',
                      f'--max_new_tokens={new}', '--temperature=0', '--device=cpu', '--dtype=float32', env=env,
                      cwd=str(tmp_path)))
    assert alone[alone.index('Loading meta from'):].split('\n', 1)[1].startswith(ours + '\n'), alone[-2000:]
    meta = json.loads((tmp_path / 'hf' / 'meta.json').read_text())
    ids = [meta['stoi'][c] for c in prompt]
    with torch.no_grad():
        out_ids = hf.generate(torch.tensor([ids]), max_new_tokens=new, do_sample=False, eos_token_id=None,
                              pad_token_id=0, attention_mask=torch.ones(1, len(ids), dtype=torch.long))[0].tolist()
    theirs = ''.join(meta['itos'][str(i)] for i in out_ids)
    assert len(theirs) == len(prompt) + new and theirs.startswith(prompt)
    assert ours == theirs
    assert len(set(theirs[len(prompt):])) > 1  # not one token repeated: the comparison has content


# -----------------------------------------------------------------------------
# to nanoGPT and back

def test_nanogpt_roundtrip_is_bit_identical_and_loads_in_torch(tmp_path, dataset, env, trained):
    """ours -> export.py --format=nanogpt -> ckpt.pt: nanoGPT's layout, which torch's load_state_dict takes
    into nanoGPT's module tree and its AdamW; -> train.py --init_from=resume from that ckpt.pt alone: the
    checkpoint it saves equals the original, parameters and optimizer state bit for bit."""
    ok(script('export.py', f'--out_dir={trained}', '--format=nanogpt', f'--export_dir={tmp_path / "nano"}',
              env=env, cwd=str(tmp_path)))
    assert sorted(os.listdir(tmp_path / 'nano')) == ['ckpt.pt', 'meta.pkl']  # nanoGPT's sample.py reads meta.pkl
    pt = str(tmp_path / 'nano' / 'ckpt.pt')
    ckpt = torch.load(pt, weights_only=True)
    assert sorted(ckpt) == ['best_val_loss', 'config', 'iter_num', 'model', 'model_args', 'optimizer']
    assert set(ckpt['model_args']) == NANOGPT_ARGS and ckpt['iter_num'] == K
    assert ckpt['model']['lm_head.weight'].data_ptr() == ckpt['model']['transformer.wte.weight'].data_ptr()

    # what nanoGPT's train.py does on resume: load_state_dict (strict) into its GPT, then into its AdamW
    args = ckpt['model_args']
    skeleton = nanogpt_skeleton(args['n_layer'], args['n_embd'], args['vocab_size'], args['block_size'], args['bias'])
    skeleton.load_state_dict(ckpt['model'])
    optimizer = nanogpt_adamw(skeleton)
    optimizer.load_state_dict(ckpt['optimizer'])
    names = [n for n, _ in skeleton.named_parameters()]
    assert len(optimizer.state) == len(names)
    ours, meta = load_checkpoint(os.path.join(trained, CKPT_NAME))
    for name, p in skeleton.named_parameters():  # the moments sit on the right parameters, in torch's layout
        module, pname = model.from_torch_name(name)
        mu = ours[f"optimizer.inner_state[1][0].mu['{module}']['{pname}']"]
        np.testing.assert_array_equal(optimizer.state[p]['exp_avg'].numpy(), mu.T if name.endswith(model.TRANSPOSED) else mu)
        assert float(optimizer.state[p]['step']) == K
    # nanoGPT's sample.py: the ckpt's weights compute our logits (transformers with them, exact GELU)
    hf = hf_model(args['vocab_size'])
    hf.load_state_dict({n: hf_layout(n, t) for n, t in ckpt['model'].items()})
    idx = np.random.default_rng(1).integers(0, args['vocab_size'], (2, 32))
    with torch.no_grad():
        want = hf(torch.tensor(idx)).logits.numpy()
    config = model.GPTConfig(**meta['model_args'])
    assert np.abs(our_logits(config, checkpoint.params_from_arrays(ours), idx) - want).max() <= 1e-4

    # back: a fresh out_dir holding only the ckpt.pt; resuming at iter K saves at once, before any step
    back = tmp_path / 'back'
    back.mkdir()
    (back / 'ckpt.pt').write_bytes(open(pt, 'rb').read())
    log = train(dataset, str(back), '--init_from=resume', f'--max_iters={K}', env=env, cwd=str(tmp_path))
    assert f"Resuming training from {back / 'ckpt.pt'}" in log
    assert (back / 'ckpt.pt').read_bytes() == open(pt, 'rb').read()  # left untouched; ours written beside it
    again, meta_again = load_checkpoint(str(back / CKPT_NAME))
    assert sorted(again) == sorted(ours)
    for name in ours:
        np.testing.assert_array_equal(again[name], ours[name], err_msg=name)
        assert again[name].dtype == ours[name].dtype, name
    assert meta_again['iter_num'] == meta['iter_num'] and meta_again['best_val_loss'] == meta['best_val_loss']
    assert meta_again['model_args'] == meta['model_args'] and meta_again['seed'] == meta['seed']


def test_nanogpt_ckpt_from_torch_loads_and_resumes_like_torch(tmp_path, dataset, env):
    """A ckpt.pt made as nanoGPT's train.py makes one: nanoGPT's module tree wrapped by torch.compile
    ('_orig_mod.' names, causal-mask buffers of torch < 2.0 included), torch.optim.AdamW after K real
    steps, best_val_loss a tensor. It loads with transformers' logits, and train.py --init_from=ckpt.pt
    continues K steps with the AdamW moments and weights torch reaches on the same batches."""
    vocab_size = vocab_of(dataset)
    torch.manual_seed(0)
    hf = hf_model(vocab_size)
    skeleton = nanogpt_skeleton(2, 32, vocab_size, 32, bias=True, flash=False)
    with torch.no_grad():  # transformers' initialisation, biases and gains spread so that misplacing one shows
        hf_params = dict(hf.named_parameters())
        for name, p in skeleton.named_parameters():
            p.copy_(hf_layout(name, hf_params[name]) + (0.1 * torch.randn(p.shape) if p.dim() == 1 else 0.0))
    optimizer = nanogpt_adamw(skeleton)
    for it in range(K):
        torch_step(skeleton, hf, optimizer, *train_batch(dataset, it))
    compiled = torch.compile(skeleton)  # wrapping only: nothing is compiled before a forward
    state_dict = compiled.state_dict()
    assert all(k.startswith('_orig_mod.') for k in state_dict) and any(k.endswith('.attn.bias') for k in state_dict)
    nanogpt_args = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, bias=True, vocab_size=vocab_size, dropout=0.0)
    out = tmp_path / 'nanogpt-out'
    out.mkdir()
    pt = out / 'ckpt.pt'
    torch.save({'model': state_dict, 'optimizer': optimizer.state_dict(), 'model_args': nanogpt_args, 'iter_num': K,
                'best_val_loss': torch.tensor(3.25), 'config': {'dataset': dataset, 'learning_rate': LR}}, pt)

    arrays, meta = load_checkpoint(str(pt))
    assert meta['model_args'] == {**nanogpt_args, 'activation': 'gelu'}  # nanoGPT's GPT: the exact GELU
    assert meta['iter_num'] == K and meta['best_val_loss'] == 3.25 and meta['config']['dataset'] == dataset
    config = model.GPTConfig(**meta['model_args'])
    idx = np.random.default_rng(2).integers(0, vocab_size, (2, 32))
    with torch.no_grad():
        for name, p in skeleton.named_parameters():
            dict(hf.named_parameters())[name].copy_(hf_layout(name, p))
        want = hf(torch.tensor(idx)).logits.numpy()
    assert np.abs(our_logits(config, checkpoint.params_from_arrays(arrays), idx) - want).max() <= 1e-4
    # nanoGPT -> transformers in one step: export.py takes an out_dir holding only the ckpt.pt
    ok(script('export.py', f'--out_dir={out}', '--format=hf', f"--export_dir={tmp_path / 'hf'}", env=env,
              cwd=str(tmp_path)))
    with torch.no_grad():
        exported = load_hf(str(tmp_path / 'hf'))(torch.tensor(idx)).logits.numpy()
    assert np.abs(exported - want).max() <= 1e-4

    # resume here from the ckpt.pt path, K more iterations; torch takes the same K steps
    before = pt.read_bytes()
    log = train(dataset, str(tmp_path / 'out'), f'--init_from={pt}', f'--max_iters={2 * K}', env=env,
                cwd=str(tmp_path))
    assert f'Resuming training from {pt}' in log and f'\niter {K}: loss' in log and '\niter 0: loss' not in log
    assert pt.read_bytes() == before
    for it in range(K, 2 * K):
        torch_step(skeleton, hf, optimizer, *train_batch(dataset, it))
    ours, meta = load_checkpoint(str(tmp_path / 'out' / CKPT_NAME))
    assert meta['iter_num'] == 2 * K
    adam = 'optimizer.inner_state[1][0]'  # the layout of configure_optimizers' state with grad_clip > 0
    assert int(ours[f'{adam}.count'].reshape(())) == 2 * K
    worst = {}
    for name, p in skeleton.named_parameters():
        module, pname = model.from_torch_name(name)
        state = optimizer.state[p]
        assert float(state['step']) == 2 * K
        flip = (lambda a: a.T) if name.endswith(model.TRANSPOSED) else (lambda a: a)  # moments: Haiku's layout
        got = {'exp_avg': flip(ours[f"{adam}.mu['{module}']['{pname}']"]),
               'exp_avg_sq': flip(ours[f"{adam}.nu['{module}']['{pname}']"]), 'weight': ours[f'model.{name}']}
        want = {'exp_avg': state['exp_avg'], 'exp_avg_sq': state['exp_avg_sq'], 'weight': p.detach()}
        for what in got:  # max |difference| relative to the tensor's largest entry
            w = want[what].numpy()
            assert np.abs(w).max() > 0, (what, name)
            worst[what] = max(worst.get(what, 0.0), float(np.abs(got[what] - w).max() / np.abs(w).max()))
    print({k: f'{v:.2e}' for k, v in worst.items()})
    assert worst['exp_avg'] <= 1e-4 and worst['exp_avg_sq'] <= 1e-4 and worst['weight'] <= 1e-5, worst


def test_runtime_requirements_have_no_torch():
    with open(os.path.join(REPO, 'requirements.txt')) as f:
        assert not [line for line in f if line.strip().lower().startswith('torch')]
