"""Bad input and faults in training (issue 13): checkpoints of other runs, crashed and damaged saves,
a full disk, clashing photo names, data that only a full read shows to be broken."""

import dataclasses
import errno
import json
import logging
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from consistentid_core.errors import CheckpointError, TrainingConfigError, TrainingDataError
from training.config import make_config
from training.disk import is_disk_full, write_errors
from training.manifest import load_entries
from training.prepare_data import prepare_dataset, read_captions
from training.state import (
    STATE_FILE,
    commit_checkpoint,
    continued_run,
    list_checkpoints,
    read_checkpoint,
    resume_candidates,
    rotate,
    staging_dir,
    verify_files,
)
from training_standins import TinyFaceParser, write_face_photos
from training_standins import one_cpu_thread, tiny_world  # noqa: F401

pytest.importorskip("diffusers")


def _checkpoint(out, step, run_id, payload=b"weights"):
    """A checkpoint saved the way training saves one (staging folder, then commit), with one small file."""
    staging = staging_dir(str(out), step)
    os.makedirs(staging)
    with open(os.path.join(staging, "model.safetensors"), "wb") as f:
        f.write(payload)
    return commit_checkpoint(str(out), staging, step, {"micro_step": step, "settings": {}, "run_id": run_id,
                                                       "parent": None})


def _names(out):
    return sorted(os.listdir(os.path.join(out, "checkpoints")))


# --- item 1: rotation and resume see only the current run; saves are atomic ------------------------

def test_rotation_deletes_only_this_runs_checkpoints_and_latest_is_the_last_saved(tmp_path):
    for step in (4000, 5000):
        _checkpoint(tmp_path, step, "earlier")
    _checkpoint(tmp_path, 1000, "now")
    assert rotate(str(tmp_path), 2, "now") == []  # the old code kept [4000, 5000] and deleted the new 1000
    assert resume_candidates(str(tmp_path), "latest")[0].name == "checkpoint-1000"
    _checkpoint(tmp_path, 2000, "now")
    _checkpoint(tmp_path, 3000, "now")
    removed = rotate(str(tmp_path), 2, "now")
    assert [os.path.basename(f) for f in removed] == ["checkpoint-1000"]
    assert _names(tmp_path) == ["checkpoint-2000", "checkpoint-3000", "checkpoint-4000", "checkpoint-5000"]
    # 'latest' and its fall-backs stay inside the run that saved last.
    assert [c.name for c in resume_candidates(str(tmp_path), "latest")] == ["checkpoint-3000", "checkpoint-2000"]


def test_resuming_an_older_checkpoint_branches_and_keeps_the_newer_ones(tmp_path, caplog):
    for step in (1000, 2000, 3000):
        _checkpoint(tmp_path, step, "first", payload=f"first {step}".encode())
    newest = read_checkpoint(str(tmp_path / "checkpoints" / "checkpoint-3000"))
    assert continued_run(str(tmp_path), newest) == ("first", None)  # the ordinary resume keeps its run

    older = read_checkpoint(str(tmp_path / "checkpoints" / "checkpoint-1000"))
    with caplog.at_level(logging.WARNING, logger="consistentid.training"):
        branch, parent = continued_run(str(tmp_path), older)
    assert branch != "first" and parent == {"run_id": "first", "step": 1000, "folder": older.folder}
    assert "older than checkpoint-2000, checkpoint-3000 of the same run" in caplog.text

    _checkpoint(tmp_path, 2000, branch, payload=b"branch 2000")
    assert rotate(str(tmp_path), 1, branch) == []
    aside = tmp_path / "checkpoints" / "checkpoint-2000.run-first"
    assert (aside / "model.safetensors").read_bytes() == b"first 2000"  # moved aside, not overwritten
    assert read_checkpoint(str(aside)).run_id == "first"
    assert read_checkpoint(str(tmp_path / "checkpoints" / "checkpoint-3000")).run_id == "first"
    assert resume_candidates(str(tmp_path), "latest")[0].run_id == branch
    assert "moved to" in caplog.text and "checkpoint-2000.run-first" in caplog.text


