"""Faults and bad input (issue 6): a killed run resumes to exactly the uninterrupted result, a
checkpoint is never left torn, bad files and bad flags get one clear line and a non-zero exit,
nothing is unpickled, and a failing save never damages the checkpoint already on disk.

Every script runs as a real subprocess. They share one tiny model configuration and one JAX
persistent compilation cache, so only the first run pays for compiling the training step."""
import json
import os
import pickle
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import checkpoint  # noqa: E402
import interop  # noqa: E402
from checkpoint import CKPT_NAME, CheckpointError, load_checkpoint  # noqa: E402

from tests.tinydata import tiny_text, write_char_dataset  # noqa: E402
MAX_ITERS, EVAL_INTERVAL = 24, 4  # a checkpoint every 4 iterations
TINY = ['--device=cpu', '--dtype=float32', '--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32',
        '--batch_size=4', '--gradient_accumulation_steps=1', '--eval_iters=2', '--log_interval=1',
        '--dropout=0.0', '--learning_rate=1e-3', '--warmup_iters=2', f'--lr_decay_iters={MAX_ITERS}',
        f'--eval_interval={EVAL_INTERVAL}', '--always_save_checkpoint=True']

# Runs a script with one fault injected at the N-th checkpoint write of the process, chosen by
# FAULT=<kind>:<N>. Kinds: 'write' (half the bytes reach the temp file, then SIGKILL), 'rename'
# (temp file complete, SIGKILL before the rename), 'readonly' (out_dir made read-only just before
# the write; as root, where modes do not bind, the EACCES such a directory gives is raised).
FAULTY = r'''
import errno, os, runpy, signal, sys, tempfile
kind, n = os.environ['FAULT'].split(':')
n, count = int(n), 0
real_mkstemp, real_fdopen, real_replace = tempfile.mkstemp, os.fdopen, os.replace

def mkstemp(*args, **kwargs):
    global count
    if kwargs.get('prefix') == '.tmp-':
        count += 1
        if count == n and kind == 'readonly':
            folder = kwargs['dir']
            os.chmod(folder, 0o555)
            if os.geteuid() == 0:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), folder)
    return real_mkstemp(*args, **kwargs)

class HalfThenDie:
    def __init__(self, f): self.f = f
    def __enter__(self): return self
    def __exit__(self, *exc): self.f.close()
    def fileno(self): return self.f.fileno()
    def write(self, blob):
        self.f.write(blob[:len(blob) // 2]); self.f.flush(); os.fsync(self.f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

def fdopen(fd, *args, **kwargs):
    f = real_fdopen(fd, *args, **kwargs)
    if kind == 'write' and count == n and '.tmp-' in os.readlink(f'/proc/self/fd/{fd}'):
        return HalfThenDie(f)
    return f

def replace(src, dst):
    if kind == 'rename' and count == n and os.path.basename(src).startswith('.tmp-'):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst)

tempfile.mkstemp, os.fdopen, os.replace = mkstemp, fdopen, replace
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name='__main__')
'''


# -----------------------------------------------------------------------------
# fixtures and helpers

@pytest.fixture(scope='module')
def env(tmp_path_factory):
    e = dict(os.environ)
    e.update(PYTHONUNBUFFERED='1', JAX_PLATFORMS='cpu')  # conftest's XLA cache and flags
    return e


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
    return write_char_dataset(str(tmp_path_factory.mktemp('data') / 'tiny'), tiny_text(20000))


def train_cmd(dataset, out_dir, *extra, wrapper=None):
    cmd = [sys.executable, os.path.join(REPO, 'train.py'), f'--dataset={dataset}', f'--out_dir={out_dir}', *TINY,
           *extra]
    return cmd if wrapper is None else [sys.executable, wrapper] + cmd[1:]


def run(cmd, env, cwd, timeout=180, **kwargs):
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, **kwargs)


