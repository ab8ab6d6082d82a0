"""ComfyUI in this process, with this pack loaded as ComfyUI would load it from custom_nodes.

The one in-process host of the repository: the runner (``tools/run_workflow.py``), the UI-workflow
writer, the benchmarks and the tests (``tests/comfy_harness.py`` adds test conveniences on top of
it) all boot ComfyUI through ``ComfyHost``.  ComfyUI keeps its state in module globals, so a process
can host one ComfyUI only; ``ComfyHost`` must be created before anything imports ComfyUI's modules.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import sys
import uuid
from types import ModuleType
from typing import Callable

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
logger = logging.getLogger("consistentid.host")

EventFn = Callable[[str, dict], None]
# ComfyUI's command-line switches for the UNet's weight dtype (--fp32-unet, --bf16-unet, --fp16-unet).
UNET_DTYPE_FLAGS = {"fp32": "fp32_unet", "bf16": "bf16_unet", "fp16": "fp16_unet"}
# ComfyUI's command-line switches for its attention backends (comfy.cli_args).
ATTENTION_FLAGS = {
    "pytorch": "use_pytorch_cross_attention",
    "sub-quadratic": "use_quad_cross_attention",
    "split": "use_split_cross_attention",
}


class _Server:
    """The part of ComfyUI's PromptServer that the executor talks to."""

    def __init__(self, on_event: EventFn):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata = {}
        self.messages: list[tuple[str, dict]] = []
        self._on_event = on_event

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))
        self._on_event(event, data if isinstance(data, dict) else {})

    def send_progress_text(self, text, node_id, sid=None):
        self._on_event("progress_text", {"text": text, "node": node_id})

    def queue_updated(self):
        pass


# Top-level modules of ComfyUI that another package could shadow (this repository has a ``nodes``).
COMFYUI_TOP_LEVEL = ("nodes", "execution", "folder_paths", "server", "comfy", "comfy_api", "comfy_execution",
                     "utils", "app")


