#!/usr/bin/env bash
# Provides a ComfyUI source tree for run.sh and the test run; the one place that does so.
#
#   bash tools/setup_comfyui.sh --print-path                   # prints the ComfyUI folder (only that) on stdout
#   bash tools/setup_comfyui.sh --install-requirements PYTHON  # its requirements.txt, without torch, into PYTHON's env
#
# Which tree, first match wins:
#   COMFYUI_PATH                      a ComfyUI you already have: checked, used as it is, never modified
#   $CID_COMFYUI_HOME                 the pack's own copy (default ~/.cache/consistentid/ComfyUI), reused when present;
#                                     otherwise made there from
#     COMFYUI_ARCHIVE                 a .tar.gz of the ComfyUI source tree (one top folder, e.g. ComfyUI/), for offline machines
#     CID_COMFYUI_FALLBACK_ARCHIVE    the same, set by callers that know of one (tried when COMFYUI_ARCHIVE is unset)
#     git                             a shallow clone of the tested tag from the official repository
# Progress and errors go to stderr; every error says what to do.
set -euo pipefail
CID_LOG_PREFIX="setup_comfyui"
# shellcheck source=tools/python_env.sh
source "$(dirname "${BASH_SOURCE[0]}")/python_env.sh"

COMFYUI_TAG="v0.3.64"
COMFYUI_REPO="https://github.com/comfyanonymous/ComfyUI"
NEEDED_MB="${CID_COMFYUI_NEEDED_MB:-100}"   # the extracted tree is 16 MB; a shallow clone adds its .git; room to spare
TREE_FILES=(main.py nodes.py folder_paths.py)

is_comfyui_tree() {
    local dir="$1" name
    for name in "${TREE_FILES[@]}"; do [ -f "$dir/$name" ] || return 1; done
    [ -d "$dir/comfy" ]
}

tree_version() {
    sed -n 's/^__version__ *= *"\(.*\)"/\1/p' "$1/comfyui_version.py" 2>/dev/null | head -n 1
}

# Free MB on the file system that will hold $1 (its nearest existing folder); empty when df cannot tell.
free_mb() {
    local dir="$1"
    while [ ! -d "$dir" ]; do dir="$(dirname "$dir")"; done
    df -Pk "$dir" 2>/dev/null | awk 'NR == 2 && $4 ~ /^[0-9]+$/ { print int($4 / 1024) }'
}

fail_no_space() {
    cid_fail "not enough free disk space for ComfyUI in $1 (${2:-too little} MB free, about $NEEDED_MB MB needed). Free some space there, or set CID_COMFYUI_HOME to a folder on a disk with room, or set COMFYUI_PATH to a ComfyUI you already have."
}

check_space() {
    local parent="$1" free
    free="$(free_mb "$parent")"
    if [ -z "$free" ]; then
        cid_say "could not read the free disk space of $parent with df; going on"
    elif [ "$free" -lt "$NEEDED_MB" ]; then
        fail_no_space "$parent" "$free"
    fi
}

# Checks that every entry of the archive lies under one top folder holding a ComfyUI tree, before
# anything is extracted; prints how many leading path parts to strip (1, or 2 for "./ComfyUI/...").
archive_strip_count() {
    local archive="$1" listing="$WORK/listing" top strip=1 name missing=()
    if ! tar -tzf "$archive" >"$listing" 2>"$WORK/tar.err"; then
        cid_fail "$archive is not a ComfyUI source archive: tar cannot read it as a .tar.gz ($(grep -m 1 . "$WORK/tar.err")). Point COMFYUI_ARCHIVE at a .tar.gz of the ComfyUI source tree (for example comfyui-v0.3.64.tar.gz), or unset it to clone ComfyUI $COMFYUI_TAG with git."
    fi
    if head -n 1 "$listing" | grep -q '^\./'; then
        strip=2
        sed -i 's#^\./##' "$listing"
    fi
    top="$(head -n 1 "$listing" | cut -d/ -f1)"
    if [ -z "$top" ] || awk -F/ -v top="$top" '$1 != top { outside = 1 } END { exit !outside }' "$listing"; then
        missing=("one top folder (e.g. ComfyUI/) holding everything")
    else
        for name in "${TREE_FILES[@]}"; do grep -qxF "$top/$name" "$listing" || missing+=("$top/$name"); done
        awk -v dir="$top/comfy/" 'index($0, dir) == 1 { found = 1 } END { exit !found }' "$listing" || missing+=("$top/comfy/")
    fi
    if [ "${#missing[@]}" -gt 0 ]; then
        cid_fail "$archive is not a ComfyUI source archive: it has no ${missing[*]} (expected: one top folder, e.g. ComfyUI/, with main.py, nodes.py, folder_paths.py and comfy/). Point COMFYUI_ARCHIVE at a .tar.gz of the ComfyUI source tree (for example comfyui-v0.3.64.tar.gz), or unset it to clone ComfyUI $COMFYUI_TAG with git."
    fi
    echo "$strip"
}

# Runs a command whose failure may mean a full disk; on failure says which, with the command's own message.
run_filling_disk() {
    local parent="$1"
    shift
    if ! "$@" 2>"$WORK/step.err"; then
        if grep -qi "no space left on device" "$WORK/step.err"; then
            fail_no_space "$parent" "$(free_mb "$parent")"
        fi
        sed 's/^/    /' "$WORK/step.err" | tail -n 5 >&2
        return 1
    fi
}

