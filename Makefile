# Quick start: `make demo` (install, start the daemon, classify the sample images) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test bench clean

# torch is pinned through constraints.txt to the 2.13.0 CPU build this kind of machine carries on
# disk; a looser pin would pull a multi-GB CUDA build. On a GPU host, install your CUDA build of
# torch into the venv first: an installed torch satisfies setup.cfg's range and is kept.
$(STAMP): setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt torch
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test,bench]'
	touch $@

demo: $(STAMP)
	$(BIN)/python -m inferd.daemon.demo samples/*.png

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) bench/out