class _WarningCollector(logging.Handler):
    """ComfyUI reports a pack that fails to import only through logging, so keep what it logs."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname}: {record.getMessage()}")


def _foreign_modules(comfyui_path: str) -> list[str]:
    """Already-imported modules that carry a ComfyUI top-level name but come from elsewhere."""
    foreign = []
    for name in COMFYUI_TOP_LEVEL:
        module = sys.modules.get(name)
        origin = getattr(module, "__file__", None) if module is not None else None
        if module is not None and (origin is None or not os.path.abspath(origin).startswith(comfyui_path + os.sep)):
            foreign.append(f"{name} ({origin or 'namespace package'})")
    return foreign


class ComfyHost:
    """ComfyUI with its built-in nodes and this pack loaded.

    Attributes: ``comfyui_path``, ``folder_paths``, ``nodes`` and ``execution`` (ComfyUI's modules),
    ``server`` (a stand-in for the PromptServer that records every message), ``pack_module`` (the
    package ComfyUI made of this repository, or None), ``pack_loaded`` (what ``load_custom_node``
    returned), ``pack_load_log`` (warnings and errors logged while the pack loaded),
    ``builtin_import_failures`` (``comfy_extras`` files that did not import, e.g. the audio nodes
    without torchaudio) and ``attention_backend``.  ``require_pack=False`` keeps a host whose pack
    failed to load, for a caller that wants to report why.
    """

    def __init__(self, comfyui_path: str, *, cpu: bool = False, base_directory: str | None = None,
                 output_directory: str | None = None, input_directory: str | None = None,
                 on_event: EventFn | None = None, attention: str | None = None, unet_dtype: str | None = None,
                 require_pack: bool = True):
        self.comfyui_path = os.path.abspath(comfyui_path)
        if not os.path.isfile(os.path.join(self.comfyui_path, "main.py")):
            raise FileNotFoundError(f"{self.comfyui_path} is not a ComfyUI folder (no main.py)")
        foreign = _foreign_modules(self.comfyui_path)
        if foreign:
            raise RuntimeError("modules with ComfyUI's names were imported from elsewhere before ComfyUI was set up: "
                               + ", ".join(foreign))
        # ComfyUI's own ``nodes`` must win over this repository's ``nodes`` package, which may be on
        # sys.path too (the working directory, or the tests' repository root): ComfyUI goes first.
        sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != self.comfyui_path]
        sys.path.insert(0, self.comfyui_path)

        # With argument parsing off (the default outside main.py) cli_args parses an empty list, so
        # the caller's argv is never read; the fields are set by hand before folder_paths and
        # comfy.model_management are imported, as both read them at import.
        import comfy.options

        comfy.options.enable_args_parsing(False)
        from comfy.cli_args import args

        args.cpu = cpu
        # ``attention``: one of ATTENTION_FLAGS, or None for ComfyUI's own choice. It must be set
        # before comfy.model_management is imported, which picks the backend once.
        if attention is not None:
            setattr(args, ATTENTION_FLAGS[attention], True)
        # ``unet_dtype``: one of UNET_DTYPE_FLAGS, or None for ComfyUI's own choice (fp32 on the CPU).
        if unet_dtype is not None:
            setattr(args, UNET_DTYPE_FLAGS[unet_dtype], True)
        args.base_directory = base_directory or self.comfyui_path
        import folder_paths

        if os.path.realpath(folder_paths.base_path) != os.path.realpath(args.base_directory):
            raise RuntimeError(f"folder_paths was imported before ComfyHost configured it (base path "
                               f"{folder_paths.base_path}); its folders cannot be redirected")
        if output_directory:
            folder_paths.set_output_directory(output_directory)
        if input_directory:
            folder_paths.set_input_directory(input_directory)
        self.folder_paths = folder_paths

        # main.py's import order: ``nodes`` puts ComfyUI's ``comfy`` folder first on sys.path, and
        # from then on ``import utils`` would find ``comfy/utils.py`` instead of the ``utils`` package.
        import utils.extra_config

        yaml_path = os.path.join(self.comfyui_path, "extra_model_paths.yaml")
        if os.path.isfile(yaml_path):
            utils.extra_config.load_extra_path_config(yaml_path)
        import comfy.model_management
        import comfy.utils
        import execution
        import hook_breaker_ac10a0
        import nodes
        import server

        if cpu and comfy.model_management.cpu_state != comfy.model_management.CPUState.CPU:
            raise RuntimeError("comfy.model_management was imported before ComfyHost selected the CPU")
        self.nodes, self.execution = nodes, execution
        import comfy.ldm.modules.attention

        self.attention_backend = comfy.ldm.modules.attention.optimized_attention.__name__
        logger.info("ComfyUI attention backend: %s", self.attention_backend)
        self.server = _Server(on_event or (lambda event, data: None))
        # Some nodes talk to PromptServer.instance directly; in ComfyUI it always exists.
        server.PromptServer.instance = getattr(server.PromptServer, "instance", None) or self.server
        comfy.utils.set_progress_bar_global_hook(self._progress)
        self.pack_module: ModuleType | None = None
        # Same bracket as main.py: ComfyUI undoes hooks that node packs put on core functions.
        hook_breaker_ac10a0.save_functions()
        try:
            self.builtin_import_failures = asyncio.run(
                nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
            self.pack_loaded, self.pack_load_log = self._load_pack()
        finally:
            hook_breaker_ac10a0.restore_functions()
        if require_pack and not self.pack_loaded:
            raise RuntimeError("ComfyUI could not import the ConsistentID pack:\n" + "\n".join(self.pack_load_log))
        self._cached_executor = None

    def _load_pack(self) -> tuple[bool, list[str]]:
        # Built-in node ids are passed as ``ignore`` exactly as init_external_custom_nodes does, so a
        # pack node that collides with a built-in one is dropped as it would be in ComfyUI.
        builtin = set(self.nodes.NODE_CLASS_MAPPINGS)
        collector = _WarningCollector()
        root_logger = logging.getLogger()
        root_logger.addHandler(collector)
        modules_before = {id(module) for module in sys.modules.values()}
        try:
            loaded = asyncio.run(self.nodes.load_custom_node(REPO_ROOT, builtin, module_parent="custom_nodes"))
        finally:
            root_logger.removeHandler(collector)
        if not loaded:
            logger.error("ComfyUI could not load the pack:\n%s", "\n".join(collector.lines))
        self.pack_module = _pack_module(modules_before)
        return bool(loaded), collector.lines

    def _progress(self, value, total, preview_image=None, prompt_id=None, node_id=None):
        import comfy.model_management

        # As in ComfyUI's server: progress updates are where an interrupt request takes effect.
        comfy.model_management.throw_exception_if_processing_interrupted()
        self.server.send_sync("progress", {"value": value, "max": total, "node": node_id})

    def loaded_unet_dtypes(self) -> dict[str, str]:
        """Weight dtype of each diffusion model ComfyUI has loaded, by model class (``{"SDXL": "bfloat16"}``)."""
        import comfy.model_management

        found = {}
        for loaded in comfy.model_management.current_loaded_models:
            patcher = loaded.model
            unet = getattr(getattr(patcher, "model", None), "diffusion_model", None)
            if unet is not None:
                weight = next(unet.parameters(), None)
                found[type(patcher.model).__name__] = str(getattr(weight, "dtype", "?")).replace("torch.", "")
        return found

    def full_path(self, folder: str, name: str) -> str | None:
        return self.folder_paths.get_full_path(folder, name)

    def folder(self, folder: str) -> list[str]:
        return self.folder_paths.get_folder_paths(folder)

    def pack_submodule(self, name: str) -> ModuleType:
        """A module of the pack as ComfyUI loaded it, e.g. ``pack_submodule("nodes.apply")``.

        ComfyUI imports the pack under a name derived from its folder, so its modules are other
        objects than a top-level ``import consistentid_core`` would give.
        """
        if self.pack_module is None:
            raise RuntimeError("the ConsistentID pack's module was not found among ComfyUI's imports")
        return importlib.import_module(f"{self.pack_module.__name__}.{name}")

    def run(self, prompt: dict, cached: bool = False) -> dict:
        """Validates and executes an API-format prompt; returns ComfyUI's history entry.

        ``cached``: run on one long-lived executor with ComfyUI's default (classic) output cache,
        as the server does, so that a re-queued graph only re-runs the nodes whose inputs changed.
        """
        prompt_id = str(uuid.uuid4())
        ok, error, outputs, node_errors = asyncio.run(self.execution.validate_prompt(prompt_id, prompt, None))
        if not ok or node_errors:
            raise WorkflowError(_describe_validation(error, node_errors, prompt))
        if cached:
            if self._cached_executor is None:
                self._cached_executor = self.execution.PromptExecutor(
                    self.server, cache_type=self.execution.CacheType.CLASSIC)
            executor = self._cached_executor
        else:
            executor = self.execution.PromptExecutor(self.server, cache_type=False)
        # Messages of an earlier prompt must not be read as this one's failure.
        self.server.messages.clear()
        # The executor sends per-node events and errors only to a connected client.
        executor.execute(prompt, prompt_id, extra_data={"client_id": "consistentid-run-workflow"}, execute_outputs=outputs)
        failure = next((data for event, data in self.server.messages if event == "execution_error"), None)
        if failure is not None:
            raise WorkflowError(
                f"node {failure.get('node_id')} ({failure.get('node_type')}) failed: {failure.get('exception_message')}"
            )
        return executor.history_result


def _pack_module(modules_before: set[int]) -> ModuleType | None:
    # Found by file: ComfyUI's naming rule for a custom-node package differs between versions.
    init_file = os.path.join(REPO_ROOT, "__init__.py")
    for module in list(sys.modules.values()):
        origin = getattr(module, "__file__", None)
        if id(module) not in modules_before and origin and os.path.abspath(origin) == init_file:
            return module
    return None


class WorkflowError(RuntimeError):
    """The workflow did not validate or a node failed; the message says which and why."""


def _describe_validation(error, node_errors, prompt) -> str:
    lines = []
    if error:
        lines.append(f"{error.get('message', error)}: {error.get('details', '')}".strip())
    for node_id, info in (node_errors or {}).items():
        title = prompt.get(node_id, {}).get("_meta", {}).get("title", node_id)
        for err in info.get("errors", []):
            lines.append(f"node {node_id} ({title}): {err.get('message')}: {err.get('details')}")
    return "\n".join(lines) or "the workflow did not validate"
