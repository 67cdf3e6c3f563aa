# Two entry points for a fresh machine (see README.md): `make demo` and `make test`.
# Both create .venv if it is missing and install the project into it; the install is
# redone only when pyproject.toml changes (the stamp file records the last one).
# The install is the bus alone; `bus demo` and the tests find this repository's application
# (celeryconfig.py, tasks/, handlers/, adapters/, entrypoints/) in the working directory.

PYTHON_FOR_VENV ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-celery-bus

.PHONY: demo test

demo: $(STAMP)
	$(VENV)/bin/bus demo

test: $(STAMP)
	$(PY) -m pytest

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON_FOR_VENV) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)
