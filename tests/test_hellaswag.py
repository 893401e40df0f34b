"""hellaswag.py: its losses, acc and acc_norm are build-nanogpt's scoring, written out here on
transformers' GPT2LMHeadModel; a bad file, a foreign vocabulary, no network: one line each."""
import glob
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
TIKTOKEN_CACHE = os.path.abspath(os.path.join(REPO, '..', 'shared', 'tiktoken_cache'))
os.environ['TIKTOKEN_CACHE_DIR'] = TIKTOKEN_CACHE
import hellaswag  # noqa: E402
import training  # noqa: E402
from model import GPTConfig, from_pretrained  # noqa: E402

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
pytestmark = pytest.mark.skipif(not os.path.isdir(TIKTOKEN_CACHE),
                                reason=f"no offline tiktoken cache at {TIKTOKEN_CACHE}")

LONG = "She picks up the saw and carefully measures the board against the wall, then " * 5
CONTEXTS = ["A man is sitting on a roof.", "The kids run into the yard and", LONG,
            "How to bake bread: mix the flour with water.", "A woman holds a violin", "Then,",
            LONG + "Finally she"]
ENDINGS = ["he starts pulling up roofing.", "is",
           "laughs loudly at the camera while the dog waits patiently by the door for a treat",
           "put the dough in a warm place to rise for an hour"]


