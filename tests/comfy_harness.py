"""Runs this node pack inside a real ComfyUI, in the test process.

Point ``COMFYUI_PATH`` at a ComfyUI checkout (v0.3.64 is the tested version); without it every
test that asks for a session is skipped.  Tests take the ``comfy`` fixture of tests/conftest.py.

ComfyUI keeps its state in module globals (node registry, folder paths, device choice) that can
be set up once per process only, so ``comfy_session()`` builds one ``ComfySession`` and hands the
same object to every caller.  ``ComfySession`` is the repository's one in-process host
(``tools/comfy_host.ComfyHost``, which the runner and the benchmarks use too) on the CPU with its
folders under a temporary root, plus what tests need.

The pack is loaded with ``nodes.load_custom_node(<repository root>)``, just as ComfyUI loads a
folder from ``custom_nodes``.  ComfyUI names that package after its folder path, so the pack's own
modules (and its copy of ``consistentid_core``) live under that name, not under the top-level
``consistentid_core`` the unit tests import: use ``pack_submodule()`` to reach them.
"""

from __future__ import annotations

import asyncio
import atexit
import copy
import ctypes
import gc
import importlib
import inspect
import logging
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tools.comfy_host import REPO_ROOT, ComfyHost

log = logging.getLogger(__name__)

# Model folders created up front, so that tests can drop files into them.  ``consistentid`` and
# ``insightface`` are not registered by ComfyUI: the pack has to register them itself, and the
# harness deliberately does not do it for the pack (that would hide a missing registration).
MODEL_FOLDERS = ("checkpoints", "clip_vision", "loras", "vae", "controlnet", "consistentid", "insightface")
PACK_MODEL_FOLDERS = ("consistentid", "insightface")

# Set by .ci/run after it has provided ComfyUI: from then on a missing COMFYUI_PATH fails a test.
REQUIRE_ENV = "CID_REQUIRE_COMFYUI"

_session: ComfySession | None = None
_init_error: BaseException | None = None


def comfyui_path_or_skip() -> str:
    """The ComfyUI checkout to test against; skips the calling test when none is configured."""
    path = os.environ.get("COMFYUI_PATH", "").strip()
    if not path:
        message = ("COMFYUI_PATH is not set: point it at a ComfyUI checkout (v0.3.64 is tested) "
                   "to run the tests inside a real ComfyUI")
        if os.environ.get(REQUIRE_ENV, "").strip() not in ("", "0"):
            # CI sets this once it has provided ComfyUI: a skip would hide that a test never ran.
            pytest.fail(f"{message} ({REQUIRE_ENV} is set, so this is a failure, not a skip)")
        pytest.skip(message)
    path = os.path.abspath(os.path.expanduser(path))
    missing = [name for name in ("nodes.py", "execution.py", "folder_paths.py", "comfy") if
               not os.path.exists(os.path.join(path, name))]
    if missing:
        # A wrong path is a broken setup, not a reason to skip silently.
        raise RuntimeError(f"COMFYUI_PATH={path} is not a ComfyUI checkout (missing: {', '.join(missing)})")
    return path


def release_process_memory() -> None:
    """ComfyUI's models unloaded (when ComfyUI is loaded), garbage collected, and the heap trimmed."""
    management = sys.modules.get("comfy.model_management")
    if management is not None:
        management.unload_all_models()
        management.soft_empty_cache()
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def comfy_session(tmp_root: str | os.PathLike | None = None) -> ComfySession:
    """The process-wide ComfyUI session, created on the first call.

    ``tmp_root`` (first call only) is the folder that becomes ComfyUI's base directory: models,
    input, output, temp and user folders all live under it.  Without it a temporary folder is made
    and removed at exit.
    """
    global _session, _init_error
    comfyui_path = comfyui_path_or_skip()
    if _session is not None:
        if _session.comfyui_path != comfyui_path:
            raise RuntimeError(f"ComfyUI from {_session.comfyui_path} is already loaded in this process; "
                               f"it cannot be swapped for {comfyui_path}")
        return _session
    if _init_error is not None:
        # Half-initialised ComfyUI globals cannot be retried in the same process.
        raise RuntimeError("setting up ComfyUI failed earlier in this test session") from _init_error
    if tmp_root is None:
        tmp_root = tempfile.mkdtemp(prefix="comfyui-session-")
        atexit.register(shutil.rmtree, tmp_root, True)
    try:
        _session = ComfySession(comfyui_path, os.path.abspath(tmp_root))
    except BaseException as exc:
        _init_error = exc
        raise
    return _session


