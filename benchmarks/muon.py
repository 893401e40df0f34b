"""AdamW against Muon on the README's CPU model, a train.py run each per seed: when val loss first
reaches target, and its last value."""
import os
import re
from statistics import mean, stdev
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
seeds, muon_lr = 5, 0.02  # seeds 0 .. seeds-1
target = 1.90  # val loss
max_iters, eval_interval = 2000, 50  # eval_interval: how finely the time to target is resolved
optimizers = 'adamw muon'  # e.g. --optimizers=muon to tune muon_lr
exec(open(os.path.join(REPO, 'configurator.py')).read())
CPU = dict(device='cpu', compile=False, eval_iters=20, log_interval=1, block_size=64, batch_size=12,
           n_layer=4, n_head=4, n_embd=128, dropout=0.0)  # the Makefile's CPU flags

def run(optimizer, seed):
    """(iteration at target, seconds to it since the first eval, or None; the last val loss)."""
    config = f"config/train_shakespeare_char{'_muon' if optimizer == 'muon' else ''}.py"
    with tempfile.TemporaryDirectory() as out_dir:
        flags = dict(CPU, out_dir=out_dir, seed=seed, max_iters=max_iters, lr_decay_iters=max_iters,
                     eval_interval=eval_interval, optimizer=optimizer, muon_lr=muon_lr)
        cmd = [sys.executable, '-u', 'train.py', config, *(f'--{k}={v}' for k, v in flags.items())]
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)
        evals = [(int(m[1]), float(m[2]), time.perf_counter()) for line in proc.stdout
                 if (m := re.match(r'step (\d+): train loss \S+, val loss ([^\s,]+)', line))]
        if proc.wait():
            sys.exit(f"{' '.join(cmd)} failed with exit status {proc.returncode}")
    it, s = next(((it, t - evals[0][2]) for it, val, t in evals if val <= target), (None, None))
    print(f"seed {seed} {optimizer:5}: val loss {target} at iter {it}, {s and round(s, 1)} s; "
          f"val loss at iter {max_iters}: {evals[-1][1]:.4f}", flush=True)
    return it, s, evals[-1][1]

def spread(xs):
    xs = [x for x in xs if x is not None]
    return f"{mean(xs):.4g} ± {stdev(xs) if xs[1:] else 0:.2g} ({len(xs)} runs)" if xs else "never"

print(f"README CPU model, {max_iters} iterations, eval every {eval_interval}; AdamW at "
      f"learning_rate 1e-3 (the config's), Muon at muon_lr {muon_lr} (the rest AdamW at 1e-3)")
runs = [(opt, run(opt, seed)) for seed in range(seeds) for opt in optimizers.split()]  # alternating
secs = {}
for optimizer in dict.fromkeys(optimizers.split()):
    its, s, last = zip(*[r for o, r in runs if o == optimizer])
    print(f"{optimizer:5}: iterations to {target}: {spread(its)}; seconds: {spread(s)}; "
          f"val loss at {max_iters}: {spread(last)}")
    secs[optimizer] = [x for x in s if x is not None]
if len(secs) == 2 and all(secs.values()):
    print(f"Muon's wall time to {target} over AdamW's (means): "
          f"{mean(secs['muon']) / mean(secs['adamw']):.2f}")
