# Two entry points: `make demo` (set up + train the built-in demo) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
# jemalloc makes VAE encoding and sampling several times faster on CPU where it is installed.
JEMALLOC := $(firstword $(wildcard /usr/lib/x86_64-linux-gnu/libjemalloc.so.2 /usr/lib/aarch64-linux-gnu/libjemalloc.so.2))
RUN := $(if $(JEMALLOC),LD_PRELOAD=$(JEMALLOC)) HF_HUB_OFFLINE=1
DEMO_DIR ?= outputs/demo

.PHONY: setup demo test lint clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# Keep whatever torch the venv has (e.g. a user's CUDA build); else CUDA build only with a GPU.
	$(PY) -c "import torch" 2>/dev/null || { \
	  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	    $(PY) -m pip install -q "torch==$(TORCH_VERSION)"; \
	  else \
	    $(PY) -m pip install -q "torch==$(TORCH_VERSION)" $(if $(TORCH_CPU_INDEX),--index-url $(TORCH_CPU_INDEX)); \
	  fi; }
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: setup
	$(RUN) bash scripts/demo.sh $(DEMO_DIR) $(PY)

test: setup
	$(RUN) $(VENV)/bin/pytest -q $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check train data jobs tests

clean:
	rm -rf outputs mlruns mlflow.db .pytest_cache
