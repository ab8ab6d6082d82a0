"""FaceEmbeds: validation, select/concat/combine, safetensors files and path containment."""

import errno
import logging
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from consistentid_core.embeds import (
    FaceEmbeds,
    combine_embeds,
    concat_embeds,
    load_embeds,
    resolve_inside,
    save_embeds,
    save_numbered_embeds,
)
from consistentid_core.embeds import files as embeds_files
from consistentid_core.errors import EmbedsError
from numeric import SAME_MATH_FP32, assert_close

ALL5 = ["Face", "Left_Eye", "Left_Ear", "Nose", "Upper_Lip"]


def make(names_per_ref, arch="sd15", seed=0, face_found=True, checkpoint="ConsistentID-v1.bin",
         uncond=None, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    n = len(names_per_ref)
    ids = torch.randn(n, 512, generator=g)
    ids = ids / ids.norm(dim=-1, keepdim=True)
    valid = torch.zeros(n, 5, dtype=torch.bool)
    for i, names in enumerate(names_per_ref):
        valid[i, : len(names)] = True
    if uncond is None:
        uncond = torch.randn(1, 257, 1280, generator=torch.Generator().manual_seed(1234))
    return FaceEmbeds(
        arch=arch,
        id_embeds=ids.to(dtype),
        clip_embeds=torch.randn(n, 257, 1280, generator=g).to(dtype),
        region_embeds=torch.randn(n, 5, 257, 1280, generator=g).to(dtype),
        region_valid=valid,
        region_names=[list(x) for x in names_per_ref],
        uncond_clip_embeds=uncond.to(dtype),
        sources=[f"ref{i}.png" for i in range(n)],
        checkpoint=checkpoint,
        face_found=None if face_found is None else torch.ones(n, dtype=torch.bool),
    )


def assert_same(a: FaceEmbeds, b: FaceEmbeds):
    assert a.arch == b.arch
    for name in ("id_embeds", "clip_embeds", "region_embeds", "region_valid", "uncond_clip_embeds"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype, name
        assert torch.equal(x, y), name
    assert a.region_names == b.region_names
    assert a.sources == b.sources
    assert a.checkpoint == b.checkpoint
    if a.face_found is None:
        assert b.face_found is None
    else:
        assert torch.equal(a.face_found, b.face_found)


# --- validation and basics ---------------------------------------------------------------------

def test_validation_names_field_and_shapes():
    e = make([ALL5, ["Face"]])
    assert e.num_references == 2
    with pytest.raises(EmbedsError, match=r"clip_embeds has shape \[2,256,1280\], expected \[2,257,1280\]"):
        FaceEmbeds(**{**vars(e), "clip_embeds": torch.zeros(2, 256, 1280)})
    with pytest.raises(EmbedsError, match=r"region_embeds has shape \[2,4,257,1280\], expected \[2,5,257,1280\]"):
        FaceEmbeds(**{**vars(e), "region_embeds": torch.zeros(2, 4, 257, 1280)})
    with pytest.raises(EmbedsError, match=r"uncond_clip_embeds has shape \[2,257,1280\], expected \[1,257,1280\]"):
        FaceEmbeds(**{**vars(e), "uncond_clip_embeds": torch.zeros(2, 257, 1280)})
    with pytest.raises(EmbedsError, match="region_valid has dtype"):
        FaceEmbeds(**{**vars(e), "region_valid": e.region_valid.to(torch.uint8)})
    with pytest.raises(EmbedsError, match="id_embeds has dtype"):
        FaceEmbeds(**{**vars(e), "id_embeds": torch.zeros(2, 512, dtype=torch.long)})
    with pytest.raises(EmbedsError, match="arch"):
        FaceEmbeds(**{**vars(e), "arch": "flux"})
    with pytest.raises(EmbedsError, match=r"region_names\[1\] has 2 names"):
        FaceEmbeds(**{**vars(e), "region_names": [ALL5, ["Face", "Nose"]]})
    with pytest.raises(EmbedsError, match="valid slots must come first"):
        FaceEmbeds(**{**vars(e), "region_valid": torch.tensor([[True] * 5, [False, True, False, False, False]])})
    with pytest.raises(EmbedsError, match="Hair"):
        FaceEmbeds(**{**vars(e), "region_names": [ALL5[:4] + ["Hair"], ["Face"]]})
    with pytest.raises(EmbedsError, match="one region per group"):
        FaceEmbeds(**{**vars(e), "region_names": [["Face", "Left_Eye", "Right_Eye", "Nose", "Upper_Lip"], ["Face"]]})
    with pytest.raises(EmbedsError, match="sources"):
        FaceEmbeds(**{**vars(e), "sources": ["only one"]})
    with pytest.raises(EmbedsError, match=r"face_found has shape \[3\]"):
        FaceEmbeds(**{**vars(e), "face_found": torch.ones(3, dtype=torch.bool)})


def test_uncond_region_embeds_and_to():
    e = make([ALL5])
    u = e.uncond_region_embeds
    assert u.shape == (1, 5, 257, 1280)
    for s in range(5):
        assert torch.equal(u[0, s], e.uncond_clip_embeds[0])
    h = e.to(dtype=torch.float16)
    assert h.id_embeds.dtype == torch.float16 and h.region_embeds.dtype == torch.float16
    assert h.region_valid.dtype == torch.bool and h.face_found.dtype == torch.bool
    assert e.id_embeds.dtype == torch.float32  # the original is untouched


def test_select_and_concat():
    a = make([ALL5, ["Face", "Nose"]], seed=1)
    b = make([["Right_Eye"]], seed=2, face_found=None)
    s = a.select([1, 0])
    assert s.sources == ["ref1.png", "ref0.png"]
    assert s.region_names == [["Face", "Nose"], ALL5]
    assert torch.equal(s.region_embeds[0], a.region_embeds[1])
    with pytest.raises(EmbedsError, match="out of range"):
        a.select([2])
    with pytest.raises(EmbedsError):
        a.select([])

    c = FaceEmbeds.concat([a, b])
    assert c.num_references == 3
    assert torch.equal(c.clip_embeds[2], b.clip_embeds[0])
    assert torch.equal(c.id_embeds[:2], a.id_embeds)
    assert c.region_names == [ALL5, ["Face", "Nose"], ["Right_Eye"]]
    assert c.region_valid[2].tolist() == [True, False, False, False, False]
    assert c.face_found.tolist() == [True, True, True]
    assert c.sources == ["ref0.png", "ref1.png", "ref0.png"]
    assert c.checkpoint == "ConsistentID-v1.bin"

    x = make([ALL5], arch="sdxl")
    with pytest.raises(EmbedsError) as err:
        concat_embeds([a, x])
    assert "sd15" in str(err.value) and "sdxl" in str(err.value)

    other = make([ALL5], uncond=torch.randn(1, 257, 1280, generator=torch.Generator().manual_seed(9)))
    with pytest.raises(EmbedsError, match="different CLIP vision model"):
        concat_embeds([a, other])

    mixed = concat_embeds([a, make([ALL5], checkpoint="other.safetensors")])
    assert mixed.checkpoint == ""


# --- combine -----------------------------------------------------------------------------------

def test_combine_first():
    e = make([ALL5, ["Face"], ["Nose"]])
    f = e.combine("first")
    assert_same(f, e.select([0]))
    with pytest.raises(EmbedsError, match="median"):
        e.combine("median")


def test_combine_average_by_hand():
    e = make([ALL5, ALL5, ALL5], seed=3)
    out = combine_embeds(e, "average")
    assert out.num_references == 1
    ids = e.id_embeds.double()
    assert_close(out.id_embeds[0].double(), (ids[0] + ids[1] + ids[2]) / 3, SAME_MATH_FP32)
    clip = e.clip_embeds.double()
    assert_close(out.clip_embeds[0].double(), (clip[0] + clip[1] + clip[2]) / 3, SAME_MATH_FP32)
    reg = e.region_embeds.double()
    assert_close(out.region_embeds[0].double(), (reg[0] + reg[1] + reg[2]) / 3, SAME_MATH_FP32)
    assert out.region_names == [ALL5]
    assert out.region_valid.tolist() == [[True] * 5]
    assert out.sources == ["average of 3: ref0.png, ref1.png, ref2.png"]
    assert out.face_found.tolist() == [True]
    # A hand-picked element, to pin the arithmetic down to a number.
    v = [float(e.clip_embeds[i, 7, 11]) for i in range(3)]
    assert float(out.clip_embeds[0, 7, 11]) == pytest.approx(sum(v) / 3, abs=1e-6)


def test_combine_regions_per_group_reference_without_ears():
    ref1 = ["Face", "Right_Eye", "Nose", "Lower_Lip"]
    e = make([ALL5, ref1], seed=4)
    out = e.combine("average")
    assert out.region_names == [ALL5]
    assert out.region_valid.tolist() == [[True] * 5]
    r = e.region_embeds
    # Ears: only reference 0 has them, so they pass through undiluted.
    assert torch.equal(out.region_embeds[0, 2], r[0, 2])
    # Other groups average slot by group, not by slot index.
    assert_close(out.region_embeds[0, 0], (r[0, 0] + r[1, 0]) / 2, SAME_MATH_FP32)
    assert_close(out.region_embeds[0, 1], (r[0, 1] + r[1, 1]) / 2, SAME_MATH_FP32)
    assert_close(out.region_embeds[0, 3], (r[0, 3] + r[1, 2]) / 2, SAME_MATH_FP32)
    assert_close(out.region_embeds[0, 4], (r[0, 4] + r[1, 3]) / 2, SAME_MATH_FP32)

    norm = e.combine("norm_average")
    assert torch.equal(norm.region_embeds[0, 2], r[0, 2])


def test_combine_names_from_first_reference_with_group_and_canonical_order():
    # Reference 0 is in old-template order (no Face) and lacks ears; reference 1 has a right ear.
    e = make([["Left_Eye", "Nose", "Upper_Lip"], ["Right_Ear", "Right_Eye"]], seed=5)
    out = e.combine("average")
    assert out.region_names == [["Left_Eye", "Right_Ear", "Nose", "Upper_Lip"]]
    assert out.region_valid.tolist() == [[True, True, True, True, False]]
    r = e.region_embeds
    assert_close(out.region_embeds[0, 0], (r[0, 0] + r[1, 1]) / 2, SAME_MATH_FP32)
    assert torch.equal(out.region_embeds[0, 1], r[1, 0])
    assert torch.equal(out.region_embeds[0, 2], r[0, 1])
    assert torch.equal(out.region_embeds[0, 3], r[0, 2])
    # The free slot holds the zero-image features, as official padding does.
    assert torch.equal(out.region_embeds[0, 4], e.uncond_clip_embeds[0])


def test_combine_norm_average_by_hand():
    e = make([ALL5, ALL5], seed=6)
    # Give the two references very different scales so plain and normalised averages differ.
    e = FaceEmbeds(**{**vars(e), "clip_embeds": e.clip_embeds * torch.tensor([1.0, 4.0]).view(2, 1, 1),
                      "id_embeds": e.id_embeds * torch.tensor([[1.0], [3.0]])})
    out = e.combine("norm_average")

    x = e.clip_embeds.double()
    norms = x.norm(dim=-1, keepdim=True)
    m = (x / norms).mean(0)
    expected = m / m.norm(dim=-1, keepdim=True) * norms.mean(0)
    assert_close(out.clip_embeds[0].double(), expected, SAME_MATH_FP32)
    # Per token, the output norm is the mean of the input norms.
    assert_close(out.clip_embeds[0].double().norm(dim=-1), norms.mean(0).squeeze(-1), SAME_MATH_FP32)
    assert not torch.allclose(out.clip_embeds[0], e.clip_embeds.mean(0), atol=1e-3)

    ids = e.id_embeds.double()
    u = (ids / ids.norm(dim=-1, keepdim=True)).mean(0)
    assert_close(out.id_embeds[0].double(), u / u.norm(), SAME_MATH_FP32)
    assert float(out.id_embeds[0].norm()) == pytest.approx(1.0, abs=1e-6)

    r = e.region_embeds.double()[:, 1]
    rn = r.norm(dim=-1, keepdim=True)
    rm = (r / rn).mean(0)
    assert torch.allclose(out.region_embeds[0, 1].double(), rm / rm.norm(dim=-1, keepdim=True) * rn.mean(0),
                          rtol=1e-5, atol=1e-6)


def test_combine_keeps_dtype_and_warns_on_missing_face(caplog):
    e = make([ALL5, ["Face"]], dtype=torch.float16)
    e.id_embeds[1] = 0
    e.face_found[1] = False
    with caplog.at_level(logging.WARNING, logger="consistentid"):
        out = e.combine("norm_average")
    assert "ref1.png" in caplog.text
    assert out.id_embeds.dtype == torch.float16 and out.region_embeds.dtype == torch.float16
    assert out.face_found.tolist() == [True]
    # A zero vector adds no direction: the result is reference 0's unit embedding.
    assert torch.allclose(out.id_embeds[0].float(), e.id_embeds[0].float(), atol=2e-3)


# --- files -------------------------------------------------------------------------------------

def test_round_trip_exact(tmp_path):
    e = make([ALL5, ["Face", "Right_Eye", "Nose"]], seed=7)
    e.face_found[1] = False
    path = tmp_path / "person.safetensors"
    save_embeds(e, str(path))
    back = load_embeds(str(path), expected_arch="sd15")
    assert_same(e, back)
    assert [p.name for p in tmp_path.iterdir()] == ["person.safetensors"]
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        assert f.get_tensor("region_valid").dtype == torch.uint8
        assert f.get_tensor("face_found").dtype == torch.uint8
    assert meta["format"] == "consistentid-embeds"
    assert meta["format_version"] == "1"
    assert meta["arch"] == "sd15"
    assert meta["checkpoint"] == "ConsistentID-v1.bin"


def test_round_trip_half_and_no_face_found(tmp_path):
    e = make([ALL5], arch="sdxl", face_found=None, checkpoint="", dtype=torch.float16)
    path = tmp_path / "x.safetensors"
    save_embeds(e, str(path))
    back = load_embeds(str(path))
    assert_same(e, back)
    assert back.face_found is None and back.checkpoint == ""


def _rewrite(src, dst, meta_changes=None, drop=None, replace=None):
    tensors = load_file(str(src))
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
    meta.update(meta_changes or {})
    meta = {k: v for k, v in meta.items() if v is not None}
    if drop:
        del tensors[drop]
    tensors.update(replace or {})
    save_file(tensors, str(dst), metadata=meta)


@pytest.fixture
def good_file(tmp_path):
    path = tmp_path / "good.safetensors"
    save_embeds(make([ALL5], seed=8), str(path))
    return path


def test_refuse_not_safetensors(tmp_path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(EmbedsError, match="garbage.safetensors") as err:
        load_embeds(str(path))
    assert "not a ConsistentID embeds file" in str(err.value)


def test_refuse_missing_file(tmp_path):
    with pytest.raises(EmbedsError, match="nothere.safetensors"):
        load_embeds(str(tmp_path / "nothere.safetensors"))


def test_refuse_safetensors_without_tag(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(EmbedsError, match="lora.safetensors") as err:
        load_embeds(str(path))
    assert "not a ConsistentID embeds file" in str(err.value)


def test_refuse_other_versions(tmp_path, good_file):
    newer = tmp_path / "newer.safetensors"
    _rewrite(good_file, newer, {"format_version": "2"})
    with pytest.raises(EmbedsError, match="newer.safetensors") as err:
        load_embeds(str(newer))
    assert "a newer version" in str(err.value)
    assert "format_version 2, this pack reads 1" in str(err.value)

    older = tmp_path / "older.safetensors"
    _rewrite(good_file, older, {"format_version": "0"})
    with pytest.raises(EmbedsError, match="older.safetensors") as err:
        load_embeds(str(older))
    assert "an older version" in str(err.value)


def test_refuse_wrong_arch(good_file):
    with pytest.raises(EmbedsError, match="good.safetensors") as err:
        load_embeds(str(good_file), expected_arch="sdxl")
    assert "sd15" in str(err.value) and "sdxl" in str(err.value)
    assert load_embeds(str(good_file), expected_arch="sd15").arch == "sd15"


def test_refuse_missing_tensor(tmp_path, good_file):
    path = tmp_path / "partial.safetensors"
    _rewrite(good_file, path, drop="region_embeds")
    with pytest.raises(EmbedsError, match="partial.safetensors") as err:
        load_embeds(str(path))
    assert "region_embeds" in str(err.value)


def test_refuse_bad_shape(tmp_path, good_file):
    path = tmp_path / "shape.safetensors"
    _rewrite(good_file, path, replace={"clip_embeds": torch.zeros(1, 256, 1280)})
    with pytest.raises(EmbedsError, match="shape.safetensors") as err:
        load_embeds(str(path))
    assert "clip_embeds has shape [1,256,1280], expected [1,257,1280]" in str(err.value)


def test_refuse_bad_metadata_json(tmp_path, good_file):
    path = tmp_path / "json.safetensors"
    _rewrite(good_file, path, {"region_names": "[not json"})
    with pytest.raises(EmbedsError, match="json.safetensors"):
        load_embeds(str(path))


# --- resolve_inside ----------------------------------------------------------------------------

def test_resolve_inside(tmp_path):
    base = tmp_path / "embeds"
    (base / "sub").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.safetensors").write_bytes(b"x")
    os.symlink(str(outside), str(base / "link"))
    os.symlink(str(outside / "secret.safetensors"), str(base / "leak.safetensors"))

    ok = resolve_inside(str(base), "sub/ok.safetensors")
    assert ok == os.path.join(os.path.realpath(str(base)), "sub", "ok.safetensors")
    assert resolve_inside(str(base), "sub/../fine.safetensors") == os.path.join(
        os.path.realpath(str(base)), "fine.safetensors")

    for bad in ("../x", "/etc/passwd", "link/evil.safetensors", "leak.safetensors", "sub/../../x", "", "."):
        with pytest.raises(EmbedsError):
            resolve_inside(str(base), bad)


# --- damaged files and numbered saves (issue 13) -------------------------------------------------

@pytest.mark.parametrize("field, poison, counts", [
    ("clip_embeds", [float("nan")] * 3, "3 NaN and 0 Inf values (of 328960)"),
    ("id_embeds", [float("inf"), -float("inf")], "0 NaN and 2 Inf values (of 512)"),
    ("uncond_clip_embeds", [float("nan"), float("inf")], "1 NaN and 1 Inf values (of 328960)"),
])
def test_refuse_nan_or_inf_embeds_naming_file_tensor_and_count(tmp_path, good_file, field, poison, counts):
    tensors = load_file(str(good_file))
    flat = tensors[field].reshape(-1)
    flat[: len(poison)] = torch.tensor(poison)
    path = tmp_path / "poisoned.safetensors"
    _rewrite(good_file, path, replace={field: tensors[field]})
    with pytest.raises(EmbedsError) as err:
        load_embeds(str(path))
    message = str(err.value)
    assert "'poisoned.safetensors' is damaged" in message
    assert f"{field} holds {counts}" in message
    assert "encode the reference photos again" in message


def _numbered(folder):
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".tmp-"))


def test_numbered_save_counts_up_and_leaves_no_temporary(tmp_path):
    first = save_numbered_embeds(make([ALL5], seed=1), str(tmp_path), "people/anna")
    second = save_numbered_embeds(make([["Face"]], seed=2), str(tmp_path), "people/anna")
    assert first == str(tmp_path / "people" / "anna_00001.safetensors")
    assert second == str(tmp_path / "people" / "anna_00002.safetensors")
    assert sorted(p.name for p in (tmp_path / "people").iterdir()) == ["anna_00001.safetensors",
                                                                        "anna_00002.safetensors"]
    assert load_embeds(first).region_names == [ALL5]
    assert load_embeds(second).region_names == [["Face"]]


def test_numbered_save_never_replaces_a_file_another_server_just_wrote(tmp_path, monkeypatch):
    # Two ComfyUI servers sharing output/: the other one wrote anna_00001 after this one listed
    # the folder.  The listing is stale, so the name must be claimed exclusively, not replaced.
    other = make([ALL5], seed=11)
    save_embeds(other, str(tmp_path / "anna_00001.safetensors"))
    save_embeds(other, str(tmp_path / "anna_00002.safetensors"))
    monkeypatch.setattr(embeds_files, "_first_free_number", lambda folder, prefix: 1)

    mine = make([["Face", "Nose"]], seed=12)
    path = save_numbered_embeds(mine, str(tmp_path), "anna")
    assert os.path.basename(path) == "anna_00003.safetensors"
    assert_same(load_embeds(str(tmp_path / "anna_00001.safetensors")), other)
    assert_same(load_embeds(str(tmp_path / "anna_00002.safetensors")), other)
    assert_same(load_embeds(path), mine)
    assert _numbered(tmp_path) == ["anna_00001.safetensors", "anna_00002.safetensors", "anna_00003.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_numbered_save_without_hard_links_still_claims_exclusively(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(errno.EPERM, "hard links not supported here")

    other = make([ALL5], seed=11)
    save_embeds(other, str(tmp_path / "anna_00001.safetensors"))
    monkeypatch.setattr(embeds_files.os, "link", no_links)
    monkeypatch.setattr(embeds_files, "_first_free_number", lambda folder, prefix: 1)
    mine = make([["Face"]], seed=13)
    path = save_numbered_embeds(mine, str(tmp_path), "anna")
    assert os.path.basename(path) == "anna_00002.safetensors"
    assert_same(load_embeds(str(tmp_path / "anna_00001.safetensors")), other)
    assert_same(load_embeds(path), mine)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_concurrent_numbered_saves_keep_every_file(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    items = [make([["Face"]], seed=20 + i) for i in range(6)]
    with ThreadPoolExecutor(max_workers=3) as pool:
        paths = list(pool.map(lambda e: save_numbered_embeds(e, str(tmp_path), "batch"), items))
    assert len(set(paths)) == 6
    assert _numbered(tmp_path) == [f"batch_{i:05d}.safetensors" for i in range(1, 7)]
    for item, path in zip(items, paths):
        assert_same(load_embeds(path), item)


@pytest.mark.parametrize("prefix", ["a" * 240, "x" * 300 + "/name", "ok/" + "é" * 130])
def test_numbered_save_refuses_an_over_long_name_with_the_limit(tmp_path, prefix):
    with pytest.raises(EmbedsError) as err:
        save_numbered_embeds(make([["Face"]]), str(tmp_path), prefix)
    message = str(err.value)
    assert "is too long" in message and "at most 255 bytes" in message and "whole path 4096" in message
    assert "'_00001.safetensors'" in message and "use a shorter filename_prefix" in message
    assert list(tmp_path.iterdir()) == []  # nothing created, not even the folder


def test_numbered_save_refuses_a_path_too_long_for_the_system(tmp_path):
    # Every name is short, the whole path is not.
    deep = "/".join(["d" * 200] * 25)
    with pytest.raises(EmbedsError, match="whole path 4096"):
        save_numbered_embeds(make([["Face"]]), str(tmp_path), deep + "/x")
    assert list(tmp_path.iterdir()) == []


def test_numbered_save_names_a_length_limit_found_only_by_the_system(tmp_path, monkeypatch):
    # A file system stricter than pathconf says (e.g. a network share): its ENAMETOOLONG is named too.
    def refuse(*args, **kwargs):
        raise OSError(errno.ENAMETOOLONG, "File name too long")

    monkeypatch.setattr(embeds_files.os, "makedirs", refuse)
    with pytest.raises(EmbedsError, match="is too long"):
        save_numbered_embeds(make([["Face"]]), str(tmp_path), "sub/name")


def test_numbered_save_refuses_escapes(tmp_path):
    for bad in ("../x", "/tmp/x", ""):
        with pytest.raises(EmbedsError):
            save_numbered_embeds(make([["Face"]]), str(tmp_path / "out"), bad)


@pytest.mark.parametrize("failure", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on '
                 'device" })'),  # how safetensors reports it
])
def test_a_full_disk_is_named_with_the_folder_and_the_room_and_leaves_no_file(tmp_path, monkeypatch, failure):
    import safetensors.torch

    def full(*args, **kwargs):
        raise failure

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(EmbedsError, match=r"no room to save embeds in .*: .* free, about .* needed\. Free some space"):
        save_numbered_embeds(make([["Face"]]), str(tmp_path), "anna")
    with pytest.raises(EmbedsError, match=str(tmp_path)):
        save_embeds(make([["Face"]]), str(tmp_path / "bob.safetensors"))
    assert list(tmp_path.iterdir()) == []  # no half-written or temporary file stays


def test_other_write_failures_are_not_called_a_full_disk(tmp_path, monkeypatch):
    import safetensors.torch

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(safetensors.torch, "save_file", refuse)
    with pytest.raises(PermissionError):
        save_embeds(make([["Face"]]), str(tmp_path / "bob.safetensors"))
