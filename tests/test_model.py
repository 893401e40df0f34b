"""Parity suite for model.py: our Haiku GPT against Hugging Face's GPT2LMHeadModel (torch, random
weights from a small GPT2Config, no download) and against nanoGPT's formulas.

Live tests need torch + transformers (pytest.importorskip); test_matches_hf_fixture always runs and
compares against tests/fixtures/hf_gpt2_tiny.npz, written by tests/make_reference.py with HF.
Measured maxima are printed: run `pytest -v -s tests/test_model.py` to see them."""
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import jax
import jax.numpy as jnp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import backends  # noqa: E402
import model  # noqa: E402
from model import GPTConfig, gpt_forward, gpt_decode, init_cache, init_params  # noqa: E402

FIXTURE = os.path.join(REPO, 'tests', 'fixtures', 'hf_gpt2_tiny.npz')
LOGITS_TOL = 1e-4  # max |Δ| of fp32 logits (issue 2)
GRAD_RTOL = 1e-4  # relative error of every gradient (issue 2)

TINY = dict(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)


def hf():
    """The live reference: skip when torch / transformers are not installed."""
    pytest.importorskip('torch')
    pytest.importorskip('transformers')
    from tests import make_reference
    return make_reference


_JITTED = {}  # one jit'd function per (kind, config), so tests sharing a model and shapes compile once


def forward_fn(config):
    """jit'd (params, idx_BT, targets_BT) -> (logits, loss), eval mode."""
    key = ('forward', repr(config))
    if key not in _JITTED:
        fwd = gpt_forward(config)
        _JITTED[key] = jax.jit(lambda params, idx_BT, targets_BT=None: fwd.apply(params, None, idx_BT, targets_BT))
    return _JITTED[key]


def full_logits(config, params, idx_BT):
    """Logits at every position (targets make the forward keep all T; their values do not matter)."""
    return forward_fn(config)(params, jnp.asarray(idx_BT), jnp.zeros(idx_BT.shape, jnp.int32))[0]