def test_an_interrupted_save_never_looks_complete(tmp_path):
    _checkpoint(tmp_path, 10, "run", payload=b"old state")
    # A save of the same step that dies half way: the complete folder is untouched, the staging one unseen.
    staging = staging_dir(str(tmp_path), 10)
    os.makedirs(staging)
    (tmp_path / "checkpoints" / ".tmp-checkpoint-10" / "model.safetensors").write_bytes(b"half")
    # What the old code could leave: a checkpoint folder whose state file is from an older save.
    legacy = tmp_path / "checkpoints" / "checkpoint-20"
    legacy.mkdir()
    (legacy / "model.safetensors").write_bytes(b"new but cut")
    (legacy / STATE_FILE).write_text("{\"global_step\": 20, \"micro_")  # cut short
    assert [c.name for c in list_checkpoints(str(tmp_path))] == ["checkpoint-10"]
    assert (tmp_path / "checkpoints" / "checkpoint-10" / "model.safetensors").read_bytes() == b"old state"
    with pytest.raises(CheckpointError, match=r"checkpoint-20: training_state.json is damaged .*resume from another"):
        read_checkpoint(str(legacy))
    shutil.rmtree(staging)
    _checkpoint(tmp_path, 20, "run", payload=b"complete")  # replaces the broken folder
    assert (legacy / "model.safetensors").read_bytes() == b"complete"
    state = json.loads((legacy / STATE_FILE).read_text())
    assert state["files"] == {"model.safetensors": 8} and state["sequence"] == 2 and state["run_id"] == "run"


# --- the same on real training runs ----------------------------------------------------------------

def _legacy_checkpoint(out, step):
    """A checkpoint as the code before run ids wrote it."""
    folder = out / "checkpoints" / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"an earlier run")
    (folder / STATE_FILE).write_text(json.dumps({"global_step": step, "micro_step": step, "settings": {}}))


@pytest.fixture(scope="module")
def two_checkpoints(tiny_world, tmp_path_factory):
    """Two steps with a checkpoint after each and checkpoints_total_limit 2, in an output_dir that
    already holds checkpoints 4000 and 5000 of an earlier run."""
    from training.train import TrainingRun

    out = tmp_path_factory.mktemp("reliability")
    for step in (4000, 5000):
        _legacy_checkpoint(out, step)
    run = TrainingRun(make_config(tiny_world.config(out, max_train_steps=2, checkpointing_steps=1,
                                                    checkpoints_total_limit=2, num_validation_samples=0)))
    result = run.run()
    yield run, result, out
    shutil.rmtree(out, ignore_errors=True)


def test_a_new_run_keeps_its_checkpoints_beside_an_earlier_runs(two_checkpoints):
    run, result, out = two_checkpoints
    assert _names(out) == ["checkpoint-1", "checkpoint-2", "checkpoint-4000", "checkpoint-5000"]
    own = [read_checkpoint(str(out / "checkpoints" / f"checkpoint-{s}")) for s in (1, 2)]
    assert {c.run_id for c in own} == {run.run_id} and own[0].sequence < own[1].sequence
    for ckpt in own:
        verify_files(ckpt)
        assert {"model.safetensors", "optimizer.bin", "consistentid.safetensors"} <= set(ckpt.files)
    assert resume_candidates(str(out), "latest")[0].name == "checkpoint-2"
    assert (out / "checkpoints" / "checkpoint-5000" / "model.safetensors").read_bytes() == b"an earlier run"
    assert (out / "consistentid.safetensors").read_bytes() == (out / "checkpoints" / "checkpoint-2" /
                                                               "consistentid.safetensors").read_bytes()
    assert result.global_step == 2


@pytest.mark.parametrize("failure", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:671] . unexpected pos 576 vs 534"),  # torch.save's zip writer
])
def test_a_full_disk_while_saving_a_checkpoint_is_named_and_leaves_nothing_half_written(two_checkpoints, failure,
                                                                                      monkeypatch):
    run, _, out = two_checkpoints

    def full_disk(folder):
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "model.safetensors"), "wb") as f:
            f.write(b"\0" * 1000)
        raise failure

    monkeypatch.setattr(run.accelerator, "save_state", full_disk)
    with pytest.raises(TrainingConfigError) as info:
        run.save(3, 3)
    message = str(info.value)
    assert f"no space left to write checkpoint-3 to {out / 'checkpoints'} (" in message
    assert "free on that disk, and it needs about" in message
    assert "lower checkpoints_total_limit (now 2;" in message and "--resume-from-checkpoint latest" in message
    assert _names(out) == ["checkpoint-1", "checkpoint-2", "checkpoint-4000", "checkpoint-5000"]
    verify_files(read_checkpoint(str(out / "checkpoints" / "checkpoint-2")))


