"""prepare_data, the manifest checks and the per-sample processing of the training set."""

import json
import logging
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from consistentid_core.errors import TrainingDataError
from consistentid_core.prompt.text import CAPTION_SD15, FACIAL_MARKER
from training.dataset import ConsistentIDDataset
from training.manifest import load_entries, read_embedding, report_captions, write_embedding
from training.prepare_data import main as prepare_main
from training.prepare_data import prepare_dataset
from training_standins import CUSTOM_CAPTION, RESOLUTION, TinyFaceParser, face_labels  # noqa: F401
from training_standins import one_cpu_thread, tiny_world  # noqa: F401
from clip_vocab import sd15_tokenizer

OFFICIAL_FIELDS = {"resize_IMG", "parsing_mask_IMG", "id_embed_file_resize", "vqa_llva", "vqa_llva_more_face_detail"}


def _manifest(world):
    with open(world.manifest, encoding="utf-8") as f:
        return json.load(f)


def test_prepare_writes_the_official_manifest_and_reports_skips(tiny_world):
    report = tiny_world.report
    assert (report.prepared, report.reused) == (4, 0)
    assert report.skipped == {"unreadable": ["broken.jpg"], "tiny": ["tiny.png"], "no face": ["no_face.jpg"]}
    assert "skipped 3 (unreadable 1, tiny 1, no face 1)" in report.summary()
    entries = _manifest(tiny_world)
    assert [e["source"] for e in entries] == [f"face_{i:02d}.png" for i in range(4)]
    for entry in entries:
        assert OFFICIAL_FIELDS <= set(entry)
        image = Image.open(os.path.join(tiny_world.data, entry["resize_IMG"]))
        labels = Image.open(os.path.join(tiny_world.data, entry["parsing_mask_IMG"]))
        assert image.size == labels.size == (512, 512) and labels.mode == "L"
        assert np.array_equal(np.asarray(labels), face_labels())
        embed = np.load(os.path.join(tiny_world.data, entry["id_embed_file_resize"]), allow_pickle=False)
        assert embed.shape == (1, 512) and abs(np.linalg.norm(embed) - 1) < 1e-4
    assert entries[0]["vqa_llva"] == CUSTOM_CAPTION
    assert entries[1]["vqa_llva"] == "a photo of a person" and entries[1]["vqa_llva_more_face_detail"] == CAPTION_SD15


def test_prepare_resumes_without_redoing_finished_photos(tiny_world, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_world.data, data)
    os.remove(data / "parsing" / "face_02_png.png")  # as if interrupted while writing this photo
    parser = TinyFaceParser()
    from consistentid_core.face.analysis import get_face_analysis

    analysis = get_face_analysis(os.path.join(tiny_world.insightface, "models", "buffalo_l"), ["CPUExecutionProvider"])
    report = prepare_dataset(tiny_world.photos, str(data), analysis, parser, progress=False)
    assert parser.calls == 1 and (report.prepared, report.reused) == (1, 3)
    assert report.total_skipped == 3  # remembered from the log, not retried
    assert len(json.loads((data / "manifest.json").read_text())) == 4


def test_prepare_command_line_with_a_bisenet_file(tiny_world, tmp_path, capsys):
    from facexlib.parsing.bisenet import BiSeNet

    torch.manual_seed(0)
    parser_file = tmp_path / "face_parsing.pth"
    torch.save(BiSeNet(num_class=19).state_dict(), parser_file)
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(os.path.join(tiny_world.photos, "face_01.png"), photos / "a.png")
    shutil.copy(os.path.join(tiny_world.photos, "broken.jpg"), photos / "b.jpg")
    out = tmp_path / "out"
    code = prepare_main(["--input", str(photos), "--output", str(out), "--insightface", tiny_world.insightface,
                         "--parser", str(parser_file), "--providers", "CPU"])
    assert code == 0
    assert "prepared 1 images (0 from an earlier run), skipped 1 (unreadable 1)" in capsys.readouterr().out
    entry = json.loads((out / "manifest.json").read_text())[0]
    labels = np.asarray(Image.open(out / entry["parsing_mask_IMG"]))
    assert labels.shape == (512, 512) and labels.max() < 19
    assert prepare_main(["--input", str(tmp_path / "nowhere"), "--output", str(out), "--insightface",
                         tiny_world.insightface, "--parser", str(parser_file), "--providers", "CPU"]) == 2


