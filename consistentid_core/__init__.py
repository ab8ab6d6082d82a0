"""Framework-free core of the ConsistentID pack: models, checkpoint format, prompt and region logic.

Nothing in this package imports ComfyUI; the nodes, the training module and the tests all build on it.
"""

import logging

__version__ = "0.1.0"

logger = logging.getLogger("consistentid")
