# Two commands do everything: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: test setup demo

$(VENV)/.runtime: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(VENV)/.test: $(VENV)/.runtime requirements-test.txt
	$(PY) -m pip install -q -r requirements-test.txt
	touch $@

setup: $(VENV)/.runtime

# nanoGPT's quick start: tiny Shakespeare, the baby GPT with nanoGPT README's CPU flags, samples.
# prepare.py downloads input.txt unless it is already there; a local copy is used when present.
SHAKESPEARE_COPY := ../shared/data/tinyshakespeare/input.txt
CPU_FLAGS := --device=cpu --compile=False --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12 \
	--n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0

demo: $(VENV)/.runtime
	if [ ! -f data/shakespeare_char/input.txt ] && [ -f $(SHAKESPEARE_COPY) ]; then \
		cp $(SHAKESPEARE_COPY) data/shakespeare_char/input.txt; fi
	$(PY) data/shakespeare_char/prepare.py
	$(PY) train.py config/train_shakespeare_char.py $(CPU_FLAGS)
	$(PY) sample.py --out_dir=out-shakespeare-char

# two workers, a test file each: much of the suite waits on one-threaded compiles and process start-up
test: $(VENV)/.test
	NANOGPT_REQUIRE_REFERENCES=1 $(PY) -m pytest -v -n 2 --dist loadfile --durations=25 tests
