# Set-up on a fresh machine is one command per use:
#   make train       create .venv on first use, install the package, download Omniglot if it is missing
#                    (md5-checked, into $META_DATA_ROOT or ~/.cache/meta/data), train the default preset
#   make test        the same install plus the test tools and learn2learn, then the whole test suite
#                    (9:57 of tests in the clean-clone CI run of b50ce13 on this project's 2-core AMD EPYC CPU)
#   make test-fast   the same, without the tests marked slow (CLI end to end, benchmarks, real data, faults);
#                    its time on that CPU is in the README's Development section
# The versions of torch and torchvision come from constraints.txt (the exact ones this project tests with);
# setup.cfg declares the wider range the code supports.
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=
CONSTRAINTS := -c constraints.txt

.PHONY: install install-dev train test test-fast lint benchmark clean

# the package and its dependencies: all that training and evaluation need
$(VENV)/.installed: setup.cfg setup.py pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet -e . $(CONSTRAINTS)
	touch $@

# the test and benchmark tools, and learn2learn (the reference loop implementation) built from source
$(VENV)/.installed-dev: $(VENV)/.installed scripts/install_learn2learn.sh
	$(PY) -m pip install --quiet -e ".[dev]" $(CONSTRAINTS)
	bash scripts/install_learn2learn.sh $(PY)
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

train: install
	$(PY) scripts/train_maml.py data.download=true $(ARGS)

test: install-dev
	$(PY) -m pytest $(ARGS)

test-fast: install-dev
	$(PY) -m pytest -m "not slow" $(ARGS)

lint: install-dev
	$(VENV)/bin/ruff check meta scripts tests experiments benchmarks

benchmark: install-dev
	$(PY) scripts/benchmark.py $(ARGS)

# the equivalence tests once per CPU kernel path this machine has (ATen's kernels, oneDNN and MKL held to the
# scalar/SSE, AVX2 and AVX-512 instruction sets in turn): a tolerance that holds on one instruction set only fails
# here, not on a user's CPU. About 3.5 minutes per path; run before each release (docs/numerics.md)
.PHONY: test-kernels
test-kernels: install-dev
	$(PY) scripts/kernel_paths.py test $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
