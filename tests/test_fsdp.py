"""Sharded parameters and optimizer state (fsdp) and remat through train.py, on simulated CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count): the same run as data parallel and as one device
doing all the accumulation; the state's bytes per device; resume across layouts and after kill -9;
bad settings; the memory check's other settings. The 2-process run is in test_distributed.py.

Every run is a subprocess on a tiny model with dropout on, so the micro-batches' dropout keys must
line up across layouts too."""
import os
import re
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from checkpoint import CKPT_NAME, load_checkpoint  # noqa: E402
from tests.tinydata import tiny_text, write_char_dataset  # noqa: E402

# 4 micro-batches per iteration: one per device on 4 devices, all 4 on one device; grad_clip low enough
# that every step clips (checked against a run without clipping)
TINY = ['--device=cpu', '--dtype=float32', '--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32',
        '--batch_size=4', '--gradient_accumulation_steps=4', '--dropout=0.1', '--eval_interval=4', '--eval_iters=2',
        '--learning_rate=1e-2', '--warmup_iters=2', '--lr_decay_iters=8', '--min_lr=1e-3', '--log_interval=1',
        '--grad_clip=0.1', '--always_save_checkpoint=True']
ITERS = 8
# every option of the modern GPT at once: Llama's (RoPE, RMSNorm, SwiGLU, untied head) with GQA, QK-norm, soft-capping
MODERN = [os.path.join(REPO, 'config', 'llama.py'), '--n_kv_head=1', '--qk_norm=True', '--softcap=30.0']


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
    return write_char_dataset(str(tmp_path_factory.mktemp('data') / 'tiny'), tiny_text(30000))


def env_for(devices):
    env = {k: v for k, v in os.environ.items() if not k.startswith(('JAX_', 'XLA_')) or 'CACHE' in k}
    env.update(JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1',
               XLA_FLAGS=f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count={devices}")
    return env


def train(dataset, out_dir, devices, *extra, timeout=240):
    cmd = [sys.executable, os.path.join(REPO, 'train.py'), f'--dataset={dataset}', f'--out_dir={out_dir}', *TINY, *extra]
    return subprocess.run(cmd, env=env_for(devices), cwd=os.path.dirname(out_dir), capture_output=True, text=True,
                          timeout=timeout)


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def losses(text):
    """{('iter', n): loss, ('step', n): (train, val)} from the log lines, as text (exactly as printed)."""
    got = {('iter', int(m[1])): m[2] for m in re.finditer(r'^iter (\d+): loss (\S+),', text, re.M)}
    got.update({('step', int(m[1])): (m[2], m[3]) for m in
                re.finditer(r'^step (\d+): train loss (\S+), val loss (\S+),', text, re.M)})
    return got


def assert_close_losses(got, ref, what, atol=2e-4):
    assert sorted(got) == sorted(ref), what
    for k in ref:
        np.testing.assert_allclose(np.asarray(got[k], float), np.asarray(ref[k], float), atol=atol, err_msg=f"{what}: {k}")


def assert_close_checkpoints(a_dir, b_dir, what, exact=False, rtol=1e-4, atol=1e-5):
    a, meta_a = load_checkpoint(os.path.join(a_dir, CKPT_NAME))
    b, meta_b = load_checkpoint(os.path.join(b_dir, CKPT_NAME))
    assert meta_a['iter_num'] == meta_b['iter_num'] == ITERS and sorted(a) == sorted(b), what
    assert any(k.startswith('optimizer') for k in a)  # the moments are compared too
    for k in a:
        if exact:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{what}: {k}")
        else:
            np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=atol, err_msg=f"{what}: {k}")


@pytest.fixture(scope='module')
def runs(tmp_path_factory, dataset):
    """ITERS iterations uninterrupted in several layouts: {name: (out_dir, log)}."""
    work = tmp_path_factory.mktemp('layouts')
    layouts = {'1 device': (1, []), 'dp 4': (4, []), 'dp 2': (2, []), 'fsdp 4 remat': (4, ['--fsdp=4', '--remat=True']), 'fsdp 2 x 2': (4, ['--fsdp=2']),
               '1 device no clip': (1, ['--grad_clip=0.0']),
               'modern 1 device': (1, MODERN), 'modern fsdp 2 x 2 remat': (4, ['--fsdp=2', '--remat=True', *MODERN])}
    done = {}
    for name, (devices, flags) in layouts.items():
        out = str(work / name.replace(' ', '_'))
        done[name] = out, ok(train(dataset, out, devices, f'--max_iters={ITERS}', *flags))
    return done


