"""Multi-process data parallel on JAX's distributed runtime (issue 7), tested on this machine:
train.py in 2 processes on localhost (CPU, gloo collectives, 1 device each) against 1 process with
2 host devices and 1 process with 1 device doing all the gradient accumulation itself.

The file bounds its own time (BUDGET_S over all launches) and every launch runs in its own process
group, killed whatever happens, so a hung collective cannot outlive the test."""
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from checkpoint import CKPT_NAME, load_checkpoint  # noqa: E402

TRAIN = os.path.join(REPO, 'train.py')
from tests.tinydata import tiny_text, write_char_dataset  # noqa: E402
BUDGET_S = 240  # all launches of this file together
_start = []

# every iteration runs 2 micro-batches: one per device with 2 devices, both on one device with 1;
# dropout on, so the dropout keys of the micro-batches must line up too
TINY = ['--device=cpu', '--dtype=float32', '--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32',
        '--batch_size=4', '--gradient_accumulation_steps=2', '--dropout=0.1', '--eval_interval=2', '--eval_iters=2',
        '--learning_rate=1e-2', '--warmup_iters=2', '--lr_decay_iters=4', '--min_lr=1e-3', '--log_interval=1',
        '--wandb_log=False']


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    """A small character-level dataset: the first 100k characters of tiny Shakespeare."""
    return write_char_dataset(str(tmp_path_factory.mktemp('data') / 'tiny'), tiny_text(100_000))


@pytest.fixture(scope='module')
def compile_cache():
    """conftest's XLA compilation cache: process 0 of the later 2-process launches runs the program the
    first one compiled (JAX writes the cache from process 0 only), which keeps the file's time down."""
    return os.environ['JAX_COMPILATION_CACHE_DIR']


def free_port():
    with socket.socket() as s:
        s.bind(('localhost', 0))
        return s.getsockname()[1]


def child_env(compile_cache, host_devices=1, **extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(('JAX_', 'SLURM_', 'OMPI_', 'XLA_', 'TPU_'))}  # nothing inherited may start a cluster
    # conftest's compile flags, as every run here; the host device count always explicit: train.py's own
    # default on CPU (one per core, up to 2) would split rows in the 2-process runs, where dropout masks
    # then differ from the 1-device reference
    xla_flags = f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count={host_devices}"
    env.update(JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1', WANDB_MODE='disabled', XLA_FLAGS=xla_flags,
               JAX_COMPILATION_CACHE_DIR=compile_cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='-1')
    env.update(extra)
    return env


def launch(jobs, cwd, what):
    """Runs the jobs (args, env) together, each train.py in its own process group; returns their
    (returncode, output). Past the file's time budget, or on any error, every group is killed."""
    if not _start:
        _start.append(time.monotonic())
    deadline = _start[0] + BUDGET_S
    procs, logs, started = [], [], time.monotonic()
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        for i, (args, env) in enumerate(jobs):
            log = open(os.path.join(cwd, f'{what.replace(" ", "_")}.{i}.log'), 'w+')
            logs.append(log)
            procs.append(subprocess.Popen([sys.executable, TRAIN] + args, cwd=cwd, env=env, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True))
        for p in procs:
            try:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"{what}: not finished within this file's {BUDGET_S} s budget; "
                            f"last output: {tail(logs)}")
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for log in logs:
            log.flush()
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = cpu.ru_utime + cpu.ru_stime - cpu_before.ru_utime - cpu_before.ru_stime
    print(f"{what}: {time.monotonic() - started:.1f}s wall, {cpu_s:.1f}s cpu")
    out = []
    for p, log in zip(procs, logs):
        log.seek(0)
        out.append((p.returncode, log.read()))
        log.close()
    return out


def tail(logs):
    parts = []
    for log in logs:
        log.flush()
        log.seek(0)
        parts.append(log.read()[-1500:])
    return '\n----\n'.join(parts)


def ok(results, what):
    for i, (rc, out) in enumerate(results):
        assert rc == 0, f"{what}, process {i}: exit code {rc}\n{out[-3000:]}"
    return [out for _, out in results]


