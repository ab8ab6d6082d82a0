"""FlexID-style control nodes inside a real ComfyUI: region mix, region strengths, pose keypoints."""

import pytest
import torch

from comfy_harness import comfy_session, comfyui_path_or_skip
from comfy_sd15 import comfy_sd15_clip, consistentid_sd15, random_embeds
from tools.insightface_standins import make_buffalo_l, red_square_image
from numeric import SAME_MATH_FP32, assert_close, assert_differs

pytestmark = [pytest.mark.comfyui, pytest.mark.filterwarnings("ignore::FutureWarning")]


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    comfyui_path_or_skip()
    return comfy_session(tmp_path_factory.mktemp("comfyui"))


def test_region_mix_node_takes_the_eyes_from_another_photo(session):
    identity, other = random_embeds(session, seed=1), random_embeds(session, seed=2)
    (mixed,) = session.execute_node("ConsistentIDRegionMix", embeds=identity, eyes_embeds=other).args
    assert torch.equal(mixed.region_embeds[0, 1], other.region_embeds[0, 1])
    assert torch.equal(mixed.region_embeds[0, 0], identity.region_embeds[0, 0])
    assert torch.equal(mixed.id_embeds, identity.id_embeds)


def test_region_strengths_reach_the_conditioning(session, tmp_path):
    clip = comfy_sd15_clip()[0]
    ckpt = consistentid_sd15(session, tmp_path)
    embeds = random_embeds(session)
    (off,) = session.execute_node("ConsistentIDRegionStrengths", face_shape=1.0, eyes=1.0, ears=1.0, nose=1.0,
                                  mouth=1.0, region_scale=0.0).args
    common = dict(clip=clip, consistentid=ckpt, embeds=embeds, text="A man", negative_text="", caption="auto",
                  merge_at=0.6, emphasis="literal (official)")
    positive, _ = session.execute_node("ConsistentIDConditioning", **common, region_strengths=off).args
    text_only, facial = positive[0][0], positive[1][0]
    assert_close(text_only, facial, SAME_MATH_FP32)  # no facial token left: the prompts are the same text
    positive_full, _ = session.execute_node("ConsistentIDConditioning", **common).args
    assert_differs(positive_full[0][0], positive_full[1][0], 1e-3)


def test_face_keypoints_node_draws_the_pose_photo(session):
    make_buffalo_l(str(session.model_dir("insightface", "models", "buffalo_l")))
    session.refresh_file_lists()
    (analysis,) = session.execute_node("ConsistentIDFaceAnalysisLoader", model_name="buffalo_l", provider="CPU").args
    photo = torch.from_numpy(red_square_image(640, ((192, 192, 128, 255),))).float()[None] / 255
    (keypoints,) = session.execute_node("ConsistentIDFaceKeypoints", face_analysis=analysis, image=photo,
                                        face_select="largest", color_order="bgr").args
    assert keypoints.shape == (1, 640, 640, 3)
    lit = (keypoints[0].sum(-1) > 0).nonzero()
    assert 110 < lit[:, 0].float().mean() < 290 and 110 < lit[:, 1].float().mean() < 290  # inside the face square
    errors = session.pack_submodule("consistentid_core.errors")
    with pytest.raises(errors.FaceNotFoundError, match="no face found in pose image 0"):
        session.execute_node("ConsistentIDFaceKeypoints", face_analysis=analysis, image=torch.zeros(1, 640, 640, 3),
                             face_select="largest", color_order="bgr")