def max_abs(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def rel_err(a, b):
    """||a - b|| / ||b||, b the reference."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def grads_as_state_dict(config, params, idx_BT, targets_BT):
    """Our loss and d loss / d params, keyed by nanoGPT state_dict name in nanoGPT's (torch) layout."""
    key = ('grad', repr(config))
    if key not in _JITTED:
        fwd = gpt_forward(config)
        _JITTED[key] = jax.jit(jax.value_and_grad(lambda p, idx, tgt: fwd.apply(p, None, idx, tgt)[1]))
    loss, g = _JITTED[key](params, idx_BT, targets_BT)
    sd = model.to_state_dict(g)
    del sd['lm_head.weight']  # to_state_dict's alias of the one tied wte
    return float(loss), sd


def check_grads(ours, ref, label):
    """Every reference gradient has ours with relative error <= GRAD_RTOL; nothing extra, nothing missing."""
    assert set(ours) == set(ref), f"{label}: parameter names differ: {set(ours) ^ set(ref)}"
    errs = {name: rel_err(ours[name], ref[name]) for name in ref}
    worst = max(errs, key=errs.get)
    print(f"\n{label}: {len(errs)} gradients, max relative error {errs[worst]:.2e} ({worst})")
    bad = {k: v for k, v in errs.items() if not v <= GRAD_RTOL}
    assert not bad, f"{label}: gradients off by more than {GRAD_RTOL}: {bad}"


# -----------------------------------------------------------------------------
# the committed fixture: runs with or without torch

@pytest.mark.parametrize('case', ['gelu_new_bias', 'gelu_nobias'])
def test_matches_hf_fixture(case):
    """Logits, loss (with ignore_index -1) and every gradient equal HF's, stored by make_reference.py."""
    f = np.load(FIXTURE)
    dims = json.loads(str(f[f'{case}/config']))
    config = GPTConfig(**dims)
    sd = {k.split('/sd/', 1)[1]: f[k] for k in f.files if k.startswith(f'{case}/sd/')}
    ref_grads = {k.split('/grad/', 1)[1]: f[k] for k in f.files if k.startswith(f'{case}/grad/')}
    params = model.from_state_dict(sd)
    idx_BT, targets_BT = jnp.asarray(f[f'{case}/idx']), jnp.asarray(f[f'{case}/targets'])
    logits_BTV, loss = forward_fn(config)(params, idx_BT, targets_BT)
    d_logits = max_abs(logits_BTV, f[f'{case}/logits'])
    d_loss = abs(float(loss) - float(f[f'{case}/loss']))
    print(f"\nfixture {case}: logits max|Δ| {d_logits:.2e}, loss |Δ| {d_loss:.2e}")
    assert d_logits <= LOGITS_TOL, f"fixture {case}: logits max|Δ| {d_logits:.2e} > {LOGITS_TOL}"
    assert d_loss <= 1e-5, f"fixture {case}: loss |Δ| {d_loss:.2e}"
    _, ours = grads_as_state_dict(config, params, idx_BT, targets_BT)
    check_grads(ours, ref_grads, f"fixture {case}")


# -----------------------------------------------------------------------------
# live parity against HF GPT2LMHeadModel

@pytest.mark.parametrize('activation', ['gelu_new', 'gelu'])
@pytest.mark.parametrize('bias', [True, False])
def test_logits_match_hf(activation, bias):
    """fp32 logits max|Δ| <= 1e-4 at T=1, a middle T and T=block_size, for each activation and bias.
    bias=False: HF has no bias-free GPT-2, so its biases are all set to zero (make_reference.hf_model);
    adding 0.0 is exact, so that HF model is the bias-free function our bias=False model must equal."""
    ref = hf()
    import torch
    config = GPTConfig(**TINY, activation=activation, bias=bias)
    hf_model = ref.hf_model(**TINY, activation=activation, bias=bias, seed=10 + 2 * bias + (activation == 'gelu'))
    params = model.from_state_dict(ref.nanogpt_state_dict(hf_model, bias))
    rng = np.random.default_rng(0)
    results = {}
    for B, T in [(1, 1), (3, 7), (2, config.block_size)]:
        idx_BT = rng.integers(0, config.vocab_size, size=(B, T)).astype(np.int32)
        with torch.no_grad():
            hf_BTV = hf_model(torch.as_tensor(idx_BT, dtype=torch.long)).logits.numpy()
        results[(B, T)] = max_abs(full_logits(config, params, idx_BT), hf_BTV)
    msg = f"{activation}, bias={bias}: logits max|Δ| by (B, T): " + ', '.join(
        f"{bt}: {d:.2e}" for bt, d in results.items())
    print('\n' + msg)
    assert max(results.values()) <= LOGITS_TOL, msg


def test_loss_and_every_gradient_match_hf():
    """Loss with ignore_index -1 equals F.cross_entropy on HF's logits, and the gradient of every
    parameter matches HF's; our single wte gets the sum of its token-embedding and lm_head gradients.
    (bias=False gradients: test_matches_hf_fixture's gelu_nobias case; one grad compile less here.)"""
    ref = hf()
    bias = True
    config = GPTConfig(**TINY, activation='gelu_new', bias=bias)
    # untied copy: lm_head has its own tensor, so the two halves of the tied gradient come out separately
    hf_model = ref.hf_model(**TINY, activation='gelu_new', bias=bias, seed=20 + bias, untie=True)
    sd = ref.nanogpt_state_dict(hf_model, bias)
    np.testing.assert_array_equal(sd['lm_head.weight'], sd['transformer.wte.weight'])
    params = model.from_state_dict(sd)
    # B=2, T=16: the fixture test's shapes and model, so the gradient compiles once for both
    idx_BT, targets_BT = ref.make_inputs(config.vocab_size, 2, config.block_size, seed=5)
    assert (targets_BT == -1).any()
    _, hf_loss = ref.logits_and_loss(hf_model, idx_BT, targets_BT)
    hf_loss.backward()
    hf_grads = ref.nanogpt_grads(hf_model, bias)
    g_emb, g_head = hf_grads.pop('transformer.wte.weight'), hf_grads.pop('lm_head.weight')
    hf_grads['transformer.wte.weight'] = g_emb + g_head
    # both halves matter: a model that dropped either one would miss the tolerance by far
    assert min(rel_err(g_emb, g_emb + g_head), rel_err(g_head, g_emb + g_head)) > 100 * GRAD_RTOL

    loss, ours = grads_as_state_dict(config, params, jnp.asarray(idx_BT), jnp.asarray(targets_BT))
    d_loss = abs(loss - hf_loss.item())
    print(f"\nbias={bias}: loss {loss:.6f} vs torch {hf_loss.item():.6f}, |Δ| {d_loss:.2e}")
    assert d_loss <= 1e-5, f"loss |Δ| {d_loss:.2e}"
    check_grads(ours, hf_grads, f"bias={bias}")


def test_blocked_attention_past_128_tokens_matches_hf(monkeypatch):
    """On the CPU, attention runs backends.blocked_causal_attention (backends.ATTENTION_BLOCK queries at a
    time, the all-masked keys skipped, the backward written by hand). At T=300, two full blocks and a partial one,
    the logits, the loss and every gradient still match HF's eager (T, T) attention (shorter sequences,
    one block, are checked by the parity tests above)."""
    if not backends.on_cpu():
        pytest.skip("blocked_causal_attention is the CPU's path")
    ref = hf()
    blocks = []
    real = backends.blocked_causal_attention
    monkeypatch.setattr(backends, 'blocked_causal_attention', lambda *a: blocks.append(a[0].shape) or real(*a))
    dims = dict(TINY, block_size=300)
    config = GPTConfig(**dims, activation='gelu_new')
    hf_model = ref.hf_model(**dims, activation='gelu_new', seed=30, untie=True)
    params = model.from_state_dict(ref.nanogpt_state_dict(hf_model))
    idx_BT, targets_BT = ref.make_inputs(config.vocab_size, 2, config.block_size, seed=6)
    hf_logits, hf_loss = ref.logits_and_loss(hf_model, idx_BT, targets_BT)
    hf_loss.backward()
    hf_grads = ref.nanogpt_grads(hf_model)
    hf_grads['transformer.wte.weight'] = hf_grads['transformer.wte.weight'] + hf_grads.pop('lm_head.weight')

    d_logits = max_abs(full_logits(config, params, idx_BT), hf_logits.detach().numpy())
    loss, ours = grads_as_state_dict(config, params, jnp.asarray(idx_BT), jnp.asarray(targets_BT))
    assert blocks and all(shape[1] == 300 for shape in blocks), f"blocked path not taken: {blocks}"
    print(f"\nT=300, blocks of {backends.ATTENTION_BLOCK}: logits max|Δ| {d_logits:.2e}, "
          f"loss |Δ| {abs(loss - hf_loss.item()):.2e}")
    assert d_logits <= LOGITS_TOL, f"logits max|Δ| {d_logits:.2e}"
    assert abs(loss - hf_loss.item()) <= 1e-5
    check_grads(ours, hf_grads, "T=300")


def rbg_key(seed):
    """A dropout key of the 'rbg' kind: with threefry keys XLA's CPU compiler spends ~10 s on each
    dropout model here, and which bit generator feeds hk.dropout does not matter to these tests."""
    return jax.random.key(seed, impl='rbg')


def fixture_model(case='gelu_new_bias', **overrides):
    """(config, params) of an HF-made fixture model: unit-scale weights, no torch needed."""
    f = np.load(FIXTURE)
    config = GPTConfig(**{**json.loads(str(f[f'{case}/config'])), **overrides})
    sd = {k.split('/sd/', 1)[1]: f[k] for k in f.files if k.startswith(f'{case}/sd/')}
    return config, model.from_state_dict(sd), sd


def test_from_pretrained_local_dir_matches_hf(tmp_path):
    """from_pretrained(<save_pretrained dir>) reads config.json + model.safetensors into the same
    function HF computes; the activation follows the checkpoint's activation_function."""
    ref = hf()
    import torch
    hf_model = ref.hf_model(**TINY, activation='gelu_new', seed=30)
    hf_model.save_pretrained(tmp_path / 'gpt2_new')
    assert (tmp_path / 'gpt2_new' / 'model.safetensors').exists()
    config, params = model.from_pretrained(str(tmp_path / 'gpt2_new'))
    assert (config.n_layer, config.n_head, config.n_embd, config.vocab_size, config.block_size) == (2, 2, 32, 64, 16)
    assert config.bias and config.activation == 'gelu_new' and config.dropout == 0.0
    idx_BT = np.random.default_rng(1).integers(0, 64, size=(2, 16)).astype(np.int32)
    with torch.no_grad():
        hf_BTV = hf_model(torch.as_tensor(idx_BT, dtype=torch.long)).logits.numpy()
    d = max_abs(full_logits(config, params, idx_BT), hf_BTV)
    print(f"\nfrom_pretrained(save_pretrained dir): logits max|Δ| {d:.2e}")
    assert d <= LOGITS_TOL, f"from_pretrained logits max|Δ| {d:.2e} > {LOGITS_TOL}"


    # the hub's own gpt2 files name tensors without 'transformer.' and keep the causal-mask buffers
    from safetensors.numpy import load_file, save_file
    hub = tmp_path / 'hub_layout'
    hub.mkdir()
    (hub / 'config.json').write_text((tmp_path / 'gpt2_new' / 'config.json').read_text())
    tensors = {k.removeprefix('transformer.'): v
               for k, v in load_file(tmp_path / 'gpt2_new' / 'model.safetensors').items()}
    for i in range(config.n_layer):
        tensors[f'h.{i}.attn.bias'] = np.tril(np.ones((1, 1, 16, 16), np.float32))
        tensors[f'h.{i}.attn.masked_bias'] = np.array(-1e4, np.float32)
    save_file(tensors, hub / 'model.safetensors')
    hub_params = model.from_pretrained(str(hub))[1]
    assert jax.tree.structure(hub_params) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(hub_params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)

    ref.hf_model(**TINY, activation='gelu', seed=31).save_pretrained(tmp_path / 'gpt2_exact')
    assert model.from_pretrained(str(tmp_path / 'gpt2_exact'))[0].activation == 'gelu'


def test_from_pretrained_overrides_dropout_only(tmp_path):
    ref = hf()
    ref.hf_model(**TINY, seed=32).save_pretrained(tmp_path)
    config, _ = model.from_pretrained(str(tmp_path), override_args=dict(dropout=0.1))
    assert config.dropout == 0.1
    with pytest.raises(ValueError, match='only dropout'):
        model.from_pretrained(str(tmp_path), override_args=dict(dropout=0.1, n_layer=3))


def test_from_pretrained_bad_path_is_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match='config.json'):
        model.from_pretrained(str(tmp_path))  # an existing directory without the files
    with pytest.raises(ValueError, match='unknown pretrained model'):
        model.from_pretrained(str(tmp_path / 'missing'))


