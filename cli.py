"""How the scripts talk to a person: one-line errors, Ctrl-C at once, progress from compiled loops."""
import os
import signal
import sys
import threading
import time

import numpy as np
import jax
from tqdm import tqdm

_dying = threading.Lock()

def die(msg):
    """Known bad input or state: one clear line on stderr, exit status 1, no traceback."""
    if _dying.acquire(blocking=False):  # one line, even when a background thread fails at once too
        print(f"error: {msg}", file=sys.stderr)
    if jax.distributed.is_initialized():
        exit_alone(1)
    sys.exit(1)

def exit_alone(code):
    """Leaves now, without exit handlers (jax.distributed's wait minutes for every process); process
    0 hosts the coordinator, so it leaves last."""
    sys.stdout.flush()
    sys.stderr.flush()
    if jax.distributed.is_initialized() and jax.process_index() == 0:
        time.sleep(2)
    os._exit(code)

def on_interrupt(describe):
    """Ctrl-C from here on, anywhere: `error: describe()`, exit status 130. Python's handlers run only
    between bytecodes, not in a compiled call: set_wakeup_fd's byte wakes a thread that exits."""
    read, write = os.pipe()
    os.set_blocking(write, False)
    signal.signal(signal.SIGINT, lambda *_: None)  # the watcher does the work
    signal.set_wakeup_fd(write)

    def watch():
        while os.read(read, 1) != bytes([signal.SIGINT]):
            pass
        if _dying.acquire(blocking=False):
            print(f"error: {describe()}", file=sys.stderr)
        exit_alone(130)
    threading.Thread(target=watch, daemon=True).start()

class Progress:
    """A tqdm bar fed by a host callback from a compiled loop: called with the steps done, it returns
    the step to be called at next, ~`every` seconds on. start(total) before a run, close() after."""

    def __init__(self, desc, every=0.25, delay=2.0, disable=False):
        self.desc, self.every, self.delay, self.disable, self.bar = desc, every, delay, disable, None

    def start(self, total):
        self.bar = tqdm(total=total, desc=self.desc, delay=self.delay, disable=self.disable, leave=False)
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
