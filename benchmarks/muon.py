"""
AdamW against Muon on the README's CPU model (config/train_shakespeare_char.py and its _muon twin,
with the Makefile's CPU flags): per seed one train.py run of each, to max_iters. Reports the first
eval at or under target val loss (its iteration, and the seconds since the first eval, compile
excluded) and the val loss at max_iters. Needs data/shakespeare_char prepared (make demo does it).

$ python benchmarks/muon.py                                               # 5 seeds, muon_lr 0.02
$ python benchmarks/muon.py --seeds=1 --optimizers=muon --muon_lr=0.05   # one of the tuning runs
"""
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# -----------------------------------------------------------------------------
seeds = 5  # seeds 0 .. seeds-1
muon_lr = 0.02
target = 1.90  # val loss
max_iters = 2000
eval_interval = 50  # how finely the time to target is resolved
optimizers = 'adamw muon'  # e.g. --optimizers=muon to tune muon_lr
exec(open(os.path.join(REPO, 'configurator.py')).read())  # overrides from command line
# -----------------------------------------------------------------------------
CPU_FLAGS = ('--device=cpu --compile=False --eval_iters=20 --log_interval=1 --block_size=64 '
             '--batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --dropout=0.0').split()


def run(optimizer, seed):
    """(iteration at target, seconds to target, both None if never; last val loss) of one run."""
    config = f"config/train_shakespeare_char{'_muon' if optimizer == 'muon' else ''}.py"
    with tempfile.TemporaryDirectory() as out_dir:
        flags = dict(out_dir=out_dir, seed=seed, max_iters=max_iters, lr_decay_iters=max_iters,
                     eval_interval=eval_interval, optimizer=optimizer, muon_lr=muon_lr)
        cmd = [sys.executable, 'train.py', config, *CPU_FLAGS,
               *(f'--{k}={v}' for k, v in flags.items())]
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True,
                                env=dict(os.environ, PYTHONUNBUFFERED='1'))
        t0, reached, val = None, (None, None), None
        for line in proc.stdout:
            if m := re.match(r'step (\d+): train loss \S+, val loss ([^\s,]+)', line):
                t0, val = t0 or time.perf_counter(), float(m[2])
                if reached[0] is None and val <= target:
                    reached = (int(m[1]), time.perf_counter() - t0)
        if proc.wait() != 0:
            sys.exit(f"{' '.join(cmd)} failed with exit status {proc.returncode}")
    return (*reached, val)


def spread(xs):
    xs = [x for x in xs if x is not None]
    sd = statistics.stdev(xs) if len(xs) > 1 else 0
    return f"{statistics.mean(xs):.4g} ± {sd:.2g} ({len(xs)} runs)" if xs else "never"


print(f"README CPU model, {max_iters} iterations, eval every {eval_interval}; AdamW at "
      f"learning_rate 1e-3 (the config's), Muon at muon_lr {muon_lr} (the rest AdamW at 1e-3)")
results = {optimizer: [] for optimizer in optimizers.split()}
for seed in range(seeds):
    for optimizer, rows in results.items():
        rows.append(run(optimizer, seed))
        it, s, last = rows[-1]
        print(f"seed {seed} {optimizer:5}: val loss {target} at iter {it}, {s and round(s, 1)} s; "
              f"val loss at iter {max_iters}: {last:.4f}", flush=True)
for optimizer, rows in results.items():
    its, secs, last = zip(*rows)
    print(f"{optimizer:5}: iterations to {target}: {spread(its)}; seconds: {spread(secs)}; "
          f"val loss at {max_iters}: {spread(last)}")
secs = {k: [s for _, s, _ in rows if s is not None] for k, rows in results.items()}
if len(secs) == 2 and all(secs.values()):
    print(f"Muon's wall time to {target} over AdamW's (means): "
          f"{statistics.mean(secs['muon']) / statistics.mean(secs['adamw']):.2f}")
