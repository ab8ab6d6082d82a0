#!/usr/bin/env bash
# GPU check: one table of what ConsistentID costs on a CUDA machine (benchmarks/gpu_check.py).
#
#   COMFYUI_PATH=/path/to/ComfyUI bash benchmarks/gpu_check.sh          # on a machine with an NVIDIA GPU
#   bash benchmarks/gpu_check.sh --dry-run                               # the same code on the CPU, tiny inputs
#   bash benchmarks/gpu_check.sh --arch sd15 --steps 10                  # options go to gpu_check.py (--help)
#
# Times SD1.5 (512 px) and SDXL (1024 px) UNet steps unpatched vs patched in fp16, the encode of
# one photo, and peak VRAM; prints one table and writes benchmarks/results/gpu_check.json.
# Random weights of the real shapes (nothing is downloaded); the first run builds them into
# ~/.cache/consistentid-test-models (about 5 GB, a few minutes).  Needs torch with CUDA, the
# pack's requirements-dev.txt and ComfyUI's requirements in $PYTHON's environment (default python3).
# ComfyUI: COMFYUI_PATH, else the tree tools/setup_comfyui.sh provides.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
PYTHON="${PYTHON:-python3}"

fail() { echo "gpu_check.sh: $*" >&2; exit 2; }

dry_run=0
passed=()
for arg in "$@"; do
    case "$arg" in
        --dry-run) dry_run=1 ;;
        -h|--help) sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) passed+=("$arg") ;;
    esac
done

"$PYTHON" -c 'import torch' 2>/dev/null \
    || fail "$PYTHON cannot import torch. Set PYTHON to the interpreter of ComfyUI's environment, or install torch (with CUDA) there."

if [ -z "${COMFYUI_PATH:-}" ]; then
    COMFYUI_PATH="$(bash "$root/tools/setup_comfyui.sh" --print-path)" \
        || fail "no ComfyUI found: set COMFYUI_PATH to a ComfyUI checkout (v0.3.64 is tested)."
    export COMFYUI_PATH
fi

if [ "$dry_run" = 1 ]; then
    echo "gpu_check.sh: DRY RUN on the CPU with tiny inputs; this checks the script, its numbers mean nothing." >&2
    exec "$PYTHON" "$here/gpu_check.py" --device cpu --tiny "${passed[@]+"${passed[@]}"}"
fi

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    fail "no CUDA GPU here: torch.cuda.is_available() is False for $PYTHON ($("$PYTHON" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)')). Run this on a machine with an NVIDIA GPU and a CUDA build of torch; to check the script here: bash benchmarks/gpu_check.sh --dry-run"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
exec "$PYTHON" "$here/gpu_check.py" --device cuda "${passed[@]+"${passed[@]}"}"
