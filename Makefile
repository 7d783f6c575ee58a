# Two commands for a new user: `make demo` opens the app, `make test` runs the tests.
# Use a virtual environment: python3 -m venv .venv && . .venv/bin/activate
PYTHON ?= python3

.PHONY: install install-dev demo test test-slow

install:
	$(PYTHON) -m pip install -q -r requirements.txt -e .

install-dev:
	$(PYTHON) -m pip install -q -r requirements-dev.txt -e .

demo: install
	$(PYTHON) app.py

test: install-dev
	$(PYTHON) -m pytest -q

test-slow: install-dev
	$(PYTHON) -m pytest -q -m slow
