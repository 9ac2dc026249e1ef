# The two commands of the README: `make demo` and `make test`.
# Both create (or reuse) .venv and install what they need into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Two workers (pytest-xdist): the suite is dominated by XLA compiles, one core each.
PYTEST_ARGS ?= -n 2

.PHONY: demo test bench-list docs clean

$(PY):
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "jaxcomp needs Python >= 3.11; set PYTHON=python3.11 (or newer)")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# Stamps re-run the install only when pyproject.toml changes.
$(VENV)/.installed-examples: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[examples]'
	@touch $@

$(VENV)/.installed-test: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[test,examples]'
	@touch $@

demo: $(VENV)/.installed-examples
	$(PY) -m jaxcomp demo

# pytest exits 5 when it collects no tests: that is a failure here, there must always be tests.
test: $(VENV)/.installed-test
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; \
	exit $$rc

docs: | $(PY)
	$(PY) -m pip install -q -e '.[docs]'
	$(PY) -m sphinx -b html docs docs/_build/html

clean:
	rm -rf $(VENV) build dist *.egg-info docs/_build .pytest_cache .hypothesis
