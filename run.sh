#!/usr/bin/env bash
# Makes a portrait from a photo and a prompt through the pack's example workflow, setting up what it needs:
#
#   bash run.sh --smoke                                               # no weights needed; draws NOISE
#   bash run.sh --image me.jpg --prompt "A man, in a forest, adventuring"
#   COMFYUI_PATH=/path/to/ComfyUI bash run.sh --image me.jpg ...     # with a ComfyUI you already have
#
# Without COMFYUI_PATH the pack sets up its own ComfyUI once, in $CID_COMFYUI_HOME
# (default ~/.cache/consistentid/ComfyUI), from COMFYUI_ARCHIVE (a .tar.gz of the ComfyUI source
# tree, for offline machines) or a shallow git clone of the tested tag, and links the pack into its
# custom_nodes/. A ComfyUI given by COMFYUI_PATH is used as it is and not modified.
# Python: $PYTHON when set (e.g. ComfyUI's own venv); otherwise a virtual environment at $CID_VENV
# (default ~/.cache/cid-venv) that it creates and fills on first use. A second run reuses everything.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
CID_LOG_PREFIX="run.sh"
# shellcheck source=tools/python_env.sh
source "$HERE/tools/python_env.sh"
export PIP_DISABLE_PIP_VERSION_CHECK=1
TORCHVISION_VERSION="0.29.2"   # pulls in its matching torch

for arg in "$@"; do
    if [ "$arg" = "-h" ] || [ "$arg" = "--help" ]; then
        sed -n '2,/^set /p' "$0" | sed -e '/^set /d' -e 's/^# \{0,1\}//'
        exec python3 "$HERE/tools/run_workflow.py" --help
    fi
done

cid_say "1/4 Python"
if [ -n "${PYTHON:-}" ]; then
    cid_say "using PYTHON=$PYTHON"
    OWN_PYTHON=0
else
    VENV="${CID_VENV:-$HOME/.cache/cid-venv}"
    if [ -x "$VENV/bin/python" ]; then
        cid_say "reusing the virtual environment at $VENV"
    else
        create_venv "$VENV"
    fi
    "$VENV/bin/python" -m pip --version >/dev/null 2>&1 ||
        cid_fail "$VENV has no pip (made without ensurepip?). Delete it, run 'apt-get install python3-venv' on Debian/Ubuntu, and run again."
    PYTHON="$VENV/bin/python"
    OWN_PYTHON=1
    if "$PYTHON" -c "import torch, torchvision" 2>/dev/null; then
        cid_say "torch and torchvision are installed"
    else
        cid_say "installing torch + torchvision $TORCHVISION_VERSION into $VENV (the first time: a few GB of downloads)"
        "$PYTHON" -m pip install -q "torchvision==$TORCHVISION_VERSION"
    fi
fi

cid_say "2/4 ComfyUI"
if [ -n "${COMFYUI_PATH:-}" ]; then OWN_COMFYUI=0; else OWN_COMFYUI=1; fi
COMFYUI_PATH="$(bash "$HERE/tools/setup_comfyui.sh" --print-path)"
export COMFYUI_PATH

cid_say "3/4 requirements"
# With PYTHON=ComfyUI's own Python and your ComfyUI, ComfyUI's requirements are yours to manage.
if [ "$OWN_PYTHON" = 1 ] || [ "$OWN_COMFYUI" = 1 ]; then
    bash "$HERE/tools/setup_comfyui.sh" --install-requirements "$PYTHON"
fi
pip_install_once "$PYTHON" "pack-requirements" "$HERE/requirements.txt"

if [ "$OWN_COMFYUI" = 1 ]; then
    # Lets the ComfyUI app of this tree (python main.py) find the pack; the runner below loads it directly.
    LINK="$COMFYUI_PATH/custom_nodes/comfyui-consistentid"
    if [ -L "$LINK" ] && [ "$(readlink "$LINK")" = "$HERE" ]; then
        cid_say "the pack is linked at $LINK"
    elif [ -L "$LINK" ] || [ ! -e "$LINK" ]; then
        ln -sfn "$HERE" "$LINK"
        cid_say "linked the pack into ComfyUI: $LINK -> $HERE"
    else
        cid_say "$LINK exists and is not a link made by run.sh; leaving it as it is"
    fi
fi

cid_say "4/4 running tools/run_workflow.py with ComfyUI at $COMFYUI_PATH (its model folders: $COMFYUI_PATH/models/)"
exec "$PYTHON" "$HERE/tools/run_workflow.py" "$@"