def run_side_by_side(cmds, env, cwd, timeout=120):
    """Scripts that fail before compiling, run concurrently to save wall time."""
    procs = [subprocess.Popen(c, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in cmds]
    done = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return done


def sample_cmd(*extra):
    return [sys.executable, os.path.join(REPO, 'sample.py'), '--device=cpu', '--num_samples=1',
            '--max_new_tokens=4', *extra]


def assert_clear_error(proc, *needles, prefix='error:'):
    """One clear line: exit status 1 (not a crash or a signal), no traceback, and the last line of
    stderr starts with prefix and names what is wrong."""
    out = proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    last = lines[-1] if lines else ''
    assert proc.returncode == 1, f"exit status {proc.returncode}\n{out[-3000:]}"
    assert 'Traceback' not in out, out[-3000:]
    assert last.startswith(prefix), f"last stderr line {last!r}\n{out[-3000:]}"
    assert sum(line.startswith(prefix) for line in lines) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in last, f"{needle!r} not in {last!r}"
    return last


def losses_logged(text):
    """{iteration: the 'iter N: loss X' line's loss text} and {step: 'val loss' text}."""
    it = {int(m[1]): m[2] for m in re.finditer(r'^iter (\d+): loss (\S+),', text, re.M)}
    val = {int(m[1]): m[2] for m in re.finditer(r'^step (\d+): train loss \S+, val loss ([^,\s]+)', text, re.M)}
    return it, val


def ckpt_of(out_dir):
    return os.path.join(out_dir, CKPT_NAME)


def temps_in(out_dir):
    return [n for n in os.listdir(out_dir) if n.startswith('.tmp-')]


@pytest.fixture(scope='module')
def reference(tmp_path_factory, dataset, env):
    """An uninterrupted run: its out_dir and its log."""
    out = str(tmp_path_factory.mktemp('reference') / 'out')
    proc = run(train_cmd(dataset, out, f'--max_iters={MAX_ITERS}'), env, cwd=os.path.dirname(out), timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return out, proc.stdout


@pytest.fixture
def resumable(tmp_path, reference):
    """A copy of the reference checkpoint in a fresh out_dir (iter_num == MAX_ITERS)."""
    out = str(tmp_path / 'out')
    os.makedirs(out)
    shutil.copy(ckpt_of(reference[0]), out)
    return out


# -----------------------------------------------------------------------------
# kill -9 at seeded random points, including mid-write, then resume: the same run exactly

class Run:
    """train.py as a child whose output is read line by line, so that it can be killed at a
    chosen log line; a watchdog kills it if it hangs."""

    def __init__(self, cmd, env, cwd, timeout=240):
        self.proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.watchdog = threading.Timer(timeout, self.proc.kill)
        self.watchdog.start()
        self.lines = []

    def kill_at(self, pattern):
        """SIGKILL as soon as a line matches pattern; returns the matching line (None if it never came)."""
        for line in self.proc.stdout:
            self.lines.append(line)
            if re.match(pattern, line):
                self.proc.send_signal(signal.SIGKILL)
                self.finish()
                return line
        self.finish()
        return None

    def finish(self):
        self.lines += self.proc.stdout.readlines()
        self.proc.wait()
        self.watchdog.cancel()
        return ''.join(self.lines)


def test_kill9_anywhere_then_resume_equals_uninterrupted_run(tmp_path, dataset, env, reference):
    ref_out, ref_log = reference
    ref_iters, ref_vals = losses_logged(ref_log)
    assert sorted(ref_iters) == list(range(MAX_ITERS + 1))
    ref_arrays, ref_meta = load_checkpoint(ckpt_of(ref_out))
    assert ref_meta['iter_num'] == MAX_ITERS

    rng = random.Random(6)
    out = str(tmp_path / 'out')
    wrapper = str(tmp_path / 'faulty.py')
    with open(wrapper, 'w') as f:
        f.write(FAULTY)
    logs = []

    def saves_begun(log):
        # log lines only: stderr is merged in, and a Ctrl-C traceback may quote the print line
        return sum(line.startswith('saving checkpoint') for line in log.splitlines())

    def on_disk():
        """The checkpoint must load (never torn) after every kill; returns its iter_num."""
        arrays, meta = load_checkpoint(ckpt_of(out))
        return meta['iter_num']

    def resume(fault=None):
        e = dict(env, FAULT=fault) if fault else env
        return Run(train_cmd(dataset, out, f'--max_iters={MAX_ITERS}', '--init_from=resume',
                             wrapper=wrapper if fault else None), e, str(tmp_path))

    def resume_and_signal_at_save(n_save, sig):
        """Resumes and sends sig the moment the n_save-th save of the run begins; (run, its log)."""
        r = resume()
        for line in r.proc.stdout:
            r.lines.append(line)
            n_save -= line.startswith('saving checkpoint')
            if n_save == 0:
                r.proc.send_signal(sig)
                break
        return r, r.finish()

    # 1. from scratch, SIGKILL from outside right after a random iteration's log line
    k = rng.randrange(EVAL_INTERVAL + 1, 2 * EVAL_INTERVAL + 1)  # early: the child runs on until the signal lands
    r = Run(train_cmd(dataset, out, f'--max_iters={MAX_ITERS}'), env, str(tmp_path))
    assert r.kill_at(rf'iter {k}:'), r.finish()[-3000:]
    assert r.proc.returncode == -signal.SIGKILL
    logs.append(''.join(r.lines))
    saved = on_disk()
    assert saved % EVAL_INTERVAL == 0 and EVAL_INTERVAL <= saved < MAX_ITERS

    # 2. resume; SIGKILL with half of the next checkpoint written to its temp file
    r = resume('write:2')
    log = r.finish()
    logs.append(log)
    assert r.proc.returncode == -signal.SIGKILL, log[-3000:]
    assert on_disk() == saved, "a half-written checkpoint replaced the good one"
    torn = temps_in(out)
    assert len(torn) == 1 and 0 < os.path.getsize(os.path.join(out, torn[0])) < os.path.getsize(ckpt_of(out))

    # 3. resume; SIGKILL with the next checkpoint complete in its temp file but not yet renamed
    r = resume('rename:2')
    log = r.finish()
    logs.append(log)
    assert r.proc.returncode == -signal.SIGKILL, log[-3000:]
    assert on_disk() == saved
    assert len(temps_in(out)) == 1 and temps_in(out) != torn, "the next save should delete a dead writer's temp file"

    # 4. resume; SIGKILL from outside the moment a random later save begins (racing the write)
    # the first save of a resumed run rewrites its starting point; the kill needs a later one
    n_save = min(rng.randrange(2, 4), (MAX_ITERS - saved) // EVAL_INTERVAL + 1)
    r, log = resume_and_signal_at_save(n_save, signal.SIGKILL)
    logs.append(log)
    assert r.proc.returncode == -signal.SIGKILL, log[-3000:]
    saves = saves_begun(log)
    assert on_disk() in (saved + (saves - 2) * EVAL_INTERVAL, saved + (saves - 1) * EVAL_INTERVAL)

    # 5. resume; Ctrl-C (SIGINT) the moment the next save after the restart begins: the
    # KeyboardInterrupt may land inside the write, which must then leave the old file in place, and the
    # run ends with one line naming the iteration it reached and the checkpoint on disk, status 130
    saved = on_disk()
    r, log = resume_and_signal_at_save(min(2, (MAX_ITERS - saved) // EVAL_INTERVAL + 1), signal.SIGINT)
    logs.append(log)
    saves = saves_begun(log)
    assert r.proc.returncode != 0 or saved + EVAL_INTERVAL >= MAX_ITERS, log[-3000:]  # else it may finish first
    assert on_disk() in (saved + (saves - 2) * EVAL_INTERVAL, saved + (saves - 1) * EVAL_INTERVAL)
    if r.proc.returncode != 0:
        last = log.strip().splitlines()[-1]
        assert r.proc.returncode == 130 and 'Traceback' not in log, log[-3000:]
        assert re.match(rf'error: interrupted at iter \d+; the checkpoint in {re.escape(out)} \(iter {on_disk()}\) is '
                        rf'intact: continue with --init_from=resume$', last), last

    # 6. resume to the end
    r = resume()
    log = r.finish()
    logs.append(log)
    assert r.proc.returncode == 0, log[-3000:]
    assert temps_in(out) == []

    # every loss any of the runs logged is the uninterrupted run's, to the printed digit
    for log in logs:
        iters, vals = losses_logged(log)
        assert iters and all(ref_iters[i] == loss for i, loss in iters.items()), (iters, ref_iters)
        assert all(ref_vals[i] == loss for i, loss in vals.items()), (vals, ref_vals)
    assert losses_logged(logs[-1])[0][MAX_ITERS] == ref_iters[MAX_ITERS]

    # and the final parameters, optimizer state and val loss are bit for bit the same
    arrays, meta = load_checkpoint(ckpt_of(out))
    assert meta['iter_num'] == MAX_ITERS
    assert meta['best_val_loss'] == ref_meta['best_val_loss']
    assert sorted(arrays) == sorted(ref_arrays)
    for name in ref_arrays:
        np.testing.assert_array_equal(arrays[name], ref_arrays[name], err_msg=name)


# -----------------------------------------------------------------------------
# damaged, foreign and malicious files: refused with one line, nothing executed

def test_every_sampled_bit_flip_is_refused(tmp_path, reference):
    """Seeded single-bit flips over the whole file (length prefix, JSON header with model_args and
    checksum, array bytes): load_checkpoint refuses every one, naming the file, and never returns
    altered data."""
    blob = open(ckpt_of(reference[0]), 'rb').read()
    header_end = 8 + int.from_bytes(blob[:8], 'little')
    rng = random.Random(66)
    positions = ([rng.randrange(8) for _ in range(8)] + [rng.randrange(8, header_end) for _ in range(150)] +
                 [rng.randrange(header_end, len(blob)) for _ in range(60)])
    path = str(tmp_path / CKPT_NAME)
    for pos in positions:
        bad = bytearray(blob)
        bad[pos] ^= 1 << rng.randrange(8)
        with open(path, 'wb') as f:
            f.write(bad)
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(path)
        assert path in str(e.value) and '\n' not in str(e.value), (pos, str(e.value))
    with open(path, 'wb') as f:
        f.write(blob)
    load_checkpoint(path)  # the same file undamaged loads: the refusals were for the flips


class Evil:
    """Unpickling this creates the sentinel file: the proof that a loader executed code."""

    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (open, (self.sentinel, 'w'))


def damaged_checkpoints(good, tmp_path):
    """name -> (bytes of a bad ckpt.safetensors, words its error line must contain)."""
    blob = open(good, 'rb').read()
    flipped = bytearray(blob)
    flipped[-5] ^= 0x10  # inside the last array
    import torch  # a real nanoGPT-style torch.save file, renamed
    pt = tmp_path / 'torch.pt'
    torch.save({'model': {'w': torch.zeros(2)}, 'iter_num': 3}, pt)
    from safetensors.numpy import save
    return {
        'truncated': (blob[:len(blob) // 2], 'truncated'),
        'bit_flipped': (bytes(flipped), 'corrupted'),
        'empty': (b'', 'not a checkpoint'),
        'torch_save': (pt.read_bytes(), 'not a checkpoint'),
        'foreign_safetensors': (save({'w': np.zeros(3, np.float32)}), 'not a checkpoint written by this project'),
        'malicious_pickle': (pickle.dumps(Evil(str(tmp_path / 'PWNED'))), 'not a checkpoint'),
    }


SAMPLE_CASES = ('truncated', 'bit_flipped', 'empty', 'torch_save')


def test_damaged_checkpoint_is_one_clear_line_for_train_and_sample(tmp_path, dataset, env, reference):
    cases = damaged_checkpoints(ckpt_of(reference[0]), tmp_path)
    procs = {}
    for name, (data, _) in cases.items():
        out = tmp_path / name
        out.mkdir()
        (out / CKPT_NAME).write_bytes(data)
        # train.py and sample.py fail before compiling anything: run them side by side
        procs[name, 'train'] = subprocess.Popen(train_cmd(dataset, str(out), '--init_from=resume'), env=env,
                                                cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                text=True)
        if name in SAMPLE_CASES:  # the same CheckpointError path: the four the issue names suffice
            procs[name, 'sample'] = subprocess.Popen(sample_cmd(f'--out_dir={out}'), env=env, cwd=str(tmp_path), stdout=subprocess.PIPE,
                                                   stderr=subprocess.PIPE, text=True)
    for (name, script), p in procs.items():
        stdout, stderr = p.communicate(timeout=120)
        proc = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
        path = str(tmp_path / name / CKPT_NAME)
        assert_clear_error(proc, path, cases[name][1])
        assert open(path, 'rb').read() == cases[name][0]  # refused, not "repaired" or overwritten
    assert not (tmp_path / 'PWNED').exists()


def export_cmd(*extra):
    return [sys.executable, os.path.join(REPO, 'export.py'), *extra]


# runs a script with `import torch` failing, as where torch is not installed
NO_TORCH = r"""
import os, runpy, sys
sys.modules['torch'] = None
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def test_malicious_nanogpt_ckpt_pt_executes_nothing(tmp_path, dataset, env, reference):
    """A user brings a nanoGPT ckpt.pt, read with torch.load(weights_only=True). A malicious one (a bare
    pickle, and a torch.save archive with a callable inside), dropped into out_dir or passed as
    --init_from, is refused by train.py, sample.py and export.py with one line naming it; the pickle runs
    nothing and nothing is written. A genuine one (the reference run in nanoGPT's format) loads in both."""
    import torch
    sentinel = tmp_path / 'PWNED'
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'ckpt.pt').write_bytes(pickle.dumps(Evil(str(sentinel))))
    pt = str(out / 'ckpt.pt')
    archive = str(tmp_path / 'archive.pt')
    torch.save({'model': {'transformer.wte.weight': torch.zeros(2, 2)}, 'model_args': {'n_layer': Evil(str(sentinel))}},
               archive)
    genuine = tmp_path / 'genuine'
    genuine.mkdir()
    torch.save(interop.to_nanogpt(*load_checkpoint(ckpt_of(reference[0]))), genuine / 'ckpt.pt')
    cases = [(train_cmd(dataset, str(out), '--init_from=resume'), [pt, 'refusing', 'nothing in it was run']),
             (sample_cmd(f'--out_dir={out}'), [pt, 'refusing']),
             (export_cmd(f'--out_dir={out}', f"--export_dir={tmp_path / 'exported'}"), [pt, 'refusing']),
             (train_cmd(dataset, str(tmp_path / 'fresh'), f'--init_from={archive}'), [archive, 'refusing', 'it names']),
             (sample_cmd(f'--init_from={archive}'), [archive, 'refusing', 'it names']),
             (train_cmd(dataset, str(genuine), '--init_from=resume', f'--max_iters={MAX_ITERS}'), None),
             (sample_cmd(f"--init_from={genuine / 'ckpt.pt'}"), None)]
    for proc, (_, needles) in zip(run_side_by_side([c for c, _ in cases], env, str(tmp_path), timeout=300), cases):
        if needles is None:
            assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        else:
            assert_clear_error(proc, *needles)
    assert not sentinel.exists()
    assert os.listdir(out) == ['ckpt.pt'] and not os.path.exists(tmp_path / 'exported')
    assert not os.path.exists(tmp_path / 'fresh' / CKPT_NAME)
    assert load_checkpoint(ckpt_of(genuine))[1]['iter_num'] == MAX_ITERS  # resumed, and saved ours beside it


def test_bad_nanogpt_checkpoints_and_exports_are_one_clear_line(tmp_path, dataset, env, reference):
    """A ckpt.pt without model_args, one whose weights do not fit its model_args, a non-empty export_dir,
    a checkpoint that is not there, an unknown format, and torch missing where a ckpt.pt is read or
    written: one clear line each, and nothing written."""
    import torch
    nanogpt = interop.to_nanogpt(*load_checkpoint(ckpt_of(reference[0])))
    no_args = str(tmp_path / 'no_model_args.pt')
    torch.save({'model': nanogpt['model'], 'iter_num': 3}, no_args)
    (tmp_path / 'wrong').mkdir()
    wrong = str(tmp_path / 'wrong' / 'ckpt.pt')
    torch.save({**nanogpt, 'model_args': {**nanogpt['model_args'], 'n_embd': 64}}, wrong)
    full = tmp_path / 'full'
    full.mkdir()
    (full / 'mine.txt').write_text('keep me')
    no_torch = str(tmp_path / 'no_torch.py')
    with open(no_torch, 'w') as f:
        f.write(NO_TORCH)
    ref = f'--out_dir={reference[0]}'
    cases = [
        (sample_cmd(f'--init_from={no_args}'), [no_args, "no 'model' and 'model_args'"]),
        (train_cmd(dataset, str(tmp_path / 'wrong'), '--init_from=resume'), [wrong, 'transformer.wte.weight has shape',
                                                                             "'n_embd': 64"]),
        (export_cmd(f"--out_dir={tmp_path / 'wrong'}", f"--export_dir={tmp_path / 'e1'}"), [wrong, 'has shape']),
        (export_cmd(ref, f'--export_dir={full}'), [str(full), 'not empty', '--overwrite=True']),
        (export_cmd(f"--out_dir={tmp_path / 'nowhere'}", f"--export_dir={tmp_path / 'e2'}"), ['no checkpoint at', 'nowhere']),
        (export_cmd(ref, '--format=onnx', f"--export_dir={tmp_path / 'e3'}"), ["format='onnx'", "'hf'", "'nanogpt'"]),
        ([sys.executable, no_torch] + export_cmd(ref, '--format=nanogpt', f"--export_dir={tmp_path / 'e4'}")[1:],
         ["writing nanoGPT's ckpt.pt needs PyTorch: pip install torch"]),
        ([sys.executable, no_torch] + sample_cmd(f'--init_from={wrong}')[1:],
         ['reading a nanoGPT ckpt.pt needs PyTorch: pip install torch']),
    ]
    for proc, (_, needles) in zip(run_side_by_side([c for c, _ in cases], env, str(tmp_path), timeout=300), cases):
        assert_clear_error(proc, *needles)
    assert os.listdir(tmp_path / 'wrong') == ['ckpt.pt'] and os.listdir(full) == ['mine.txt']
    assert not any(os.path.exists(tmp_path / e) for e in ('e1', 'e2', 'e3', 'e4'))


def test_malicious_meta_pkl_executes_nothing(tmp_path, dataset, env, reference):
    """nanoGPT's meta.pkl is read, but a pickle that would call anything is refused by train.py
    (dataset vocabulary) and by sample.py (vocabulary of the checkpoint's dataset)."""
    sentinel = tmp_path / 'PWNED'
    evil_data = tmp_path / 'evil_data'
    shutil.copytree(dataset, evil_data)
    os.remove(evil_data / 'meta.json')
    (evil_data / 'meta.pkl').write_bytes(pickle.dumps({'vocab_size': Evil(str(sentinel))}))
    # a checkpoint that names the evil dataset, as one trained on it would
    arrays, meta = load_checkpoint(ckpt_of(reference[0]))
    meta['config']['dataset'] = str(evil_data)
    out = tmp_path / 'out'
    out.mkdir()
    checkpoint.save_checkpoint(str(out / CKPT_NAME), arrays, meta)
    for cmd in (train_cmd(str(evil_data), str(tmp_path / 'fresh')), sample_cmd(f'--out_dir={out}')):
        assert_clear_error(run(cmd, env, cwd=str(tmp_path)), str(evil_data / 'meta.pkl'), 'refusing')
    assert not sentinel.exists()
    assert not os.path.exists(tmp_path / 'fresh' / CKPT_NAME)


# -----------------------------------------------------------------------------
# bad flags, bad data, bad sampling input: one line each, nothing trained or written

def test_configurator_faults_stop_before_training(tmp_path, dataset, env):
    (tmp_path / 'raises.py').write_text("batch_size = 8\nn_layer = int('two')\n")
    cases = [  # (arguments, words the line must contain)
        (['--n_layr=4'], ['unknown config key: n_layr', '--n_layer']),
        (['--batch_size=big'], ['--batch_size=big', 'expected int']),
        (['--batch_size'], ["malformed argument '--batch_size'", '--key=value']),
        (['config/no_such_config.py'], ['config/no_such_config.py']),
        ([str(tmp_path / 'raises.py')], [f"{tmp_path / 'raises.py'}, line 2", 'ValueError']),
    ]
    outs = [tmp_path / f'out{i}' for i in range(len(cases))]
    procs = run_side_by_side([train_cmd(dataset, str(o), *args) for o, (args, _) in zip(outs, cases)],
                             env, str(tmp_path))
    for proc, out, (args, needles) in zip(procs, outs, cases):
        assert_clear_error(proc, *needles, prefix='config error:')
        assert 'compiling' not in proc.stdout and not out.exists()  # stopped before anything started


def test_zero_intervals_and_impossible_dropout_stop_before_compiling(tmp_path, dataset, env):
    """nanoGPT divides by eval_interval and log_interval and averages eval_iters losses: 0 was a traceback
    (ZeroDivisionError, or KeyError for the eval step never compiled); dropout 1.0 was Haiku's line."""
    cases = [(['--eval_interval=0'], ['eval_interval=0', 'at least 1']),
             (['--log_interval=0'], ['log_interval=0', 'at least 1']),
             (['--eval_iters=0'], ['eval_iters=0', 'at least 1']),
             (['--dropout=1.0'], ['dropout must be in [0, 1)', '1.0']),
             (['--rope=True', '--n_embd=30'], ['n_embd // n_head must be even', '30 // 2'])]
    outs = [tmp_path / f'out{i}' for i in range(len(cases))]
    procs = run_side_by_side([train_cmd(dataset, str(o), *args) for o, (args, _) in zip(outs, cases)],
                             env, str(tmp_path))
    for proc, out, (args, needles) in zip(procs, outs, cases):
        assert_clear_error(proc, *needles)
        assert 'compiling' not in proc.stdout and not (out / CKPT_NAME).exists(), args


def test_wandb_without_a_login_is_one_line(tmp_path, dataset, env):
    """--wandb_log=True where wandb has no API key (a fresh HOME, no WANDB_* settings): wandb's own
    advice in one line, not its traceback."""
    pytest.importorskip('wandb')
    fresh = {k: v for k, v in env.items() if not k.startswith('WANDB_')}
    fresh.update(HOME=str(tmp_path), WANDB_DIR=str(tmp_path))
    proc = run(train_cmd(dataset, str(tmp_path / 'out'), '--wandb_log=True'), fresh, cwd=str(tmp_path))
    assert_clear_error(proc, 'wandb login')
    assert not (tmp_path / 'out' / CKPT_NAME).exists()


@pytest.fixture
def broken_datasets(tmp_path, dataset, reference):
    """name -> (dataset folder, extra flags, words the error line must contain)."""
    def variant(name, edit):
        folder = tmp_path / name
        shutil.copytree(dataset, folder)
        edit(folder)
        return str(folder)

    ids = np.fromfile(os.path.join(dataset, 'val.bin'), dtype=np.uint16)
    vocab = json.load(open(os.path.join(dataset, 'meta.json')))['vocab_size']
    resume = ['--init_from=resume', f'--out_dir={reference[0]}']  # refused before any write: safe to share
    cases = {
        'missing_train': (lambda f: os.remove(f / 'train.bin'), [], ['train.bin not found', 'prepare.py']),
        'missing_val': (lambda f: os.remove(f / 'val.bin'), [], ['val.bin not found']),
        'empty_train': (lambda f: open(f / 'train.bin', 'wb').close(), [], ['train.bin holds 0 tokens', 'block_size=32']),
        'short_val': (lambda f: ids[:20].tofile(f / 'val.bin'), [], ['val.bin holds 20 tokens', 'block_size=32']),
        'torn_train': (lambda f: (f / 'train.bin').write_bytes((f / 'train.bin').read_bytes()[:-1]), [],
                       ['train.bin has an odd number of bytes']),
        # another prepare.py's data: found by the prefetch thread and the first eval at once
        'tokens_outside_vocab': (lambda f: (ids + vocab).tofile(f / 'train.bin'), [],
                                 ['train.bin holds token id', f'has {vocab} tokens']),
        'unreadable_meta': (lambda f: (f / 'meta.json').write_text('{"vocab_size": 5'), [], ['meta.json is unreadable']),
        'other_vocab_on_resume': (
            lambda f: (f / 'meta.json').write_text(json.dumps({'vocab_size': vocab + 7})), resume,
            [CKPT_NAME, f'vocab_size {vocab}', f'has {vocab + 7}']),
    }
    return {name: (variant(name, edit), extra, needles) for name, (edit, extra, needles) in cases.items()}


def test_dataset_problems_are_clear_errors(tmp_path, env, broken_datasets, reference):
    before = open(ckpt_of(reference[0]), 'rb').read()
    names = list(broken_datasets)
    cmds = []
    for name in names:
        folder, extra, _ = broken_datasets[name]
        cmds.append(train_cmd(folder, str(tmp_path / f'out_{name}'), *extra))
    for name, proc in zip(names, run_side_by_side(cmds, env, str(tmp_path))):
        folder, extra, needles = broken_datasets[name]
        assert_clear_error(proc, folder, *needles)
        assert not os.path.exists(tmp_path / f'out_{name}' / CKPT_NAME)
    assert open(ckpt_of(reference[0]), 'rb').read() == before


def test_sample_bad_input_as_a_new_user(tmp_path, dataset, env, reference):
    fresh = tmp_path / 'fresh'  # a new user's empty working directory
    fresh.mkdir()
    out = f'--out_dir={reference[0]}'
    # a checkpoint whose dataset was prepared again with another vocabulary since
    other = tmp_path / 'other_data'
    shutil.copytree(dataset, other)
    meta = json.load(open(other / 'meta.json'))
    vocab = meta['vocab_size']
    meta['vocab_size'] += 7
    (other / 'meta.json').write_text(json.dumps(meta))
    arrays, ckpt_meta = load_checkpoint(ckpt_of(reference[0]))
    ckpt_meta['config']['dataset'] = str(other)
    (tmp_path / 'other_out').mkdir()
    checkpoint.save_checkpoint(ckpt_of(tmp_path / 'other_out'), arrays, ckpt_meta)
    cases = [
        ([], [os.path.join('out', CKPT_NAME), 'train one first']),
        ([out, '--start=Ωmega'], ["'Ω'", 'vocabulary']),
        ([out, '--start=FILE:prompt.txt'], ["'prompt.txt'", 'No such file']),
        ([out, '--max_new_tokens=0'], ['max_new_tokens must be at least 1']),
        ([f"--out_dir={tmp_path / 'other_out'}"], [str(other), f'has {vocab + 7} tokens', f'has {vocab}']),
        (['--init_from=gpt2'], ['cannot download gpt2 from the Hugging Face hub', 'save_pretrained']),  # offline
    ]
    offline = dict(env, HF_HOME=str(tmp_path / 'hf'), HF_HUB_OFFLINE='1')  # an empty cache
    procs = run_side_by_side([sample_cmd(*args) for args, _ in cases], offline, str(fresh))
    for proc, (args, needles) in zip(procs, cases):
        assert_clear_error(proc, *needles)
    assert os.listdir(fresh) == []


# -----------------------------------------------------------------------------
# divergence and failing saves: a clear stop, and the checkpoint on disk stays as it was

def test_nan_loss_stops_naming_the_iteration_and_keeps_the_checkpoint(tmp_path, dataset, env, resumable):
    before = open(ckpt_of(resumable), 'rb').read()
    # an absurd learning rate blows the weights up within a step or two; without
    # always_save_checkpoint the resume point's eval (val loss equal to best) writes nothing
    proc = run(train_cmd(dataset, resumable, '--init_from=resume', f'--max_iters={MAX_ITERS + 12}',
                         '--learning_rate=1e30', '--decay_lr=False', '--always_save_checkpoint=False'),
               env, cwd=str(tmp_path))
    last = assert_clear_error(proc, 'diverged', f'the checkpoint in {resumable}', 'untouched')
    it = int(re.match(r'error: iter (\d+): (val )?loss is (nan|inf|-inf)', last)[1])
    logged, _ = losses_logged(proc.stdout)
    assert it > MAX_ITERS and it not in logged and all(np.isfinite(float(v)) for v in logged.values())
    assert open(ckpt_of(resumable), 'rb').read() == before
    assert temps_in(resumable) == []


def test_disk_full_at_save_time_keeps_the_previous_checkpoint(tmp_path, dataset, env, resumable):
    """RLIMIT_FSIZE makes any write past the limit fail with EFBIG, as a full disk fails a write:
    the limit lets the run start but not write a whole checkpoint."""
    path = ckpt_of(resumable)
    before = open(path, 'rb').read()

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) // 2, len(before) // 2))

    proc = run(train_cmd(dataset, resumable, '--init_from=resume', f'--max_iters={MAX_ITERS + 2}'),
               env, cwd=str(tmp_path), preexec_fn=small_files)
    assert_clear_error(proc, f'cannot write the checkpoint to {resumable}', 'previous checkpoint is intact')
    assert open(path, 'rb').read() == before
    assert temps_in(resumable) == []  # the partial temp file was removed, not left filling the disk


def test_no_save_lands_after_the_exit_line_named_the_checkpoint(tmp_path):
    """The Ctrl-C line (a watcher thread) names the checkpoint on disk while the main thread may be saving:
    once describe() has read it, a save's rename waits for the exit, so the line stays true. Without the
    wait the iter-12 save landed after the line said iter 8 (test_kill9's Ctrl-C step, once)."""
    script = textwrap.dedent('''
        import sys, threading
        sys.path.insert(0, sys.argv[1])
        import numpy as np
        from checkpoint import CKPT_NAME, describe, load_checkpoint, save_checkpoint
        path = sys.argv[2] + '/' + CKPT_NAME
        save_checkpoint(path, {'a': np.zeros(3)}, {'iter_num': 8})
        print(describe(sys.argv[2], 'intact'))
        saver = threading.Thread(target=save_checkpoint, args=(path, {'a': np.ones(3)}, {'iter_num': 12}),
                                 daemon=True)
        saver.start()
        saver.join(timeout=3)
        print(saver.is_alive(), load_checkpoint(path)[1]['iter_num'])
    ''')
    proc = subprocess.run([sys.executable, '-c', script, REPO, str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == [f'the checkpoint in {tmp_path} (iter 8) is intact', 'True 8']


def test_ctrl_c_while_a_diverged_run_dies_still_gives_its_line(tmp_path):
    """train.py's stop_diverged: describe() (which keeps the checkpoint's lock), then die(). A Ctrl-C in
    between leaves the watcher waiting in its own describe(); die() must still print its line. (The
    watcher used to claim the one error line first, and the run exited 1 in silence.)"""
    script = textwrap.dedent('''
        import os, signal, sys, threading, time
        sys.path.insert(0, sys.argv[1])
        import numpy as np
        from checkpoint import CKPT_NAME, describe, save_checkpoint
        from cli import die, on_interrupt
        save_checkpoint(sys.argv[2] + '/' + CKPT_NAME, {'a': np.zeros(3)}, {'iter_num': 8})
        on_interrupt(lambda: 'interrupted; ' + describe(sys.argv[2], 'intact'))
        line = describe(sys.argv[2], 'untouched')  # the lock is now this thread's for good
        os.kill(os.getpid(), signal.SIGINT)
        me, deadline = threading.get_ident(), time.time() + 30
        while not any(f.f_code.co_name == 'describe' for t, f in sys._current_frames().items() if t != me):
            time.sleep(0.01)  # until the watcher waits in describe()
            if time.time() > deadline:
                os._exit(3)  # the watcher never got there: the check below says so
        die('diverged; ' + line)
    ''')
    proc = subprocess.run([sys.executable, '-c', script, REPO, str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 3, "the Ctrl-C watcher never entered describe() within 30 s"
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr == f'error: diverged; the checkpoint in {tmp_path} (iter 8) is untouched\n', proc.stderr


def test_out_dir_read_only_at_save_time_keeps_the_previous_checkpoint(tmp_path, dataset, env, resumable):
    """out_dir turns read-only during the run (after the start-up check passed); root ignores file
    modes, so there the wrapper raises the EACCES the write would get."""
    path = ckpt_of(resumable)
    before = open(path, 'rb').read()
    wrapper = tmp_path / 'faulty.py'
    wrapper.write_text(FAULTY)
    try:
        proc = run(train_cmd(dataset, resumable, '--init_from=resume', f'--max_iters={MAX_ITERS + 2}',
                             wrapper=str(wrapper)), dict(env, FAULT='readonly:1'), cwd=str(tmp_path))
    finally:
        os.chmod(resumable, 0o755)
    assert_clear_error(proc, f'cannot write the checkpoint to {resumable}', 'Permission denied',
                       'previous checkpoint is intact')
    assert open(path, 'rb').read() == before
    assert temps_in(resumable) == []


def test_out_dir_not_writable_at_start_fails_before_compiling(tmp_path, dataset, env):
    blocker = tmp_path / 'a_file'
    blocker.write_text('not a directory')
    proc = run(train_cmd(dataset, str(blocker / 'out')), env, cwd=str(tmp_path))
    assert_clear_error(proc, 'out_dir', str(blocker / 'out'), 'not writable')
    assert 'compiling' not in proc.stdout


def test_checkpoint_file_mode_is_what_open_would_give(tmp_path):
    """The temp file is created 0600; the checkpoint must not stay that way (a group sharing runs
    could not read it), and a mode the user set on it survives the next save."""
    path = str(tmp_path / CKPT_NAME)
    umask = os.umask(0o022)
    try:
        checkpoint.save_checkpoint(path, {'w': np.ones(3, np.float32)}, {'iter_num': 1})
        assert os.stat(path).st_mode & 0o777 == 0o644
        os.chmod(path, 0o640)
        checkpoint.save_checkpoint(path, {'w': np.zeros(3, np.float32)}, {'iter_num': 2})
        assert os.stat(path).st_mode & 0o777 == 0o640
    finally:
        os.umask(umask)
    assert load_checkpoint(path)[1] == {'iter_num': 2}


def test_unreadable_checkpoint_is_not_called_corrupt(tmp_path):
    """A checkpoint path that cannot be read (here a directory; a file without read permission
    goes the same way for a non-root user) is reported as unreadable, not as damaged."""
    path = tmp_path / CKPT_NAME
    path.mkdir()
    with pytest.raises(CheckpointError, match=rf'cannot read {re.escape(str(path))} .*readable file'):
        load_checkpoint(str(path))


def test_saving_holds_one_array_beyond_the_callers(tmp_path):
    """save_checkpoint writes array by array: at its peak it has allocated about one array (the contiguous copy
    of a transposed weight, as params_to_arrays hands them over), not a second copy of the state; safetensors'
    own reader reads back every array and the metadata."""
    import tracemalloc
    from safetensors import safe_open
    rng = np.random.default_rng(0)
    arrays = {f'model.w{i}': rng.normal(size=(256, 512)).astype(np.float32).T for i in range(8)}
    arrays.update({'optimizer.count': np.int32(3), 'mask': np.array([True, False])})
    largest = max(a.nbytes for a in arrays.values())
    path = str(tmp_path / CKPT_NAME)
    tracemalloc.start()
    try:
        checkpoint.save_checkpoint(path, arrays, {'iter_num': 3})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 * largest, (peak, largest, sum(a.nbytes for a in arrays.values()))
    with safe_open(path, framework='numpy') as f:
        assert sorted(f.keys()) == sorted(arrays) and json.loads(f.metadata()['meta']) == {'iter_num': 3}
        for k, a in arrays.items():
            np.testing.assert_array_equal(f.get_tensor(k), a, err_msg=k)
    assert load_checkpoint(path)[1] == {'iter_num': 3}  # and its checksum holds


def test_ctrl_c_while_sampling_exits_at_once(tmp_path, env, reference):
    """SIGINT once sample.py's progress bar shows (minutes of sampling ahead): Python's own handler would
    wait for the compiled loop to return; sample.py must leave within 3 s, status 130, one line."""
    cmd = sample_cmd(f'--out_dir={reference[0]}', '--num_samples=256', '--batch_size=256',
                     '--max_new_tokens=100000')
    proc = subprocess.Popen(cmd, env=env, cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        seen, deadline = b'', time.monotonic() + 120
        while b'sampling' not in seen and time.monotonic() < deadline:  # tqdm's bar: inside the loop
            if not (chunk := os.read(proc.stderr.fileno(), 4096)):
                break  # it ended: the checks below say how
            seen += chunk
        proc.send_signal(signal.SIGINT)
        sent = time.monotonic()
        stdout, stderr = proc.communicate(timeout=30)  # the old handler: minutes
        waited = time.monotonic() - sent
    finally:
        proc.kill()
    assert b'sampling' in seen, (seen + stderr)[-2000:]
    assert proc.returncode == 130, (proc.returncode, stderr[-2000:])
    assert waited < 3, f"exited {waited:.1f} s after the signal"
    assert b'Traceback' not in stderr and b'-----' not in stdout, (stdout + stderr)[-2000:]
    assert stderr.strip().splitlines()[-1].split(b'\r')[-1] == b'error: interrupted', stderr[-300:]


def test_ctrl_c_inside_a_long_eval_exits_at_once(tmp_path, dataset, env, resumable):
    """SIGINT 2 s into the first eval of a bigger model (5,000 batches a split, ~a minute here), next to
    a checkpoint: Python's own handler would wait for the compiled call to return; the run must leave
    within 3 s with the one interrupted line, status 130, the eval unfinished, the checkpoint as it was."""
    before = open(ckpt_of(resumable), 'rb').read()
    cmd = train_cmd(dataset, resumable, '--n_layer=4', '--n_head=4', '--n_embd=128', '--block_size=64',
                    '--batch_size=12', '--eval_iters=5000')
    proc = subprocess.Popen(cmd, env=env, cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        for line in proc.stdout:  # the last line before the eval's compiled call
            if line.startswith('memory:'):
                break
        time.sleep(2)
        proc.send_signal(signal.SIGINT)
        sent = time.monotonic()
        stdout, stderr = proc.communicate(timeout=120)
        waited = time.monotonic() - sent
    finally:
        proc.kill()
    assert proc.returncode == 130, (proc.returncode, stderr[-2000:])
    assert waited < 3, f"exited {waited:.1f} s after the signal"
    assert 'step 0' not in stdout and 'Traceback' not in stderr, stdout[-2000:] + stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert re.match(rf'error: interrupted at iter 0; the checkpoint in {re.escape(resumable)} '
                    rf'\(iter {MAX_ITERS}\) is intact: continue with --init_from=resume$', last), last
    assert open(ckpt_of(resumable), 'rb').read() == before