def losses(out):
    """{('iter', n): loss, ('step', n): (train loss, val loss)} from train.py's log lines."""
    got = {}
    for m in re.finditer(r'^iter (\d+): loss ([-\d.naif]+),', out, re.M):
        got[('iter', int(m.group(1)))] = float(m.group(2))
    for m in re.finditer(r'^step (\d+): train loss ([-\d.naif]+), val loss ([-\d.naif]+)', out, re.M):
        got[('step', int(m.group(1)))] = (float(m.group(2)), float(m.group(3)))
    return got


def multi(coordinator, n, i, flags):
    """The two ways to tell train.py its place: JAX_* variables, or the same as flags."""
    if flags:
        return [f'--coordinator_address={coordinator}', f'--num_processes={n}', f'--process_id={i}'], {}
    return [], dict(JAX_COORDINATOR_ADDRESS=coordinator, JAX_NUM_PROCESSES=str(n), JAX_PROCESS_ID=str(i))


BAD_SETTINGS = [
    (['--num_processes=2', '--process_id=0'], {}, 'needs a coordinator'),
    (['--coordinator_address=localhost:1'], {'JAX_NUM_PROCESSES': '2'}, 'give each process its own --process_id'),
    (['--coordinator_address=auto'], {}, 'JAX detects no cluster here'),
    ([], {'JAX_NUM_PROCESSES': 'two'}, 'must be integers'),
]


def test_bad_multi_process_settings_give_one_line(data_dir, compile_cache, tmp_path):
    """Each a one-line error before anything is compiled; all launched together. Then 2 processes
    started with different batch sizes: both refuse, naming the setting. Then 2 processes asked for
    3 micro-batches of 5 rows: they divide over the 2 devices neither whole (DDP's rule) nor by rows."""
    cases = [(args, env) for args, env, _ in BAD_SETTINGS]
    coordinator = f'localhost:{free_port()}'
    for i in range(2):
        args, env = multi(coordinator, 2, i, flags=False)
        cases.append((args + [f'--batch_size={4 + i}'], env))
    coordinator = f'localhost:{free_port()}'
    for i in range(2):
        args, env = multi(coordinator, 2, i, flags=False)
        cases.append((args + ['--gradient_accumulation_steps=3', '--batch_size=5'], env))
    expected = ([e for _, _, e in BAD_SETTINGS] + ['started with different settings (batch_size)'] * 2
                + ['gradient_accumulation_steps=3 must be divisible by the number of devices (2)'] * 2)
    jobs = [(TINY + [f'--dataset={data_dir}', f'--out_dir={tmp_path / f"out{i}"}'] + args, child_env(compile_cache, **env))
            for i, (args, env) in enumerate(cases)]
    results = launch(jobs, str(tmp_path), 'bad settings')
    for i, ((rc, out), (args, env), exp) in enumerate(zip(results, cases, expected)):
        lines = [l for l in out.splitlines() if l.startswith('error:')]
        assert rc != 0 and 'Traceback' not in out and len(lines) == 1, f"{args} {env}:\n{out[-2000:]}"
        assert exp in lines[0], f"{args} {env}: {lines[0]}"
        assert 'compiling' not in out and not os.path.exists(tmp_path / f'out{i}' / CKPT_NAME)


