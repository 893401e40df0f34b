"""sample.py: the KV-cache decoder must pick exactly the tokens nanoGPT's generate picks (a full
recompute over the cropped context, written out here), match Hugging Face's GPT-2 generate, keep
nanoGPT's temperature/top-k rule, and answer a user's mistakes with one clear line."""
import json
import os
import re
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
from model import GPTConfig, gpt_forward, init_params, from_pretrained  # noqa: E402
from model import make_generate, crop_top_k, sample_next, top_p_filter  # noqa: E402

TIKTOKEN_CACHE = os.path.abspath(os.path.join(REPO, '..', 'shared', 'tiktoken_cache'))
TINY = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=8, vocab_size=50)  # few context lengths to compile


def tiny_params(config=TINY, seed=0):
    params = init_params(config, jax.random.PRNGKey(seed))
    # nanoGPT's init gives logits within ~0.1 of each other; spread them so that float rounding
    # between two correct implementations cannot flip a greedy argmax
    params['transformer/wte']['weight'] = params['transformer/wte']['weight'] * 20.0
    return params


def row_keys(seed, B):
    """One key per row, as sample.py makes them: row k draws with fold_in(PRNGKey(seed), k)."""
    return jax.vmap(jax.random.fold_in, (None, 0))(jax.random.PRNGKey(seed), jnp.arange(B))


_forwards = {}


def _jit_forward(config):
    # one jitted function per config, compiled once for the whole module; logits at every position
    if str(config) not in _forwards:
        _forwards[str(config)] = jax.jit(lambda p, idx: gpt_forward(config).apply(p, None, idx, idx)[0])
    return _forwards[str(config)]


def full_recompute_greedy(params, config, idx_BT, max_new_tokens):
    """nanoGPT's GPT.generate with greedy picks: crop to the last block_size tokens, run the whole
    context through the model, take the argmax at the last position, append, repeat."""
    forward = _jit_forward(config)
    idx = np.asarray(idx_BT)
    for _ in range(max_new_tokens):
        idx_cond = idx if idx.shape[1] <= config.block_size else idx[:, -config.block_size:]
        T = idx_cond.shape[1]  # padded on the right to block_size: one compile; causal, so unseen
        padded = np.pad(idx_cond, ((0, 0), (0, config.block_size - T)))
        logits_BV = np.asarray(forward(params, padded))[:, T - 1, :]
        idx = np.concatenate([idx, logits_BV.argmax(-1)[:, None]], axis=1)
    return idx


# (prompt length, new tokens) with block_size 8: all in the cache; in the cache, then past
# block_size; a prompt of exactly block_size; a prompt longer than block_size
@pytest.mark.parametrize('T,new', [(2, 4), (3, 20), (8, 4), (11, 5)])
def test_greedy_kv_cache_matches_full_recompute(T, new):
    params = tiny_params()
    idx_BT = jax.random.randint(jax.random.PRNGKey(T), (2, T), 0, TINY.vocab_size, dtype=jnp.int32)
    want = full_recompute_greedy(params, TINY, idx_BT, new)
    got, made = make_generate(TINY, new, temperature=0.0)(params, idx_BT, row_keys(0, 2))
    np.testing.assert_array_equal(got, want)
    assert int(made) == new
    if T == 3:  # top_k=1 at temperature 1 is greedy too, through the sampling path
        got_k1 = make_generate(TINY, new, temperature=1.0, top_k=1)(params, idx_BT, row_keys(5, 2))[0]
        np.testing.assert_array_equal(np.asarray(got_k1), want)


def test_seeded_sampling_is_reproducible():
    params = init_params(TINY, jax.random.PRNGKey(0))  # nanoGPT's init: near-uniform, so seeds matter
    idx_BT = jnp.array([[1, 2, 3]], jnp.int32)
    run = make_generate(TINY, 12, temperature=1.0, top_k=None)  # crosses block_size too
    a = np.asarray(run(params, idx_BT, row_keys(1337, 1))[0])
    b = np.asarray(run(params, idx_BT, row_keys(1337, 1))[0])
    c = np.asarray(run(params, idx_BT, row_keys(1338, 1))[0])
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    np.testing.assert_array_equal(a[:, :3], idx_BT)


