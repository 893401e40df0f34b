"""Under `make test` the reference implementations are mandatory; and the measured parity numbers
of test_model.py's passing tests are shown at the end of every run, so the maxima (not only
PASSED) are in CI's output without `-s`."""

import atexit
import os
import shutil
import tempfile

# one persistent XLA compilation cache for the whole run, set before JAX is imported: the many train.py
# subprocesses that compile the same tiny model's steps compile them once
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:  # pytest-xdist's workers inherit the controller's
    os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='nanogpt-xla-cache-')
    atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], True)  # the run's own
os.environ.update(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0', JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='-1')
# XLA:CPU's compile time of the tests' tiny programs halves without LLVM's optimisations and the new
# fusion emitters, and drops by a further ~25% of CPU in one codegen thread (the module's split for
# parallel codegen costs CPU that two busy cores do not have); every comparison here is between
# programs compiled alike (test files that set XLA_FLAGS for a subprocess start from these)
TEST_XLA_FLAGS = ('--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false '
                  '--xla_cpu_parallel_codegen_split_count=1')
if TEST_XLA_FLAGS not in os.environ.get('XLA_FLAGS', ''):
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + TEST_XLA_FLAGS).strip()

import jaxtyping  # noqa: E402

# shapes checked where the code is traced (jaxtyping's annotations, beartype's checks): installed before
# any test imports these modules; train.py and sample.py run without it, the annotations then cost nothing
jaxtyping.install_import_hook(['model', 'training'], 'beartype.beartype')

_parity = []


def pytest_sessionstart(session):
    """`make test` installs the references (torch, transformers, wandb) and sets this variable, so
    there a missing one is an error, not the silent skips that let the suite run without them.
    Checked where the tests run: not in pytest-xdist's controller, where it cost ~3 s before any test."""
    controller = getattr(session.config.option, 'numprocesses', None) and not hasattr(session.config, 'workerinput')
    if os.environ.get('NANOGPT_REQUIRE_REFERENCES') == '1' and not controller:
        import torch, transformers, wandb  # noqa: F401


def pytest_runtest_logreport(report):
    if report.when == 'call' and report.passed and 'test_model.py' in report.nodeid and report.capstdout.strip():
        _parity.append((report.nodeid.split('::')[-1], report.capstdout.strip()))


def pytest_terminal_summary(terminalreporter):
    if not _parity:
        return
    terminalreporter.section('parity with Hugging Face GPT-2 (measured, fp32)')
    for name, text in _parity:
        for line in text.splitlines():
            if line.strip():
                terminalreporter.write_line(f"{name}: {line.strip()}")
