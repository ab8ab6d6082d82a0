"""tools/setup_comfyui.sh and run.sh's first steps, in fake environments.

Each test runs the real scripts with a temporary HOME and ComfyUI cache, and a PATH that holds
only the tools the scripts need (links in a temporary bin folder), so that git, df, tar or python3
can be left out or replaced by a stand-in that fails the way the real one does. Nothing is
downloaded and nothing is pip-installed.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SETUP = REPO_ROOT / "tools" / "setup_comfyui.sh"
RUN = REPO_ROOT / "run.sh"
BASH = shutil.which("bash")
TOOLS = ("bash", "cat", "cut", "dirname", "grep", "head", "tail", "sed", "awk", "mktemp", "mkdir", "rmdir",
         "rm", "mv", "ln", "readlink", "tar", "gzip", "df", "sha256sum")
REQUIREMENTS = "comfyui-frontend-package==1.27.10\ntorch\ntorchsde\ntorchvision\ntorchaudio\nnumpy>=1.25.0\naiohttp>=3.11.8\n"
COMFYUI_FILES = {
    "main.py": "",
    "nodes.py": "",
    "folder_paths.py": "",
    "comfy/__init__.py": "",
    "comfyui_version.py": '__version__ = "0.3.64"\n',
    "requirements.txt": REQUIREMENTS,
}


def _executable(path: Path, text: str) -> Path:
    path.write_text(f"#!{BASH}\n{text}")
    path.chmod(0o755)
    return path


def _archive(path: Path, files: dict[str, str]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _tree_listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


class Sandbox:
    def __init__(self, tmp_path: Path):
        self.root = tmp_path
        self.bin = tmp_path / "bin"
        self.bin.mkdir()
        for tool in TOOLS:
            (self.bin / tool).symlink_to(shutil.which(tool))
        self.cache = tmp_path / "cache"
        self.comfyui = self.cache / "ComfyUI"
        self.env = {"HOME": str(tmp_path / "home"), "PATH": str(self.bin), "LC_ALL": "C",
                    "CID_COMFYUI_HOME": str(self.comfyui)}
        self.good_archive = _archive(tmp_path / "comfyui.tar.gz", {f"ComfyUI/{k}": v for k, v in COMFYUI_FILES.items()})

    def tool(self, name: str, script: str) -> None:
        """Replaces (or adds) a tool on the sandbox PATH by a bash script."""
        target = self.bin / name
        if target.is_symlink():
            target.unlink()
        _executable(target, script)

    def run(self, *args: str, script: Path = SETUP, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([BASH, str(script), *args], env={**self.env, **env}, capture_output=True,
                              text=True, timeout=60, cwd=self.root)

    def leftovers(self) -> list[str]:
        """What a failed run left in the cache folder (a target or a partial tree)."""
        return sorted(os.listdir(self.cache)) if self.cache.exists() else []


@pytest.fixture
def sandbox(tmp_path):
    return Sandbox(tmp_path)


def test_archive_is_extracted_then_reused_without_it(sandbox):
    first = sandbox.run("--print-path", COMFYUI_ARCHIVE=str(sandbox.good_archive))
    assert first.returncode == 0, first.stderr
    assert first.stdout == f"{sandbox.comfyui}\n"  # the path only: callers read it with $(...)
    assert f"extracting ComfyUI from {sandbox.good_archive} into {sandbox.comfyui}" in first.stderr
    assert _tree_listing(sandbox.comfyui) == sorted(["comfy", *COMFYUI_FILES])
    assert sandbox.leftovers() == ["ComfyUI"]

    sandbox.good_archive.unlink()
    second = sandbox.run("--print-path", COMFYUI_ARCHIVE=str(sandbox.good_archive))
    assert second.returncode == 0, second.stderr
    assert second.stdout == first.stdout
    assert f"reusing ComfyUI 0.3.64 at {sandbox.comfyui}" in second.stderr


def test_archive_with_dot_slash_entries_and_another_top_folder_name(sandbox):
    archive = _archive(sandbox.root / "release.tar.gz", {f"./ComfyUI-0.3.64/{k}": v for k, v in COMFYUI_FILES.items()})
    result = sandbox.run("--print-path", COMFYUI_ARCHIVE=str(archive))
    assert result.returncode == 0, result.stderr
    assert (sandbox.comfyui / "comfy" / "__init__.py").is_file()
    assert (sandbox.comfyui / "comfyui_version.py").read_text() == COMFYUI_FILES["comfyui_version.py"]


def test_fallback_archive_is_used_when_no_archive_is_given(sandbox):
    result = sandbox.run("--print-path", CID_COMFYUI_FALLBACK_ARCHIVE=str(sandbox.good_archive))
    assert result.returncode == 0, result.stderr
    assert f"extracting ComfyUI from {sandbox.good_archive}" in result.stderr
    assert (sandbox.comfyui / "main.py").is_file()


def test_no_git_and_no_archive(sandbox):
    result = sandbox.run("--print-path")
    assert result.returncode == 1
    assert result.stdout == ""
    assert "git is not installed and no archive was given" in result.stderr
    assert "apt-get install git" in result.stderr
    assert "COMFYUI_ARCHIVE=/path/to/comfyui-v0.3.64.tar.gz" in result.stderr
    assert sandbox.leftovers() == []


def test_missing_fallback_archive_and_no_git(sandbox):
    result = sandbox.run("--print-path", CID_COMFYUI_FALLBACK_ARCHIVE=str(sandbox.root / "gone.tar.gz"))
    assert result.returncode == 1
    assert f"fallback archive {sandbox.root / 'gone.tar.gz'} not found" in result.stderr
    assert "git is not installed and no archive was given" in result.stderr


@pytest.mark.parametrize("files, reason", [
    ({"notes/readme.txt": "hello", "notes/main.py": ""}, "it has no notes/nodes.py notes/folder_paths.py notes/comfy/"),
    ({"ComfyUI/main.py": "", "ComfyUI/nodes.py": "", "ComfyUI/folder_paths.py": "", "ComfyUI/comfy/a.py": "",
      "evil.sh": ""}, "it has no one top folder"),
])
def test_archive_that_is_not_a_comfyui_tree(sandbox, files, reason):
    archive = _archive(sandbox.root / "other.tar.gz", files)
    result = sandbox.run("--print-path", COMFYUI_ARCHIVE=str(archive))
    assert result.returncode == 1
    assert f"{archive} is not a ComfyUI source archive: {reason}" in result.stderr
    assert "unset it to clone ComfyUI v0.3.64 with git" in result.stderr
    assert sandbox.leftovers() == []


def test_archive_that_is_not_gzip(sandbox):
    archive = sandbox.root / "comfyui.tar.gz"
    archive.write_text("an HTML error page saved under the archive's name")
    result = sandbox.run("--print-path", COMFYUI_ARCHIVE=str(archive))
    assert result.returncode == 1
    assert f"{archive} is not a ComfyUI source archive: tar cannot read it as a .tar.gz (gzip: stdin: not in gzip format)" in result.stderr
    assert sandbox.leftovers() == []


def test_no_disk_space_is_found_before_extracting(sandbox):
    sandbox.tool("df", 'echo "Filesystem 1024-blocks Used Available Capacity Mounted on"\n'
                       'echo "/dev/full 1000000 999980 20 100% /"\n')
    result = sandbox.run("--print-path", COMFYUI_ARCHIVE=str(sandbox.good_archive))
    assert result.returncode == 1
    assert f"not enough free disk space for ComfyUI in {sandbox.cache} (0 MB free, about 100 MB needed)" in result.stderr
    assert "set CID_COMFYUI_HOME to a folder on a disk with room" in result.stderr
    assert sandbox.leftovers() == []


def test_disk_filling_up_while_extracting(sandbox):
    real_tar = shutil.which("tar")
    sandbox.tool("tar", f'case "$1" in -x*) echo "tar: ComfyUI/nodes.py: Cannot write: No space left on device" >&2; exit 2;; esac\n'
                        f'exec {real_tar} "$@"\n')
    result = sandbox.run("--print-path", COMFYUI_ARCHIVE=str(sandbox.good_archive))
    assert result.returncode == 1
    assert f"not enough free disk space for ComfyUI in {sandbox.cache}" in result.stderr
    assert sandbox.leftovers() == []  # the partial tree is removed


def test_git_clones_the_tested_tag_shallow(sandbox):
    log = sandbox.root / "git.log"
    make_tree = "".join(f'mkdir -p "$(dirname "$dest/{name}")"; : > "$dest/{name}"\n' for name in COMFYUI_FILES)
    sandbox.tool("git", f'echo "$@" > {log}\nfor dest; do :; done\n{make_tree}')
    result = sandbox.run("--print-path")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{sandbox.comfyui}\n"
    args = log.read_text().split()
    assert args[args.index("clone"):-1] == ["clone", "--quiet", "--depth", "1", "--branch", "v0.3.64",
                                            "https://github.com/comfyanonymous/ComfyUI"]
    assert Path(args[-1]).parent.parent == sandbox.cache  # cloned beside the target, then moved into place
    assert (sandbox.comfyui / "folder_paths.py").is_file()
    assert sandbox.leftovers() == ["ComfyUI"]


def test_git_failing_on_a_full_disk(sandbox):
    sandbox.tool("git", 'echo "fatal: write error: No space left on device" >&2; exit 128\n')
    result = sandbox.run("--print-path")
    assert result.returncode == 1
    assert "not enough free disk space for ComfyUI" in result.stderr
    assert sandbox.leftovers() == []


def test_git_failing_without_network(sandbox):
    sandbox.tool("git", 'echo "fatal: unable to access \'https://github.com/comfyanonymous/ComfyUI/\': Could not resolve host" >&2; exit 128\n')
    result = sandbox.run("--print-path")
    assert result.returncode == 1
    assert "Could not resolve host" in result.stderr
    assert "Without network, set COMFYUI_ARCHIVE=/path/to/comfyui-v0.3.64.tar.gz" in result.stderr
    assert sandbox.leftovers() == []


def test_comfyui_path_is_used_as_it_is(sandbox):
    assert sandbox.run(COMFYUI_ARCHIVE=str(sandbox.good_archive)).returncode == 0
    user_tree = sandbox.root / "users-ComfyUI"
    sandbox.comfyui.rename(user_tree)
    before = _tree_listing(user_tree)
    result = sandbox.run("--print-path", COMFYUI_PATH=str(user_tree), COMFYUI_ARCHIVE=str(sandbox.good_archive))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{user_tree}\n"
    assert _tree_listing(user_tree) == before
    assert sandbox.leftovers() == []  # the pack's own copy is not made


def test_comfyui_path_that_is_not_comfyui(sandbox):
    result = sandbox.run("--print-path", COMFYUI_PATH=str(sandbox.root))
    assert result.returncode == 1
    assert f"COMFYUI_PATH={sandbox.root} is not a ComfyUI folder (it needs main.py, nodes.py, folder_paths.py and comfy/)" in result.stderr


def test_occupied_cache_folder_is_not_overwritten(sandbox):
    sandbox.comfyui.mkdir(parents=True)
    (sandbox.comfyui / "mine.txt").write_text("keep")
    result = sandbox.run("--print-path", COMFYUI_ARCHIVE=str(sandbox.good_archive))
    assert result.returncode == 1
    assert f"{sandbox.comfyui} exists but is not a ComfyUI tree" in result.stderr
    assert _tree_listing(sandbox.comfyui) == ["mine.txt"]


def test_requirements_installed_once_without_torch(sandbox):
    assert sandbox.run(COMFYUI_ARCHIVE=str(sandbox.good_archive)).returncode == 0
    prefix, pip_log = sandbox.root / "venv", sandbox.root / "pip.log"
    prefix.mkdir()
    python = _executable(sandbox.root / "python", f"""
