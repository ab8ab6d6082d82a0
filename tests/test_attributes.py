"""The FlexID attribute branch: regions, embeds, keys and checkpoints, projections, dropout, training stage."""

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from consistentid_core.attributes.branch import (
    AttributeBranch, attribute_branch_from_extra, attribute_projections, attribute_state_dict, branch_dropout,
)
from training.attention_processors import ConsistentIDIPAttnProcessor, install_processors
from training.attribute_branch_training import (
    AttributeAttnProcessor, AttributeBatch, AttributeStream, attribute_loss_step, attribute_optimizer,
    identity_context, install_attribute_processors, remove_attribute_processors,
)
from consistentid_core.attributes.photos import (
    ATTRIBUTE_NAMES, NO_ATTRIBUTES_MESSAGE, AttributeEmbeds, attribute_images, attribute_regions, encode_attributes,
)
from consistentid_core.model.checkpoint import load_checkpoint
from consistentid_core.face.clip_features import clip_pixel_values
from consistentid_core.errors import CheckpointError, EmbedsError
from consistentid_core.model.id_attention import IDPatchSettings, id_attention_delta, sdpa_attention
from consistentid_core.model.layers import UNetLayout, cross_attention_layers
from consistentid_core.model.networks import FacialEncoder, ProjPlusModel
from consistentid_core.face.labels import LABEL_EARRING, LABEL_EYEGLASSES, LABEL_HAIR, LABEL_LEFT_EYE, LABEL_SKIN
from spec_keys import flatten, random_official_state
from numeric import SAME_MATH_FP32, assert_close, assert_differs

CROSS = 64
TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=CROSS, attention_head_dim=8, norm_num_groups=8,
)
TINY_LAYOUT = UNetLayout.from_diffusers_config(TINY_UNET)
SLOTS = len(ATTRIBUTE_NAMES)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These are many small ops, for which the hand-off between threads costs more than it saves: on a
    shared 2-core machine the tiny UNet steps ran 3 x slower with 2 threads than with one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _label_map(hair=True, glasses=True):
    """64 x 64: a face (skin with two eyes), glasses over the eyes, hair as a ring around the face."""
    labels = np.zeros((64, 64), np.uint8)
    if hair:
        labels[6:58, 8:56] = LABEL_HAIR
    labels[14:50, 16:48] = LABEL_SKIN
    labels[26:29, 22:27] = LABEL_LEFT_EYE
    labels[26:29, 37:42] = LABEL_LEFT_EYE
    if glasses:
        labels[24:30, 18:46] = LABEL_EYEGLASSES
    labels[40, 60] = LABEL_EARRING  # one stray pixel: parser noise, below the minimum area
    return labels


def _photo():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(30, 226, (64, 64, 3), dtype=np.uint8))


def test_attribute_regions_of_a_label_map():
    labels = _label_map()
    regions = attribute_regions(labels)
    assert list(regions) == ["hair", "eyeglasses", "face_outline"]
    # Raw label pixels for hair: the face its ring encloses must not become hair.
    assert np.array_equal(regions["hair"] > 0, labels == LABEL_HAIR)
    assert regions["hair"][32, 32] == 0 and int((regions["hair"] > 0).sum()) == 52 * 48 - 36 * 32
    assert int((regions["eyeglasses"] > 0).sum()) == 6 * 28
    # The outline is filled: skin, eyes and glasses together, the whole 36 x 32 face.
    assert int((regions["face_outline"] > 0).sum()) == 36 * 32
    assert attribute_regions(labels, min_fraction=0.0)["earrings"].sum() == 255


def test_attribute_images_crop_and_full_frame():
    photo, labels = _photo(), _label_map()
    regions = attribute_regions(labels)
    crops = attribute_images(photo, regions)
    glasses = np.asarray(crops[1])
    # Glasses box x 18..46, y 24..30: a square of 28 * 1.3 = 36.4 around (32, 27) -> x 14..50, y 9..45.
    assert crops[1].size == (36, 36)
    assert np.array_equal(glasses[24 - 9, 18 - 14], np.asarray(photo)[24, 18])
    assert glasses[0, 0].tolist() == [0, 0, 0]
    outline = np.asarray(attribute_images(photo, {"face_outline": regions["face_outline"]}, mode="full")[0])
    assert outline.shape == (64, 64, 3)
    assert outline[32, 32].tolist() == [255, 255, 255] and outline[2, 2].tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="one of"):
        attribute_images(photo, regions, mode="bbox")