def numpy_top_k(logits, k):
    """nanoGPT's rule in numpy: v = topk(logits, min(k, V)); logits[logits < v[-1]] = -inf."""
    v = np.sort(logits)[::-1][min(k, logits.shape[-1]) - 1]
    out = logits.copy()
    out[out < v] = -np.inf
    return out


N_DRAWS = 200_000


def draw_frequencies(logits, temperature, top_k, top_p=1.0, n=N_DRAWS, seed=0):
    """How often sample_next picks each token in n draws from the same logits, row k with its own key."""
    logits_BV = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, len(logits)))
    draws = np.asarray(sample_next(logits_BV, row_keys(seed, n), temperature, top_k, top_p))
    return np.bincount(draws, minlength=len(logits)) / n


def five_sigma(p, n=N_DRAWS):
    """Per-token tolerance on the frequency of n independent draws from p: 5 binomial standard deviations
    (a correct sampler misses it about once in 10^6 tokens; the seeds are fixed, so the outcome is too)."""
    return 5 * np.sqrt(p * (1 - p) / n)


def assert_draws_follow(freq, p, *wrong):
    """freq draws only tokens p keeps, each within five_sigma of p; and each distribution in wrong (what a
    sampler that ignores one setting draws from) is too far from p to pass: another support, or a
    probability more than 4 tolerances off."""
    tol = five_sigma(p)
    for q in wrong:
        assert (q > 0).tolist() != (p > 0).tolist() or (np.abs(q - p) > 4 * np.maximum(tol, five_sigma(q))).any(), \
            "this case cannot tell the right distribution from a wrong one"
    np.testing.assert_array_equal(freq > 0, p > 0, err_msg=f"draws {freq} vs probabilities {p}")
    assert (np.abs(freq - p) <= tol).all(), f"draws {freq}\nwant    {p}\n|diff|  {np.abs(freq - p)}\ntol     {tol}"


def nanogpt_probs(logits, temperature, top_k):
    """nanoGPT's generate in numpy (float64): logits / temperature, its top-k cut, softmax."""
    kept = logits.astype(np.float64) / temperature
    kept = numpy_top_k(kept, top_k) if top_k is not None else kept
    p = np.exp(kept - kept.max())
    return p / p.sum()


LOGITS = np.array([1.0, 3.0, 2.0, 3.0, -1.0, 2.0, 0.5, -7.0], np.float32)  # ties at the 2nd and 3rd values


def test_top_k_matches_nanogpt_rule():
    for k in [1, 2, 3, 4, 5, 8, 100]:
        got = np.asarray(crop_top_k(jnp.asarray(LOGITS)[None], k))[0]
        np.testing.assert_array_equal(got, numpy_top_k(LOGITS, k))
    np.testing.assert_array_equal(np.asarray(crop_top_k(jnp.asarray(LOGITS)[None], None))[0], LOGITS)


@pytest.mark.parametrize('temperature,top_k', [(0.7, 3), (2.0, 6)])
def test_sampling_draws_in_nanogpts_proportions(temperature, top_k):
    """sample_next draws only the tokens nanoGPT's top-k keeps, in softmax(logits / temperature) proportions;
    ignoring the temperature or top_k puts the draws outside the tolerance."""
    freq = draw_frequencies(LOGITS, temperature, top_k)
    assert_draws_follow(freq, nanogpt_probs(LOGITS, temperature, top_k),
                        nanogpt_probs(LOGITS, 1.0, top_k), nanogpt_probs(LOGITS, temperature, None))


