"""
Poor Man's Configurator, as in nanoGPT. Example usage:
$ python train.py config/override_file.py --batch_size=32
this first runs config/override_file.py, then overrides batch_size to 32.

It is not a module: train.py (and sample.py, bench.py) run it with
>>> exec(open('configurator.py').read())
so the code below reads and overrides the calling script's globals() directly.

Rules (nanoGPT's):
- an argument without '=' is a config file: plain Python, exec'd into the same globals
- --key=value overrides an existing global; value is parsed with ast.literal_eval, kept as a
  string if that fails; its type must match the global's (an int is accepted for a float)

Anything wrong (unknown key, wrong type, malformed argument, missing config file, a config file
that raises) prints one line to stderr and exits with status 1 before anything else runs.
"""

import sys
import builtins as _builtins
from ast import literal_eval as _literal_eval


def _config_error(msg):
    print(f"config error: {msg}", file=sys.stderr)
    sys.exit(1)


def _config_nearest(key, names):
    from difflib import get_close_matches
    close = get_close_matches(key, names, n=3, cutoff=0.6)
    return f" (did you mean {', '.join('--' + c for c in close)}?)" if close else ""


# the names a command line may set: the script's plain-valued globals, except UPPER_CASE
# constants (e.g. an imported CKPT_NAME), which are not settings
_config_names = [k for k, v in globals().items()
                 if not k.startswith('_') and not k.isupper() and isinstance(v, (int, float, bool, str))]

for _arg in sys.argv[1:]:
    if '=' not in _arg:
        # assume it's the name of a config file
        if _arg.startswith('-'):
            _config_error(f"malformed argument {_arg!r}: use --key=value, or a config file path")
        try:
            with open(_arg) as _f:
                _config_source = _f.read()
        except OSError as _e:
            _config_error(f"cannot read config file {_arg}: {_e.strerror}")
        print(f"Overriding config with {_arg}:")
        print(_config_source)
        try:
            # builtins.compile: the script's own `compile` global (nanoGPT's flag) shadows the builtin
            exec(_builtins.compile(_config_source, _arg, 'exec'))
        except SystemExit:
            raise
        except BaseException as _e:
            # report where in the config file it failed, in one line
            _tb = _e.__traceback__
            _line = None
            while _tb is not None:
                if _tb.tb_frame.f_code.co_filename == _arg:
                    _line = _tb.tb_lineno
                _tb = _tb.tb_next
            if isinstance(_e, SyntaxError):
                _line = _e.lineno
            _where = f"{_arg}, line {_line}" if _line else _arg
            _config_error(f"config file {_where} failed: {type(_e).__name__}: {_e}")
    else:
        # assume it's a --key=value argument
        if not _arg.startswith('--') or _arg.startswith('---'):
            _config_error(f"malformed argument {_arg!r}: use --key=value")
        _key, _val = _arg[2:].split('=', 1)
        if not _key.isidentifier():
            _config_error(f"malformed argument {_arg!r}: {_key!r} is not a config name")
        if _key not in globals() or _key.startswith('_') or _key not in _config_names:
            _config_error(f"unknown config key: {_key}{_config_nearest(_key, _config_names)}")
        try:
            # attempt to eval it (e.g. if bool, number, or etc)
            _attempt = _literal_eval(_val)
        except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
            # if that goes wrong, just use the string
            _attempt = _val
        _old = globals()[_key]
        if type(_attempt) is int and type(_old) is float:
            _attempt = float(_attempt)  # --learning_rate=1 means 1.0
        # ensure the types match ok
        if type(_attempt) is not type(_old):
            _config_error(f"--{_key}={_val}: expected {type(_old).__name__} (like {_old!r}), "
                          f"got {type(_attempt).__name__}")
        # cross fingers
        print(f"Overriding: {_key} = {_attempt}")
        globals()[_key] = _attempt
