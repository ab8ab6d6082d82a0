# Shell functions for the Python environments of run.sh and tools/setup_comfyui.sh (source this file).
#
#   create_venv DIR                     python3 -m venv DIR, with one message per way it can fail
#   pip_install_once PYTHON LABEL FILE  pip install -r FILE into PYTHON's environment, skipped when
#                                       FILE is unchanged since the last install there
#
# Messages go to stderr, prefixed with $CID_LOG_PREFIX, so that stdout stays free for results.

cid_say() { echo "[${CID_LOG_PREFIX:-consistentid}] $*" >&2; }
cid_fail() { echo "[${CID_LOG_PREFIX:-consistentid}] ERROR: $*" >&2; exit 1; }

create_venv() {
    local dir="$1" log
    command -v python3 >/dev/null 2>&1 ||
        cid_fail "python3 was not found on PATH. Install Python 3.10 or newer (Debian/Ubuntu: apt-get install python3 python3-venv), or set PYTHON=/path/to/python of an environment that has torch."
    cid_say "creating a Python virtual environment at $dir"
    log="$(mktemp)"
    # Debian's python3 without python3-venv fails here (no ensurepip) and leaves a half-made
    # environment behind, which a later run would take for a good one: remove it.
    if ! python3 -m venv "$dir" 2>"$log" || [ ! -x "$dir/bin/python" ]; then
        sed 's/^/    /' "$log" >&2
        rm -f "$log"
        rm -rf "$dir"
        cid_fail "could not create a Python virtual environment at $dir: Python's venv module (or its ensurepip) is missing. On Debian/Ubuntu run 'apt-get install python3-venv' (or python3.X-venv for your Python version), then run again; or set PYTHON=/path/to/python of an environment you already have."
    fi
    rm -f "$log"
}

pip_install_once() {
    local python="$1" label="$2" file="$3" prefix marker digest
    prefix="$("$python" -c 'import sys; print(sys.prefix)')" ||
        cid_fail "$python does not run; set PYTHON to a working Python or delete the environment to have it made again."
    marker="$prefix/.consistentid-$label.sha256"
    digest="$(sha256sum <"$file" | cut -d' ' -f1)"
    if [ -f "$marker" ] && [ "$(cat "$marker")" = "$digest" ]; then
        cid_say "$label: already installed in $prefix (unchanged since the last run; delete $marker to reinstall)"
        return 0
    fi
    cid_say "$label: installing into $prefix (pip; the first time this downloads packages)"
    "$python" -m pip install -q -r "$file" ||
        cid_fail "$label: pip could not install $file into $prefix; see pip's message above (no network? then install these packages from a local wheel folder with pip --no-index --find-links)."
    echo "$digest" >"$marker"
}