case "$1" in
    -c) echo {prefix} ;;
    -m) shift 2; while [ $# -gt 0 ]; do [ "$1" = -r ] && cat "$2" >> {pip_log}; shift; done ;;
    *) exit 1 ;;
esac
""")
    first = sandbox.run("--install-requirements", str(python))
    assert first.returncode == 0, first.stderr
    assert pip_log.read_text() == "comfyui-frontend-package==1.27.10\ntorchsde\nnumpy>=1.25.0\naiohttp>=3.11.8\n"
    assert f"comfyui-requirements: installing into {prefix}" in first.stderr

    second = sandbox.run("--install-requirements", str(python))
    assert second.returncode == 0, second.stderr
    assert pip_log.read_text().count("aiohttp") == 1  # pip was not called again
    assert f"comfyui-requirements: already installed in {prefix}" in second.stderr

    (sandbox.comfyui / "requirements.txt").write_text(REQUIREMENTS + "einops\n")
    third = sandbox.run("--install-requirements", str(python))
    assert third.returncode == 0, third.stderr
    assert pip_log.read_text().count("aiohttp") == 2 and pip_log.read_text().endswith("einops\n")


def test_run_sh_without_python_venv_module(sandbox):
    # Debian's python3 without python3-venv: `-m venv` fails for want of ensurepip and leaves a
    # half-made environment, which a later run must not take for a good one.
    sandbox.tool("python3", 'if [ "$1" = -m ] && [ "$2" = venv ]; then mkdir -p "$3/bin"; : > "$3/bin/python"; '
                            'chmod +x "$3/bin/python"\n'
                            '  echo "The virtual environment was not created successfully because ensurepip is not available." >&2; exit 1; fi\n'
                            'exit 1\n')
    venv = sandbox.root / "venv"
    result = sandbox.run("--smoke", script=RUN, CID_VENV=str(venv))
    assert result.returncode == 1
    assert "ensurepip is not available" in result.stderr
    assert (f"could not create a Python virtual environment at {venv}: Python's venv module (or its ensurepip) is missing. "
            "On Debian/Ubuntu run 'apt-get install python3-venv'") in result.stderr
    assert not venv.exists()
    assert sandbox.leftovers() == []  # it stopped before fetching ComfyUI


def test_run_sh_without_python3(sandbox):
    result = sandbox.run("--smoke", script=RUN, CID_VENV=str(sandbox.root / "venv"))
    assert result.returncode == 1
    assert "python3 was not found on PATH" in result.stderr
