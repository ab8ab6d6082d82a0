"""Shared test set-up.

The repository root is appended (not prepended) to sys.path: ComfyUI has its own top-level
module called ``nodes``, and the ComfyUI tests must find that one, not this pack's folder.
"""

import os
import random
import sys
import zlib

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.append(REPO_ROOT)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Every test starts from its own fixed seed (derived from its id), before its fixtures run.

    A test's random draws are then the same on every machine and in every selection or order of
    tests.  Tests that need specific numbers still use their own ``torch.Generator``.
    """
    import numpy as np
    import torch

    seed = zlib.crc32(item.nodeid.encode()) & 0x7FFFFFFF
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# Tests that start a memory-hungry process of their own (an SDXL graph: about 21 GB at its peak)
# run first, while this process is still small: ComfyUI tests that run in this process keep
# gigabytes of allocator pages that would add to the child's peak.
# The SD1.5 workflow tests follow, while this process is still small: each loads a checkpoint of its own.
RUN_FIRST = ("test_comfy_sdxl_workflows.py", "test_comfy_workflows.py")


def pytest_collection_modifyitems(session, config, items):
    first = [item for item in items if os.path.basename(str(item.fspath)) in RUN_FIRST]
    if first:
        items[:] = first + [item for item in items if item not in first]


@pytest.fixture(autouse=True, scope="module")
def release_models_after_each_module():
    """After each test module ComfyUI unloads every model it still holds and the freed heap goes back to
    the system (comfy_harness.release_process_memory); without it the one-process suite grew past 24 GB."""
    yield
    from comfy_harness import release_process_memory

    release_process_memory()


# The face-node test files (test_comfy_face_*.py, test_comfy_model_files.py, test_comfy_embeds_files.py)
# share one set of placed models and loaded nodes per session.
from comfy_face_fixtures import errors, loaded, models, pack_embeds, photo_embeds  # noqa: E402,F401


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    """The pack loaded into a real ComfyUI in this process (tests/comfy_harness.py); skipped without
    COMFYUI_PATH, a failure instead when CI set CID_REQUIRE_COMFYUI.  One per process: ComfyUI keeps
    its state in module globals."""
    from comfy_harness import comfy_session, comfyui_path_or_skip

    comfyui_path_or_skip()
    return comfy_session(tmp_path_factory.mktemp("comfyui"))