def test_two_processes_match_one_process_and_resume(data_dir, compile_cache, tmp_path):
    """2 processes x 1 device, interrupted at iteration 2 and resumed to 4, give the losses and final
    checkpoint of 1 process x 2 devices and of 1 process x 1 device; only process 0 logs and writes."""
    out_dir, out_dir_1 = str(tmp_path / 'out'), str(tmp_path / 'out_process1')
    base = TINY + [f'--dataset={data_dir}']

    # 2 processes, iterations 0..2 (checkpoint at 2), launched with JAX_* variables. Process 1 gets
    # its own out_dir, as if its disk were not shared: it must write nothing there. At the same
    # time the uninterrupted references to iteration 4: 1 process x 2 devices, 1 process x 1 device.
    coordinator = f'localhost:{free_port()}'
    jobs = []
    for i, od in enumerate([out_dir, out_dir_1]):
        args, env = multi(coordinator, 2, i, flags=False)
        jobs.append((base + args + ['--max_iters=2', f'--out_dir={od}'], child_env(compile_cache, **env)))
    jobs.append((base + ['--max_iters=4', f'--out_dir={tmp_path / "ref2"}'],
                 child_env(compile_cache, host_devices=2)))
    jobs.append((base + ['--max_iters=4', f'--out_dir={tmp_path / "ref1"}'], child_env(compile_cache)))
    first, second, ref2, ref1 = ok(launch(jobs, str(tmp_path), '2 processes then references'), 'first launch')

    assert 'training on 2 cpu device(s) in 2 process(es)' in first
    assert 'training on 2 cpu device(s) in 1 process(es)' in ref2
    assert 'training on 1 cpu device(s) in 1 process(es)' in ref1
    # only process 0 logs and saves
    assert sorted(k for k in losses(first)) == [('iter', 0), ('iter', 1), ('iter', 2), ('step', 0), ('step', 2)]
    assert 'saving checkpoint' in first
    assert losses(second) == {} and 'saving checkpoint' not in second, second[-2000:]
    assert not os.path.exists(out_dir_1) or os.listdir(out_dir_1) == [], os.listdir(out_dir_1)
    _, meta = load_checkpoint(os.path.join(out_dir, CKPT_NAME))
    assert meta['iter_num'] == 2

    # resume to iteration 4 in 2 processes, told their places by flags: both read process 0's checkpoint
    coordinator = f'localhost:{free_port()}'
    jobs = []
    for i in range(2):
        args, env = multi(coordinator, 2, i, flags=True)
        jobs.append((base + args + ['--max_iters=4', '--init_from=resume', f'--out_dir={out_dir}'],
                     child_env(compile_cache, **env)))
    first_r, second_r = ok(launch(jobs, str(tmp_path), '2 processes resumed'), 'resume')
    assert sorted(k for k in losses(first_r)) == [('iter', 2), ('iter', 3), ('iter', 4), ('step', 2), ('step', 4)]
    assert losses(second_r) == {} and 'saving checkpoint' not in second_r, second_r[-2000:]

    # the same losses: interrupted 2 processes = 1 process x 2 devices = 1 process x 1 device
    two_proc = {**losses(first), **losses(first_r)}  # iteration 2 and step 2 appear in both halves
    assert losses(first)[('iter', 2)] == losses(first_r)[('iter', 2)]
    for name, ref in (('1 process x 2 devices', losses(ref2)), ('1 process x 1 device', losses(ref1))):
        assert sorted(ref) == sorted(two_proc), name
        for k in ref:
            np.testing.assert_allclose(two_proc[k], ref[k], atol=2e-4, err_msg=f"{name}: {k}")

    # the same final parameters and optimizer state
    arrays, meta = load_checkpoint(os.path.join(out_dir, CKPT_NAME))
    assert meta['iter_num'] == 4
    for name in ('ref2', 'ref1'):
        ref_arrays, ref_meta = load_checkpoint(str(tmp_path / name / CKPT_NAME))
        assert ref_meta['iter_num'] == 4 and sorted(ref_arrays) == sorted(arrays)
        for k in arrays:
            np.testing.assert_allclose(arrays[k], ref_arrays[k], rtol=1e-4, atol=1e-5, err_msg=f"{name}: {k}")  # as test_train's row split
    # and training did move them: the comparison above is not between two copies of the init
    assert losses(first_r)[('iter', 4)] < losses(first)[('iter', 0)] - 0.2

    # a process whose out_dir does not hold process 0's checkpoint (a disk of its own) cannot resume:
    # it says so in one line and leaves; process 0's first collective then fails, and it says so in one line
    coordinator = f'localhost:{free_port()}'
    jobs = []
    for i, od in enumerate([out_dir, out_dir_1]):
        args, env = multi(coordinator, 2, i, flags=False)
        jobs.append((base + args + ['--max_iters=6', '--init_from=resume', f'--out_dir={od}'],
                     child_env(compile_cache, **env)))
    results = launch(jobs, str(tmp_path), '2 processes, process 1 without the checkpoint')
    for i, (rc, out) in enumerate(results):
        lines = [l for l in out.splitlines() if l.startswith('error:')]
        assert rc != 0 and 'Traceback' not in out and len(lines) == 1, f"process {i}:\n{out[-3000:]}"
        expected = 'if another process stopped first, its output says why' if i == 0 else \
            'put out_dir on a filesystem all hosts share'
        assert expected in lines[0], lines[0]
    assert load_checkpoint(os.path.join(out_dir, CKPT_NAME))[1]['iter_num'] == 4


