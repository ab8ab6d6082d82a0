"""Every number and default of ConsistentID that more than one module needs, in one place.

The official values come from the released code (see ``shared/spec/consistentid.md``); the pack's own
limits are marked as such.
"""

from __future__ import annotations

ARCHS = ("sd15", "sdxl")

# Feature sizes of the released weights: ArcFace embedding, CLIP ViT-H/14 at 224 px (penultimate layer).
ID_DIM = 512
CLIP_SIZE = 224
CLIP_TOKENS = 257
CLIP_WIDTH = 1280
# OpenAI CLIP normalisation; an image filled with the mean colour normalises to all zeros, which
# is what the official code feeds for padded region slots and for the unconditional features.
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

# At most five facial regions are fused into the prompt, in the official slot order.
MAX_REGIONS = 5

# Official preprocessing per architecture: the parse square, the insightface detection size and
# the colour order the official pipeline hands insightface (RGB for SD1.5 is its quirk).
PARSE_SIZE = {"sd15": 512, "sdxl": 1280}
OFFICIAL_DET_SIZE = {"sd15": 640, "sdxl": 512}
OFFICIAL_COLOR_ORDER = {"sd15": "rgb", "sdxl": "bgr"}

# The official merge step (spec §2.1, §2.7): 50 steps, the text-only prompt for steps 0..30 (31 steps)
# and the facial prompt after, i.e. a boundary at (start_merge_step + 1) / steps of the schedule.
OFFICIAL_STEPS = 50
OFFICIAL_MERGE_STEP = 30
DEFAULT_MERGE_AT = (OFFICIAL_MERGE_STEP + 1) / OFFICIAL_STEPS
"""The default ``merge_at`` of every node and workflow: 0.62.  A schedule of 50 steps spaced evenly in
timestep (ComfyUI's ``normal`` scheduler) puts step i at i/49 of it, so 0.62 falls between step 30
(0.612) and step 31 (0.633): the official switch.  ``prompt.conditioning.merge_fraction`` gives the exact
boundary for any schedule."""

# The pack's limits on the strengths (the official value of each is 1.0).
MAX_WEIGHT = 3.0
MAX_LORA_STRENGTH = 2.0
# A region prompt's strength inside its mask (ConsistentIDConditioning's mask_strength), with the range of
# the host's own masked conditioning (ComfyUI's Conditioning (Set Mask): 0..10, default 1).
MAX_MASK_STRENGTH = 10.0