class ComfySession(ComfyHost):
    """The repository's ComfyHost on the CPU, with every folder under a temporary root, plus what tests need:
    model folders to drop files into, node classes by id, prompts that must validate and run, and one
    node called the way the executor calls it.

    Attributes besides ComfyHost's: ``root``, ``models_dir``, ``input_dir``, ``output_dir``, ``temp_dir``.
    """

    def __init__(self, comfyui_path: str, root: str) -> None:
        self.root = Path(root)
        # A pack that fails to load is kept: the pack tests report why (pack_load_log).
        super().__init__(comfyui_path, cpu=True, base_directory=str(self.root), require_pack=False)
        self.models_dir = Path(self.folder_paths.models_dir)
        self.input_dir = Path(self.folder_paths.get_input_directory())
        self.output_dir = Path(self.folder_paths.get_output_directory())
        self.temp_dir = Path(self.folder_paths.get_temp_directory())
        for folder in (self.input_dir, self.output_dir, self.temp_dir,
                       *(self.models_dir / name for name in MODEL_FOLDERS)):
            folder.mkdir(parents=True, exist_ok=True)
        self._point_pack_folders_here()
        log.info("ComfyUI from %s ready under %s; pack loaded: %s", comfyui_path, root, self.pack_loaded)

    def release_memory(self) -> None:
        """Unload every model ComfyUI holds and give the freed heap back to the system.

        The suite runs in one process: ComfyUI's loaded-model list keeps every UNet a test made alive
        (on the CPU nothing forces it to let go), and glibc keeps freed pages of a large heap."""
        release_process_memory()

    def _point_pack_folders_here(self) -> None:
        for name in PACK_MODEL_FOLDERS:
            if name in self.folder_paths.folder_names_and_paths:
                self.folder_paths.add_model_folder_path(name, str(self.models_dir / name))

    # --- the pack -----------------------------------------------------------------------------

    @property
    def pack_module_name(self) -> str:
        if self.pack_module is None:
            raise AssertionError(self._load_failure_text())
        return self.pack_module.__name__

    def pack_submodule(self, name: str) -> ModuleType:
        """A module of the loaded pack, e.g. ``pack_submodule("nodes.extension")``."""
        return importlib.import_module(f"{self.pack_module_name}.{name}")

    def is_pack_class(self, node_cls: type) -> bool:
        return self.pack_module is not None and node_cls.__module__.startswith(self.pack_module_name + ".")

    def pack_node_ids(self) -> list[str]:
        """The node ids ComfyUI registered from this pack."""
        return sorted(node_id for node_id, node_cls in self.nodes.NODE_CLASS_MAPPINGS.items()
                      if self.is_pack_class(node_cls))

    def node_class(self, node_id: str) -> type:
        """The class ComfyUI registered under ``node_id`` (built-in or from the pack)."""
        node_cls = self.nodes.NODE_CLASS_MAPPINGS.get(node_id)
        if node_cls is None:
            raise AssertionError(f"node {node_id!r} is not registered in ComfyUI; pack nodes: "
                                 f"{self.pack_node_ids()}\n{self._load_failure_text()}")
        return node_cls

    def _load_failure_text(self) -> str:
        if self.pack_loaded and self.pack_module is not None:
            return ""
        return "ComfyUI failed to load the pack:\n" + "\n".join(self.pack_load_log)

    # --- folders ------------------------------------------------------------------------------

    def model_dir(self, folder_name: str, *subfolders: str) -> Path:
        """``<models>/<folder_name>/<subfolders...>``, created; e.g. ("insightface", "models", "buffalo_l")."""
        path = self.models_dir.joinpath(folder_name, *subfolders)
        path.mkdir(parents=True, exist_ok=True)
        self.refresh_file_lists()
        return path

    def refresh_file_lists(self) -> None:
        """Forget ComfyUI's cached folder listings, so files added by a test show up in combos."""
        self.folder_paths.filename_list_cache.clear()

    # --- running nodes ------------------------------------------------------------------------

    def validate(self, prompt: dict, prompt_id: str | None = None) -> list[str]:
        """Validates an API-format prompt as the server does; returns the output node ids."""
        prompt_id = prompt_id or str(uuid.uuid4())
        ok, error, outputs, node_errors = asyncio.run(self.execution.validate_prompt(prompt_id, prompt, None))
        # ComfyUI queues a prompt when at least one output is valid; a test wants all of them valid.
        if not ok or node_errors:
            raise AssertionError("ComfyUI rejected the prompt:\n" + _validation_text(error, node_errors))
        return outputs

    def run_workflow(self, prompt: dict, extra_data: dict | None = None) -> dict:
        """Validates and executes an API-format prompt in process.

        Returns the history entry ComfyUI would store: ``prompt_id``, ``outputs`` (node id -> ui
        output), ``meta`` and ``status`` (``status_str``, ``completed``, ``messages``).  Raises
        AssertionError with ComfyUI's node errors or the node's exception and traceback.
        """
        prompt = copy.deepcopy(prompt)
        prompt_id = str(uuid.uuid4())
        outputs = self.validate(prompt, prompt_id)
        self.server.messages.clear()
        self.server.last_prompt_id = prompt_id
        executor = self.execution.PromptExecutor(self.server, cache_type=False)
        executor.execute(prompt, prompt_id, extra_data or {}, outputs)
        events = {event: data for event, data in executor.status_messages}
        failure = events.get("execution_error") or events.get("execution_interrupted")
        if failure is not None or not executor.success or "execution_success" not in events:
            raise AssertionError("ComfyUI failed to execute the prompt:\n" + _execution_text(failure))
        return {
            "prompt_id": prompt_id,
            **executor.history_result,
            "status": {"status_str": "success", "completed": True, "messages": executor.status_messages},
        }

    def execute_node(self, node_id: str, /, *, hidden: dict | None = None, unique_id: str = "harness",
                     **inputs: Any) -> Any:
        """Calls one node the way the executor does, without a graph.

        V3 nodes run on a locked clone of their class with ``hidden`` (keys: ``io.Hidden`` members
        or their strings) and return an ``io.NodeOutput`` (values in ``.args``, ``.ui``); V1 nodes
        return whatever their FUNCTION returns.  Runs in inference mode, as execution does.
        """
        import torch
        from comfy_api.internal import _ComfyNodeInternal, make_locked_method_func
        from comfy_api.latest import io
        from comfy_execution.utils import CurrentNodeContext

        node_cls = self.node_class(node_id)
        with torch.inference_mode(), CurrentNodeContext("harness", unique_id, None):
            if issubclass(node_cls, _ComfyNodeInternal):
                node_cls.GET_SCHEMA()
                clone = node_cls.PREPARE_CLASS_CLONE({io.Hidden.unique_id: unique_id, **(hidden or {})})
                function = make_locked_method_func(node_cls, node_cls.FUNCTION, clone)
            else:
                function = getattr(node_cls(), node_cls.FUNCTION)
            result = function(**inputs)
            if inspect.iscoroutine(result):
                result = asyncio.run(result)
        return result


def _validation_text(error: dict | None, node_errors: dict) -> str:
    lines = []
    if error:
        lines.append(f"{error.get('message')}: {error.get('details')}")
    for node_id, entry in node_errors.items():
        for reason in entry.get("errors", []):
            lines.append(f"  node {node_id} ({entry.get('class_type')}): {reason.get('message')}: "
                         f"{reason.get('details')}")
            trace = reason.get("extra_info", {}).get("traceback")
            if trace:
                lines.append("".join(trace))
    return "\n".join(lines)


def _execution_text(failure: dict | None) -> str:
    if failure is None:
        return "the executor reported no error but did not finish the prompt"
    if "exception_message" not in failure:
        return f"interrupted at node {failure.get('node_id')} ({failure.get('node_type')})"
    return (f"node {failure['node_id']} ({failure['node_type']}) raised {failure['exception_type']}: "
            f"{failure['exception_message']}\n" + "".join(failure.get("traceback") or []))


__all__ = ["ComfySession", "comfy_session", "comfyui_path_or_skip", "REPO_ROOT"]
