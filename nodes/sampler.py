"""The merge step: switch from text-only to facial conditioning exactly after step ``merge_step``.

``ConsistentIDMergeStep`` turns (model, scheduler, steps, merge_step) into the ``merge_at`` that
makes a stock KSampler switch there; ``ConsistentIDKSampler`` is a KSampler that re-times the
ConsistentID entries of its positive conditioning itself.  Exact for first-order samplers
(Euler, DDIM...); samplers that also evaluate intermediate sigmas switch within the same step.
"""

from __future__ import annotations

from comfy_api.latest import io

from ..consistentid_core.constants import OFFICIAL_MERGE_STEP, OFFICIAL_STEPS
from ..consistentid_core.errors import PromptError
from ..consistentid_core.prompt.conditioning import merge_fraction
from .glue.text_encoding import PHASE_KEY
from .glue.types import CATEGORY_SAMPLING


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
            category=CATEGORY_SAMPLING,
            description="The merge_at for ConsistentID Conditioning that switches to the facial tokens exactly after "
                        "step merge_step (official: 30 of 50), for a KSampler with these steps and scheduler.",
            inputs=[
                io.Model.Input("model", tooltip="the model the KSampler samples (its noise schedule sets where "
                                                "each step falls)"),
                io.Combo.Input("scheduler", options=schedulers, default="normal",
                               tooltip="the same scheduler as the KSampler's"),
                io.Int.Input("steps", default=OFFICIAL_STEPS, min=1, max=10000,
                             tooltip=f"the same steps as the KSampler's (official: {OFFICIAL_STEPS})"),
                io.Int.Input("merge_step", default=OFFICIAL_MERGE_STEP, min=0, max=10000,
                             tooltip=f"the last step with the text-only prompt, 0..steps-1 (official: "
                                     f"{OFFICIAL_MERGE_STEP}); the facial prompt starts at the step after it"),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="the same denoise as the KSampler's (1.0 = the full schedule)"),
            ],
            outputs=[io.Float.Output(display_name="merge_at",
                                     tooltip="link to merge_at of ConsistentID Conditioning (or Apply ConsistentID "
                                             "All-in-One)")],
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
            category=CATEGORY_SAMPLING,
            description="A KSampler that uses the text-only prompt up to merge_step and the facial prompt after it, "
                        "as the official pipeline does.",
            inputs=[
                io.Model.Input("model", tooltip="the patched model from Apply ConsistentID to Model (or All-in-One)"),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="the noise seed, as in KSampler"),
                io.Int.Input("steps", default=OFFICIAL_STEPS, min=1, max=10000,
                             tooltip=f"sampling steps (official: {OFFICIAL_STEPS})"),
                io.Float.Input("cfg", default=5.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="classifier-free guidance scale (official: 5.0 for SD1.5, 7.5 for SDXL)"),
                io.Combo.Input("sampler_name", options=samplers, default="euler",
                               tooltip="the sampler; the switch is exact for first-order ones (euler = official)"),
                io.Combo.Input("scheduler", options=schedulers, default="normal", tooltip="the noise schedule"),
                io.Conditioning.Input("positive", tooltip="from ConsistentID Conditioning (its two entries are "
                                                          "re-timed to merge_step; other entries are kept)"),
                io.Conditioning.Input("negative", tooltip="from ConsistentID Conditioning"),
                io.Latent.Input("latent_image", tooltip="the starting latent, e.g. Empty Latent Image"),
                io.Int.Input("merge_step", default=OFFICIAL_MERGE_STEP, min=0, max=10000,
                             tooltip=f"the last step with the text-only prompt, 0..steps-1 (official: "
                                     f"{OFFICIAL_MERGE_STEP}); the facial prompt starts at the step after it"),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="1.0 = from pure noise; lower keeps more of latent_image"),
            ],
            outputs=[io.Latent.Output(display_name="LATENT", tooltip="the sampled latent; to VAE Decode")],
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