def test_state_dict_round_trip_and_names():
    """to_state_dict gives exactly HF/nanoGPT's names and (out, in) layout, lm_head tied; from_state_dict
    inverts it, also with torch.compile's '_orig_mod.' prefix and nanoGPT's attn.bias mask buffers."""
    config, params, sd = fixture_model()
    # the loaded tree is exactly the model's own: one wte (no separate lm_head), same paths and shapes
    assert jax.tree.map(np.shape, params) == jax.tree.map(lambda s: s.shape, model.param_shapes(config))
    back = model.to_state_dict(params)
    assert set(back) == set(sd)  # the fixture's keys are HF's state_dict names
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
    compiled = {'_orig_mod.' + k: v for k, v in back.items()}
    compiled['_orig_mod.transformer.h.0.attn.bias'] = np.tril(np.ones((1, 1, 16, 16), np.float32))
    for restored in (model.from_state_dict(back), model.from_state_dict(compiled)):
        assert jax.tree.structure(restored) == jax.tree.structure(params)
        for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params)):
            np.testing.assert_array_equal(a, b)


def test_init_std_follows_nanogpt_scheme():
    """N(0, 0.02) for Linear/Embedding weights, N(0, 0.02/sqrt(2*n_layer)) for every c_proj weight,
    zero biases, LayerNorm weights one: each tensor's std within 6 standard errors of the target."""
    config = GPTConfig(vocab_size=512, block_size=64, n_layer=3, n_head=4, n_embd=128)
    params = jax.jit(lambda rng: init_params(config, rng))(jax.random.PRNGKey(0))
    proj_std = 0.02 / math.sqrt(2 * config.n_layer)
    checked = {'weight std': 0, 'c_proj std': 0, 'zero bias': 0, 'ln ones': 0}
    worst = 0.0
    for key, a in model.to_state_dict(params).items():
        a = np.asarray(a, np.float64)
        if key == 'lm_head.weight':
            continue
        if key.endswith('.bias'):
            assert not a.any(), key
            checked['zero bias'] += 1
        elif 'ln_' in key:
            assert (a == 1).all(), key
            checked['ln ones'] += 1
        else:
            target = proj_std if key.endswith('c_proj.weight') else 0.02
            checked['c_proj std' if key.endswith('c_proj.weight') else 'weight std'] += 1
            n = a.size
            # standard errors of a normal sample's std and mean
            z_std = abs(a.std() / target - 1) / (1 / math.sqrt(2 * n))
            z_mean = abs(a.mean()) / (target / math.sqrt(n))
            worst = max(worst, z_std, z_mean)
            assert z_std < 6 and z_mean < 6, f"{key}: std {a.std():.5f} vs {target:.5f}, mean {a.mean():.2e}"
    print(f"\ninit: tensors checked {checked}, worst deviation {worst:.1f} standard errors")
    assert checked == {'weight std': 2 + 2 * config.n_layer, 'c_proj std': 2 * config.n_layer,
                       'zero bias': 6 * config.n_layer + 1, 'ln ones': 2 * config.n_layer + 1}


