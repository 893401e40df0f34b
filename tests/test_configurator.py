"""configurator.py: nanoGPT's command-line semantics, run the way train.py runs it (exec'd into a
script's globals). The scripts here hold no jax, so every case is a fast subprocess; every file in
config/ is loaded in-process against train.py's own settings."""
import ast
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGURATOR = os.path.join(REPO, 'configurator.py')
CONFIGS = sorted(f for f in os.listdir(os.path.join(REPO, 'config')) if f.endswith('.py'))

# a script shaped like train.py's top: plain globals, configurator exec'd, the result printed
SCRIPT = '''
import json, os, sys
out_dir = 'out'
batch_size = 12
learning_rate = 6e-4
bias = False
compile = True
dataset = 'openwebtext'
_private = 1
CKPT_NAME = 'ckpt.safetensors'  # a constant, as train.py imports one
exec(open({configurator!r}).read())
print('RESULT ' + json.dumps({{k: [type(v).__name__, v] for k, v in globals().items()
                               if k in ('out_dir', 'batch_size', 'learning_rate', 'bias', 'compile', 'dataset')}}))
'''


@pytest.fixture
def script(tmp_path):
    path = tmp_path / 'script.py'
    path.write_text(SCRIPT.format(configurator=CONFIGURATOR))
    return str(path)


def configure(script, *args, cwd=None):
    return subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=60,
                          cwd=cwd or os.path.dirname(script))


def result(proc):
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')][-1]
    return {k: tuple(v) for k, v in json.loads(line[len('RESULT '):]).items()}


def one_line_error(proc, *needles):
    """README: a bad setting is one line and exit status 1 (not a crash's traceback and status)."""
    assert proc.returncode == 1, f"exit status {proc.returncode}\n{proc.stdout}{proc.stderr}"
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and 'Traceback' not in proc.stderr, proc.stderr
    assert lines[0].startswith('config error: '), lines[0]
    assert 'RESULT' not in proc.stdout  # stopped before the script went on
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def test_defaults_untouched_without_arguments(script):
    assert result(configure(script)) == {
        'out_dir': ('str', 'out'), 'batch_size': ('int', 12), 'learning_rate': ('float', 6e-4),
        'bias': ('bool', False), 'compile': ('bool', True), 'dataset': ('str', 'openwebtext')}


def test_key_value_is_literal_eval_with_string_fallback(script):
    got = result(configure(script, '--batch_size=32', '--learning_rate=1e-3', '--bias=True',
                           '--out_dir=out-shakespeare-char', "--dataset='quoted'", '--compile=False'))
    assert got['batch_size'] == ('int', 32)
    assert got['learning_rate'] == ('float', 1e-3)
    assert got['bias'] == ('bool', True)
    assert got['out_dir'] == ('str', 'out-shakespeare-char')  # not a Python literal: kept as the string
    assert got['dataset'] == ('str', 'quoted')  # a Python string literal
    assert got['compile'] == ('bool', False)   # the script's `compile` global shadows the builtin
    # an int where a float is expected is the float (--learning_rate=1 means 1.0)
    assert result(configure(script, '--learning_rate=1'))['learning_rate'] == ('float', 1.0)
    # a value holding '=' splits at the first one only
    assert result(configure(script, '--out_dir=a=b'))['out_dir'] == ('str', 'a=b')


def test_config_file_is_executed_then_later_arguments_win(script, tmp_path):
    cfg = tmp_path / 'my_config.py'
    cfg.write_text("batch_size = 2 * 3\nout_dir = 'out-' + str(batch_size)\nlearning_rate = 1e-2\n")
    proc = configure(script, str(cfg), '--learning_rate=5e-3')
    got = result(proc)
    assert got['batch_size'] == ('int', 6) and got['out_dir'] == ('str', 'out-6')  # real Python, exec'd
    assert got['learning_rate'] == ('float', 5e-3)
    assert 'Overriding config with' in proc.stdout and "out_dir = 'out-' + str(batch_size)" in proc.stdout
    # in order: a --key before the file is overridden by the file
    assert result(configure(script, '--learning_rate=5e-3', str(cfg)))['learning_rate'] == ('float', 1e-2)
    # a relative path is read from the working directory, like nanoGPT's config/...
    assert result(configure(script, 'my_config.py', cwd=str(tmp_path)))['batch_size'] == ('int', 6)


def test_type_mismatch_is_one_line(script):
    one_line_error(configure(script, '--batch_size=abc'), '--batch_size=abc', 'expected int')
    one_line_error(configure(script, '--batch_size=2.5'), 'expected int', 'got float')
    one_line_error(configure(script, '--bias=1'), 'expected bool', 'got int')
    one_line_error(configure(script, '--learning_rate=fast'), 'expected float', 'got str')