# Makes the pack's own ComfyUI at $1: the tree is built in a temporary folder beside it and
# renamed into place, so an interrupted run never leaves a half tree where the next run looks.
provision() {
    local target="$1" parent archive="" strip="" staging
    parent="$(dirname "$target")"
    if [ -n "${COMFYUI_ARCHIVE:-}" ]; then
        [ -f "$COMFYUI_ARCHIVE" ] || cid_fail "COMFYUI_ARCHIVE=$COMFYUI_ARCHIVE does not exist. Point it at a .tar.gz of the ComfyUI source tree, or unset it to clone ComfyUI $COMFYUI_TAG with git."
        archive="$COMFYUI_ARCHIVE"
    elif [ -n "${CID_COMFYUI_FALLBACK_ARCHIVE:-}" ]; then
        if [ -f "$CID_COMFYUI_FALLBACK_ARCHIVE" ]; then
            archive="$CID_COMFYUI_FALLBACK_ARCHIVE"
        else
            cid_say "fallback archive $CID_COMFYUI_FALLBACK_ARCHIVE not found; trying git"
        fi
    fi
    if [ -z "$archive" ] && ! command -v git >/dev/null 2>&1; then
        cid_fail "cannot get ComfyUI: git is not installed and no archive was given. Install git (Debian/Ubuntu: apt-get install git), or set COMFYUI_ARCHIVE=/path/to/comfyui-v0.3.64.tar.gz (a .tar.gz of the ComfyUI source tree), or set COMFYUI_PATH to a ComfyUI you already have."
    fi
    if [ -n "$archive" ]; then
        strip="$(archive_strip_count "$archive")"
    fi
    if [ -e "$target" ]; then
        rmdir "$target" 2>/dev/null ||
            cid_fail "$target exists but is not a ComfyUI tree (no main.py, nodes.py, folder_paths.py, comfy/). Remove it, or set CID_COMFYUI_HOME to another folder."
    fi
    mkdir -p "$parent"
    check_space "$parent"
    staging="$(mktemp -d "$parent/.ComfyUI.partial.XXXXXX")"
    STAGING="$staging"   # removed by the exit trap
    if [ -n "$archive" ]; then
        cid_say "extracting ComfyUI from $archive into $target"
        mkdir "$staging/tree"
        run_filling_disk "$parent" \
            tar -xzf "$archive" --no-same-owner --strip-components="$strip" -C "$staging/tree" ||
            cid_fail "extracting $archive failed (see above). Check the file, or unset COMFYUI_ARCHIVE to clone ComfyUI $COMFYUI_TAG with git."
    else
        cid_say "cloning ComfyUI $COMFYUI_TAG from $COMFYUI_REPO into $target (shallow: the tag only, no history)"
        run_filling_disk "$parent" \
            git -c advice.detachedHead=false clone --quiet --depth 1 --branch "$COMFYUI_TAG" "$COMFYUI_REPO" "$staging/tree" ||
            cid_fail "git clone of $COMFYUI_REPO ($COMFYUI_TAG) failed (see above). Without network, set COMFYUI_ARCHIVE=/path/to/comfyui-v0.3.64.tar.gz; or set COMFYUI_PATH to a ComfyUI you already have."
    fi
    is_comfyui_tree "$staging/tree" || cid_fail "what was fetched into $staging/tree is not a ComfyUI tree; remove $target and run again."
    if ! mv -T "$staging/tree" "$target" 2>/dev/null; then
        # Another run may have put a tree there first; that one is as good as ours.
        is_comfyui_tree "$target" || cid_fail "could not move the new ComfyUI tree into $target; remove $target and run again."
    fi
    cid_say "ComfyUI $(tree_version "$target") is at $target"
}

resolve_comfyui() {
    local target
    if [ -n "${COMFYUI_PATH:-}" ]; then
        is_comfyui_tree "$COMFYUI_PATH" ||
            cid_fail "COMFYUI_PATH=$COMFYUI_PATH is not a ComfyUI folder (it needs main.py, nodes.py, folder_paths.py and comfy/). Point it at your ComfyUI folder, or unset it to have the pack set up its own ComfyUI."
        cid_say "using the ComfyUI at $COMFYUI_PATH (from COMFYUI_PATH; not modified)"
        (cd "$COMFYUI_PATH" && pwd)
        return
    fi
    target="${CID_COMFYUI_HOME:-$HOME/.cache/consistentid/ComfyUI}"
    if is_comfyui_tree "$target"; then
        cid_say "reusing ComfyUI $(tree_version "$target") at $target"
    else
        provision "$target"
    fi
    (cd "$target" && pwd)
}

install_requirements() {
    local python="$1" comfyui="$2" filtered="$WORK/comfyui-requirements.txt"
    [ -f "$comfyui/requirements.txt" ] || cid_fail "$comfyui/requirements.txt is missing; is $comfyui a complete ComfyUI tree?"
    # torch comes from the caller's environment (its CUDA or CPU build); ComfyUI's unpinned lines would replace it.
    grep -v -E '^[[:space:]]*(torch|torchvision|torchaudio)[[:space:]]*([<>=!~;[].*)?$' "$comfyui/requirements.txt" >"$filtered"
    pip_install_once "$python" "comfyui-requirements" "$filtered"
}

usage() {
    sed -n '2,/^set /p' "${BASH_SOURCE[0]}" | sed -e '/^set /d' -e 's/^# \{0,1\}//'
}

WORK="$(mktemp -d)"
STAGING=""
trap 'rm -rf "$WORK" ${STAGING:+"$STAGING"}' EXIT

case "${1:---print-path}" in
    --print-path)
        resolve_comfyui
        ;;
    --install-requirements)
        [ -n "${2:-}" ] || cid_fail "--install-requirements needs the Python to install into, e.g. --install-requirements ~/.cache/cid-venv/bin/python"
        comfyui="$(resolve_comfyui)"
        install_requirements "$2" "$comfyui"
        ;;
    -h | --help)
        usage
        ;;
    *)
        usage >&2
        cid_fail "unknown option $1"
        ;;
esac