def test_a_sample_is_the_same_alone_or_in_a_batch():
    """Sample k draws with fold_in(PRNGKey(seed), k) whatever else is in its batch: four samples drawn side by
    side equal each drawn alone, token for token, through the cache and past block_size."""
    params = init_params(TINY, jax.random.PRNGKey(0))  # nanoGPT's init: near-uniform, so every draw is a coin toss
    idx_BT = jnp.array([[1, 2, 3]] * 4, jnp.int32)
    run = make_generate(TINY, 12, temperature=1.0, top_k=None, top_p=0.9)
    together = np.asarray(run(params, idx_BT, row_keys(7, 4))[0])
    alone = [np.asarray(run(params, idx_BT[:1], row_keys(7, 4)[k:k + 1])[0])[0] for k in range(4)]
    np.testing.assert_array_equal(together, np.stack(alone))
    assert len({tuple(row) for row in together}) == 4  # four different samples


def test_top_p_keeps_what_hf_top_p_warper_keeps():
    """top_p_filter against transformers' TopPLogitsWarper on the same logits (with ties and -inf from a top-k
    cut): the same tokens kept. A top_p close to 0 keeps only the most likely token: greedy."""
    torch = pytest.importorskip('torch')
    transformers = pytest.importorskip('transformers')
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (6, 50)).astype(np.float32)
    logits[1, :10] = logits[1, 10]  # ties
    logits[2, 5:] = -np.inf  # what top_k leaves behind
    for top_p in (0.05, 0.3, 0.5, 0.9, 0.99, 1.0):
        want = transformers.TopPLogitsWarper(top_p)(None, torch.tensor(logits)).numpy()
        got = np.asarray(top_p_filter(jnp.asarray(logits), top_p))
        np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want), err_msg=f"top_p={top_p}")
        np.testing.assert_array_equal(got[np.isfinite(got)], logits[np.isfinite(got)])
    greedy = np.asarray(top_p_filter(jnp.asarray(logits), 1e-6))
    assert (np.isfinite(greedy).sum(axis=1) == 1).all()
    assert (np.argmax(greedy, axis=1) == np.argmax(logits, axis=1)).all()
    keys = jax.random.split(jax.random.PRNGKey(0), 6)
    np.testing.assert_array_equal(np.asarray(sample_next(jnp.asarray(logits), keys, 1.0, None, 1e-6)), np.argmax(logits, axis=1))


def hf_warped_probs(logits, temperature, top_k, top_p):
    """What transformers' sampling draws from: its temperature, top-k and top-p warpers in generate's order,
    then softmax (float64)."""
    torch = pytest.importorskip('torch')
    transformers = pytest.importorskip('transformers')
    scores = transformers.TemperatureLogitsWarper(temperature)(None, torch.tensor(logits)[None])
    if top_k is not None:
        scores = transformers.TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = transformers.TopPLogitsWarper(top_p)(None, scores)
    return torch.softmax(scores.double(), dim=-1)[0].numpy()


@pytest.mark.parametrize('temperature,top_k,top_p', [(1.5, 5, 0.8), (1.5, 6, 0.9)])
def test_sampling_draws_in_hf_warpers_proportions(temperature, top_k, top_p):
    """Temperature, top-k and top-p together draw in the proportions transformers' warpers give the same
    logits; a sampler ignoring any one of the three draws outside the tolerance."""
    logits = np.array([2.5, 1.0, 0.0, 1.8, -0.5, 1.2, -2.0, 0.6], np.float32)
    want = hf_warped_probs(logits, temperature, top_k, top_p)
    wrong = [hf_warped_probs(logits, 1.0, top_k, top_p), hf_warped_probs(logits, temperature, None, top_p),
             hf_warped_probs(logits, temperature, top_k, 1.0)]
    assert_draws_follow(draw_frequencies(logits, temperature, top_k, top_p), want, *wrong)


