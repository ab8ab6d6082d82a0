"""Input definitions and choices that several nodes share, so that they read and default alike."""

from __future__ import annotations

from comfy_api.latest import io

from ...consistentid_core.constants import DEFAULT_MERGE_AT, OFFICIAL_MERGE_STEP, OFFICIAL_STEPS
from ...consistentid_core.prompt.text import CAPTIONS

CAPTION_CHOICES = ["auto", *CAPTIONS, "custom"]
DEFAULT_PROMPT = "A man, in a forest, adventuring"
DEFAULT_NEGATIVE = "monochrome, lowres, bad anatomy, worst quality, low quality, blurry"
FACE_SELECT = ["first", "largest", "highest_score"] + [f"index:{i}" for i in range(8)]
COLOR_ORDER = ["official", "bgr", "rgb"]


def prompt_inputs() -> list:
    """The text and negative_text widgets, shared by the split and the one-box nodes."""
    return [
        io.String.Input("text", multiline=True, default=DEFAULT_PROMPT,
                        tooltip="the prompt, e.g. 'A man, in a forest, adventuring'; the facial caption is "
                                "appended to it, and a prompt too long for 77 tokens is cut"),
        io.String.Input("negative_text", multiline=True, default=DEFAULT_NEGATIVE,
                        tooltip="read literally as the official code does; only the first 77 tokens count"),
    ]


def merge_at_input(tooltip: str):
    """The merge_at widget, with the one default every node uses (consistentid_core.constants)."""
    return io.Float.Input("merge_at", default=DEFAULT_MERGE_AT, min=0.0, max=1.0, step=0.01, tooltip=tooltip)


MERGE_AT_TOOLTIP = (f"fraction of sampling after which the facial prompt replaces the text-only one (0..1); "
                    f"{DEFAULT_MERGE_AT:g} = the official switch after step {OFFICIAL_MERGE_STEP} of {OFFICIAL_STEPS} "
                    "with the normal scheduler. For an exact step with any scheduler, link ConsistentID Merge Step here")