def test_get_num_params_gpt2_from_shapes():
    """GPT-2 124M from shapes only (nothing allocated): 124,439,808 parameters in all (wte counted once,
    it is the lm_head too); nanoGPT's default count leaves out wpe and prints 123.65M."""
    shapes = model.param_shapes(GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768))
    assert all(isinstance(s, jax.ShapeDtypeStruct) for s in jax.tree.leaves(shapes))
    total, non_emb = model.get_num_params(shapes, non_embedding=False), model.get_num_params(shapes)
    print(f"\ngpt2: {total:,} parameters, number of parameters: {non_emb / 1e6:.2f}M")
    assert total == 124_439_808
    assert non_emb == 124_439_808 - 1024 * 768 and f"{non_emb / 1e6:.2f}M" == "123.65M"


def test_crop_block_size():
    """wpe keeps its first rows, and on inputs that fit, the cropped model computes the same logits."""
    config, params, _ = fixture_model()
    cropped, small = model.crop_block_size(params, config, 8)
    assert small.block_size == 8 and config.block_size == 16
    np.testing.assert_array_equal(cropped['transformer/wpe']['weight'], params['transformer/wpe']['weight'][:8])
    assert params['transformer/wpe']['weight'].shape == (16, config.n_embd)  # the input is untouched
    idx_BT = np.random.default_rng(2).integers(0, config.vocab_size, size=(2, 8)).astype(np.int32)
    d = max_abs(full_logits(small, cropped, idx_BT), full_logits(config, params, idx_BT))
    assert d == 0.0, f"cropped vs uncropped logits max|Δ| {d:.2e}"
    with pytest.raises(ValueError, match='block size is only 8'):
        forward_fn(small)(cropped, jnp.zeros((1, 9), jnp.int32))
    with pytest.raises(ValueError):
        model.crop_block_size(params, config, 32)