def test_a_failed_adapter_write_is_named_too(two_checkpoints, monkeypatch):
    from safetensors import SafetensorError

    run, _, out = two_checkpoints

    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("training.train.save_checkpoint", full_disk)
    with pytest.raises(TrainingConfigError, match=r"no space left to write checkpoint-3 to .*checkpoints"):
        run.save(3, 3)
    assert _names(out) == ["checkpoint-1", "checkpoint-2", "checkpoint-4000", "checkpoint-5000"]


def test_the_final_adapter_is_replaced_in_one_step(two_checkpoints, monkeypatch):
    run, _, out = two_checkpoints
    final = out / "consistentid.safetensors"
    before = final.read_bytes()

    def cut_copy(source, target):
        with open(source, "rb") as src, open(target, "wb") as dst:
            dst.write(src.read(100))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("training.disk.shutil.copyfile", cut_copy)
    with pytest.raises(TrainingConfigError) as info:
        run.write_final(2, (2, str(out / "checkpoints" / "checkpoint-2")))
    message = str(info.value)
    assert f"no space left to write the trained weights to {final}" in message
    assert "checkpoint-2/consistentid.safetensors: copy that file once there is room" in message
    assert final.read_bytes() == before
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == ["consistentid.safetensors"]  # no temp file left


def test_write_errors_that_are_not_a_full_disk_are_named(tmp_path):
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert not is_disk_full(PermissionError(errno.EACCES, "Permission denied"))
    with pytest.raises(TrainingConfigError, match=r"could not write the weights to .*out \(PermissionError: "
                                                  r".*Permission denied; .* free on that disk\)\. Check that"):
        with write_errors("the weights", str(tmp_path / "out")):
            raise PermissionError(errno.EACCES, "Permission denied")
    with pytest.raises(ValueError):  # not a write failure: passes through unchanged
        with write_errors("the weights", str(tmp_path / "out")):
            raise ValueError("a bug")


# --- item 5: a damaged checkpoint (these tests damage the fixture's checkpoints: keep them last of its users) ---

def _resume(run, value):
    run.config = dataclasses.replace(run.config, resume_from_checkpoint=value)
    return run.resume_point()


