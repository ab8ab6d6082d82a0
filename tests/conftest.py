"""Shared test set-up.

The repository root is appended (not prepended) to sys.path: ComfyUI has its own top-level
module called ``nodes``, and the ComfyUI tests must find that one, not this pack's folder.
"""

import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.append(REPO_ROOT)
