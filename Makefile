# Two commands do all the set-up on a fresh machine:
#   make train   create .venv on first use, install, train the default preset
#   make test    the same install, then the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: install train test lint benchmark clean

$(VENV)/.installed: setup.cfg pyproject.toml scripts/install_learn2learn.sh
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet -e ".[dev]"
	bash scripts/install_learn2learn.sh $(PY)
	touch $@

install: $(VENV)/.installed

train: install
	$(PY) scripts/train_maml.py $(ARGS)

test: install
	$(PY) -m pytest $(ARGS)

lint: install
	$(VENV)/bin/ruff check meta scripts tests experiments

benchmark: install
	$(PY) scripts/benchmark.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