class _Payload:
    pass


def test_embedding_files_new_and_official(tmp_path):
    vector = np.linspace(-1, 1, 512, dtype=np.float32)
    for name in ("e.npy", "e.safetensors"):
        write_embedding(str(tmp_path / name), vector)
        assert torch.equal(read_embedding(str(tmp_path / name)), torch.from_numpy(vector))
    torch.save(torch.from_numpy(vector)[None], tmp_path / "official.pt")  # the official [1, 512] torch.save
    assert torch.equal(read_embedding(str(tmp_path / "official.pt")), torch.from_numpy(vector))
    torch.save({"not": _Payload()}, tmp_path / "pickle.pt")  # weights_only=True must refuse to build it
    with pytest.raises(TrainingDataError, match="pickle.pt is unreadable"):
        read_embedding(str(tmp_path / "pickle.pt"))
    np.save(tmp_path / "short.npy", vector[:128])
    with pytest.raises(TrainingDataError, match=r"short.npy holds \(128,\)"):
        read_embedding(str(tmp_path / "short.npy"))


def test_an_inconsistent_data_set_is_refused_with_every_problem(tiny_world, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_world.data, data)
    entries = json.loads((data / "manifest.json").read_text())
    os.remove(data / entries[0]["parsing_mask_IMG"])
    Image.fromarray(face_labels(256)).save(data / entries[1]["parsing_mask_IMG"])
    os.remove(data / entries[2]["id_embed_file_resize"])
    Image.new("RGB", (512, 512)).save(data / entries[3]["parsing_mask_IMG"])
    with pytest.raises(TrainingDataError) as info:
        load_entries(str(data / "manifest.json"), shown=3)
    message = str(info.value)
    assert "4 problem(s)" in message and "... and 1 more" in message
    assert "label map not found" in message and entries[0]["parsing_mask_IMG"].split("/")[-1] in message
    assert "is 256x256 but the image is 512x512" in message
    assert "ID embedding not found" in message


def test_official_layout_with_separate_roots_and_torch_embeddings(tiny_world, tmp_path):
    images, parsing, faceid = tmp_path / "imgs", tmp_path / "parse", tmp_path / "ids"
    for folder in (images, parsing, faceid):
        folder.mkdir()
    source = _manifest(tiny_world)[0]
    shutil.copy(os.path.join(tiny_world.data, source["resize_IMG"]), images / "0.jpg")
    shutil.copy(os.path.join(tiny_world.data, source["parsing_mask_IMG"]), parsing / "0.png")
    vector = torch.randn(1, 512)
    torch.save(vector, faceid / "0.pt")
    manifest = tmp_path / "official.json"
    manifest.write_text(json.dumps([{"resize_IMG": "0.jpg", "parsing_mask_IMG": "0.png",
                                     "id_embed_file_origin": "0.pt", "vqa_llva": "A man."}]))
    entries = load_entries(str(manifest), str(images), str(parsing), str(faceid))
    sample = ConsistentIDDataset(entries, sd15_tokenizer(), resolution=RESOLUTION, text_drop_rate=0.0)[0]
    assert torch.equal(sample["id_embed"], vector[0])
    assert entries[0].facial_caption is None  # the SD1.5 template is used
    assert sample["region_valid"].tolist() == [True, True, False, False, False]


