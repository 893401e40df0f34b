"""nanoGPT's Poor Man's Configurator: `python train.py config/file.py --batch_size=32`."""
import sys
import builtins as _builtins
from ast import literal_eval as _literal_eval
from difflib import get_close_matches as _close_matches
from traceback import extract_tb as _extract_tb

def _config_nearest(key, dashes='--'):
    close = _close_matches(key, _config_names, n=3, cutoff=0.6)
    return f" (did you mean {', '.join(dashes + c for c in close)}?)" if close else ""

_config_names = [k for k, v in globals().items() if not k.startswith('_') and not k.isupper()
                 and isinstance(v, (int, float, bool, str))]  # the settings

for _arg in sys.argv[1:]:
    if '=' not in _arg:  # assume it's the name of a config file
        if _arg.startswith('-'):
            sys.exit(f"config error: malformed argument {_arg!r}: use --key=value, or a config "
                     f"file path")
        try:
            _source = open(_arg).read()
        except OSError as _e:
            sys.exit(f"config error: cannot read config file {_arg}: {_e.strerror}")
        print(f"Overriding config with {_arg}:\n{_source}")
        _before = dict(globals())
        try:  # the `compile` setting shadows the builtin
            exec(_builtins.compile(_source, _arg, 'exec'))
        except Exception as _e:
            _lines = [f.lineno for f in _extract_tb(_e.__traceback__) if f.filename == _arg]
            _where = f"{_arg}, line {_lines[-1]}" if _lines else _arg
            sys.exit(f"config error: config file {_where} failed: {type(_e).__name__}: {_e}")
        # a new name, not a _helper or an import: a misspelled setting
        for _key in [k for k, v in globals().items()
                     if not (k in _before or k.startswith('_') or isinstance(v, type(sys)))]:
            sys.exit(f"config error: config file {_arg}: {_key} is not a setting"
                     f"{_config_nearest(_key, '')}")
    else:  # assume it's a --key=value argument
        _key, _, _val = _arg[2:].partition('=')
        if not _arg.startswith('--') or not _key.isidentifier():
            sys.exit(f"config error: malformed argument {_arg!r}: use --key=value")
        if _key not in _config_names:
            sys.exit(f"config error: unknown config key: {_key}{_config_nearest(_key)}")
        try:
            _attempt = _literal_eval(_val)
        except Exception:  # not a Python literal: the string
            _attempt = _val
        _old = globals()[_key]
        if type(_attempt) is int and type(_old) is float:
            _attempt = float(_attempt)  # --learning_rate=1 means 1.0
        if type(_attempt) is not type(_old):
            sys.exit(f"config error: --{_key}={_val}: expected {type(_old).__name__} (like "
                     f"{_old!r}), got {type(_attempt).__name__}")
        print(f"Overriding: {_key} = {_attempt}")
        globals()[_key] = _attempt