def run(script, *args, cwd, **env):
    env = dict(os.environ, JAX_PLATFORMS='cpu', TIKTOKEN_CACHE_DIR=TIKTOKEN_CACHE, **env)
    return subprocess.run([sys.executable, os.path.join(REPO, script), *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def torch_losses(model, examples):
    """build-nanogpt's scoring: each ending's per-token losses, given the context before it."""
    import tiktoken
    enc, out = tiktoken.get_encoding('gpt2'), []
    for ex in examples:
        ctx = enc.encode(ex['ctx'])
        for end in ex['endings']:
            end = enc.encode(' ' + end)
            ids = torch.tensor([ctx + end])
            with torch.no_grad():
                logits = model(ids).logits[0]
            loss = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction='none')
            out.append((loss[-len(end):].sum().item(), loss[-len(end):].mean().item()))
    return np.array(out).reshape(len(examples), 4, 2)


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    """A small random GPT-2 (spread logits: no near ties); a jsonl whose labels are the endings of
    lowest loss per token, so acc_norm is 1 and acc is not."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=128,
                                  vocab_size=50257, resid_pdrop=0.0, embd_pdrop=0.0,
                                  attn_pdrop=0.0, initializer_range=0.2)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    folder = tmp_path_factory.mktemp('hellaswag')
    model.save_pretrained(str(folder / 'model'))
    examples = [dict(ctx=ctx, endings=ENDINGS[k:] + ENDINGS[:k]) for k, ctx in enumerate(CONTEXTS)]
    want = torch_losses(model, examples)
    for ex, loss_42 in zip(examples, want):
        ex['label'] = int(loss_42[:, 1].argmin())
    with open(folder / 'val.jsonl', 'w') as f:
        f.writelines(json.dumps(ex) + '\n' for ex in examples)
    return str(folder), want


def test_losses_acc_and_acc_norm_match_transformers(setup):
    folder, want = setup
    training.set_precision('float32')
    config, params = from_pretrained(os.path.join(folder, 'model'))
    examples = hellaswag.load_examples(os.path.join(folder, 'val.jsonl'))
    # 28 rows, 8 a call: rows of 64 and of 128 tokens, a last call half padding
    sum_N4, mean_N4 = hellaswag.ending_losses(params, config, examples, batch_rows=8)
    np.testing.assert_allclose(sum_N4, want[..., 0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(mean_N4, want[..., 1], rtol=1e-4, atol=1e-4)
    acc = np.mean(want[..., 0].argmin(1) == [label for *_, label in examples])
    assert acc < 1.0  # the summed loss picks another ending somewhere: the two numbers differ
    assert hellaswag.evaluate(params, config, examples, batch_rows=8) == (len(CONTEXTS), acc, 1.0)
    assert hellaswag.load_examples(os.path.join(folder, 'val.jsonl'), 3) == examples[:3]


def test_cli_prints_acc_and_acc_norm(setup):
    folder, want = setup
    r = run('hellaswag.py', f'--init_from={folder}/model', f'--hellaswag_file={folder}/val.jsonl',
            '--device=cpu', '--dtype=float32', '--max_examples=2', cwd=folder)
    assert r.returncode == 0, r.stderr
    labels = want[:2, :, 1].argmin(1)
    acc = np.mean(want[:2, :, 0].argmin(1) == labels)
    assert r.stdout.splitlines()[-1] == f"hellaswag: 2 examples, acc {acc:.4f}, acc_norm 1.0000"


def test_bad_input_is_one_line(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="HellaSwag needs GPT-2's tokens, the model has 65"):
        hellaswag.evaluate({}, GPTConfig(vocab_size=65), [])
    with pytest.raises(ValueError, match="examples must be >= 0 .0: all., got -3"):  # it sliced off the end
        hellaswag.load_examples(str(tmp_path / 'none.jsonl'), -3)
    with pytest.raises(OSError, match=f"cannot read {tmp_path}/none.jsonl: No such file"):
        hellaswag.load_examples(str(tmp_path / 'none.jsonl'))
    good = dict(ctx="A cat", endings=["a", "b", "c", "d"], label=0)
    for bad in ['{"ctx": "A cat"', dict(good, label=4), dict(good, label='0'), dict(good, ctx=5),
                dict(good, endings=["a"]), dict(good, endings="abcd")]:
        bad = bad if isinstance(bad, str) else json.dumps(bad)
        (tmp_path / 'bad.jsonl').write_text(json.dumps(good) + '\n' + bad + '\n')
        with pytest.raises(ValueError, match="bad.jsonl, line 2: not HellaSwag's ctx, 4 endings"):
            hellaswag.load_examples(str(tmp_path / 'bad.jsonl'))

    import requests
    def offline(*args, **kwargs):
        raise requests.ConnectionError("no network")
    monkeypatch.setattr(requests, 'get', offline)
    monkeypatch.setattr(hellaswag, 'VAL_FILE', str(tmp_path / 'hs' / 'val.jsonl'))
    with pytest.raises(OSError, match=f"ConnectionError\\): put it at {tmp_path}/hs/val.jsonl"):
        hellaswag.load_examples()

    r = run('hellaswag.py', '--device=cpu', f'--hellaswag_file={tmp_path}/bad.jsonl', cwd=tmp_path)
    assert r.returncode == 1
    why = "line 2: not HellaSwag's ctx, 4 endings, label"
    assert r.stderr == f"error: {tmp_path}/bad.jsonl, {why}\n"


def test_train_py_scores_hellaswag_at_each_eval(setup, tmp_path):
    """--eval_hellaswag=True: the step line and wandb carry the acc_norm of data/hellaswag's val
    file (here the test's: labels of lowest loss per token, so 1.0); a character-level model is
    refused at start in one line."""
    from tests.test_train import wandb_records
    from tests.tinydata import tiny_text, write_char_dataset
    folder, _ = setup
    os.makedirs(tmp_path / 'data' / 'hellaswag')
    shutil.copy(f'{folder}/val.jsonl', tmp_path / 'data' / 'hellaswag' / 'hellaswag_val.jsonl')
    os.makedirs(tmp_path / 'data' / 'web')
    tokens = np.random.default_rng(0).integers(0, 50257, 5000).astype(np.uint16)
    for split in ('train', 'val'):
        tokens.tofile(tmp_path / 'data' / 'web' / f'{split}.bin')
    flags = ['--device=cpu', '--dtype=float32', '--batch_size=2', '--gradient_accumulation_steps=1',
             '--eval_iters=1', '--eval_only=True', '--eval_hellaswag=True']
    r = run('train.py', *flags, '--dataset=web', '--block_size=128', f'--init_from={folder}/model',
            '--hellaswag_examples=5', '--wandb_log=True', cwd=tmp_path, WANDB_MODE='offline',
            WANDB_DIR=str(tmp_path), WANDB_SILENT='true')
    assert r.returncode == 0, r.stderr[-3000:]
    assert [line for line in r.stdout.splitlines() if line.startswith('step 0: ')][0].endswith(
        ', hellaswag acc_norm 1.0000')
    history = [{item.key or '/'.join(item.nested_key): json.loads(item.value_json)
                for item in rec.history.item} for rec in wandb_records(
                glob.glob(str(tmp_path / 'wandb' / 'offline-run-*' / 'run-*.wandb'))[0])
               if rec.WhichOneof('record_type') == 'history']
    assert [h['hellaswag/acc_norm'] for h in history] == [1.0]

    chars = write_char_dataset(str(tmp_path / 'chars'), tiny_text(3000))
    r = run('train.py', *flags, f'--dataset={chars}', '--block_size=8', '--n_layer=1',
            '--n_head=1', '--n_embd=8', cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.startswith("error: HellaSwag needs GPT-2's tokens, the "
                                                     "model has "), r.stderr
    assert len(r.stderr.splitlines()) == 1
