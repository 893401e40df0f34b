"""How the scripts talk to a person: one-line errors, Ctrl-C at once, progress from compiled loops."""
import contextlib
import os
import signal
import sys
import threading
import time

import numpy as np
import jax
from tqdm import tqdm

_dying = threading.Lock()

def _say(line):  # the one error line on a line of its own: a progress bar may be mid-line
    for bar in list(getattr(tqdm, '_instances', ())):
        bar.close()  # leave=False bars erase themselves
    print(f"error: {line}", file=sys.stderr)

def die(msg):
    """Known bad input or state: one clear line on stderr, exit status 1, no traceback."""
    if _dying.acquire(False):  # one line, even if a background thread fails too
        _say(msg)
    if jax.distributed.is_initialized():
        exit_alone(1)
    sys.exit(1)

@contextlib.contextmanager
def die_on(*errors):  # one of these raised inside: die with its message
    try:
        yield
    except errors as e:
        die(e)

def exit_alone(code):
    """Leaves now, without exit handlers (jax.distributed's wait minutes for every process)."""
    sys.stdout.flush()
    sys.stderr.flush()
    if jax.distributed.is_initialized() and jax.process_index() == 0:
        time.sleep(2)  # the coordinator's host leaves last
    os._exit(code)

def on_interrupt(describe):
    """Ctrl-C, even in a compiled call (Python's handlers wait): `error: describe()`, exit 130."""
    read, write = os.pipe()
    os.set_blocking(write, False)
    signal.signal(signal.SIGINT, lambda *_: None)
    signal.set_wakeup_fd(write)  # its byte wakes the watcher thread

    def watch():
        while os.read(read, 1) != bytes([signal.SIGINT]):
            pass
        line = describe()  # first: a dying main thread may hold the checkpoint's lock
        if _dying.acquire(False):
            _say(line)
        exit_alone(130)
    threading.Thread(target=watch, daemon=True).start()

class Progress:
    """A tqdm bar fed by a compiled loop's callback, which it tells when to call next (~`every` s)."""

    def __init__(self, desc, every=0.25, disable=False):
        self.desc, self.every, self.disable = desc, every, disable

    def start(self, total):
        self.bar = tqdm(total=total, desc=self.desc, delay=2.0, disable=self.disable, leave=False)
        self.t, self.n = time.time(), 0

    def __call__(self, n, *args):
        n = int(n)
        self.show(n, *map(np.asarray, args))
        now = time.time()
        per_second = max(n - self.n, 1) / max(now - self.t, 1e-6)
        self.t, self.n = now, n
        return np.int32(min(n + max(1, int(per_second * self.every)), 2 ** 31 - 1))

    def show(self, n, *args):
        self.bar.update(n - self.bar.n)

    def close(self):
        self.bar.close()