def test_stop_ends_each_row_and_the_loop_once_all_have_stopped():
    """A row is done once its new tokens end with the stop tokens: up to there it is the run without a stop,
    and once every row is done the loop ends, so the slots it never reached stay 0."""
    params = tiny_params()
    idx_BT = jax.random.randint(jax.random.PRNGKey(3), (2, 3), 1, TINY.vocab_size, dtype=jnp.int32)
    free = np.asarray(make_generate(TINY, 20, temperature=0.0)(params, idx_BT, row_keys(0, 2))[0])
    stop = free[0, 3 + 4:3 + 6].tolist()  # row 0's new tokens 4 and 5
    end = next(i for i in range(1, 20) if free[0, 3 + i - 1:3 + i + 1].tolist() == stop)  # where it first ends
    one, made = make_generate(TINY, 20, temperature=0.0, stop=stop)(params, idx_BT[:1], row_keys(0, 1))
    np.testing.assert_array_equal(one[0, :3 + end + 1], free[0, :3 + end + 1])
    assert end <= 5 and (np.asarray(one)[0, 3 + end + 1:] == 0).all() and int(made) == end + 1
    # beside a row that never draws the stop tokens, the loop runs to the end for both rows
    assert stop not in [free[1, 3 + i - 1:3 + i + 1].tolist() for i in range(1, 20)]
    both, made = make_generate(TINY, 20, temperature=0.0, stop=stop)(params, idx_BT, row_keys(0, 2))
    np.testing.assert_array_equal(both, free)
    assert int(made) == 20
    # a stop longer than prompt and new tokens together can never be met (its window did not fit)
    short = make_generate(TINY, 2, temperature=0.0, stop=[1, 2, 3, 4, 5, 6])(params, idx_BT, row_keys(0, 2))[0]
    np.testing.assert_array_equal(short, free[:, :3 + 2])


def test_a_host_function_sees_the_tokens_as_they_come():
    """on_tokens is called from inside the compiled loop with the tokens so far, when it asked to be."""
    params = tiny_params()
    idx_BT = jnp.array([[1, 2, 3]], jnp.int32)
    seen = []

    def on_tokens(n, idx_BN):
        seen.append((int(n), np.asarray(idx_BN).copy()))
        return np.int32(n + 3)  # every third token
    got = np.asarray(make_generate(TINY, 10, temperature=0.0, on_tokens=on_tokens)(params, idx_BT, row_keys(0, 1))[0])
    assert [n for n, _ in seen] == [1, 4, 7, 10]
    for n, idx_BN in seen:
        np.testing.assert_array_equal(idx_BN[:, :3 + n], got[:, :3 + n])


# -----------------------------------------------------------------------------
# Hugging Face GPT-2 (test-only dependency): a small random one saved with save_pretrained

@pytest.fixture(scope='module')
def hf_gpt2(tmp_path_factory):
    torch = pytest.importorskip('torch')
    transformers = pytest.importorskip('transformers')
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=32, vocab_size=50257,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.2)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    folder = tmp_path_factory.mktemp('hf_gpt2')
    model.save_pretrained(str(folder))
    return model, str(folder)


def hf_greedy(model, ids, max_new_tokens):
    import torch
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             eos_token_id=None, pad_token_id=0)  # no early stop: always max_new_tokens
    return out[0].tolist()


def test_greedy_matches_hf_generate(hf_gpt2):
    model, folder = hf_gpt2
    config, params = from_pretrained(folder)
    assert config.block_size == 32 and config.activation == 'gelu_new'
    ids = [464, 2068, 7586, 21831, 18045, 625, 262]
    new = 32 - len(ids)  # up to HF's n_positions, the longest it can generate
    want = hf_greedy(model, ids, new)
    got = make_generate(config, new, temperature=0.0)(params, jnp.asarray([ids], jnp.int32), row_keys(0, 1))[0]
    assert np.asarray(got)[0].tolist() == want


def run_sample(*args, cwd=REPO, timeout=180, **env_vars):
    env = {**os.environ, 'TIKTOKEN_CACHE_DIR': TIKTOKEN_CACHE, 'PYTHONIOENCODING': 'utf-8', 'JAX_PLATFORMS': 'cpu',
           **env_vars}
    r = subprocess.run([sys.executable, os.path.join(REPO, 'sample.py'), *args], cwd=cwd, env=env,
                       capture_output=True, timeout=timeout)
    return r.returncode, r.stdout.decode('utf-8'), r.stderr.decode('utf-8')


