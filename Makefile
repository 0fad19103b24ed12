# Two entry points (see README): `make demo` and `make test`. Each creates .venv itself.
PYTHON ?= python3
VENV := .venv
PIP := $(VENV)/bin/pip

.PHONY: demo test bench clean

# One stamp per extra, redone when pyproject.toml or the pins in constraints.txt change.
$(VENV)/.installed-%: pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt -e ".[$*]"
	touch $@

demo: $(VENV)/.installed-demo
	$(VENV)/bin/agnostic-prefetch demo

test: $(VENV)/.installed-test
	$(VENV)/bin/python -m pytest -q

bench: $(VENV)/.installed-bench
	$(VENV)/bin/python -m pytest -q -m bench -s

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
