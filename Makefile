# The two commands of README: `make demo` and `make test`. Both set up on first use.
PY := .venv/bin/python

.PHONY: setup demo test
setup:
	@bash scripts/setup_env.sh

demo: setup
	$(PY) scripts/demo.py

test: setup
	$(PY) -m pytest tests