def test_sample_script_without_gpt2_bpe_offline_is_one_line(hf_gpt2, tmp_path):
    """A GPT-2-vocabulary model where tiktoken has no cached BPE and no network (a proxy that refuses)."""
    _, folder = hf_gpt2
    rc, out, err = run_sample(f'--init_from={folder}', '--num_samples=1', '--max_new_tokens=2', '--device=cpu',
                              cwd=str(tmp_path), TIKTOKEN_CACHE_DIR=str(tmp_path / 'empty'),
                              HTTPS_PROXY='http://127.0.0.1:9', https_proxy='http://127.0.0.1:9')
    lines = err.strip().splitlines()
    assert rc == 1 and 'Traceback' not in err and sum(l.startswith('error:') for l in lines) == 1, err[-3000:]
    assert lines[-1].startswith("error: cannot get GPT-2's BPE for tiktoken") and 'TIKTOKEN_CACHE_DIR' in lines[-1]


@pytest.mark.skipif(not os.path.isdir(TIKTOKEN_CACHE), reason=f"no offline tiktoken cache at {TIKTOKEN_CACHE}")
def test_sample_script_local_hf_dir_matches_hf(hf_gpt2, tmp_path):
    os.environ['TIKTOKEN_CACHE_DIR'] = TIKTOKEN_CACHE
    import tiktoken
    model, folder = hf_gpt2
    enc = tiktoken.get_encoding('gpt2')
    prompt = "The quick brown fox jumps over"
    ids = enc.encode(prompt)
    (tmp_path / 'prompt.txt').write_text(prompt, encoding='utf-8')
    new = 20
    want = enc.decode(hf_greedy(model, ids, new))
    rc, out, err = run_sample(f'--init_from={folder}', f'--start=FILE:{tmp_path / "prompt.txt"}', '--num_samples=1',
                              f'--max_new_tokens={new}', '--temperature=0.0', '--device=cpu', '--dtype=float32',
                              cwd=str(tmp_path))  # any working directory
    assert rc == 0, err
    assert want + '\n---------------\n' in out
    assert 'tokens/s' in out


# -----------------------------------------------------------------------------
# a character-level checkpoint as train.py writes it, for the script's own checks

CHARS = sorted(set("First Citizen:\nBefore we proceed any further, hear me speak.\n"))


@pytest.fixture(scope='module')
def char_run(tmp_path_factory):
    root = tmp_path_factory.mktemp('char_run')
    data_dir = root / 'data' / 'tiny_char'
    data_dir.mkdir(parents=True)
    meta = {'vocab_size': len(CHARS), 'itos': {i: c for i, c in enumerate(CHARS)},
            'stoi': {c: i for i, c in enumerate(CHARS)}}
    (data_dir / 'meta.json').write_text(json.dumps(meta))
    config = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=len(CHARS))
    out_dir = root / 'out'
    out_dir.mkdir()
    checkpoint.save_checkpoint(str(out_dir / checkpoint.CKPT_NAME), checkpoint.params_to_arrays(init_params(config, jax.random.PRNGKey(0))),
                               {'model_args': asdict(config), 'iter_num': 0, 'best_val_loss': 1e9,
                                'config': {'dataset': 'tiny_char'}, 'seed': 1337, 'dtype': 'float32'})
    return root


def samples_of(out):
    """The samples sample.py printed: what follows its 'Loading meta from ...' line, one per separator."""
    body = out[out.index('Loading meta from'):].split('\n', 1)[1]
    return body.split('\n---------------\n')[:-1]


def test_sample_script_char_seeds(char_run):
    args = ['--out_dir=out', '--start=First', '--num_samples=2', '--max_new_tokens=30', '--temperature=1.0',
            '--top_k=10', '--device=cpu']
    rc, out, err = run_sample(*args, '--seed=7', cwd=str(char_run))
    assert rc == 0, err
    assert 'Loading meta from' in out and 'tokens/s' in out
    first = samples_of(out)
    assert len(first) == 2 and first[0] != first[1]  # two samples of one run differ
    for s in first:
        assert s.startswith('First') and len(s) == 5 + 30 and set(s) <= set(CHARS)
    # the same seed in another process gives the same samples: test_sample_script_batches_streams_and_stops


