"""Poor Man's Configurator, as in nanoGPT: `python train.py config/override_file.py --batch_size=32`
runs the config file, then overrides batch_size. exec'd in the script's globals: its settings are
the plain-valued ones but UPPER_CASE; --key=value keeps a setting's type."""
import sys
import builtins as _builtins
from ast import literal_eval as _literal_eval
from difflib import get_close_matches as _close_matches
from traceback import extract_tb as _extract_tb

def _config_error(msg):
    print(f"config error: {msg}", file=sys.stderr)
    sys.exit(1)

def _config_nearest(key, dashes='--'):
    close = _close_matches(key, _config_names, n=3, cutoff=0.6)
    return f" (did you mean {', '.join(dashes + c for c in close)}?)" if close else ""

_config_names = [k for k, v in globals().items() if not k.startswith('_') and not k.isupper()
                 and isinstance(v, (int, float, bool, str))]

for _arg in sys.argv[1:]:
    if '=' not in _arg:  # assume it's the name of a config file
        if _arg.startswith('-'):
            _config_error(f"malformed argument {_arg!r}: use --key=value, or a config file path")
        try:
            _source = open(_arg).read()
        except OSError as _e:
            _config_error(f"cannot read config file {_arg}: {_e.strerror}")
        print(f"Overriding config with {_arg}:\n{_source}")
        _before = dict(globals())
        try:  # builtins.compile: the script's `compile` setting shadows the builtin
            exec(_builtins.compile(_source, _arg, 'exec'))
        except Exception as _e:  # one line, naming the config file's failing line
            _lines = [f.lineno for f in _extract_tb(_e.__traceback__) if f.filename == _arg]
            _where = f"{_arg}, line {_lines[-1]}" if _lines else _arg
            _config_error(f"config file {_where} failed: {type(_e).__name__}: {_e}")
        # a new name, not a _helper or an import: a misspelled setting
        for _key in [k for k, v in globals().items()
                     if not (k in _before or k.startswith('_') or isinstance(v, type(sys)))]:
            _config_error(f"config file {_arg}: {_key} is not a setting{_config_nearest(_key, '')}")
    else:  # assume it's a --key=value argument
        _key, _, _val = _arg[2:].partition('=')
        if not _arg.startswith('--') or not _key.isidentifier():
            _config_error(f"malformed argument {_arg!r}: use --key=value")
        if _key not in _config_names:
            _config_error(f"unknown config key: {_key}{_config_nearest(_key)}")
        try:  # attempt to eval it (e.g. if bool, number, or etc)
            _attempt = _literal_eval(_val)
        except Exception:  # if that goes wrong, just use the string
            _attempt = _val
        _old = globals()[_key]
        if type(_attempt) is int and type(_old) is float:
            _attempt = float(_attempt)  # --learning_rate=1 means 1.0
        if type(_attempt) is not type(_old):
            _config_error(f"--{_key}={_val}: expected {type(_old).__name__} (like {_old!r}), "
                          f"got {type(_attempt).__name__}")
        print(f"Overriding: {_key} = {_attempt}")
        globals()[_key] = _attempt
