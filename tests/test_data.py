"""data/*/prepare.py: what they write must be nanoGPT's layout, checked against the raw text and
against tiktoken itself; and the vocabulary loader must read nanoGPT's meta.pkl without ever
running code from it."""
import importlib.util
import json
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import training  # noqa: E402

SHARED = os.path.join(REPO, '..', 'shared')
INPUT_TXT = os.path.join(SHARED, 'data', 'tinyshakespeare', 'input.txt')
TIKTOKEN_CACHE = os.path.join(SHARED, 'tiktoken_cache')

needs_input = pytest.mark.skipif(not os.path.exists(INPUT_TXT), reason=f"tiny Shakespeare not found at {INPUT_TXT}")
needs_tiktoken = pytest.mark.skipif(not os.path.isdir(TIKTOKEN_CACHE),
                                    reason=f"no offline tiktoken cache at {TIKTOKEN_CACHE} (GPT-2 BPE needs it here)")


def run_prepare(dataset, tmp_path):
    """Copy data/<dataset>/prepare.py plus the shared input.txt into tmp_path and run it there,
    so the repository's own data folder is never touched."""
    folder = tmp_path / dataset
    folder.mkdir()
    shutil.copy(os.path.join(REPO, 'data', dataset, 'prepare.py'), folder)
    shutil.copy(INPUT_TXT, folder / 'input.txt')
    env = dict(os.environ, TIKTOKEN_CACHE_DIR=os.path.abspath(TIKTOKEN_CACHE))
    r = subprocess.run([sys.executable, str(folder / 'prepare.py')], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return folder, r.stdout


@needs_input
def test_shakespeare_char_prepare(tmp_path):
    folder, out = run_prepare('shakespeare_char', tmp_path)
    text = open(INPUT_TXT, encoding='utf-8').read()
    n_train = int(len(text) * 0.9)  # nanoGPT's split point
    train = np.fromfile(folder / 'train.bin', dtype=np.uint16)
    val = np.fromfile(folder / 'val.bin', dtype=np.uint16)
    assert (len(train), len(val)) == (n_train, len(text) - n_train)

    with open(folder / 'meta.json', encoding='utf-8') as f:
        raw = json.load(f)
    assert raw['vocab_size'] == 65 == len(set(text))
    meta = training.load_meta(str(folder))
    itos, stoi = meta['itos'], meta['stoi']
    assert ''.join(itos[int(i)] for i in train) == text[:n_train]
    assert ''.join(itos[int(i)] for i in val) == text[n_train:]
    assert all(stoi[itos[i]] == i for i in range(65))
    assert list(itos[i] for i in range(65)) == sorted(set(text))  # nanoGPT's order: sorted characters
    assert f"{n_train:,}" in out and "vocab size: 65" in out


def test_nanogpt_meta_pkl_is_read(tmp_path):
    chars = sorted(set("hello world\n"))
    meta = {'vocab_size': len(chars), 'itos': {i: c for i, c in enumerate(chars)},
            'stoi': {c: i for i, c in enumerate(chars)}}
    with open(tmp_path / 'meta.pkl', 'wb') as f:
        pickle.dump(meta, f)  # what nanoGPT's prepare.py does
    assert training.load_meta(str(tmp_path)) == meta


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_malicious_meta_pkl_is_refused(tmp_path):
    marker = str(tmp_path / 'pwned')
    with open(tmp_path / 'meta.pkl', 'wb') as f:
        pickle.dump({'vocab_size': 3, 'itos': _Exploit(marker)}, f)
    with pytest.raises(ValueError, match='meta.pkl'):
        training.load_meta(str(tmp_path))
    assert not os.path.exists(marker)


@needs_input
@needs_tiktoken
def test_shakespeare_bpe_prepare(tmp_path):
    os.environ['TIKTOKEN_CACHE_DIR'] = os.path.abspath(TIKTOKEN_CACHE)
    import tiktoken
    folder, out = run_prepare('shakespeare', tmp_path)
    enc = tiktoken.get_encoding('gpt2')
    text = open(INPUT_TXT, encoding='utf-8').read()
    n_train = int(len(text) * 0.9)
    want_train = enc.encode_ordinary(text[:n_train])
    want_val = enc.encode_ordinary(text[n_train:])
    train = np.fromfile(folder / 'train.bin', dtype=np.uint16)
    val = np.fromfile(folder / 'val.bin', dtype=np.uint16)
    assert len(train) == len(want_train) and len(val) == len(want_val)
    assert train.tolist() == want_train and val.tolist() == want_val
    assert f"train has {len(want_train):,} tokens" in out
    assert not os.path.exists(folder / 'meta.json')  # GPT-2 BPE is the default: no vocabulary file


@needs_tiktoken
def test_openwebtext_tokenize_and_write(tmp_path):
    os.environ['TIKTOKEN_CACHE_DIR'] = os.path.abspath(TIKTOKEN_CACHE)
    import tiktoken
    spec = importlib.util.spec_from_file_location('owt_prepare', os.path.join(REPO, 'data', 'openwebtext', 'prepare.py'))
    owt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(owt)  # must not need Hugging Face datasets

    docs = [{'text': "Hello world."}, {'text': "Ünïcödé — and <|endoftext|> as plain text"}, {'text': ""},
            {'text': "The quick brown fox\n\njumps over the lazy dog. " * 20}]
    enc = tiktoken.get_encoding('gpt2')
    want = []
    for d in docs:
        want += enc.encode_ordinary(d['text']) + [enc.eot_token]
    filename = str(tmp_path / 'val.bin')
    processed = [owt.process(d) for d in docs]
    batches = [np.concatenate([p['ids'] for p in processed[i:i + 3]]).astype(np.uint16)
               for i in (0, 3)]  # several batches, one of them partial
    n = owt.write_split(batches, sum(p['len'] for p in processed), filename)
    got = np.memmap(filename, dtype=np.uint16, mode='r')
    assert n == len(want) == len(got)
    assert got.tolist() == want
    assert sum(1 for t in want if t == 50256) == len(docs)  # the special-token text stayed text


@pytest.mark.parametrize('dataset', ['shakespeare_char', 'shakespeare'])
def test_prepare_offline_is_one_line(tmp_path, dataset):
    """No input.txt and no network (a proxy that refuses): one error line, exit 1, nothing written."""
    folder = tmp_path / dataset
    folder.mkdir()
    shutil.copy(os.path.join(REPO, 'data', dataset, 'prepare.py'), folder)
    env = dict(os.environ, HTTPS_PROXY='http://127.0.0.1:9', https_proxy='http://127.0.0.1:9')
    r = subprocess.run([sys.executable, str(folder / 'prepare.py')], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and lines == [lines[-1]] and 'Traceback' not in r.stderr, r.stderr[-3000:]
    assert lines[-1].startswith('error: cannot download https://') and 'input.txt' in lines[-1], lines
    assert sorted(os.listdir(folder)) == ['prepare.py']