@pytest.mark.parametrize('args,message', [
    (['--out_dir=nowhere'], 'no checkpoint at nowhere'),
    (['--start=Fi§Qx'], "'Q', 'x', '§'"),
    (['--start=FILE:missing_prompt.txt'], 'missing_prompt.txt'),
    (['--max_new_tokens=0'], 'max_new_tokens must be at least 1'),
    (['--temperature=-0.5'], 'temperature must be >= 0.0'),
    (['--init_from=gpt3'], "unknown pretrained model 'gpt3'"),
    (['--top_p=0'], 'top_p must be in (0, 1]'),
    (['--top_p=1.5'], 'top_p must be in (0, 1]'),
    (['--stop=§'], "'§'"),
    (['--stream=True', '--num_samples=2'], 'stream=True prints one sample at a time'),
    (['--batch_size=0'], 'batch_size must be at least 1'),
])
def test_sample_script_bad_input(char_run, args, message):
    ckpt = os.path.join(char_run, 'out', checkpoint.CKPT_NAME)
    before = open(ckpt, 'rb').read()
    rc, out, err = run_sample('--out_dir=out', '--num_samples=1', '--max_new_tokens=5', *args, cwd=str(char_run))
    assert rc == 1, f"exit status {rc}\n{err}"  # cli.die: bad input is status 1, not a crash
    assert 'Traceback' not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: ') and message in lines[0], err
    assert open(ckpt, 'rb').read() == before


def test_sample_script_char_model_without_its_vocabulary(char_run):
    # run from a directory without data/tiny_char/: GPT-2 BPE would feed ids the model does not have
    rc, out, err = run_sample('--out_dir=.', '--max_new_tokens=5', cwd=os.path.join(char_run, 'out'))
    assert rc == 1 and 'Traceback' not in err, f"exit status {rc}\n{err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and 'too few for GPT-2 BPE' in lines[0] and 'tiny_char' in lines[0], err


def test_sample_script_batches_streams_and_stops(char_run):
    """The same samples drawn in one batch and streamed one at a time; --stop cuts each where the stop string
    first appears in its new text (printed without it)."""
    args = ['--out_dir=out', '--start=First', '--num_samples=3', '--max_new_tokens=200', '--temperature=1.0', '--device=cpu']
    runs, tokens_made = {}, {}
    for name, extra in [('free', []), ('batched', ['--stop=e']),
                        ('streamed', ['--stop=e', '--batch_size=1', '--stream=True'])]:
        rc, out, err = run_sample(*args, *extra, cwd=str(char_run))
        assert rc == 0, err
        runs[name] = samples_of(out)
        tokens_made[name] = int(re.search(r'^([\d,]+) tokens in ', out, re.M)[1].replace(',', ''))
    assert runs['batched'] == runs['streamed']
    # tokens/s counts what the compiled loop made: a batch until its last row's stop, a row alone until its own
    ends = [len(cut) - len('First') + 1 for cut in runs['batched']]  # through the 'e'
    assert tokens_made['free'] == 3 * 200 and tokens_made['streamed'] == sum(ends)
    assert tokens_made['batched'] == 3 * max(ends) < 3 * 200
    for free, cut in zip(runs['free'], runs['batched']):
        new = free[len('First'):]
        assert 'e' in new and cut == 'First' + new[:new.index('e')]
    # --stop="\n" from a shell is a backslash and an n: it means the newline
    rc, out, err = run_sample(*args, '--stop=\\n', cwd=str(char_run))
    assert rc == 0, err
    frees = [f[len('First'):] for f in runs['free']]
    assert any('\n' in f for f in frees)  # the check below has something to cut
    assert samples_of(out) == ['First' + f.split('\n')[0] for f in frees]
