"""Llama in and out, and model.py's other options, against code nobody here wrote: transformers'
LlamaForCausalLM (grouped-query attention on), Qwen3ForCausalLM (QK-norm; its norm weights set to
one: RMSNorm without a weight), GPT2LMHeadModel (ReLU²) and MistralForCausalLM (a sliding window:
the rolling KV cache of RoPE past block_size). Random weights of small configs, fp32, no download;
the scripts run in this process (runpy)."""
import os
import runpy
import sys
import threading
from dataclasses import asdict

import numpy as np
import pytest
import jax
import jax.numpy as jnp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import checkpoint  # noqa: E402
import cli  # noqa: E402
import interop  # noqa: E402
import model  # noqa: E402
from model import GPTConfig, gpt_decode, gpt_forward, init_cache, make_generate  # noqa: E402

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

TOL = 1e-4  # max |Δ| of the logits, relative error of each gradient
V, T = 64, 16
SMALL = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=T,
             rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=None, pad_token_id=None,
             attn_implementation='eager')
LLAMA = GPTConfig(vocab_size=V, block_size=T, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                  mlp_hidden=48, bias=False, rope=True, rope_theta=500.0, norm='rmsnorm',
                  activation='swiglu', tie_lm_head=False)
CHARS = sorted(set("First Citizen:\nBefore we proceed any further, hear me speak.\n"))


def randomized(hf, seed, unit_norms=False):
    """hf in eval mode with every weight random: unit-variance Linear outputs, norm weights 1 +
    noise (exactly 1 with unit_norms), so that a misplaced or untransposed weight shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if 'norm' in name:
                p.copy_(torch.ones(p.shape) if unit_norms else 1.0 + 0.1 * noise)
            else:
                p.copy_(noise / p.shape[-1] ** 0.5 if p.dim() == 2 else 0.1 * noise)
    return hf.float().eval()


def llama_grads(config, grads):
    """Our gradients under Llama's names (c_attn split into q_proj, k_proj, v_proj)."""
    sd = model.to_state_dict(grads)
    sd.pop('lm_head.weight', None)  # the tied alias
    return interop.to_llama(config, sd)[1]


def check_against(config, params, hf, softcap=0.0, names=llama_grads, seed=0):
    """Our logits, loss gradients and KV-cache decode against hf's logits (soft-capped here in
    torch when softcap) and gradients: returns the logits' max |Δ|."""
    idx_BT = np.random.default_rng(seed).integers(0, V, (2, config.block_size)).astype(np.int32)
    tgt_BT = np.random.default_rng(seed + 1).integers(0, V, idx_BT.shape).astype(np.int32)
    logits = hf(torch.tensor(idx_BT, dtype=torch.long)).logits
    logits = softcap * torch.tanh(logits / softcap) if softcap else logits
    targets = torch.tensor(tgt_BT, dtype=torch.long).reshape(-1)
    torch.nn.functional.cross_entropy(logits.reshape(-1, V), targets).backward()
    fwd = gpt_forward(config)
    ours_BTV, _ = jax.jit(fwd.apply)(params, None, idx_BT, tgt_BT)
    grads = jax.jit(jax.grad(lambda p: fwd.apply(p, None, idx_BT, tgt_BT)[1]))(params)
    d = float(np.abs(np.asarray(ours_BTV) - logits.detach().numpy()).max())
    assert d <= TOL and np.abs(logits.detach().numpy()).max() > 1.0, d
    theirs = {n: p.grad.numpy() for n, p in hf.named_parameters()}
    for name, g in names(config, grads).items():
        err = np.linalg.norm(g - theirs[name]) / np.linalg.norm(theirs[name])
        assert err <= TOL, (name, err)
    # the KV cache: a prompt of 5, then a token a step, gives the full forward's logits
    decode, cache = jax.jit(gpt_decode(config).apply), init_cache(config, 2)
    for pos, n in [(0, 5)] + [(p, 1) for p in range(5, config.block_size)]:
        logits_BV, cache = decode(params, idx_BT[:, pos:pos + n], cache, pos)
        np.testing.assert_allclose(logits_BV, ours_BTV[:, pos + n - 1], atol=TOL)
    return d


def hf_greedy(hf, ids_BT, new):
    with torch.no_grad():
        return hf.generate(torch.tensor(ids_BT), max_new_tokens=new, do_sample=False,
                           attention_mask=torch.ones(np.shape(ids_BT), dtype=torch.long),
                           eos_token_id=None, pad_token_id=0).numpy()


def our_greedy(config, params, ids_BT, new):
    keys_B = jax.random.split(jax.random.PRNGKey(0), len(ids_BT))
    generate = make_generate(config, new, temperature=0.0)
    return np.asarray(generate(params, jnp.asarray(ids_BT), keys_B)[0])


@pytest.fixture(scope='module')
def hf_llama(tmp_path_factory):
    """LlamaForCausalLM (GQA: 4 query heads, 2 key/value heads; untied; rope_theta 500) and its
    save_pretrained directory."""
    hf = randomized(transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **SMALL, rope_theta=500.0, tie_word_embeddings=False)), seed=0)
    folder = str(tmp_path_factory.mktemp('llama'))
    hf.save_pretrained(folder)
    return hf, folder


