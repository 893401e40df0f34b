"""bench.py smoke tests: it runs on a tiny config and prints its report lines. No timing
assertions: speed is shown by bench.py's side-by-side ratios (BENCHMARKS.md), not by tests."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--n_layer=2', '--n_head=2', '--n_embd=32', '--vocab_size=64', '--block_size=32', '--batch_size=4',
        '--device=cpu', '--burnin=1', '--num_steps=2']


def bench(tmp_path, *args, timeout=120):
    return subprocess.run([sys.executable, os.path.join(REPO, 'bench.py'), *TINY, *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=timeout)


def test_bench_reports_and_compares_with_torch(tmp_path):
    pytest.importorskip('torch')
    pytest.importorskip('transformers')
    # real_data reads data/<dataset>/train.bin from the working directory, as train.py does
    d = tmp_path / 'data' / 'tiny'
    d.mkdir(parents=True)
    np.random.default_rng(0).integers(0, 64, 5000).astype(np.uint16).tofile(d / 'train.bin')
    trace = tmp_path / 'trace'
    r = bench(tmp_path, '--dataset=tiny', '--compare=torch', '--compile=False', '--profile=True', f'--profile_dir={trace}')
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    assert 'using random tokens' not in out
    assert re.search(r'peak: [\d,.]+ GFLOP/s \(2048x2048 fp32 matmul measured now', out)
    tokens_per_iter = int(re.search(r'= ([\d,]+) tokens/iter', out)[1].replace(',', ''))
    assert tokens_per_iter == 4 * 32
    medians = {}
    for name in ('jax', r'torch \(eager\)'):
        m = re.search(name + r': compile [\d.]+s \| median ([\d.]+) ms/iter \(min ([\d.]+), max ([\d.]+), 2 iters\) '
                             r'\| ([\d,]+) tokens/s', out)
        assert m, f"no report line for {name}:\n{out}"
        med, lo, hi, tps = float(m[1]), float(m[2]), float(m[3]), int(m[4].replace(',', ''))
        assert 0 < lo <= med <= hi  # the median of the timed steps lies between them
        assert tps == pytest.approx(tokens_per_iter / (med / 1000), rel=0.01)  # tokens/s from that median
        medians[name] = med
    ratio = float(re.search(r'jax/torch: ([\d.]+)x', out)[1])
    assert ratio == pytest.approx(medians[r'torch \(eager\)'] / medians['jax'], rel=0.02)
    assert re.search(r'peak memory: [\d,.]+ MiB', out)
    # the timed steps ran the same model from its random init: losses near ln(64) = 4.16, both frameworks
    for name in ('jax', 'torch'):
        losses = [float(x) for x in re.findall(rf'^{name} \d+ loss: ([\d.]+)', out, re.M)]
        assert losses and all(abs(l - np.log(64)) < 0.3 for l in losses), (name, losses)
    assert any(trace.rglob('*.xplane.pb')), "profile=True wrote no jax.profiler trace"


def test_bench_random_tokens_and_given_peak(tmp_path):
    # no data/openwebtext here: random tokens, and it says so; a given peak is not measured
    r = bench(tmp_path, '--peak_flops=1e12', '--num_steps=1')
    assert r.returncode == 0, r.stderr[-2000:]
    assert re.search(r'ms/iter \(.*, 1 iters\)', r.stdout)
    assert 'using random tokens' in r.stdout
    assert 'peak: 1,000.0 GFLOP/s (given by --peak_flops)' in r.stdout
    assert re.search(r'jax: compile [\d.]+s \| median [\d.]+ ms/iter', r.stdout)
    assert 'jax/torch' not in r.stdout


def test_bench_bad_input_one_line(tmp_path):
    r = bench(tmp_path, '--compare=tensorflow', timeout=60)
    message = "compare='tensorflow'"
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert 'Traceback' not in r.stderr


def test_bench_takes_fsdp_and_remat(tmp_path):
    """--fsdp=2 --remat=True over 2 host devices: the state sharded, the step trained; the loss of its first
    timed call equals the data-parallel run's (the same step, laid out differently)."""
    runs = {}
    for name, flags in (('dp', []), ('fsdp', ['--fsdp=2', '--remat=True'])):
        r = bench(tmp_path, '--gradient_accumulation_steps=2', '--num_steps=1', '--peak_flops=1e12', *flags)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        runs[name] = r.stdout
    assert ', the state sharded over 2 (fsdp), remat' in runs['fsdp'] and 'fsdp' not in runs['dp']
    first = {name: float(re.search(r'^jax 1 loss: ([\d.]+)', out, re.M)[1]) for name, out in runs.items()}
    assert 0 < first['dp'] < 10 and first['fsdp'] == pytest.approx(first['dp'], abs=2e-4), first