def test_no_targets_gives_last_position_logits_only():
    config, params, _ = fixture_model()
    idx_BT = np.random.default_rng(3).integers(0, config.vocab_size, size=(2, 16)).astype(np.int32)
    logits_B1V, loss = forward_fn(config)(params, jnp.asarray(idx_BT))
    assert loss is None and logits_B1V.shape == (2, 1, config.vocab_size)
    d = max_abs(logits_B1V, full_logits(config, params, idx_BT)[:, -1:])
    assert d <= 1e-5, f"last-position logits max|Δ| {d:.2e}"


def test_kv_cache_decode_equals_full_forward():
    """gpt_decode over a prompt, a chunk and then one token at a time up to block_size gives the
    full forward's logits at each fed position."""
    config, params, _ = fixture_model()
    B = 2
    idx_BT = np.random.default_rng(4).integers(0, config.vocab_size, size=(B, config.block_size)).astype(np.int32)
    full_BTV = np.asarray(full_logits(config, params, idx_BT))
    decode = jax.jit(gpt_decode(config).apply)
    cache = init_cache(config, B)
    pos, worst = 0, 0.0
    for T in [5, 3] + [1] * (config.block_size - 8):
        logits_BV, cache = decode(params, jnp.asarray(idx_BT[:, pos:pos + T]), cache, pos)
        pos += T
        worst = max(worst, max_abs(logits_BV, full_BTV[:, pos - 1]))
    assert pos == config.block_size
    print(f"\nKV-cache decode vs full forward: logits max|Δ| {worst:.2e}")
    assert worst <= LOGITS_TOL, f"KV-cache decode vs full forward: max|Δ| {worst:.2e}"


