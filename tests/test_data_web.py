"""data/fineweb10B and data/openwebtext prepare.py, offline, on files put in a temporary Hugging
Face cache here: the tokens land in nanoGPT's train.bin / val.bin in order, OpenWebText split as
nanoGPT splits it (seed 2357); a bad shard or a missing `datasets` is one line."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIKTOKEN_CACHE = os.path.abspath(os.path.join(REPO, '..', 'shared', 'tiktoken_cache'))


def hub_cache(root, repo, files):
    """What hf_hub_download finds offline: refs/main naming a snapshot that holds the files."""
    commit, folder = 'a' * 40, root / 'hub' / f"datasets--{repo.replace('/', '--')}"
    (folder / 'refs').mkdir(parents=True)
    (folder / 'refs' / 'main').write_text(commit)
    for name, data in files.items():
        path = folder / 'snapshots' / commit / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def prepare(tmp_path, dataset, *args, code=None):
    """Runs a copy of data/<dataset>/prepare.py (it writes beside itself) offline on the cache."""
    folder = tmp_path / dataset
    folder.mkdir(exist_ok=True)
    shutil.copy(os.path.join(REPO, 'data', dataset, 'prepare.py'), folder)
    env = dict(os.environ, HF_HOME=str(tmp_path), HF_HUB_CACHE=str(tmp_path / 'hub'),
               HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1', TIKTOKEN_CACHE_DIR=TIKTOKEN_CACHE)
    cmd = ['-c', code] if code else [str(folder / 'prepare.py'), *args]
    return subprocess.run([sys.executable, *cmd], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=120)


def shard(tokens, magic=20240520, version=1, n=None):
    header = np.zeros(256, np.int32)
    header[:3] = magic, version, len(tokens) if n is None else n
    return header.tobytes() + np.asarray(tokens, np.uint16).tobytes()


rng = np.random.default_rng(0)
VAL, *TRAIN = (rng.integers(0, 50257, n) for n in (1000, 3000, 2000, 500))
SHARDS = {'fineweb_val_000000.bin': shard(VAL), **{f'fineweb_train_{i:06d}.bin': shard(t)
                                                   for i, t in enumerate(TRAIN, 1)}}


def test_fineweb_shards_in_order(tmp_path):
    hub_cache(tmp_path, 'kjj0/fineweb10B-gpt2', SHARDS)
    r = prepare(tmp_path, 'fineweb10B', '2')
    assert r.returncode == 0, r.stderr
    train, val = (tmp_path / 'fineweb10B' / f'{s}.bin' for s in ('train', 'val'))
    assert np.fromfile(val, np.uint16).tolist() == VAL.tolist()
    assert np.fromfile(train, np.uint16).tolist() == np.concatenate(TRAIN[:2]).tolist()
    assert "train has 5,000 tokens" in r.stdout

    mtime = train.stat().st_mtime_ns
    r = prepare(tmp_path, 'fineweb10B', '2')  # complete: nothing written
    assert r.returncode == 0 and "already holds its 5,000 tokens" in r.stdout
    assert train.stat().st_mtime_ns == mtime
    assert prepare(tmp_path, 'fineweb10B', '3').returncode == 0  # one shard more: written again
    assert np.fromfile(train, np.uint16).tolist() == np.concatenate(TRAIN).tolist()


@pytest.mark.parametrize('bad', [shard(TRAIN[1])[:-2], shard(TRAIN[1], magic=20240521)])
def test_fineweb_bad_shard_is_refused(tmp_path, bad):
    hub_cache(tmp_path, 'kjj0/fineweb10B-gpt2', {**SHARDS, 'fineweb_train_000002.bin': bad})
    (tmp_path / 'fineweb10B').mkdir()
    (tmp_path / 'fineweb10B' / 'train.bin').write_bytes(b'good')  # an earlier run's
    r = prepare(tmp_path, 'fineweb10B', '3')
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1
    assert r.stderr.startswith('error: ')
    assert 'fineweb_train_000002.bin is not a whole fineweb shard' in r.stderr
    assert sorted(os.listdir(tmp_path / 'fineweb10B')) == ['prepare.py', 'train.bin']  # untouched
    assert (tmp_path / 'fineweb10B' / 'train.bin').read_bytes() == b'good'


def test_fineweb_argument_and_offline(tmp_path):
    r = prepare(tmp_path, 'fineweb10B', '104')
    want = "error: give the number of train shards, 1 to 103, not '104'\n"
    assert (r.returncode, r.stderr) == (1, want)
    r = prepare(tmp_path, 'fineweb10B')  # offline, nothing in the cache
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1
    assert r.stderr.startswith("error: cannot fetch fineweb_val_000000.bin from kjj0/fineweb10B-gpt2")


@pytest.mark.skipif(not os.path.isdir(TIKTOKEN_CACHE), reason=f"no {TIKTOKEN_CACHE}")
def test_openwebtext_from_parquet(tmp_path):
    pytest.importorskip('datasets')
    import pyarrow as pa
    import pyarrow.parquet as pq
    import tiktoken
    docs = [f"Document {i}: " + "the quick brown fox jumps. " * (i % 7) for i in range(2500)]
    files = {}
    for k, part in enumerate((docs[:1500], docs[1500:])):  # two files, read in name order
        sink = pa.BufferOutputStream()
        pq.write_table(pa.table({'text': part}), sink)
        files[f'plain_text/train-{k:05d}-of-00002.parquet'] = sink.getvalue().to_pybytes()
    hub_cache(tmp_path, 'Skylion007/openwebtext', files)
    one_proc = "import prepare as p; p.num_proc = p.num_proc_load_dataset = 1; p.main()"
    r = prepare(tmp_path, 'openwebtext', code=one_proc)
    assert r.returncode == 0, r.stderr

    # nanoGPT's split: datasets' train_test_split(test_size=0.0005, seed=2357), written out here
    order = np.random.default_rng(2357).permutation(len(docs))
    n_val = int(np.ceil(0.0005 * len(docs)))
    os.environ['TIKTOKEN_CACHE_DIR'] = TIKTOKEN_CACHE
    enc = tiktoken.get_encoding('gpt2')
    for split, idx in (('val', order[:n_val]), ('train', order[n_val:])):
        want = [t for i in idx for t in enc.encode_ordinary(docs[i]) + [enc.eot_token]]
        assert np.fromfile(tmp_path / 'openwebtext' / f'{split}.bin', np.uint16).tolist() == want

    (tmp_path / 'empty').mkdir()
    offline = prepare(tmp_path / 'empty', 'openwebtext', code="import prepare; prepare.main()")  # no cache
    assert offline.returncode == 1 and len(offline.stderr.splitlines()) == 1, offline.stderr[-3000:]
    assert offline.stderr.startswith("error: cannot fetch Skylion007/openwebtext: "), offline.stderr

    no_datasets = "import sys; sys.modules['datasets'] = None; import prepare; prepare.main()"
    r = prepare(tmp_path, 'openwebtext', code=no_datasets)
    assert r.returncode == 1
    assert r.stderr == "error: data/openwebtext/prepare.py needs Hugging Face's datasets: " \
                       "pip install datasets\n"
