"""The merge step: switch from text-only to facial conditioning exactly after step ``merge_step``.

``ConsistentIDMergeStep`` turns (model, scheduler, steps, merge_step) into the ``merge_at`` that
makes a stock KSampler switch there; ``ConsistentIDKSampler`` is a KSampler that re-times the
ConsistentID entries of its positive conditioning itself.  Exact for first-order samplers
(Euler, DDIM...); samplers that also evaluate intermediate sigmas switch within the same step.
"""

from __future__ import annotations

from comfy_api.latest import io

from ..consistentid_core.conditioning import merge_fraction
from ..consistentid_core.errors import PromptError
from .conditioning import PHASE_KEY
from .types import CATEGORY


def schedule(model, scheduler: str, steps: int, denoise: float = 1.0, sampler_name: str | None = None):
    """The sigmas ComfyUI's KSampler will use for these settings."""
    import comfy.samplers

    ksampler = comfy.samplers.KSampler(model, steps=steps, device="cpu", sampler=sampler_name, scheduler=scheduler,
                                       denoise=denoise, model_options=model.model_options)
    return [float(s) for s in ksampler.sigmas]


def percent_of_sigma(model):
    sampling = model.get_model_object("model_sampling")

    def invert(sigma: float) -> float:
        import torch

        return 1.0 - float(sampling.timestep(torch.tensor(sigma))) / 999.0

    return invert


def merge_at_for(model, scheduler, steps, merge_step, denoise=1.0, sampler_name=None) -> float:
    sigmas = schedule(model, scheduler, steps, denoise, sampler_name)
    if len(sigmas) < 2:
        raise PromptError(f"denoise {denoise} leaves no steps to sample")
    return merge_fraction(sigmas, merge_step, percent_of_sigma(model))


def retime(positive, merge_at: float):
    """Copies of the entries with our phase marker moved to the new boundary; other entries untouched."""
    out = []
    for cond, info in positive:
        phase = info.get(PHASE_KEY)
        if phase is not None:
            info = dict(info)
            if phase == "text":
                info["end_percent"] = merge_at
            else:
                info["start_percent"] = merge_at
        out.append([cond, info])
    return out


def _scheduler_names():
    import comfy.samplers

    return list(comfy.samplers.KSampler.SCHEDULERS), list(comfy.samplers.KSampler.SAMPLERS)


class ConsistentIDMergeStep(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        schedulers, _ = _scheduler_names()
        return io.Schema(
            node_id="ConsistentIDMergeStep",
            display_name="ConsistentID Merge Step",
            category=CATEGORY,
            description="The merge_at for ConsistentID Conditioning that switches to the facial tokens exactly after "
                        "step merge_step (official: 30 of 50), for a KSampler with these steps and scheduler.",
            inputs=[
                io.Model.Input("model"),
                io.Combo.Input("scheduler", options=schedulers, default="normal"),
                io.Int.Input("steps", default=50, min=1, max=10000),
                io.Int.Input("merge_step", default=30, min=0, max=10000),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01, optional=True),
            ],
            outputs=[io.Float.Output(display_name="merge_at")],
        )

    @classmethod
    def execute(cls, model, scheduler, steps, merge_step, denoise=1.0) -> io.NodeOutput:
        return io.NodeOutput(merge_at_for(model, scheduler, steps, merge_step, denoise))


class ConsistentIDKSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        schedulers, samplers = _scheduler_names()
        return io.Schema(
            node_id="ConsistentIDKSampler",
            display_name="KSampler (ConsistentID merge step)",
            category=CATEGORY,
            description="A KSampler that uses the text-only prompt up to merge_step and the facial prompt after it, "
                        "as the official pipeline does.",
            inputs=[
                io.Model.Input("model"),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True),
                io.Int.Input("steps", default=50, min=1, max=10000),
                io.Float.Input("cfg", default=5.0, min=0.0, max=100.0, step=0.1, round=0.01),
                io.Combo.Input("sampler_name", options=samplers, default="euler"),
                io.Combo.Input("scheduler", options=schedulers, default="normal"),
                io.Conditioning.Input("positive", tooltip="from ConsistentID Conditioning"),
                io.Conditioning.Input("negative"),
                io.Latent.Input("latent_image"),
                io.Int.Input("merge_step", default=30, min=0, max=10000),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01),
            ],
            outputs=[io.Latent.Output(display_name="LATENT")],
        )

    @classmethod
    def execute(cls, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, merge_step,
                denoise) -> io.NodeOutput:
        import nodes as comfy_nodes

        if not any(PHASE_KEY in info for _cond, info in positive):
            raise PromptError("the positive conditioning has no ConsistentID entries: connect ConsistentID Conditioning")
        merge_at = merge_at_for(model, scheduler, steps, merge_step, denoise, sampler_name)
        latent = comfy_nodes.common_ksampler(model, seed, steps, cfg, sampler_name, scheduler, retime(positive, merge_at),
                                             negative, latent_image, denoise=denoise)[0]
        return io.NodeOutput(latent)