def test_a_sample_has_the_official_tensors(tiny_world):
    tokenizer = sd15_tokenizer()
    entries = load_entries(tiny_world.manifest)
    sample = ConsistentIDDataset(entries, tokenizer, resolution=RESOLUTION, text_drop_rate=0.0)[1]
    assert sample["pixel_values"].shape == (3, RESOLUTION, RESOLUTION)
    assert -1.0 <= sample["pixel_values"].min() < 0 < sample["pixel_values"].max() <= 1.0
    assert sample["clip_pixels"].shape == (3, 224, 224)
    assert sample["region_pixels"].shape == (5, 3, 224, 224)
    assert sample["region_pixels"][:2].abs().sum(dim=(1, 2, 3)).gt(0).all() and sample["region_pixels"][2:].eq(0).all()
    assert sample["region_valid"].tolist() == [True, True, False, False, False]
    tokens = tokenizer.convert_ids_to_tokens(sample["input_ids"][sample["facial_token_index"][:2]].tolist())
    assert tokens == ["face</w>", "nose</w>"]  # regions Face and Nose, in this order
    assert sample["token_mask"].sum() == 2
    masks = sample["facial_masks"]
    assert masks.shape == (5, RESOLUTION, RESOLUTION) and set(masks.unique().tolist()) <= {0.0, 1.0}
    face = torch.zeros(RESOLUTION, RESOLUTION)
    face[24:40, 24:40] = 1  # the 128 px face box of the 512 px label map, at 64 px
    nose = torch.zeros(RESOLUTION, RESOLUTION)
    nose[31:35, 30:33] = 1
    assert torch.equal(masks[0], face) and torch.equal(masks[1], nose) and masks[2:].eq(0).all()
    background = sample["background_mask"][0]
    assert background[30, 30] == 1 and background[60, 32] == 1 and background[5, 5] == 0  # face and neck kept


def test_text_drop_empties_the_text_and_the_whole_image_clip_input_only(tiny_world):
    entries = load_entries(tiny_world.manifest)
    dataset = ConsistentIDDataset(entries, sd15_tokenizer(), resolution=RESOLUTION, text_drop_rate=1.0)
    sample = dataset[0]
    assert sample["text_dropped"] and sample["input_ids"][:2].tolist() == [49406, 49407]
    assert not sample["region_valid"].any() and not sample["token_mask"].any()
    assert sample["clip_pixels"].eq(0).all()
    assert sample["id_embed"].abs().sum() > 0  # ArcFace is not dropped (spec §3.2)
    half = ConsistentIDDataset(entries * 10, sd15_tokenizer(), resolution=RESOLUTION, text_drop_rate=0.5, seed=3)
    first = [half.drops_text(i) for i in range(40)]
    assert first == [half.drops_text(i) for i in range(40)] and 5 < sum(first) < 35
    half.set_epoch(1)
    assert first != [half.drops_text(i) for i in range(40)]


def test_captions_over_the_token_limit_are_reported_and_use_the_fallback(tiny_world, caplog):
    tokenizer = sd15_tokenizer()
    entries = load_entries(tiny_world.manifest)
    entries[2].caption = "A person " + "wearing a long coat with many buttons, " * 10 + "in a park."
    with caplog.at_level(logging.WARNING, logger="consistentid.training"):
        notes = report_captions(entries, tokenizer, CAPTION_SD15)
    assert len(notes) == 1 and notes[0].startswith("entry 2 (face_02_png.jpg)") and "77-token limit" in notes[0]
    assert "1 caption(s) are too long" in caplog.text
    sample = ConsistentIDDataset(entries, tokenizer, resolution=RESOLUTION, text_drop_rate=0.0)[2]
    words = tokenizer.convert_ids_to_tokens(sample["input_ids"][:4].tolist())
    assert words[1:3] == ["detail</w>", ":</w>"]  # the facial details come first
    assert sample["token_mask"].sum() == 2 and sample["input_ids"][-1] != 49407  # cut without EOS
    assert FACIAL_MARKER not in tokenizer.decode(sample["input_ids"])
