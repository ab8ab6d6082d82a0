#!/usr/bin/env bash
# Installs what the pack needs next to ComfyUI and makes a portrait from a photo and a prompt:
#
#   COMFYUI_PATH=/path/to/ComfyUI bash run.sh --image me.jpg --prompt "A man, in a forest, adventuring"
#   COMFYUI_PATH=/path/to/ComfyUI bash run.sh --smoke      # no weights needed; draws NOISE
#
# Uses $PYTHON when set (e.g. ComfyUI's own venv); otherwise a virtual environment at
# $CID_VENV (default ~/.cache/cid-venv) that it creates and fills on first use.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
: "${COMFYUI_PATH:?set COMFYUI_PATH to your ComfyUI folder}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [ -z "${PYTHON:-}" ]; then
    VENV="${CID_VENV:-$HOME/.cache/cid-venv}"
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    PYTHON="$VENV/bin/python"
    if ! "$PYTHON" -c "import torch, torchvision" 2>/dev/null; then
        "$PYTHON" -m pip install -q "torchvision==0.29.2"
    fi
    grep -v -E '^(torch|torchvision|torchaudio)$' "$COMFYUI_PATH/requirements.txt" | "$PYTHON" -m pip install -q -r /dev/stdin
fi
"$PYTHON" -m pip install -q -r "$HERE/requirements.txt"
exec "$PYTHON" "$HERE/tools/run_workflow.py" "$@"
