"""
AdamW against Muon on the README's CPU model (config/train_shakespeare_char.py, and its _muon twin, with
the Makefile's CPU flags), seed by seed side by side: for each seed one AdamW run, then one Muon run,
each train.py as it is, to max_iters. For each run: the first eval whose val loss is at most target (its iteration, and the
wall time from the first eval line to that one, evals included, compile excluded), and the val loss at
max_iters. Needs data/shakespeare_char prepared (make demo does it).

$ python bench_muon.py                                  # 5 seeds, muon_lr 0.02
$ python bench_muon.py --seeds=1 --optimizers=muon --muon_lr=0.05   # one of the tuning runs
"""
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

# -----------------------------------------------------------------------------
seeds = 5  # seeds 0 .. seeds-1
muon_lr = 0.02
target = 1.90  # val loss
max_iters = 2000
eval_interval = 50  # how finely the time to target is resolved
optimizers = 'adamw muon'  # e.g. --optimizers=muon to tune muon_lr
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())  # overrides
# -----------------------------------------------------------------------------

REPO = os.path.dirname(os.path.abspath(__file__))
CPU_FLAGS = ['--device=cpu', '--compile=False', '--eval_iters=20', '--log_interval=1', '--block_size=64',
             '--batch_size=12', '--n_layer=4', '--n_head=4', '--n_embd=128', '--dropout=0.0']


def run(optimizer, seed):
    """(iterations to target or None, seconds to target or None, val loss at max_iters) of one train.py run."""
    with tempfile.TemporaryDirectory() as out_dir:
        config = 'config/train_shakespeare_char_muon.py' if optimizer == 'muon' else 'config/train_shakespeare_char.py'
        cmd = [sys.executable, os.path.join(REPO, 'train.py'), config, *CPU_FLAGS, f'--max_iters={max_iters}',
               f'--lr_decay_iters={max_iters}', f'--eval_interval={eval_interval}', f'--seed={seed}',
               f'--optimizer={optimizer}', f'--muon_lr={muon_lr}', f'--out_dir={out_dir}']
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED='1'))
        t0 = reached = None
        val = {}
        for line in proc.stdout:
            m = re.match(r'step (\d+): train loss \S+, val loss (\S+)', line)
            if m:
                t0 = time.perf_counter() if t0 is None else t0
                it, val[int(m[1])] = int(m[1]), float(m[2].rstrip(','))
                if reached is None and val[it] <= target:
                    reached = (it, time.perf_counter() - t0)
        if proc.wait() != 0:
            sys.exit(f"{' '.join(cmd)} failed with exit status {proc.returncode}")
    return (*(reached or (None, None)), val[max(val)])


def spread(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "never"
    return f"{statistics.mean(xs):.4g} ± {statistics.stdev(xs) if len(xs) > 1 else 0:.2g} ({len(xs)} runs)"


print(f"README CPU model, {max_iters} iterations, eval every {eval_interval}; AdamW at learning_rate 1e-3 "
      f"(the config's), Muon at muon_lr {muon_lr} (its other parameters AdamW at 1e-3)")
results = {optimizer: [] for optimizer in optimizers.split()}
for seed in range(seeds):
    for optimizer in results:
        results[optimizer].append(run(optimizer, seed))
        it, s, last = results[optimizer][-1]
        print(f"seed {seed} {optimizer:5}: val loss {target} at iter {it}, {s if s is None else round(s, 1)} s; "
              f"val loss at iter {max_iters}: {last:.4f}", flush=True)
for optimizer, rows in results.items():
    its, secs, last = zip(*rows)
    print(f"{optimizer:5}: iterations to {target}: {spread(its)}; seconds: {spread(secs)}; "
          f"val loss at {max_iters}: {spread(last)}")
mean_secs = {k: [s for _, s, _ in v if s is not None] for k, v in results.items()}
if len(mean_secs) == 2 and all(mean_secs.values()):
    print(f"Muon's wall time to {target} over AdamW's (means): "
          f"{statistics.mean(mean_secs['muon']) / statistics.mean(mean_secs['adamw']):.2f}")