def test_unknown_key_suggests_the_nearest_names(script):
    line = one_line_error(configure(script, '--batch_sise=32'), 'unknown config key: batch_sise', '--batch_size')
    assert '--out_dir' not in line
    # private names and modules are not config keys
    one_line_error(configure(script, '--_private=2'), 'unknown config key')
    one_line_error(configure(script, '--json=2'), 'unknown config key')
    one_line_error(configure(script, '--CKPT_NAME=x'), 'unknown config key')  # UPPER_CASE: a constant
    # nothing close: no suggestion, still one line
    assert 'did you mean' not in one_line_error(configure(script, '--zzzzzz=1'), 'unknown config key: zzzzzz')


def test_missing_or_failing_config_file_is_one_line(script, tmp_path):
    one_line_error(configure(script, 'config/no_such_file.py'), 'config/no_such_file.py')
    bad = tmp_path / 'bad.py'
    bad.write_text("batch_size = 4\nn = 1 / 0\n")
    one_line_error(configure(script, str(bad)), f'{bad}, line 2', 'ZeroDivisionError')
    syntax = tmp_path / 'syntax.py'
    syntax.write_text("batch_size = = 4\n")
    one_line_error(configure(script, str(syntax)), 'SyntaxError')


def test_malformed_arguments_are_one_line(script):
    one_line_error(configure(script, '--batch_size'), 'malformed argument')
    one_line_error(configure(script, '-batch_size=3'), 'malformed argument')
    one_line_error(configure(script, '--=3'), 'malformed argument')


def test_misspelled_setting_in_config_file_is_one_line(script, tmp_path):
    cfg = tmp_path / 'typo.py'
    cfg.write_text("batch_size = 4\nlerning_rate = 1e-3\n")
    proc = configure(script, str(cfg))
    assert proc.returncode == 1
    line = one_line_error(proc, str(cfg), 'lerning_rate', 'did you mean learning_rate?')
    assert '--learning_rate' not in line  # a config file sets names, not --flags
    with pytest.raises(SystemExit):  # and train.py's own settings catch it, as in the test below
        load_config('train.py', str(cfg))


def test_config_file_may_import_and_use_private_helpers(script, tmp_path):
    cfg = tmp_path / 'helpers.py'
    cfg.write_text("import time\nimport os.path\nfrom math import ceil as _ceil\n_base = 3\n"
                   "batch_size = _ceil(_base * 1.5)\n"
                   "out_dir = os.path.join('out', str(time.time() > 0))\n")
    got = result(configure(script, str(cfg)))
    assert got['batch_size'] == ('int', 5)
    assert got['out_dir'] == ('str', os.path.join('out', 'True'))


def settings(script):
    """A script's settings: its module-level assignments between its first two '# ----' lines."""
    path = os.path.join(REPO, script)
    source = open(path).read()
    marks = [i + 1 for i, line in enumerate(source.splitlines()) if line.startswith('# ----')][:2]
    block = [node for node in ast.parse(source).body
             if isinstance(node, ast.Assign) and marks[0] < node.lineno < marks[1]]
    namespace = {'__file__': path}  # a config file may find config/ next to the script
    exec(compile(ast.Module(block, type_ignores=[]), path, 'exec'), namespace)
    return namespace


def load_config(script, config):
    """configurator.py on one config file, in-process, as script runs it; exits on an error."""
    namespace = settings(script)
    argv = sys.argv
    sys.argv = [script, config]
    try:
        exec(open(CONFIGURATOR).read(), namespace)
    finally:
        sys.argv = argv
    return namespace


@pytest.mark.parametrize('config', CONFIGS)
def test_every_config_file_loads(config, capsys):
    try:
        got = load_config('train.py', os.path.join(REPO, 'config', config))  # all train.py's
    except SystemExit as e:
        pytest.fail(str(e.code))
    # every setting the file assigns a literal to has that value, of the type train.py gives it
    path = os.path.join(REPO, 'config', config)
    pairs = []  # (name, value node) of `a = 1`, `a = b = 1` and `a, b = 1, 2`
    for node in ast.parse(open(path).read()).body:
        for target in node.targets if isinstance(node, ast.Assign) else ():
            if isinstance(target, ast.Name):
                pairs.append((target, node.value))
            elif isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple):
                pairs += zip(target.elts, node.value.elts)
    literals = {name.id: literal(value) for name, value in pairs if literal(value) is not NOT_LITERAL}
    defaults = settings('train.py')
    assert literals, config
    for key, value in literals.items():
        assert key in defaults, (config, key)
        assert got[key] == value and type(got[key]) is type(defaults[key]), (config, key, got[key], value)


NOT_LITERAL = object()


def literal(node):
    """The value of a Python literal (`1e-3`, `'gpt2'`, `-1`), else NOT_LITERAL (`5 * 8`, a call)."""
    try:
        return ast.literal_eval(node)
    except ValueError:
        return NOT_LITERAL