def _fake_encoder(pixels):
    """Each picture's mean pixel in every feature: enough to tell which picture went to which slot."""
    return pixels.mean(dim=(1, 2, 3))[:, None, None].expand(-1, 257, 1280).clone()


def test_encode_attributes_fills_the_slots():
    photo, labels = _photo(), _label_map()
    embeds = encode_attributes(photo, labels, _fake_encoder, source="B.png")
    assert embeds.valid[0].tolist() == [True, True, False, False, False, True]
    assert embeds.present(0) == ["hair", "eyeglasses", "face_outline"]
    pictures = attribute_images(photo, attribute_regions(labels))
    expected = float(clip_pixel_values(pictures[1]).mean())
    assert float(embeds.features[0, 1, 100, 7]) == pytest.approx(expected, abs=1e-6)
    assert float(embeds.features[0, 2].abs().max()) == 0.0
    assert float(embeds.uncond.abs().max()) == 0.0  # the zero image
    assert embeds.skip_message() is None


def test_a_photo_without_attributes_skips_the_branch(caplog):
    labels = _label_map(hair=False, glasses=False)
    with caplog.at_level(logging.WARNING, logger="consistentid"):
        assert encode_attributes(_photo(), labels, _fake_encoder, source="C.png") is None
    assert caplog.messages == [f"C.png: {NO_ATTRIBUTES_MESSAGE}"]
    assert NO_ATTRIBUTES_MESSAGE == ("the attribute photo shows no hair, glasses, hat, earrings or necklace; "
                                     "the attribute branch is skipped")
    # Embeds with only a face outline: the projections are skipped with the same message.
    valid = torch.zeros(1, SLOTS, dtype=torch.bool)
    valid[0, ATTRIBUTE_NAMES.index("face_outline")] = True
    embeds = AttributeEmbeds(torch.zeros(1, SLOTS, 257, 1280), valid, torch.zeros(1, 257, 1280))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="consistentid"):
        assert attribute_projections(AttributeBranch(TINY_LAYOUT), embeds) is None
    assert caplog.messages == [NO_ATTRIBUTES_MESSAGE]


def test_attribute_embeds_refuse_wrong_shapes():
    with pytest.raises(EmbedsError, match=r"expected \[N, 6, 257, 1280\]"):
        AttributeEmbeds(torch.zeros(1, 5, 257, 1280), torch.zeros(1, 5, dtype=torch.bool), torch.zeros(1, 257, 1280))
    with pytest.raises(EmbedsError, match=r"expected \[1, 6\] torch.bool"):
        AttributeEmbeds(torch.zeros(1, SLOTS, 257, 1280), torch.zeros(1, SLOTS), torch.zeros(1, 257, 1280))


