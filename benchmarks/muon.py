"""Named train.py runs taking turns, one of each per seed: each run's wall time (the whole process,
start-up and compile included) and its last val loss, and its time over the first run's."""
import os
import re
from statistics import mean, stdev
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
seeds = 5  # seeds 0 .. seeds-1
runs = 'adamw muon speedrun'  # names from RUNS, the first the yardstick; e.g. --runs='muon'
flags = ''  # added to every run, e.g. --flags='--muon_lr=0.05'
exec(open(os.path.join(REPO, 'configurator.py')).read())
README = ('config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20 '
          '--log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 '
          '--max_iters=2000 --lr_decay_iters=2000 --dropout=0.0')  # the README's CPU command
RUNS = {
    'adamw': README,
    'muon': README + ' --optimizer=muon --muon_lr=0.02 --max_iters=600 --lr_decay_iters=600 '
                     '--eval_interval=300',
    'speedrun': 'config/train_shakespeare_char.py config/train_shakespeare_char_speedrun.py '
                '--device=cpu --compile=False --eval_iters=20 --block_size=64',
}

def run(name, seed):
    """(wall seconds of the whole train.py process, its last val loss)."""
    with tempfile.TemporaryDirectory() as out_dir:
        cmd = [sys.executable, 'train.py', *f'{RUNS[name]} {flags}'.split(),
               f'--seed={seed}', f'--out_dir={out_dir}']
        t = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)
        s = time.perf_counter() - t
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed with exit status {proc.returncode}")
    val = float(re.findall(r'^step \d+: .*val loss ([^\s,]+)', proc.stdout, re.M)[-1])
    print(f"seed {seed} {name:9}: {s:6.1f} s, val loss {val:.4f}", flush=True)
    return s, val

names = runs.split()
got = {(n, seed): run(n, seed) for seed in range(seeds) for n in names}  # taking turns per seed
col = lambda n, i: [got[n, s][i] for s in range(seeds)]  # i: 0 seconds, 1 val loss
sd = lambda xs: f"{mean(xs):.4g} ± {stdev(xs) if xs[1:] else 0:.2g}"
print(f"\n| seed | {' | '.join(f'{n} s | {n} val' for n in names)} |")
print(f"|---|{'---|---|' * len(names)}")
for seed in range(seeds):
    print(f"| {seed} | {' | '.join('%.1f | %.4f' % got[n, seed] for n in names)} |")
print(f"| mean ± sd | {' | '.join(f'{sd(col(n, 0))} | {sd(col(n, 1))}' for n in names)} |")
for n in names[1:]:
    pairs = ', '.join(f'{a / b:.2f}' for a, b in zip(col(n, 0), col(names[0], 0)))
    ratio = mean(col(n, 0)) / mean(col(names[0], 0))
    print(f"{n} over {names[0]}, wall time: {ratio:.2f}x (means), per seed {pairs}; "
          f"val ≤ 1.909: {sum(v <= 1.909 for v in col(n, 1))} of {seeds}")
