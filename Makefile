# Two commands do everything on a fresh machine: `make demo` (the main job) and `make test`.
# Both create .venv and install what they need (torch's CPU build from this machine's local wheel cache).
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: setup demo test test-fast test-torch211 clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,examples]"
	touch $@

demo: setup
	$(PY) examples/quickstart.py

# pytest exits 5 when it collects no test; that is not a failure of the suite.
test: setup
	$(PY) -m pytest -q -p no:cacheprovider; rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

# The suite under torch 2.11, the GPU machine's version (a CUDA build from PyPI, about 3.5 GB; runs on the CPU):
# torch.compile behaves differently there (docs/architecture.md, "Tests mirror the code").
test-torch211:
	$(MAKE) test VENV=.venv211 TORCH=torch==2.11.0

clean:
	rm -rf $(VENV) .venv211 out .pytest_cache