def test_llama_dir_logits_gradients_cache_and_greedy_match_hf(hf_llama):
    hf, folder = hf_llama
    config, params = model.from_pretrained(folder)
    assert config == LLAMA
    print(f"\nLlama: logits max|Δ| {check_against(config, params, hf):.2e}")
    ids_BT = np.random.default_rng(7).integers(0, V, (2, 5))
    np.testing.assert_array_equal(our_greedy(config, params, ids_BT, T - 5),
                                  hf_greedy(hf, ids_BT, T - 5))


def test_qk_norm_unit_rmsnorm_tied_softcap_match_qwen3():
    """Qwen3 is Llama with RMSNorm of each head's q and k; its norm weights all one (ours have no
    weight), its embedding tied; soft-capping applied to its logits in torch."""
    hf = randomized(transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        **SMALL, rope_theta=500.0, tie_word_embeddings=True)), seed=1, unit_norms=True)
    config = GPTConfig(**{**asdict(LLAMA), 'norm': 'rmsnorm_noweight', 'qk_norm': True,
                          'tie_lm_head': True, 'softcap': 3.0})
    tensors = {n: p.detach().numpy() for n, p in hf.named_parameters()}
    params = interop.params_from_llama(config, tensors, 'qwen3')
    assert not any('ln_' in m for m in params) and 'transformer/lm_head' not in params
    check_against(config, params, hf, softcap=3.0, seed=2)


def test_relu2_matches_gpt2_relu2():
    from tests import make_reference as ref
    hf = ref.hf_model(V, T, 2, 2, 32, activation='relu2', bias=True, seed=3)
    params = model.from_state_dict(ref.nanogpt_state_dict(hf))
    config = GPTConfig(vocab_size=V, block_size=T, n_layer=2, n_head=2, n_embd=32,
                       activation='relu2')
    gpt2_names = lambda config, g: {  # HF's Conv1D layout, (in, out)
        k: v.T if k.endswith(model.TRANSPOSED) else v
        for k, v in model.to_state_dict(g).items() if k != 'lm_head.weight'}
    check_against(config, params, hf, names=gpt2_names, seed=4)


def test_rope_cache_rolls_past_block_size_as_mistrals_sliding_window():
    """With RoPE, past block_size each new token attends to the block_size tokens before it:
    Mistral's sliding window of block_size, over positions HF's model has room for."""
    hf = randomized(transformers.MistralForCausalLM(transformers.MistralConfig(
        **{**SMALL, 'max_position_embeddings': 64}, sliding_window=8)), seed=5)
    config = GPTConfig(**{**asdict(LLAMA), 'block_size': 8, 'rope_theta': 10000.0})
    tensors = {n: p.detach().numpy() for n, p in hf.named_parameters()}
    params = interop.params_from_llama(config, tensors, 'mistral')
    idx_BT = np.random.default_rng(8).integers(0, V, (2, 32)).astype(np.int32)
    with torch.no_grad():  # HF's full forward, the window a mask
        want_BTV = hf(torch.tensor(idx_BT, dtype=torch.long)).logits.numpy()
    decode, cache = jax.jit(gpt_decode(config).apply), init_cache(config, 2)  # 8 slots
    for pos, n in [(0, 3)] + [(p, 1) for p in range(3, 32)]:
        logits_BV, cache = decode(params, idx_BT[:, pos:pos + n], cache, pos)
        np.testing.assert_allclose(logits_BV, want_BTV[:, pos + n - 1], atol=TOL)
    np.testing.assert_array_equal(our_greedy(config, params, idx_BT[:, :3], 30),
                                  hf_greedy(hf, idx_BT[:, :3], 30))


def run_script(name, *args):
    """A script in this process: (exit status, stdout, stderr) read by capsys after."""
    argv, sys.argv = sys.argv, [name, *args]
    cli._dying = threading.Lock()  # die() prints once per process
    try:
        runpy.run_path(os.path.join(REPO, name), run_name='__main__')
        return 0
    except SystemExit as e:
        return e.code
    finally:
        sys.argv = argv


def save(out, config, params):
    os.makedirs(out)
    checkpoint.save_checkpoint(os.path.join(out, checkpoint.CKPT_NAME),
                               checkpoint.params_to_arrays(params),
                               {'model_args': asdict(config), 'iter_num': 0, 'best_val_loss': 1e9,
                                'config': {}})