def test_dropout_only_in_training_with_explicit_key():
    # the 1-layer fixture model: fewer dropout sites, so a cheaper compile of the training forward
    config, params, _ = fixture_model('gelu_nobias', dropout=0.2)
    fwd = gpt_forward(config)
    train = jax.jit(lambda p, rng, idx: fwd.apply(p, rng, idx, idx, is_training=True)[0])
    idx_BT = jnp.asarray(np.random.default_rng(5).integers(0, config.vocab_size, size=(2, 16)), jnp.int32)
    k1, k2 = rbg_key(1), rbg_key(2)
    a, b, c = train(params, k1, idx_BT), train(params, k1, idx_BT), train(params, k2, idx_BT)
    np.testing.assert_array_equal(a, b)  # deterministic for a key
    assert max_abs(a, c) > 1e-2  # another key drops other units
    eval_logits = full_logits(config, params, idx_BT)  # is_training=False, rng None: no dropout
    no_dropout = full_logits(GPTConfig(**{**config.__dict__, 'dropout': 0.0}), params, idx_BT)
    np.testing.assert_array_equal(eval_logits, no_dropout)
    assert max_abs(a, eval_logits) > 1e-2
    with pytest.raises(ValueError):  # training with dropout needs an explicit key
        fwd.apply(params, None, idx_BT, idx_BT, is_training=True)


def test_training_attention_path_equals_fused():
    """Training with dropout takes an explicit masked-softmax attention (the fused kernel has no
    dropout); at a vanishing rate nothing is dropped and it must compute what the fused path does."""
    config, params, _ = fixture_model(dropout=1e-7)
    fwd = gpt_forward(config)
    idx_BT = jnp.asarray(np.random.default_rng(6).integers(0, config.vocab_size, size=(2, 16)), jnp.int32)
    train = jax.jit(lambda p, rng, idx: fwd.apply(p, rng, idx, idx, is_training=True)[0])(
        params, rbg_key(0), idx_BT)
    d = max_abs(train, full_logits(config, params, idx_BT))
    print(f"\nexplicit (training) vs fused attention: logits max|Δ| {d:.2e}")
    assert d <= LOGITS_TOL, f"training attention path max|Δ| {d:.2e}"


