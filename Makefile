# The README's two Quick-start commands: `make demo` and `make test`.
# Both create .venv on first use (with --system-site-packages, so a GPU host's own torch,
# Transformer Engine and apex are reused) and install the package into it.
VENV   ?= .venv
PYTHON := $(VENV)/bin/python
STAMP  := $(VENV)/.megatron_wesar-installed
TORCH_PIN := torch==2.13.0

.PHONY: install demo test test-fast test-megatron-lm lint wheels clean

install: $(STAMP)

$(STAMP): setup.py requirements.txt $(wildcard csrc/*)
	test -x $(PYTHON) || python3 -m venv --system-site-packages $(VENV)
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q $(TORCH_PIN)
	$(PYTHON) -m pip install -q -r requirements.txt
	$(PYTHON) -m pip install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(PYTHON) -m megatron_wesar demo

test: $(STAMP)
	$(PYTHON) -m pytest -q tests

# the tests that spawn no process group (markers `parallel` and `oracle` deselected): < 1 minute
test-fast: $(STAMP)
	$(PYTHON) -m pytest -q -m "not parallel and not oracle" tests

# the Megatron-LM plug-in against a Megatron-LM checkout: MEGATRON_LM_DIR=<core_v0.16.1 checkout>
# (docs/megatron-lm.md); without it these tests skip
test-megatron-lm: $(STAMP)
	$(PYTHON) -m pytest -q -m megatron_lm tests/megatron_lm

lint: $(STAMP)
	$(PYTHON) -m ruff check .

# the wheels bench/gpu_check.py installs on a GPU machine without internet (Python 3.12,
# x86-64): run here, carry bench/wheels/ (git-ignored) along. torchao's float8 training is pure
# Python; its C++ ops, built for one torch release, are skipped with a warning on another.
WHEELS ?= bench/wheels
TORCHAO_VERSION ?= 0.17.0
wheels:
	python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
	    --platform manylinux_2_28_x86_64 --dest $(WHEELS) \
	    megatron-core==0.16.1 torchao==$(TORCHAO_VERSION) numpy packaging

clean:
	rm -rf $(VENV) build *.egg-info megatron_wesar/_C*.so