def test_config_llama_exports_as_llama_and_samples_as_hf_generates(tmp_path, capsys):
    """config/llama.py's settings make a Llama; export.py --format=hf writes what
    AutoModelForCausalLM loads as LlamaForCausalLM, every weight found; sample.py on that directory
    (its tokenizer.json read by `tokenizers`) prints HF's greedy text."""
    settings = {k: v for k, v in runpy.run_path(os.path.join(REPO, 'config', 'llama.py')).items()
                if not k.startswith('__')}
    config = GPTConfig(**{**settings, 'n_kv_head': 2}, n_layer=2, n_head=4, n_embd=32,
                       block_size=32, vocab_size=len(CHARS))
    assert interop.unsupported(config, 'llama') == []
    leaves, tree = jax.tree.flatten(model.init_params(config, jax.random.PRNGKey(0)))
    rng = np.random.default_rng(9)
    params = jax.tree.unflatten(tree, [rng.normal(0, 0.3, p.shape).astype(np.float32)
                                       for p in leaves])
    save(str(tmp_path / 'out'), config, params)
    hf_dir = str(tmp_path / 'hf')
    assert run_script('export.py', f'--out_dir={tmp_path / "out"}', f'--export_dir={hf_dir}') == 0
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, output_loading_info=True)
    assert type(hf).__name__ == 'LlamaForCausalLM' and not any(info.values()), info

    from tokenizers import Tokenizer, Regex, decoders, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(CHARS)}, unk_token=CHARS[0]))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex('[\\s\\S]'), 'isolated')  # one token a char
    tok.decoder = decoders.Fuse()
    tok.save(os.path.join(hf_dir, 'tokenizer.json'))
    prompt, new = 'First Citizen', 12
    capsys.readouterr()
    assert run_script('sample.py', f'--init_from={hf_dir}', f'--start={prompt}', '--num_samples=1',
                      f'--max_new_tokens={new}', '--temperature=0.0', '--device=cpu',
                      '--dtype=float32') == 0
    out = capsys.readouterr().out.split('\n---------------\n')[0]
    ours = out[out.rindex(prompt):]
    ids = tok.encode(prompt, add_special_tokens=False).ids
    theirs = tok.decode(hf_greedy(hf.eval(), [ids], new)[0].tolist())
    assert ours == theirs and len(set(theirs[len(prompt):])) > 1, (ours, theirs)


@pytest.mark.parametrize('options,named', [
    (dict(activation='relu2'), "activation='relu2'"), (dict(softcap=30.0), 'softcap=30.0'),
    (dict(qk_norm=True), 'qk_norm=True'),
    (dict(norm='rmsnorm_noweight'), "norm='rmsnorm_noweight'"),
    (dict(norm='layernorm', activation='gelu'), "norm='layernorm'")])  # a mix of the two
def test_hf_export_refuses_what_transformers_cannot_hold(options, named):
    meta = {'model_args': {**asdict(LLAMA), **options}}
    with pytest.raises(ValueError) as e:
        interop.to_hf({}, meta)
    assert named in str(e.value) and '\n' not in str(e.value), e.value


def test_export_refusals_are_one_line(tmp_path, capsys):
    gpt = GPTConfig(vocab_size=V, block_size=T, n_layer=1, n_head=2, n_embd=16)
    for option, fmt, named in [(dict(rope=True), 'nanogpt', 'rope=True'),
                               (dict(n_kv_head=1), 'nanogpt', 'n_kv_head=1'),
                               (dict(softcap=5.0), 'hf', 'softcap=5.0')]:
        config = GPTConfig(**{**asdict(gpt), **option})
        out = str(tmp_path / f'{fmt}{named}')
        save(out, config, model.init_params(config, jax.random.PRNGKey(0)))
        capsys.readouterr()
        rc = run_script('export.py', f'--out_dir={out}', f'--format={fmt}', f'--export_dir={out}x')
        assert rc == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f'error: format={fmt}') and named in err[0], err
        assert not os.path.exists(f'{out}x')


def test_tied_llama_exports_without_an_lm_head(tmp_path):
    config = GPTConfig(**{**asdict(LLAMA), 'tie_lm_head': True})
    params = model.init_params(config, jax.random.PRNGKey(1))
    json_config, tensors = interop.to_hf(checkpoint.params_to_arrays(params),
                                         {'model_args': asdict(config)})
    assert json_config['tie_word_embeddings'] and 'lm_head.weight' not in tensors
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{
        k: v for k, v in json_config.items() if k not in ('architectures', 'model_type')}))
    missing, unexpected = hf.load_state_dict({k: torch.tensor(v) for k, v in tensors.items()},
                                             strict=False)
    assert missing in ([], ['lm_head.weight']) and not unexpected  # lm_head is embed_tokens


def test_published_llama_shapes_count_as_transformers():
    """Llama 3.2 1B (tied head, 8 key/value heads) and Llama 2 7B as GPTConfigs: their parameter
    counts are transformers' LlamaForCausalLM's of the same configs (the memory rows' models)."""
    llama = dict(block_size=2048, bias=False, rope=True, norm='rmsnorm', activation='swiglu')
    for kw, count in ((dict(n_layer=16, n_head=32, n_embd=2048, n_kv_head=8, mlp_hidden=8192,
                            vocab_size=128256), 1_235_814_400),
                      (dict(n_layer=32, n_head=32, n_embd=4096, mlp_hidden=11008, vocab_size=32000,
                            tie_lm_head=False), 6_738_415_616)):
        config = model.GPTConfig(**llama, **kw)
        assert model.get_num_params(model.param_shapes(config)) == count, kw