@pytest.mark.parametrize('product', ['matmul', 'lm_head'])
def test_cpu_products_have_autodiffs_gradients(product):
    """backends.matmul (a Linear's x @ w) and backends.lm_head (x @ wte^T), custom VJPs on the CPU, have
    autodiff's gradients for x and w, with leading dims, jitted as in the training step."""
    fn = getattr(backends, product)
    plain_fn = (lambda x, w: x @ w) if product == 'matmul' else (lambda x, w: x @ w.T)
    kx, kw, kg = jax.random.split(jax.random.PRNGKey(0), 3)
    x_BTI = jax.random.normal(kx, (3, 5, 8))
    w = jax.random.normal(kw, (8, 6) if product == 'matmul' else (6, 8))
    g_BTO = jax.random.normal(kg, (3, 5, 6))
    ours = jax.jit(lambda x, w, g: jax.vjp(fn, x, w)[1](g))(x_BTI, w, g_BTO)
    plain = jax.vjp(plain_fn, x_BTI, w)[1](g_BTO)
    for a, b in zip(ours, plain):
        assert a.shape == b.shape
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(fn(x_BTI, w)), np.asarray(plain_fn(x_BTI, w)))


def test_matmul_weight_gradient_is_a_plain_product_on_cpu():
    """backends.matmul's weight gradient reaches XLA:CPU as a plain (I, M) x (M, O) dot, the form it hands to
    YNNPACK: no dot of the compiled gradient contracts its left operand's first dim. lm_head's g^T x does
    (the check can tell them apart)."""
    if not backends.on_cpu():
        pytest.skip("a CPU layout choice")
    x_BTI, w_IO, g_BTO = jnp.ones((2, 64, 128)), jnp.ones((128, 512)), jnp.ones((2, 64, 512))

    def lhs_row_contractions(fn, w):
        hlo = jax.jit(lambda x, w, g: jax.vjp(fn, x, w)[1](g)).lower(x_BTI, w, g_BTO).compile().as_text()
        dims = re.findall(r' dot\([^\n]*?lhs_contracting_dims=\{(\d)\}', hlo)
        assert len(dims) == 2, hlo  # the input gradient's dot and the weight gradient's
        return dims.count('0')

    assert lhs_row_contractions(backends.matmul, w_IO) == 0
    assert lhs_row_contractions(backends.lm_head, w_IO.T) == 1


def test_residual_gradient_is_exact_whatever_the_stream_holds():
    """backends.residual is x, and on the CPU its gradient is the incoming one bit for bit (divided by an
    exact 1 to be written out), also where the stream holds NaN or infinity (a 1 made as x * 0 + 1 would turn
    those gradients into NaN)."""
    g = jnp.asarray([1.5, -0.0, 3e-38, -7.25, np.inf, np.nan, 2.0], jnp.float32)
    x = jnp.asarray([0.3, np.nan, np.inf, -np.inf, 1.0, 2.0, -0.0], jnp.float32)
    for dtype in (jnp.float32, jnp.bfloat16):
        y, vjp = jax.vjp(backends.residual, x.astype(dtype))
        np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(x.astype(dtype), np.float32))
        got = jax.jit(vjp)(g.astype(dtype))[0]
        assert got.dtype == dtype
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(g.astype(dtype), np.float32))


def compiled_loss_grad(config, params, idx_BT):
    """The training loss's value_and_grad, compiled (on the CPU with the memory-optimized scheduler that
    train.py's remat compiles with: the default one runs the recomputation early and saves nothing), and
    XLA's temp estimate."""
    from training import CPU_REMAT_OPTIONS
    fwd = gpt_forward(config)
    loss_grad = jax.value_and_grad(lambda p, idx, tgt: fwd.apply(p, None, idx, tgt, is_training=True)[1])
    options = CPU_REMAT_OPTIONS if jax.default_backend() == 'cpu' else {}
    compiled = jax.jit(loss_grad).lower(params, idx_BT, idx_BT).compile(compiler_options=options)
    return compiled, compiled.memory_analysis().temp_size_in_bytes


