"""ComfyUI in this process, with this pack loaded as ComfyUI would load it from custom_nodes.

Used by ``tools/run_workflow.py``.  ComfyUI keeps its state in module globals, so a process can
host one ComfyUI only; ``ComfyHost`` must be created before anything imports ComfyUI's modules.
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


class ComfyHost:
    def __init__(self, comfyui_path: str, *, cpu: bool = False, base_directory: str | None = None,
                 output_directory: str | None = None, input_directory: str | None = None,
                 on_event: EventFn | None = None, attention: str | None = None, unet_dtype: str | None = None):
        self.comfyui_path = os.path.abspath(comfyui_path)
        if not os.path.isfile(os.path.join(self.comfyui_path, "main.py")):
            raise FileNotFoundError(f"{self.comfyui_path} is not a ComfyUI folder (no main.py)")
        # ComfyUI's own ``nodes`` module must win over this repository's ``nodes`` package.
        sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) not in (self.comfyui_path, REPO_ROOT)]
        sys.path.insert(0, self.comfyui_path)

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

        if output_directory:
            folder_paths.set_output_directory(output_directory)
        if input_directory:
            folder_paths.set_input_directory(input_directory)
        self.folder_paths = folder_paths

        import utils.extra_config  # main.py imports it before ``nodes`` shadows ``utils``

        yaml_path = os.path.join(self.comfyui_path, "extra_model_paths.yaml")
        if os.path.isfile(yaml_path):
            utils.extra_config.load_extra_path_config(yaml_path)
        import comfy.utils
        import execution
        import hook_breaker_ac10a0
        import nodes
        import server

        self.nodes, self.execution = nodes, execution
        import comfy.ldm.modules.attention

        self.attention_backend = comfy.ldm.modules.attention.optimized_attention.__name__
        logger.info("ComfyUI attention backend: %s", self.attention_backend)
        self.server = _Server(on_event or (lambda event, data: None))
        server.PromptServer.instance = getattr(server.PromptServer, "instance", None) or self.server
        comfy.utils.set_progress_bar_global_hook(self._progress)
        hook_breaker_ac10a0.save_functions()
        try:
            asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
            builtin = set(nodes.NODE_CLASS_MAPPINGS)
            modules_before = {id(module) for module in sys.modules.values()}
            self.pack_loaded = asyncio.run(nodes.load_custom_node(REPO_ROOT, builtin, module_parent="custom_nodes"))
        finally:
            hook_breaker_ac10a0.restore_functions()
        if not self.pack_loaded:
            raise RuntimeError("ComfyUI could not import the ConsistentID pack; see the log above")
        self.pack_module = _pack_module(modules_before)
        self._cached_executor = None

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
