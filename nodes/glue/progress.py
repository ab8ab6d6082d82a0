"""ComfyUI's progress bar and cancel button for the pack's own loops over photos and regions.

The core takes a plain ``progress(done, total)`` callback (see consistentid_core.progress)
and never imports ComfyUI; this is the callback the nodes pass in.
"""

from __future__ import annotations


def comfy_progress():
    """A progress callback that moves the running node's progress bar and stops on an interrupt.

    The interrupt is checked before every unit of work: a cancel stops the node before its next
    photo with ComfyUI's own InterruptProcessingException, which the executor reports as a cancel.
    """
    import comfy.model_management
    import comfy.utils

    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        comfy.model_management.throw_exception_if_processing_interrupted()
        if bar is None:
            bar = comfy.utils.ProgressBar(total)
        bar.update_absolute(done, total)

    return progress