def _randomised(branch, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in branch.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return branch


def test_branch_keys_and_round_trip():
    branch = _randomised(AttributeBranch("sd15"))
    flat = attribute_state_dict(branch)
    assert all(k.startswith(("attribute_proj.", "attribute_adapter.")) for k in flat)
    adapter = sorted({int(k.split(".")[1]) for k in flat if k.startswith("attribute_adapter.")})
    assert adapter == list(range(1, 32, 2))  # the 16 cross-attention processors of SD1.5
    assert tuple(flat["attribute_adapter.1.to_k_attr.weight"].shape) == (320, 768)
    assert tuple(flat["attribute_adapter.31.to_v_attr.weight"].shape) == (1280, 768)  # the mid block is last
    assert tuple(flat["attribute_proj.queries"].shape) == (1, 4, 768)
    assert tuple(flat["attribute_proj.layers.3.0.to_q.weight"].shape) == (768, 768)  # 12 heads of 64
    rebuilt = attribute_branch_from_extra(flat, "sd15")
    assert rebuilt.num_tokens == 4 and len(rebuilt.attribute_proj.layers) == 4
    assert all(torch.equal(v, flat[k]) for k, v in rebuilt.state_dict().items())
    assert attribute_branch_from_extra({"other": torch.zeros(1)}, "sd15") is None

    eight = attribute_state_dict(AttributeBranch(TINY_LAYOUT, num_tokens=8, depth=2))
    assert attribute_branch_from_extra(eight, TINY_LAYOUT).num_tokens == 8


def test_partial_or_misshaped_branch_names_the_key():
    flat = attribute_state_dict(AttributeBranch(TINY_LAYOUT))
    partial = {k: v for k, v in flat.items() if k != "attribute_adapter.1.to_v_attr.weight"}
    with pytest.raises(CheckpointError, match=r"missing key attribute_adapter\.1\.to_v_attr\.weight"):
        attribute_branch_from_extra(partial, TINY_LAYOUT, source="x.safetensors")
    wrong = dict(flat, **{"attribute_proj.proj_out.weight": torch.zeros(64, 32)})
    with pytest.raises(CheckpointError, match=r"^x\.safetensors: .*attribute_proj\.proj_out\.weight has shape \[64, 32\], "
                                              r"this UNet needs \[64, 64\]"):
        attribute_branch_from_extra(wrong, TINY_LAYOUT, source="x.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected key attribute_extra\.x \(1 in all\)"):
        attribute_branch_from_extra(dict(flat, **{"attribute_extra.x": torch.zeros(1)}), TINY_LAYOUT)
    # A branch made for SD1.5 does not fit the tiny UNet: named at its first tensor.
    with pytest.raises(CheckpointError, match=r"attribute_proj\.queries has shape \[1, 4, 768\]"):
        attribute_branch_from_extra(attribute_state_dict(AttributeBranch("sd15", depth=1)), TINY_LAYOUT)


def test_crafted_branch_sizes_are_refused_before_anything_is_built(monkeypatch):
    flat = attribute_state_dict(AttributeBranch(TINY_LAYOUT))
    # A layer number of ten million: the depth it implies is refused from the key alone.
    deep = dict(flat, **{"attribute_proj.layers.9999999.0.to_q.weight": torch.zeros(1, 1)})
    with pytest.raises(CheckpointError, match=r"claims depth = 10000000 \(at most 32 is accepted\)"):
        attribute_branch_from_extra(deep, TINY_LAYOUT, source="crafted.safetensors")
    # Sizes within the limits but shapes that do not fit: refused from meta tensors, nothing real is allocated.
    built_on = []
    original = AttributeBranch.__init__

    def recording_init(self, *args, **kwargs):
        built_on.append(torch.empty(0).device.type)  # the default device while this branch is built
        original(self, *args, **kwargs)

    monkeypatch.setattr(AttributeBranch, "__init__", recording_init)
    wide = dict(flat, **{"attribute_proj.queries": torch.zeros(1, 4, 999)})
    with pytest.raises(CheckpointError, match=r"attribute_proj\.queries has shape"):
        attribute_branch_from_extra(wide, TINY_LAYOUT)
    assert built_on == ["meta"]
    assert attribute_branch_from_extra(flat, TINY_LAYOUT) is not None and built_on == ["meta", "meta", "cpu"]


def test_checkpoint_with_and_without_the_branch(tmp_path):
    official = flatten(random_official_state("sd15", fill=0.01))
    branch = _randomised(AttributeBranch("sd15", depth=2), seed=3)
    torch.save(official, tmp_path / "official.bin")
    torch.save({**official, **attribute_state_dict(branch)}, tmp_path / "with_branch.bin")

    plain = load_checkpoint(tmp_path / "official.bin")
    assert plain.extra == {} and attribute_branch_from_extra(plain.extra, plain.layout) is None

    ckpt = load_checkpoint(tmp_path / "with_branch.bin")
    assert ckpt.arch == "sd15" and set(ckpt.extra) == set(attribute_state_dict(branch))
    rebuilt = attribute_branch_from_extra(ckpt.extra, ckpt.layout)
    assert all(torch.equal(v, branch.state_dict()[k]) for k, v in rebuilt.state_dict().items())

    # The official nested layout with the branch as two more nested parts loads it too.
    nested = random_official_state("sd15", fill=0.01)
    for key, value in attribute_state_dict(branch).items():
        part, rest = key.split(".", 1)
        nested.setdefault(part, {})[rest] = value
    torch.save(nested, tmp_path / "nested_with_branch.bin")
    (tmp_path / "with_branch.bin").unlink()  # 0.8 GB each: keep the test's disk use low
    from_nested = load_checkpoint(tmp_path / "nested_with_branch.bin")
    assert set(from_nested.extra) == set(attribute_state_dict(branch))
    rebuilt = attribute_branch_from_extra(from_nested.extra, from_nested.layout)
    assert all(torch.equal(v, branch.state_dict()[k]) for k, v in rebuilt.state_dict().items())


def test_attribute_projections_per_layer(caplog):
    branch = _randomised(AttributeBranch(TINY_LAYOUT), seed=1)
    gen = torch.Generator().manual_seed(2)
    valid = torch.zeros(2, SLOTS, dtype=torch.bool)
    valid[0, :2] = True  # photo 0: hair and glasses
    valid[1, SLOTS - 1] = True  # photo 1: a face outline only, so unconditional
    embeds = AttributeEmbeds(torch.randn(2, SLOTS, 257, 1280, generator=gen), valid, torch.randn(1, 257, 1280, generator=gen))
    with caplog.at_level(logging.WARNING, logger="consistentid"):
        proj = attribute_projections(branch, embeds)
    assert caplog.messages == ["attribute photo 2: the attribute photo shows no hair, glasses, hat, earrings or "
                               "necklace; its images get no attributes"]
    layers = cross_attention_layers(TINY_LAYOUT)
    assert set(proj.cond_k) == {layer.comfy_block for layer in layers} and len(layers) == 4
    for layer in layers:
        assert tuple(proj.cond_k[layer.comfy_block].shape) == (2, 4, layer.hidden_size)
        assert tuple(proj.uncond_v[layer.comfy_block].shape) == (1, 4, layer.hidden_size)
    key = layers[0].comfy_block
    assert_close(proj.cond_k[key][1], proj.uncond_k[key][0], SAME_MATH_FP32)
    assert_differs(proj.cond_k[key][0], proj.uncond_k[key][0], 1e-4)

    # The existing patch math on these projections: weight * attention(q, k_attr, v_attr) per row.
    q = torch.randn(4, 16, 32, generator=gen)  # chunks cond (2 images), uncond (2 images)
    options = {"n_heads": 4, "cond_or_uncond": [0, 1], "sigmas": torch.tensor([5.0])}
    delta = id_attention_delta(q, options, key, proj, IDPatchSettings(weight=0.5), sdpa_attention)
    tokens = branch.tokens(embeds.features, valid & embeds.usable_rows[:, None], embeds.uncond)
    kv = branch.attribute_adapter[str(layers[0].index)]
    k0, v0 = kv.to_k_attr(tokens[0]), kv.to_v_attr(tokens[0])
    expected = 0.5 * sdpa_attention(q[:1], k0[None], v0[None], 4)
    assert_close(delta[:1], expected, SAME_MATH_FP32)
    late = id_attention_delta(q, options, key, proj, IDPatchSettings(weight=0.5, sigma_start=2.0), sdpa_attention)
    assert late is None


def test_branch_dropout_is_independent_per_stream():
    n = 40_000
    id_tokens, attr_tokens = torch.ones(n, 4, 8), torch.full((n, 4, 8), 2.0)
    attr_null = torch.full((1, 4, 8), -1.0)
    gen = torch.Generator().manual_seed(0)
    ids, attrs, keep_id, keep_attr = branch_dropout(id_tokens, attr_tokens, 0.1, 0.2, gen, attr_null=attr_null)
    assert float((~keep_id).float().mean()) == pytest.approx(0.1, abs=0.006)
    assert float((~keep_attr).float().mean()) == pytest.approx(0.2, abs=0.008)
    assert float((~keep_id & ~keep_attr).float().mean()) == pytest.approx(0.02, abs=0.003)
    assert torch.equal(ids[~keep_id], torch.zeros(int((~keep_id).sum()), 4, 8))
    assert torch.equal(ids[keep_id], id_tokens[keep_id])
    assert torch.equal(attrs[~keep_attr], attr_null.expand(int((~keep_attr).sum()), 4, 8))
    again = branch_dropout(id_tokens, attr_tokens, 0.1, 0.2, torch.Generator().manual_seed(0))
    assert torch.equal(again[2], keep_id) and torch.equal(again[3], keep_attr)
    with pytest.raises(ValueError, match="p_attr must lie in 0..1, got 1.5"):
        branch_dropout(id_tokens[:2], attr_tokens[:2], 0.1, 1.5)


def _heads_attention(q, k, v, heads):
    split = lambda t: t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
    w = (split(q) @ split(k).transpose(-1, -2) / (q.shape[-1] // heads) ** 0.5).softmax(-1)
    return (w @ split(v)).transpose(1, 2).reshape(q.shape)


def test_training_processor_adds_the_term_before_the_output_projection():
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(query_dim=32, cross_attention_dim=CROSS, heads=4, dim_head=8).eval()
    identity = ConsistentIDIPAttnProcessor(32, CROSS, rank=4)
    kv = AttributeBranch(TINY_LAYOUT).attribute_adapter["1"]
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in list(identity.parameters()) + list(kv.parameters()):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    stream = AttributeStream()
    attn.set_processor(AttributeAttnProcessor(identity, kv, stream, scale=0.7))
    x, text, ids = torch.randn(2, 16, 32), torch.randn(2, 77, CROSS), torch.randn(2, 4, CROSS)
    stream.tokens = torch.randn(2, 4, CROSS)
    with torch.no_grad():
        out = attn(x, encoder_hidden_states=torch.cat([text, ids], dim=1))
        lora = lambda module, t: module.up(module.down(t))  # noqa: E731
        q = attn.to_q(x) + lora(identity.to_q_lora, x)
        k, v = attn.to_k(text) + lora(identity.to_k_lora, text), attn.to_v(text) + lora(identity.to_v_lora, text)
        total = (_heads_attention(q, k, v, 4) + _heads_attention(q, identity.to_k_ip(ids), identity.to_v_ip(ids), 4)
                 + 0.7 * _heads_attention(q, kv.to_k_attr(stream.tokens), kv.to_v_attr(stream.tokens), 4))
        expected = attn.to_out[0](total) + lora(identity.to_out_lora, total)
        assert (out - expected).abs().max() < 1e-5
        stream.tokens = None  # outside a step the wrapper is the identity processor
        assert torch.equal(attn(x, encoder_hidden_states=torch.cat([text, ids], dim=1)),
                           identity(attn, x, torch.cat([text, ids], dim=1)))


def _tiny_batch(seed=1):
    gen = torch.Generator().manual_seed(seed)
    token_mask = torch.zeros(2, 77, dtype=torch.bool)
    token_mask[0, 5] = True
    region_valid = torch.zeros(2, 5, dtype=torch.bool)
    region_valid[0, 0] = True
    attribute_valid = torch.zeros(2, SLOTS, dtype=torch.bool)
    attribute_valid[0, :2] = True
    attribute_valid[1, 0] = True
    rand = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    return AttributeBatch(rand(2, 4, 8, 8), rand(2, 77, CROSS), token_mask, rand(2, 5, 257, 1280), region_valid,
                          rand(2, 512), rand(2, 257, 1280), rand(2, SLOTS, 257, 1280), attribute_valid,
                          rand(1, 257, 1280))


def _snapshot(*modules):
    return [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in modules]


def test_tiny_attribute_stage_learns_and_leaves_the_identity_alone():
    from diffusers import DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_UNET).eval().requires_grad_(False)
    adapter = install_processors(unet).train().requires_grad_(True)  # as the identity stage leaves them
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            if name.endswith("up.weight"):
                p.normal_(0, 0.02)  # non-zero LoRAs, so the recomputed query really is the LoRA'd one
    facial, proj = FacialEncoder(1280, CROSS, CROSS), ProjPlusModel(CROSS)
    branch = AttributeBranch(UNetLayout.from_diffusers_config(unet.config))
    stream = install_attribute_processors(unet, branch)
    optimizer = attribute_optimizer(branch, frozen=(adapter, facial, proj), lr=1e-2)
    unet_base = {k: v.clone() for k, v in unet.state_dict().items()}
    before = _snapshot(adapter, facial, proj)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)
    batch = _tiny_batch()
    # Seed 3 drops the identity of sample 0 and the attributes of sample 1, so both paths run.
    step = lambda identity=None: attribute_loss_step(  # noqa: E731
        unet, stream, branch, facial, proj, scheduler, batch, generator=torch.Generator().manual_seed(3),
        identity=identity)
    identity = identity_context(facial, proj, batch)
    losses = []
    for i in range(15):
        optimizer.zero_grad()
        loss = step(None if i == 0 else identity)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    with torch.no_grad():
        assert float(step(identity)) == pytest.approx(float(step()), rel=1e-6)
    assert losses[-1] < 0.95 * losses[0], losses
    assert max(losses[-3:]) < 0.9 * losses[0], losses
    assert float(branch.attribute_adapter["1"].to_v_attr.weight.detach().abs().max()) > 0  # started at zero, trained
    for old, new in zip(before, _snapshot(adapter, facial, proj)):
        assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old)
    assert all(torch.equal(v, unet.state_dict()[k]) for k, v in unet_base.items())
    assert all(p.grad is None for m in (adapter, facial, proj, unet) for p in m.parameters())
    assert remove_attribute_processors(unet) == 4
    assert all(isinstance(p, ConsistentIDIPAttnProcessor) for n, p in unet.attn_processors.items() if "attn2" in n)