def test_fsdp_equals_data_parallel_and_one_device(runs):
    """fsdp=4 over 4 devices with remat, 2 groups x 2 shards, dp over 4 devices, dp over 2 (2 micro-steps
    each) and 1 device with 4 micro-steps: the same losses and final parameters and moments, dropout
    and clipping on."""
    assert 'the state sharded over 4 (fsdp)' in runs['fsdp 4 remat'][1] and 'the state sharded over 2 (fsdp)' in runs['fsdp 2 x 2'][1]
    assert 'training on 4 cpu device(s)' in runs['fsdp 4 remat'][1] and 'fsdp' not in runs['dp 4'][1].split('tokens per')[0]
    ref_out, ref_log = runs['1 device']
    ref = losses(ref_log)
    assert len(ref) == ITERS + 1 + 3 and len(set(ref.values())) > ITERS  # every iteration and eval, and they move
    for name in ('dp 4', 'dp 2', 'fsdp 4 remat', 'fsdp 2 x 2'):
        out, log = runs[name]
        assert_close_losses(losses(log), ref, name)
        assert_close_checkpoints(out, ref_out, name)
    # clipping is active: without it the parameters differ far beyond the tolerance above
    clipped, _ = load_checkpoint(os.path.join(ref_out, CKPT_NAME))
    unclipped, _ = load_checkpoint(os.path.join(runs['1 device no clip'][0], CKPT_NAME))
    assert max(float(np.max(np.abs(clipped[k] - unclipped[k]))) for k in clipped if k.startswith('model.')) > 1e-3


def test_modern_options_train_the_same_under_fsdp_and_remat(runs):
    """With every modern option on, fsdp 2 x 2 with remat equals one device: the same losses (train and
    eval), parameters and moments; the options change the model (its losses are not nanoGPT's)."""
    ref_out, ref_log = runs['modern 1 device']
    ref = losses(ref_log)
    assert len(ref) == ITERS + 1 + 3 and ref[('iter', 0)] != losses(runs['1 device'][1])[('iter', 0)]
    out, log = runs['modern fsdp 2 x 2 remat']
    assert_close_losses(losses(log), ref, 'modern fsdp 2 x 2 remat')
    assert_close_checkpoints(out, ref_out, 'modern fsdp 2 x 2 remat')
    arrays, meta = load_checkpoint(os.path.join(out, CKPT_NAME))
    assert meta['model_args']['rope'] and meta['model_args']['n_kv_head'] == 1
    assert 'model.transformer.lm_head.weight' in arrays and 'model.transformer.wpe.weight' not in arrays


