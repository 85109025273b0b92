# The two commands of README: `make demo` and `make test`. Both set up on first use.
# `make test` runs the whole suite on every host that scripts/setup_env.sh set up: ComfyUI 0.3.75
# (.comfyui/ + .venv/) and ComfyUI 0.33.0 (.comfyui-0.33/ + .venv-0.33/); it fails if either fails.
# `make test-default` / `make test-0.33` run one host. COMFYUI_DIR=/path/to/ComfyUI tests that one only.
PY := .venv/bin/python
HOST2 := .comfyui-0.33
PY2 := .venv-0.33/bin/python

.PHONY: setup demo test test-default test-0.33
setup:
	@bash scripts/setup_env.sh

demo: setup
	$(PY) scripts/demo.py

test: setup
	@status=0; \
	echo "[test] host 1: ComfyUI $${COMFYUI_DIR:-0.3.75 in .comfyui/} with $(PY)"; \
	$(PY) -m pytest tests || status=1; \
	if [ -n "$$COMFYUI_DIR" ]; then \
	  echo "[test] COMFYUI_DIR is set: that ComfyUI is the one host tested"; \
	elif [ -f $(HOST2)/.streamline-stamp ] && [ -f .venv-0.33/.streamline-stamp ]; then \
	  echo "[test] host 2: ComfyUI 0.33.0 in $(HOST2)/ with $(PY2)"; \
	  COMFYUI_DIR="$(CURDIR)/$(HOST2)" $(PY2) -m pytest tests || status=1; \
	else \
	  echo "[test] !!!!!!!! ComfyUI 0.33.0 is not set up (see the setup log): ONLY ComfyUI 0.3.75 WAS TESTED !!!!!!!!"; \
	fi; \
	exit $$status

test-default: setup
	$(PY) -m pytest tests

test-0.33: setup
	COMFYUI_DIR="$(CURDIR)/$(HOST2)" $(PY2) -m pytest tests
