"""The pack's caches tied to ComfyUI's model memory management (v0.3.64 has no hook for custom caches).

Hook used: a ModelPatcher's ``on_detach_after`` callback (comfy.patcher_extension.CallbacksMP.ON_DETACH).
ComfyUI calls ``detach(unpatch_all=True)`` on every model it unloads: ``unload_all_models`` (the
"unload models" button, an out-of-memory error, --disable-smart-memory) and ``free_memory`` when a
larger model needs the room.  It is a registration on the patcher, not a wrapped function, so the
hook breaker that restores core functions after every prompt cannot undo it.

* Projected ID keys/values: the patched UNet's callback (``model_patch.release_patch_caches``) drops
  their per-device copies, batch layouts and resampled masks; the next step rebuilds what it needs
  from the fp32 projections.
* Face parser: loaded through ComfyUI's model manager like any other model (it is offloaded when
  the memory is needed), and its callback empties the face parser and insightface caches.
``soft_empty_cache`` itself calls no hook; it only runs after ComfyUI has unloaded models, which
is when the callbacks above have already run.
"""

from __future__ import annotations

import itertools
import logging

import torch

from ...consistentid_core.memo import release_model_caches
from .types import CALLBACK_KEY

logger = logging.getLogger("consistentid")

PATCHER_ATTRIBUTE = "consistentid_patcher"  # the face parser's ModelPatcher, kept on the network itself


def _release_face_models(_patcher, unpatch_all: bool) -> None:
    if unpatch_all:
        release_model_caches()


def face_parser_patcher(parser: torch.nn.Module):
    """The ModelPatcher through which ComfyUI manages the parser, made on first use.

    It loads onto the device the parser was loaded for and offloads to ComfyUI's offload device.
    """
    patcher = getattr(parser, PATCHER_ATTRIBUTE, None)
    if patcher is None:
        import comfy.model_management
        import comfy.model_patcher
        from comfy.patcher_extension import CallbacksMP

        first = next(itertools.chain(parser.parameters(), parser.buffers()), None)
        load_device = first.device if first is not None else torch.device("cpu")
        offload = torch.device("cpu") if load_device.type == "cpu" else comfy.model_management.unet_offload_device()
        patcher = comfy.model_patcher.ModelPatcher(parser, load_device=load_device, offload_device=offload)
        patcher.add_callback_with_key(CallbacksMP.ON_DETACH, CALLBACK_KEY, _release_face_models)
        # On the module itself: the patcher lives exactly as long as the network it manages.
        setattr(parser, PATCHER_ATTRIBUTE, patcher)
    return patcher


def use_face_parser(parser: torch.nn.Module) -> None:
    """Puts the parser on its device through ComfyUI's model manager (which may unload others for room)."""
    import comfy.model_management

    if not isinstance(parser, torch.nn.Module):  # a stand-in callable: nothing to place
        return
    comfy.model_management.load_models_gpu([face_parser_patcher(parser)], force_full_load=True)
