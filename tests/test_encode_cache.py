"""The per-photo encode cache: a photo seen before with the same models and options skips every model;
any change of photo, option or model object is a miss; the cache stays bounded and forgets freed models."""

import gc
import logging

import numpy as np
import pytest
import torch

from consistentid_core.face.encode_cache import EncodeCache, image_digest
from consistentid_core.face.analysis import get_face_analysis, load_face_analysis
from consistentid_core.face.pipeline import encode_references
from consistentid_core.memo import IdentityLRU
from face_standins import FixedParser, PatchEncoder, face_label_map
from tools.insightface_standins import make_buffalo_l, red_square_image

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

FACE_BOX = (128, 128, 256, 256)


@pytest.fixture(scope="module")
def buffalo(tmp_path_factory):
    return make_buffalo_l(str(tmp_path_factory.mktemp("insightface") / "models" / "buffalo_l"))


@pytest.fixture(scope="module")
def analysis(buffalo):
    return get_face_analysis(buffalo, "CPU")


def photo(shift=0):
    return red_square_image(640, ((192 + shift, 192, 128, 255),))


def encode(images, analysis, parser, encoder, cache, **options):
    options.setdefault("color_order", "bgr")
    return encode_references(images, analysis, parser, encoder, options.pop("arch", "sd15"), cache=cache, **options)