def test_remat_gives_the_same_gradients_in_less_temp_memory():
    """remat=True recomputes each block in the backward: the same parameters (names and shapes), the same loss
    and gradients, and a lower temp-memory estimate from XLA. The config makes the blocks' activations (the
    (T, T) attention probabilities above all) the bulk of the memory, as in a real model."""
    config = GPTConfig(vocab_size=64, block_size=256, n_layer=4, n_head=8, n_embd=64, remat=False)
    remat_config = GPTConfig(**{**config.__dict__, 'remat': True})
    params = init_params(config, jax.random.PRNGKey(0))
    assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, init_params(remat_config, jax.random.PRNGKey(0)))
    idx_BT = jnp.asarray(np.random.default_rng(7).integers(0, config.vocab_size, size=(4, 256)), jnp.int32)
    (plain, plain_temp), (remat, remat_temp) = (compiled_loss_grad(c, params, idx_BT) for c in (config, remat_config))
    (loss, grads), (remat_loss, remat_grads) = plain(params, idx_BT, idx_BT), remat(params, idx_BT, idx_BT)
    np.testing.assert_allclose(float(remat_loss), float(loss), rtol=1e-6)
    assert jax.tree.structure(remat_grads) == jax.tree.structure(grads)
    for a, b in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    print(f"\nremat: XLA temp estimate {remat_temp / 2**20:.1f} MiB vs {plain_temp / 2**20:.1f} MiB without "
          f"({remat_temp / plain_temp:.2f}x)")
    assert remat_temp < 0.8 * plain_temp, f"remat {remat_temp} bytes vs {plain_temp} without"


def test_import_model_does_not_import_torch():
    code = "import sys, model; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == '[]', f"import model pulled in {out.stdout.strip()}"


def test_estimate_mfu_is_nanogpts_formula():
    """PaLM appendix B as nanoGPT: 6N + 12*L*H*Q*T flops per token, T tokens per fwd/bwd, over A100 peak."""
    config = GPTConfig()
    N = model.get_num_params(model.param_shapes(config))
    flops_per_iter = (6 * N + 12 * 12 * 12 * 64 * 1024) * 1024 * 40
    assert model.estimate_mfu(config, N, fwdbwd_per_iter=40, dt=2.5) == pytest.approx(flops_per_iter / 2.5 / 312e12)
    assert model.estimate_mfu(config, N, 40, 2.5, peak_flops=989e12) == pytest.approx(flops_per_iter / 2.5 / 989e12)


# -----------------------------------------------------------------------------
# shapes checked at trace time: conftest installs jaxtyping's import hook (beartype) for model.py

def wrong_shape(call):
    """The one-paragraph error a wrong shape gets, as jaxtyping words it."""
    import jaxtyping
    with pytest.raises(jaxtyping.TypeCheckError) as info:
        call()
    return str(info.value)


def test_targets_of_another_length_name_the_argument_and_dimension():
    config, params, _ = fixture_model()
    idx_BT, targets_BT = np.zeros((2, 8), np.int32), np.zeros((2, 7), np.int32)
    msg = wrong_shape(lambda: jax.jit(gpt_forward(config).apply)(params, None, idx_BT, targets_BT))
    assert "parameter 'targets_BT'" in msg and "'B T'" in msg and 'T=8' in msg, msg


def test_one_dimensional_prompt_names_the_argument_and_dimension():
    config, params, _ = fixture_model()
    keys_B = jax.random.PRNGKey(0)[None]
    msg = wrong_shape(lambda: model.make_generate(config, 3)(params, np.arange(5, dtype=np.int32), keys_B))
    assert "parameter 'idx_BT'" in msg and "'B T'" in msg and 'i32[5]' in msg, msg


def test_cache_of_another_batch_size_names_the_argument_and_dimension():
    config, params, _ = fixture_model()
    idx_BT = jnp.zeros((2, 1), jnp.int32)
    msg = wrong_shape(lambda: jax.jit(gpt_decode(config).apply)(params, idx_BT, init_cache(config, 3), 0))
    assert "parameter 'cache'" in msg and "'B G D S'" in msg and 'B=2' in msg, msg
    logits_BV, _ = jax.jit(gpt_decode(config).apply)(params, idx_BT, init_cache(config, 2), 0)  # the right one runs
    assert logits_BV.shape == (2, config.vocab_size)