def test_fsdp_state_per_device_is_its_share():
    """Per device, the bytes of parameters + AdamW state under fsdp=4 (read off the arrays' shards on each
    device) are at most a quarter of the whole plus the arrays too small or too oddly shaped to split;
    data parallel keeps a whole copy on every device. With 4 micro-steps, XLA's temporaries per device grow
    by less than half the parameters' bytes: no micro-step keeps them all gathered."""
    script = textwrap.dedent('''
        import math, sys
        sys.path.insert(0, sys.argv[1])
        import numpy as np, jax
        import model, parallel, training
        config = model.GPTConfig(n_layer=2, n_head=4, n_embd=128, block_size=64, vocab_size=500)
        tx = training.configure_optimizers(model.param_shapes(config), 0.1, 1e-3, (0.9, 0.95), 1.0)
        for fsdp in (4, 1):
            mesh = parallel.make_mesh(jax.devices(), fsdp)
            compiled = training.compile_steps(config, tx, mesh, 4, 2, 'float32', 0, from_scratch=True)
            state = compiled['initial state'][0](jax.random.PRNGKey(0))
            leaves = jax.tree.leaves((state.params, state.opt_state))
            whole = sum(math.prod(a.shape) * a.dtype.itemsize for a in leaves)
            small = sum(math.prod(a.shape) * a.dtype.itemsize for a in leaves
                        if math.prod(a.shape) < parallel.MIN_SHARDED or not any(d % 4 == 0 for d in a.shape))
            per_device = [sum(s.data.nbytes for a in leaves for s in a.addressable_shards if s.device == d)
                          for d in jax.devices()]
            print(fsdp, int(whole), int(small), *per_device)
        # with 4 micro-steps per device: XLA's temporaries, against 1 micro-step and the parameters' bytes
        mesh = parallel.make_mesh(jax.devices(), 4)
        temp = [training.compile_steps(config, tx, mesh, a, 2, 'float32', 0)['train step'][0].memory_analysis().temp_size_in_bytes
                for a in (4, 16)]
        print('temp', *temp, sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(model.param_shapes(config))))
    ''')
    proc = subprocess.run([sys.executable, '-c', script, REPO], env=env_for(4), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = {int(r[0]): [int(v) for v in r[1:]] for r in (line.split() for line in proc.stdout.splitlines()
                                                         if re.match(r'^[14] \d', line))}
    whole, small, *per_device = rows[4]
    assert whole > 4 * small  # most of the state can be split: the bound below says something
    for b in per_device:
        assert b <= whole / 4 + small, (b, whole, small)
    whole_dp, _, *per_device_dp = rows[1]
    assert whole_dp == whole and per_device_dp == [whole] * 4  # dp: a whole copy per device
    # gradient accumulation keeps the parameters sharded too: gathered within each micro-step, not once for all
    one, four, params = map(int, re.search(r'^temp (\d+) (\d+) (\d+)$', proc.stdout, re.M).groups())
    assert four - one < params / 2, (one, four, params)


def test_resume_across_layouts_and_after_kill9(tmp_path, dataset, runs):
    """Saved under fsdp=4, resumed under dp: the continuation equals the uninterrupted dp run (a
    checkpoint holds whole arrays whatever the layout; resuming into fsdp's shards is the kill -9 case).
    An fsdp + remat run killed with SIGKILL and resumed equals the uninterrupted one bit for bit."""
    out = str(tmp_path / 'fsdp-dp')
    log = ok(train(dataset, out, 4, f'--max_iters={ITERS // 2}', '--fsdp=4'))
    log += ok(train(dataset, out, 4, f'--max_iters={ITERS}', '--init_from=resume'))
    assert_close_losses(losses(log), losses(runs['dp 4'][1]), 'fsdp -> dp')
    assert_close_checkpoints(out, runs['dp 4'][0], 'fsdp -> dp')

    out = str(tmp_path / 'killed')
    cmd = [sys.executable, os.path.join(REPO, 'train.py'), f'--dataset={dataset}', f'--out_dir={out}', *TINY,
           f'--max_iters={ITERS}', '--fsdp=4', '--remat=True']
    child = subprocess.Popen(cmd, env=env_for(4), cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    try:
        lines = []
        for line in child.stdout:
            lines.append(line)
            if line.startswith(f'iter {ITERS // 2 + 1}:'):  # the checkpoint of iteration ITERS/2 is on disk
                child.send_signal(signal.SIGKILL)
                break
        child.wait(timeout=240)
    finally:
        child.kill()
    assert child.returncode == -signal.SIGKILL, ''.join(lines)[-3000:]
    assert load_checkpoint(os.path.join(out, CKPT_NAME))[1]['iter_num'] == ITERS // 2
    log = ok(train(dataset, out, 4, f'--max_iters={ITERS}', '--init_from=resume', '--fsdp=4', '--remat=True'))
    full = losses(runs['fsdp 4 remat'][1])
    resumed = losses(log)
    assert resumed and all(full[k] == v for k, v in resumed.items()), (resumed, full)
    assert_close_checkpoints(out, runs['fsdp 4 remat'][0], 'fsdp killed and resumed', exact=True)


@pytest.mark.parametrize('devices,flags,expected', [
    (4, ['--fsdp=3'], 'fsdp=3 must divide the number of devices (4)'),
    (1, ['--fsdp=2'], 'fsdp=2 shards the state over several devices but this run has one'),
    (4, ['--fsdp=0'], 'fsdp=0: must be at least 1'),
])
def test_bad_fsdp_is_one_line(tmp_path, dataset, devices, flags, expected):
    out = tmp_path / 'out'
    proc = train(dataset, str(out), devices, '--max_iters=2', *flags)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and 'Traceback' not in proc.stderr and lines, proc.stderr[-3000:]
    assert lines[-1].startswith('error: ') and expected in lines[-1], lines[-1]
    assert 'compiling' not in proc.stdout and not (out / CKPT_NAME).exists()


def test_memory_check_names_the_settings_that_would_fit():
    """train.py's memory check, on 4 host devices, for a model whose state is the bulk of its memory, told the
    devices have 0.7x what its data-parallel step needs: it refuses in one line with XLA's estimate for every
    device sharing the state (which fits), remat, and both; nothing allocated. (On a CPU the host devices
    share the machine's RAM, which is why its size is given here rather than read.)"""
    script = textwrap.dedent('''
        import sys
        sys.path.insert(0, sys.argv[1])
        import jax
        import model, parallel, training
        config = model.GPTConfig(n_layer=2, n_head=4, n_embd=256, block_size=16, vocab_size=64)
        params = model.param_shapes(config)
        tx = training.configure_optimizers(params, 0.1, 1e-3, (0.9, 0.95), 1.0)
        devices, num_params = jax.devices(), model.get_num_params(params)
        mesh = parallel.make_mesh(devices, 1)
        compiled = training.compile_steps(config, tx, mesh, 4, 1, 'float32', 0, eval_iters=4)
        steps = [compiled['train step'][0], compiled['eval step'][0]]
        need = parallel.process_bytes(steps, mesh)
        print('need', need, flush=True)
        parallel.device_memory_bytes = lambda device: int(0.7 * need) // len(devices) * len(devices)
        parallel.check_memory(steps, mesh, lambda: training.other_settings(
            config, tx, devices, 4, 1, 'float32', 0, 1))
        print('not refused')
    ''')
    proc = subprocess.run([sys.executable, '-c', script, REPO], env=env_for(4), capture_output=True, text=True, timeout=240)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and 'Traceback' not in proc.stderr and lines, proc.stdout[-2000:] + proc.stderr[-3000:]
    need = int(re.search(r'^need (\d+)$', proc.stdout, re.M)[1])
    last = lines[-1]
    assert re.match(r'error: the compiled training step needs ~[\d.]+ GiB but 4 cpu device\(s\) \(machine RAM\) has', last), last
    estimates = {flags: (float(gib) * 2**30, bool(fits)) for flags, gib, fits in
                 re.findall(r'(--[-=\w ]+?) ~([\d.]+) GiB( \(fits\))?', last)}
    assert set(estimates) == {'--fsdp=4', '--remat=True', '--fsdp=4 --remat=True'}, last
    have = 0.7 * need
    for flags, (estimate, fits) in estimates.items():
        assert fits == (estimate <= have), (flags, last)
    assert estimates['--fsdp=4'][1] and not estimates['--remat=True'][1], last
    assert estimates['--fsdp=4'][0] < 0.5 * need  # a quarter of the state per device, plus the gradients' reduction


def test_fsdp_float16_keeps_the_loss_scale_of_data_parallel(tmp_path, dataset):
    """float16 under fsdp=4: the dynamic loss scale (GradScaler's) acts on the sharded gradients as on data
    parallel's: the same loss scale, and the losses and parameters to float16's precision after a few steps
    (dropout off: on the CPU float16 takes the blocked attention)."""
    flags = ['--dtype=float16', '--dropout=0.0', f'--max_iters={ITERS}']
    dp, fsdp = str(tmp_path / 'dp'), str(tmp_path / 'fsdp')
    ref = losses(ok(train(dataset, dp, 4, *flags)))
    assert_close_losses(losses(ok(train(dataset, fsdp, 4, '--fsdp=4', *flags))), ref, 'float16', atol=3e-3)
    # a float16 product sums its rows in float16 on a CPU, and the mesh's sums 4 devices' rows at once: parameters
    # that Adam moved by up to ~lr * ITERS = 0.08 agree to 5e-3
    assert_close_checkpoints(fsdp, dp, 'float16', rtol=0, atol=5e-3)
    a, b = (load_checkpoint(os.path.join(out, CKPT_NAME))[0] for out in (fsdp, dp))
    scale = sorted(k for k in a if k.startswith('loss_scale'))
    assert scale and all(np.array_equal(a[k], b[k]) for k in scale), {k: (a[k], b[k]) for k in scale}