def test_a_second_encode_of_the_same_photo_runs_no_model(analysis, caplog):
    cache, encoder, parser = EncodeCache(), PatchEncoder(), FixedParser(face_label_map(640, FACE_BOX))
    first, refs_first = encode([photo()], analysis, parser, encoder, cache)
    assert (encoder.calls, parser.calls) == (1, 1)
    with caplog.at_level(logging.INFO, logger="consistentid"):
        second, refs_second = encode([photo()], analysis, parser, encoder, cache)
    assert (encoder.calls, parser.calls) == (1, 1), "the vision model and the parser ran again"
    assert "1 of 1 photo(s) from the cache" in caplog.text
    for name in ("id_embeds", "clip_embeds", "region_embeds", "region_valid", "uncond_clip_embeds", "face_found"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name
    assert second.region_names == first.region_names and second.sources == first.sources
    assert refs_second[0].face_index == refs_first[0].face_index
    assert np.array_equal(refs_second[0].label_map, refs_first[0].label_map)


def test_only_the_new_photos_of_a_batch_are_encoded(analysis):
    cache, encoder, parser = EncodeCache(), PatchEncoder(), FixedParser(face_label_map(640, FACE_BOX))
    alone, _ = encode([photo()], analysis, parser, encoder, cache)
    assert encoder.images == 7  # photo + 5 regions + the zero image
    both, refs = encode([photo(64), photo()], analysis, parser, encoder, cache, sources=["new", "known"])
    assert encoder.calls == 2 and encoder.images == 7 + 6, "the known photo or the zero image was encoded again"
    assert torch.equal(both.clip_embeds[1], alone.clip_embeds[0])
    assert both.sources == ["new", "known"] and refs[1].source == "known"


@pytest.mark.parametrize("change", ["pixel", "face_select", "color_order", "arch", "on_no_face"])
def test_any_change_of_photo_or_option_misses(analysis, change):
    cache, encoder, parser = EncodeCache(), PatchEncoder(), FixedParser(face_label_map(640, FACE_BOX))
    image = photo()
    encode([image], analysis, parser, encoder, cache, on_no_face="zeros")
    options = {"on_no_face": "zeros"}
    if change == "pixel":
        image = image.copy()
        image[0, 0, 1] = 1
    elif change == "face_select":
        options["face_select"] = "largest"
    elif change == "color_order":
        options["color_order"] = "rgb"  # the stand-in detector then sees no face: zeros
    elif change == "arch":
        options["arch"] = "sdxl"
    else:
        options["on_no_face"] = "skip"
    encode([image], analysis, parser, encoder, cache, **options)
    assert encoder.calls == 2 and parser.calls == 2


def test_another_model_object_misses_even_with_equal_weights(analysis, buffalo):
    cache, encoder, parser = EncodeCache(), PatchEncoder(seed=0), FixedParser(face_label_map(640, FACE_BOX))
    encode([photo()], analysis, parser, encoder, cache)
    other_encoder = PatchEncoder(seed=0)
    encode([photo()], analysis, parser, other_encoder, cache)
    assert other_encoder.calls == 1
    other_parser = FixedParser(face_label_map(640, FACE_BOX))
    encode([photo()], analysis, other_parser, encoder, cache)
    assert other_parser.calls == 1 and encoder.calls == 2
    encode([photo()], load_face_analysis(buffalo, ["CPUExecutionProvider"]), parser, encoder, cache)
    assert encoder.calls == 3


def test_the_host_model_object_keys_the_cache_when_the_encoder_is_a_fresh_closure(analysis):
    cache, encoder, parser = EncodeCache(), PatchEncoder(), FixedParser(face_label_map(640, FACE_BOX))
    for _ in range(2):
        closure = lambda pixels: encoder(pixels)  # noqa: E731  (a new callable per call, as in the node)
        encode([photo()], analysis, parser, closure, cache, vision_model=encoder)
    assert encoder.calls == 1


def test_no_face_results_are_cached_with_their_policy(analysis, caplog):
    cache, encoder, parser = EncodeCache(), PatchEncoder(), FixedParser(face_label_map(640, FACE_BOX))
    blank = np.zeros((640, 640, 3), dtype=np.uint8)
    encode([blank, photo()], analysis, parser, encoder, cache, on_no_face="skip")
    with caplog.at_level(logging.WARNING, logger="consistentid"):
        embeds, _ = encode([blank, photo()], analysis, parser, encoder, cache, on_no_face="skip")
    assert encoder.calls == 1 and parser.calls == 2  # nothing ran the second time
    assert embeds.num_references == 1 and embeds.sources == ["image 1"]
    assert "no face found in image 0 of 2" in caplog.text, "a cached photo without a face is still reported"


def test_the_returned_embeds_do_not_share_memory_with_the_cache(analysis):
    cache, encoder, parser = EncodeCache(), PatchEncoder(), FixedParser(face_label_map(640, FACE_BOX))
    first, _ = encode([photo()], analysis, parser, encoder, cache)
    kept, kept_uncond = first.clip_embeds.clone(), first.uncond_clip_embeds.clone()
    first.clip_embeds.zero_()
    first.uncond_clip_embeds.fill_(7.0)
    second, _ = encode([photo()], analysis, parser, encoder, cache)
    assert encoder.calls == 1
    assert torch.equal(second.clip_embeds, kept) and torch.equal(second.uncond_clip_embeds, kept_uncond)


def test_the_cache_is_bounded_by_entries_and_bytes(analysis):
    encoder, parser = PatchEncoder(), FixedParser(face_label_map(640, FACE_BOX))
    cache = EncodeCache(max_entries=2)
    for shift in (0, 64, 128):
        encode([photo(shift)], analysis, parser, encoder, cache)
    assert len(cache) == 2  # the zero image's features (used by every call) and the newest photo
    encode([photo(0)], analysis, parser, encoder, cache)
    assert encoder.calls == 4, "the oldest photo should have been evicted"

    small = EncodeCache(max_bytes=12 * 2**20)
    for shift in (0, 64, 128):
        encode([photo(shift)], analysis, parser, encoder, small)
    assert 0 < small.nbytes <= 12 * 2**20


def test_entries_of_a_freed_model_are_dropped(analysis):
    cache, parser = EncodeCache(), FixedParser(face_label_map(640, FACE_BOX))
    encoder = PatchEncoder()
    encode([photo()], analysis, parser, encoder, cache)
    assert len(cache) == 2 and cache.nbytes > 0
    del encoder
    gc.collect()
    assert len(cache) == 0 and cache.nbytes == 0


def test_image_digest_follows_the_content_only():
    a = photo()
    assert image_digest(a) == image_digest(a.copy())
    assert image_digest(a) != image_digest(photo(64))
    assert image_digest(a) != image_digest(a.astype(np.float32))
    assert image_digest(a[:, :320]) == image_digest(np.ascontiguousarray(a[:, :320]))


def test_identity_lru_never_answers_for_a_new_object_with_a_reused_id():
    lru = IdentityLRU("test", max_entries=4)

    class Owner:
        pass

    owners = [Owner() for _ in range(50)]
    for owner in owners:
        lru.put((owner,), "v", owner.__class__.__name__)
    ids = {id(o) for o in owners}
    del owner, owners
    gc.collect()
    fresh = [Owner() for _ in range(200)]
    # CPython usually hands the freed addresses to the new objects; either way nothing may hit.
    reused = [o for o in fresh if id(o) in ids]
    assert all(lru.get((o,), "v") is None for o in fresh)
    assert len(lru) == 0, f"entries of freed owners were kept ({len(reused)} ids reused)"
    assert lru.put((1,), "v", "x") is False, "an int cannot be weakly referenced: never cached"