def test_cluster_auto_detection_and_divergence_stop_every_process(data_dir, compile_cache, tmp_path):
    """--coordinator_address=auto lets JAX read a cluster's own variables (here a fake 2-task SLURM
    step on localhost). A diverging run stops in every process with the same one-line error, and
    none of them writes a checkpoint."""
    out_dir = str(tmp_path / 'out')
    port, jobs = free_port(), []
    for i in range(2):
        slurm = dict(SLURM_JOB_ID='4242', SLURM_STEP_NODELIST='localhost', SLURM_NTASKS='2', SLURM_PROCID=str(i),
                     SLURM_LOCALID=str(i), JAX_COORDINATOR_PORT=str(port))
        jobs.append((TINY + [f'--dataset={data_dir}', '--coordinator_address=auto', '--max_iters=6',
                             '--learning_rate=1e9', '--warmup_iters=0', f'--out_dir={out_dir}'],
                     child_env(compile_cache, **slurm)))
    results = launch(jobs, str(tmp_path), 'auto cluster diverging')
    assert 'training on 2 cpu device(s) in 2 process(es)' in results[0][1], results[0][1][-2000:]
    errors = []
    for i, (rc, out) in enumerate(results):
        assert rc != 0, f"process {i} did not stop:\n{out[-2000:]}"
        assert 'Traceback' not in out, out[-3000:]
        lines = [l for l in out.splitlines() if l.startswith('error:')]
        assert len(lines) == 1 and re.match(r'error: iter \d+: loss is nan, training diverged', lines[0]), out[-2000:]
        errors.append(lines[0])
    assert errors[0] == errors[1]
    assert not os.path.exists(os.path.join(out_dir, CKPT_NAME))


def test_fsdp_over_two_processes_equals_one_process(data_dir, compile_cache, tmp_path):
    """fsdp=4 over 2 processes x 2 devices (each parameter sharded across both processes) gives the losses
    and final checkpoint of fsdp=4 over 1 process x 4 devices; the checkpoint's gather from both processes
    is process 0's to write. 4 micro-batches per iteration: one per device."""
    base = TINY + [f'--dataset={data_dir}', '--gradient_accumulation_steps=4', '--fsdp=4', '--max_iters=2']
    coordinator = f'localhost:{free_port()}'
    jobs = []
    for i in range(2):
        args, env = multi(coordinator, 2, i, flags=False)
        jobs.append((base + args + [f'--out_dir={tmp_path / "out"}'], child_env(compile_cache, host_devices=2, **env)))
    jobs.append((base + [f'--out_dir={tmp_path / "ref"}'], child_env(compile_cache, host_devices=4)))
    first, second, ref = ok(launch(jobs, str(tmp_path), 'fsdp 2 processes and reference'), 'fsdp')
    assert 'training on 4 cpu device(s) in 2 process(es)' in first and 'the state sharded over 4 (fsdp)' in first
    assert 'training on 4 cpu device(s) in 1 process(es)' in ref
    assert losses(second) == {} and sorted(losses(first)) == sorted(losses(ref)), first[-2000:]
    for k in losses(ref):
        np.testing.assert_allclose(losses(first)[k], losses(ref)[k], atol=2e-4, err_msg=k)
    arrays, meta = load_checkpoint(str(tmp_path / 'out' / CKPT_NAME))
    ref_arrays, ref_meta = load_checkpoint(str(tmp_path / 'ref' / CKPT_NAME))
    assert meta['iter_num'] == ref_meta['iter_num'] == 2 and sorted(arrays) == sorted(ref_arrays)
    for k in arrays:
        np.testing.assert_allclose(arrays[k], ref_arrays[k], rtol=1e-4, atol=1e-5, err_msg=k)