def test_a_damaged_checkpoint_is_named_and_latest_falls_back_to_the_previous_one(two_checkpoints, caplog):
    run, result, out = two_checkpoints
    first_run = run.run_id
    second = out / "checkpoints" / "checkpoint-2"
    optimizer = second / "optimizer.bin"
    size = optimizer.stat().st_size
    with open(optimizer, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(CheckpointError, match=rf"checkpoint {second} is damaged: optimizer.bin has {size // 2} "
                                              rf"bytes but was saved with {size}"):
        _resume(run, str(second))

    with caplog.at_level(logging.WARNING, logger="consistentid.training"):
        resumed = dataclasses.replace(run.config, resume_from_checkpoint="latest")
        run.config = resumed
        again = run.run()
    assert "optimizer.bin has" in caplog.text and "falling back to the previous checkpoint of this run" in caplog.text
    assert "resumed from checkpoint-1 instead of the damaged checkpoint-2" in caplog.text
    # Step 2 trained again from checkpoint 1 is the step the uninterrupted run trained.
    assert again.history == result.history[1:]
    assert run.run_id == first_run
    verify_files(read_checkpoint(str(second)))  # replaced by a complete save of the same run
    assert _names(out) == ["checkpoint-1", "checkpoint-2", "checkpoint-4000", "checkpoint-5000"]


def test_a_checkpoint_damaged_inside_its_files_and_no_usable_one_left(two_checkpoints):
    run, _, out = two_checkpoints
    for step in (1, 2):
        model = out / "checkpoints" / f"checkpoint-{step}" / "model.safetensors"
        size = model.stat().st_size
        model.write_bytes(b"\xff" * size)  # same size: only loading finds it
    with pytest.raises(CheckpointError, match=r"checkpoint-2 cannot be loaded \(.*\); it is damaged, or was saved "
                                              r"by a run with other models"):
        _resume(run, str(out / "checkpoints" / "checkpoint-2"))
    with pytest.raises(CheckpointError) as info:
        _resume(run, "latest")
    message = str(info.value)
    assert "no checkpoint of the last run can be loaded: checkpoint-2; checkpoint-1" in message
    assert "4000" not in message and "5000" not in message  # never another run's checkpoint


# --- item 5: the attribute stage ------------------------------------------------------------------

def test_attribute_stage_refuses_resume_and_keeps_only_its_newest_snapshots(tiny_world, tmp_path):
    from consistentid_core.model.checkpoint import load_checkpoint, save_checkpoint
    from training.attribute_stage import AttributeStage
    from training.base_models import load_base_models
    from training.modules import build_trainee

    identity = tmp_path / "identity.safetensors"
    save_checkpoint(build_trainee(load_base_models(tiny_world.base, tiny_world.vision), "custom").to_checkpoint(), identity)
    out = tmp_path / "out"
    settings = tiny_world.config(out, stage="attributes", init_from=str(identity), max_train_steps=3,
                                 checkpointing_steps=1, checkpoints_total_limit=1)
    with pytest.raises(TrainingConfigError, match=r"resume_from_checkpoint: the attribute stage saves weight snapshots"
                                                  r".*set init_from to it"):
        make_config({**settings, "resume_from_checkpoint": "latest"})
    earlier = out / "checkpoints" / "attributes-9"
    earlier.mkdir(parents=True)
    (earlier / "consistentid_attributes.safetensors").write_bytes(b"an earlier run")
    result = AttributeStage(make_config(settings)).run()
    assert result.global_step == 3
    assert sorted(os.listdir(out / "checkpoints")) == ["attributes-2", "attributes-9"]
    assert os.listdir(out / "checkpoints" / "attributes-2") == ["consistentid_attributes.safetensors"]
    assert load_checkpoint(out / "checkpoints" / "attributes-2" / "consistentid_attributes.safetensors").metadata[
        "trained_steps"] == "2"
    assert (out / "consistentid_attributes.safetensors").is_file()
    assert not [p for p in out.rglob(".*")]  # no temporary file left behind


# --- item 5: the data set check reads every file ----------------------------------------------------

def test_the_data_check_decodes_every_file_and_lists_every_problem(tiny_world, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_world.data, data)
    entries = json.loads((data / "manifest.json").read_text())
    image0 = data / entries[0]["resize_IMG"]
    content = image0.read_bytes()
    image0.write_bytes(content[: len(content) // 2])  # a JPEG cut short: its header still reads
    with Image.open(image0) as img:
        assert img.size == (512, 512)
    nan = np.full((1, 512), 0.1, dtype=np.float32)
    nan[0, 7] = np.nan
    np.save(data / entries[1]["id_embed_file_resize"], nan)
    np.save(data / entries[2]["id_embed_file_resize"], np.ones((2, 256), dtype=np.float32))
    labels = np.asarray(Image.open(data / entries[2]["parsing_mask_IMG"])).copy()
    labels[0, 0] = 25
    Image.fromarray(labels).save(data / entries[2]["parsing_mask_IMG"])
    (data / entries[3]["id_embed_file_resize"]).write_bytes(b"\x93NUMPY garbage")
    shutil.copy(data / entries[3]["resize_IMG"], data / "images" / "copy.jpg")
    entries.append(dict(entries[1]))  # entry 4: entry 1 again
    entries.append({**entries[3], "resize_IMG": "images/copy.jpg", "id_embed_file_resize": None,
                    "parsing_mask_IMG": entries[0]["parsing_mask_IMG"]})  # entry 5: entry 0's label map
    (data / "manifest.json").write_text(json.dumps(entries))
    with pytest.raises(TrainingDataError) as info:
        load_entries(str(data / "manifest.json"))
    message = str(info.value)
    assert "8 problem(s)" in message
    assert f"entry 0 (face_00_png.jpg): image {image0} cannot be decoded (image file is truncated" in message
    assert message.count("holds 1 NaN/Inf value(s)") == 2  # entries 1 and 4
    assert "entry 2 (face_02_png.jpg): ID embedding" in message and "holds (2, 256)" in message
    assert "holds label 25; BiSeNet labels are 0..18" in message
    assert "entry 3 (face_03_png.jpg): ID embedding" in message and "is unreadable" in message
    assert "entries 1, 4 list the same image" in message
    assert "entries 0, 5 share the label map" in message and "but have different images" in message


# --- item 2: clashing photo names in prepare_data ---------------------------------------------------

CLASHING = ("a/b.png", "a__b.png", "a.b/c.png", "a_b/c.png")


@pytest.fixture()
def clashing_photos(tmp_path):
    made = tmp_path / "made"
    names = write_face_photos(str(made), len(CLASHING), seed=5)
    photos = tmp_path / "photos"
    for name, target in zip(names, CLASHING):
        os.makedirs(os.path.dirname(photos / target), exist_ok=True)
        shutil.move(str(made / name), str(photos / target))
    captions = tmp_path / "captions.jsonl"
    captions.write_text("".join(json.dumps({"file": n, "caption": f"photo {n}"}) + "\n" for n in CLASHING))
    return photos, read_captions(str(captions))


def _analysis(world):
    from consistentid_core.face.analysis import get_face_analysis

    return get_face_analysis(os.path.join(world.insightface, "models", "buffalo_l"), ["CPUExecutionProvider"])


def test_photos_whose_names_clash_get_files_of_their_own(tiny_world, clashing_photos, tmp_path):
    photos, captions = clashing_photos
    out = tmp_path / "data"
    report = prepare_dataset(str(photos), str(out), _analysis(tiny_world), TinyFaceParser(), captions,
                             image_format="png", progress=False)
    assert (report.prepared, report.reused) == (4, 0)
    entries = json.loads((out / "manifest.json").read_text())
    assert sorted(e["source"] for e in entries) == sorted(CLASHING)
    for field in ("resize_IMG", "parsing_mask_IMG", "id_embed_file_resize"):
        assert len({e[field] for e in entries}) == 4, field
    assert all(e["resize_IMG"].startswith(("images/a__b_png-", "images/a_b__c_png-")) for e in entries)
    embeds = []
    for entry in entries:
        prepared = np.asarray(Image.open(out / entry["resize_IMG"]))
        assert np.array_equal(prepared, np.asarray(Image.open(photos / entry["source"]))), entry["source"]
        assert entry["vqa_llva"] == f"photo {entry['source']}"
        embeds.append(np.load(out / entry["id_embed_file_resize"]))
    assert all(not np.array_equal(embeds[i], embeds[j]) for i in range(4) for j in range(i))
    assert len(load_entries(str(out / "manifest.json"))) == 4

    parser = TinyFaceParser()
    again = prepare_dataset(str(photos), str(out), _analysis(tiny_world), parser, captions, image_format="png",
                            progress=False)
    assert (again.prepared, again.reused, parser.calls) == (0, 4, 0)


def test_resume_redoes_photos_that_an_earlier_version_gave_one_name(tiny_world, clashing_photos, tmp_path, caplog):
    photos, captions = clashing_photos
    out = tmp_path / "data"
    prepare_dataset(str(photos), str(out), _analysis(tiny_world), TinyFaceParser(), captions, progress=False)
    # The log as the earlier version wrote it: both photos of a clashing pair point at one set of files.
    lines = []
    for source in CLASHING:
        stem = source.replace("/", "__").replace(".", "_")
        files = {"image": f"images/{stem}.jpg", "labels": f"parsing/{stem}.png", "embed": f"id_embeds/{stem}.npy"}
        for path in files.values():
            (out / path).write_bytes(b"whichever photo was written last")
        lines.append(json.dumps({"source": source, "status": "ok", "files": files}))
    (out / "prepare_log.jsonl").write_text("\n".join(lines) + "\n")
    parser = TinyFaceParser()
    with caplog.at_level(logging.WARNING, logger="consistentid.training"):
        report = prepare_dataset(str(photos), str(out), _analysis(tiny_world), parser, captions, progress=False)
    assert (report.prepared, report.reused, parser.calls) == (4, 0, 4)
    assert "a/b.png shares its prepared files with another photo" in caplog.text
    entries = json.loads((out / "manifest.json").read_text())
    assert len({e["resize_IMG"] for e in entries}) == 4
