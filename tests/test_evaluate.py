"""training.evaluate: FaceSim on real photos with SFace, FGIS region logic, CLIP/DINO, FID, report, CLI."""

import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from consistentid_core.errors import EvaluationError
from eval_standins import SequenceParser, astronaut, coffee, full_face_map, save_dino, save_small_clip
from training import evaluate as cli
from training.evaluation import prompts as protocol
from training.evaluation.encoders import ClipEncoder, DinoEncoder
from training.evaluation.facesim import SFaceModel, face_similarity, load_face_model
from training.evaluation.fgis import GROUP_ORDER, PARTS, FGISScorer, group_masks
from training.evaluation.fid import frechet_distance, fid_or_reason
from training.evaluation.layout import Sample, collect_samples, load_references
from training.evaluation.report import CSV_COLUMNS, write_report
from training.evaluation.scoring import Evaluator
from training.make_eval_workflows import make_workflows

PHOTOS = os.environ.get("CID_TEST_PHOTOS", "")
needs_photos = pytest.mark.skipif(not os.path.isfile(os.path.join(PHOTOS, "obama.jpg")),
                                  reason="CID_TEST_PHOTOS (face_recognition's test photos) is not set")


@pytest.fixture(scope="module")
def sface():
    return SFaceModel()


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory):
    return save_dino(tmp_path_factory.mktemp("dino-vits16"))


@pytest.fixture(scope="module")
def dino(dino_dir):
    return DinoEncoder.from_folder(dino_dir)


@pytest.fixture(scope="module")
def astro_regions(dino):
    """Region embeddings of the astronaut under the stand-in face map, shared by the FGIS tests."""
    return FGISScorer(SequenceParser(full_face_map()), dino).regions(astronaut())


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_small_clip(tmp_path_factory.mktemp("clip"))


def _photo(name):
    return np.asarray(Image.open(os.path.join(PHOTOS, name)).convert("RGB"))


# --- FaceSim -------------------------------------------------------------------------------------

@needs_photos
def test_sface_scores_the_same_person_higher_than_a_different_one(sface):
    emb = {n: sface.embed(_photo(f"{n}.jpg")) for n in ("obama", "obama2", "obama3", "biden")}
    same = [face_similarity(emb["obama"], emb[o]) for o in ("obama2", "obama3")]
    other = face_similarity(emb["obama"], emb["biden"])
    assert emb["obama"].shape == (128,) and abs(np.linalg.norm(emb["obama"]) - 1) < 1e-5
    assert min(same) > 0.6 and other < 0.3, (same, other)
    assert min(same) - other > 0.4


@needs_photos
def test_dlib_backend_agrees_on_who_is_who():
    pytest.importorskip("dlib")
    model = load_face_model("dlib")
    emb = {n: model.embed(_photo(f"{n}.jpg")) for n in ("obama", "obama2", "biden")}
    assert face_similarity(emb["obama"], emb["obama2"]) - face_similarity(emb["obama"], emb["biden"]) > 0.1


def test_no_face_gives_none_and_facesim_zero(sface):
    assert sface.embed(np.full((256, 256, 3), 128, np.uint8)) is None
    vector = sface.embed(np.asarray(astronaut()))
    assert face_similarity(vector, None) == 0.0
    assert face_similarity(vector, -vector) == 0.0  # clamped, not -1
    assert face_similarity(vector, vector) == pytest.approx(1.0, abs=1e-5)


@needs_photos
def test_real_photos_run_copy_paste_indicator_and_no_face_count(tmp_path, sface):
    refs = tmp_path / "refs" / "obama"
    gen = tmp_path / "gen" / "obama"
    refs.mkdir(parents=True)
    gen.mkdir(parents=True)
    Image.open(os.path.join(PHOTOS, "obama.jpg")).save(refs / "reference.png")
    Image.open(os.path.join(PHOTOS, "obama2.jpg")).save(refs / "other.png")
    Image.open(os.path.join(PHOTOS, "obama.jpg")).save(gen / "0.png")     # a copy of the reference
    Image.open(os.path.join(PHOTOS, "obama3.jpg")).save(gen / "1.png")    # another photo of him
    Image.new("RGB", (300, 300), (90, 90, 90)).save(gen / "2.png")         # no face
    (tmp_path / "p.txt").write_text("a {class} in the snow\na {class} reading\n# group: style\na sketch of a {class}\n")
    references = load_references(tmp_path / "refs", "man")
    samples = collect_samples(tmp_path / "gen", str(tmp_path / "p.txt"), references)
    assert [s.prompt for s in samples] == ["a man in the snow", "a man reading", "a sketch of a man"]
    assert [s.group for s in samples] == ["", "", "style"]
    result = Evaluator(sface).evaluate(samples, references, "photos")
    copy, other, blank = result.per_image
    to_obama2 = face_similarity(sface.embed(_photo("obama2.jpg")), sface.embed(_photo("obama.jpg")))
    assert copy["FaceSim"] == pytest.approx(1.0, abs=1e-5)
    assert copy["copy_paste"] == pytest.approx(1.0 - to_obama2, abs=1e-4) and copy["copy_paste"] > 0.2
    assert abs(other["copy_paste"]) < 0.15 and other["FaceSim"] > 0.6
    assert blank["FaceSim"] == 0.0 and blank["face_found"] is False and "copy_paste" not in blank
    assert result.row["no_face"] == 1 and result.row["copy_paste_images"] == 2
    assert result.row["FaceSim"] == pytest.approx((1.0 + other["FaceSim"]) / 3, abs=1e-5)
    assert result.row["CLIP-T"] is None and result.row["FGIS"] is None


# --- FGIS ----------------------------------------------------------------------------------------

def _scorer(dino, *maps):
    return FGISScorer(SequenceParser(*maps), dino)


def test_fgis_of_an_image_with_itself_is_one_for_every_region(dino, astro_regions):
    scorer = _scorer(dino, full_face_map())
    result = scorer.compare(astro_regions, scorer.regions(astronaut()))
    assert list(result.per_region) == list(GROUP_ORDER) and list(result.per_part) == list(PARTS)
    assert all(abs(v - 1.0) < 1e-5 for v in result.per_region.values()), result.per_region
    assert result.score == pytest.approx(1.0, abs=1e-5)
    assert result.missing_in_generated == [] and result.missing_in_reference == []


def test_region_masks_are_disjoint_and_face_excludes_the_parts():
    masks = group_masks(full_face_map())
    stacked = np.stack(list(masks.values())).astype(int)
    assert list(masks) == list(GROUP_ORDER) and stacked.sum(axis=0).max() == 1
    assert not (masks["face"] & masks["eye"]).any()
    assert masks["eye"].sum() == np.isin(full_face_map(), (4, 5)).sum()  # both eyes, not the first only
    assert masks["lip"].sum() == np.isin(full_face_map(), (12, 13)).sum()


@pytest.mark.parametrize("swapped", GROUP_ORDER)
def test_swapping_one_region_lowers_exactly_that_region(dino, astro_regions, swapped):
    scorer = _scorer(dino, full_face_map())
    mask = group_masks(full_face_map())[swapped]
    changed = np.asarray(astronaut()).copy()
    changed[mask] = np.asarray(coffee())[mask]
    result = scorer.compare(astro_regions, scorer.regions(Image.fromarray(changed)))
    assert result.per_region[swapped] < 0.99, result.per_region
    for group in GROUP_ORDER:
        if group != swapped:
            assert abs(result.per_region[group] - 1.0) < 1e-5, (group, result.per_region)
    assert result.score == pytest.approx((4 + result.per_region[swapped]) / 5, abs=1e-5)


def test_region_absent_in_one_image_is_excluded_and_reported(tmp_path, dino, capsys):
    no_ears = full_face_map()
    no_ears[np.isin(no_ears, (7, 8))] = 0
    image = tmp_path / "refs" / "astro.png"
    image.parent.mkdir()
    astronaut().save(image)
    refs = load_references(tmp_path / "refs")
    evaluator = Evaluator(None, SequenceParser(full_face_map(), no_ears), dino)
    result = evaluator.evaluate([Sample(str(image), "astro", "a person")], refs, "run")
    rec = result.per_image[0]
    assert rec["missing_in_generated"] == ["Left_Ear", "Right_Ear"] and rec["missing_in_reference"] == []
    assert "fgis_ear" not in rec and rec["FGIS"] == pytest.approx(1.0, abs=1e-5)  # ear is not counted as 0
    assert result.details["regions_excluded"]["generated"]["Left_Ear"] == 1
    assert result.row["fgis_ear"] is None and result.row["no_shared_region"] == 0
    cli.print_summary({"runs": {"run": {"row": result.row, **result.details}},
                       "files": write_report([result.row], tmp_path / "out")})
    assert "run: FGIS parts excluded, absent in the generated: Left_Ear 1x, Right_Ear 1x" in capsys.readouterr().out


def test_no_shared_region_scores_zero(dino, astro_regions):
    scorer = _scorer(dino, np.zeros((512, 512), np.uint8))
    result = scorer.compare(astro_regions, scorer.regions(astronaut()))
    assert result.score == 0.0 and not result.shared and result.missing_in_generated == list(PARTS)


# --- CLIP, DINO, FID -----------------------------------------------------------------------------

def test_clip_and_dino_run_with_random_encoders_of_the_real_layouts(clip_dir, dino):
    assert dino.model.config.hidden_size == 384 and dino.model.config.num_hidden_layers == 12
    assert sum(p.numel() for p in dino.model.parameters()) == 21_665_664
    clip = ClipEncoder.from_folder(clip_dir)
    images = [astronaut(300), coffee(300), astronaut(300)]
    img = clip.embed_images(images)
    txt = clip.embed_texts(["a woman in a space suit", "a cup of coffee"])
    assert img.shape == (3, 32) and txt.shape == (2, 32)
    assert float(img[0] @ img[2]) == pytest.approx(1.0, abs=1e-5) and float(img[0] @ img[1]) < 0.999
    assert float(txt[0] @ txt[1]) < 0.999 and abs(float(txt[0] @ img[0])) <= 1.0
    whole = dino.embed_images(images)
    assert whole.shape == (3, 384) and float(whole[0] @ whole[2]) == pytest.approx(1.0, abs=1e-5)
    assert float(whole[0] @ whole[1]) < 0.99


def test_frechet_distance_matches_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 4))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shift = np.array([1.0, -2.0, 0.5, 0.0])
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift), abs=1e-6)
    x, y = rng.normal(size=(500, 1)), 3.0 * rng.normal(size=(400, 1)) + 2.0
    expected = (x.mean() - y.mean()) ** 2 + (x.std(ddof=1) - y.std(ddof=1)) ** 2
    assert frechet_distance(x, y) == pytest.approx(expected, rel=1e-6)
    assert fid_or_reason(a[:5], a, min_images=10) == (None, "FID needs at least 10 images per set; got 5 generated, "
                                                           "200 real")


# --- report, CLI, bad inputs ---------------------------------------------------------------------

def test_table_and_plot_have_the_paper_columns(tmp_path):
    rows = [{"method": "ours", "CLIP-T": 0.2431, "CLIP-I": 0.7, "DINO": 0.5, "FaceSim": 0.61, "FGIS": 0.8,
             "FID": None, "images": 4, "no_face": 1}, {"method": "paper", "FaceSim": 0.5}]
    paths = write_report(rows, tmp_path, percent=True)
    md = open(paths["md"], encoding="utf-8").read().splitlines()
    assert md[0] == "| Method | CLIP-T ↑ | CLIP-I ↑ | DINO ↑ | FaceSim ↑ | FGIS ↑ | FID ↓ |"
    assert md[2] == "| ours | 24.3 | 70.0 | 50.0 | 61.0 | 80.0 | – |"
    assert md[3] == "| paper | – | – | – | 50.0 | – | – |"
    with open(paths["csv"], newline="") as fh:
        table = list(csv.reader(fh))
    assert tuple(table[0][:7]) == ("method", "CLIP-T", "CLIP-I", "DINO", "FaceSim", "FGIS", "FID")
    assert tuple(table[0]) == CSV_COLUMNS and table[1][:7] == ["ours", "0.2431", "0.7", "0.5", "0.61", "0.8", ""]
    with open(paths["png"], "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(paths["png"]) > 5000


def _layout(tmp_path, images: int = 3):
    ref = tmp_path / "refs" / "astro"
    ref.mkdir(parents=True)
    astronaut().save(ref / "reference.png")
    astronaut().transpose(Image.FLIP_LEFT_RIGHT).save(ref / "other.png")
    gen = tmp_path / "gen" / "astro"
    gen.mkdir(parents=True)
    astronaut().save(gen / "0.png")
    Image.new("RGB", (320, 320), (128, 128, 128)).save(gen / "1.png")
    astronaut(400).rotate(8).save(gen / "2.png")
    (tmp_path / "prompts.txt").write_text("\n".join(["a {class} in the snow", "a {class} reading", "a pencil sketch "
                                                     "of a {class}"][:images]) + "\n")
    return tmp_path / "refs", tmp_path / "gen", tmp_path / "prompts.txt"


def test_cli_writes_table_plot_and_per_image_scores(tmp_path, clip_dir, dino_dir, capsys):
    from tools import random_models

    refs, gen, prompts = _layout(tmp_path)
    parser = random_models.face_parser(tmp_path / "face_parsing.pth")
    extra = tmp_path / "paper.csv"
    extra.write_text("method,CLIP-T,FaceSim\npaper table,0.25,0.6\n")
    out = tmp_path / "out"
    code = cli.main(["--references", str(refs), "--generated", f"mine={gen}", "--prompts", str(prompts), "--out",
                     str(out), "--parser", str(parser), "--dino", dino_dir, "--clip", clip_dir, "--class-word",
                     "woman", "--fid-min-images", "2", "--extra-rows", str(extra), "--parse-size", "256"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "| Method | CLIP-T ↑ | CLIP-I ↑ | DINO ↑ | FaceSim ↑ | FGIS ↑ | FID ↓ |" in printed
    assert "mine: 1 of 3 images without a face (FaceSim 0)" in printed
    with open(out / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["method"] for r in rows] == ["mine", "paper table"]
    assert rows[0]["images"] == "3" and rows[0]["no_face"] == "1" and float(rows[0]["FID"]) >= 0.0
    assert all(rows[0][m] != "" for m in ("CLIP-T", "CLIP-I", "DINO", "FaceSim", "FGIS"))
    with open(out / "per_image_mine.csv", newline="") as fh:
        per = list(csv.DictReader(fh))
    assert [p["prompt"] for p in per] == ["a woman in the snow", "a woman reading", "a pencil sketch of a woman"]
    for key in ("CLIP-I", "DINO", "FaceSim", "FGIS"):  # the first image is the reference itself
        assert float(per[0][key]) == pytest.approx(1.0, abs=1e-4), key
    assert per[1]["FaceSim"] == "0.0" and per[1]["face_found"] == "False" and per[1]["copy_paste"] == ""
    assert 0.0 < float(per[0]["copy_paste"]) < 1.0  # a copy is closer to the reference than to the mirrored photo
    assert float(rows[0]["FaceSim"]) == pytest.approx(np.mean([float(p["FaceSim"]) for p in per]), abs=1e-6)
    assert os.path.getsize(out / "results.png") > 5000
    assert json.load(open(out / "summary.json"))["runs"]["mine"]["no_face_images"][0].endswith("1.png")


def test_run_names_that_would_write_one_file_are_refused_before_any_model_loads(tmp_path, capsys):
    refs, gen, prompts = _layout(tmp_path)
    with pytest.raises(EvaluationError, match=r"runs 'a b' and 'a_b' would both write per_image_a_b.csv; give one "
                                              r"of them another name with NAME=DIR"):
        cli.evaluate(refs, {"a b": str(gen), "a_b": str(gen)}, str(prompts), tmp_path / "out", evaluator=None)
    with pytest.raises(EvaluationError, match="runs 'Mine' and 'mine' would both write"):  # case-blind file systems
        cli.check_run_names(["Mine", "mine"])
    cli.check_run_names(["mine", "theirs", "a b"])
    # The command line refuses them before it reads --parser (a missing file here).
    code = cli.main(["--references", str(refs), "--generated", f"a b={gen}", f"a_b={gen}", "--prompts", str(prompts),
                     "--out", str(tmp_path / "out"), "--parser", str(tmp_path / "no_parser.pth")])
    assert code == 2
    error = capsys.readouterr().err
    assert "would both write per_image_a_b.csv" in error and "no_parser.pth" not in error
    assert not (tmp_path / "out").exists()


def test_bad_layouts_name_what_is_wrong(tmp_path):
    refs, gen, prompts = _layout(tmp_path)
    references = load_references(refs)
    with pytest.raises(EvaluationError, match=r"astro holds 3 images but .*prompts.txt has 2 prompts"):
        collect_samples(gen, str(_layout(tmp_path / "b", images=2)[2]), references)
    (gen / "bob").mkdir()
    for i in range(3):
        astronaut(64).save(gen / "bob" / f"{i}.png")
    with pytest.raises(EvaluationError, match=r"no reference photo for identity 'bob' .*holds astro"):
        collect_samples(gen, str(prompts), references)
    with pytest.raises(EvaluationError, match="reference folder .*nowhere does not exist"):
        load_references(tmp_path / "nowhere")
    table = tmp_path / "prompts.csv"
    table.write_text("image,prompt,group\nastro/2.png,a woman reading,action\nastro/0.png,a woman,style\n")
    samples = collect_samples(gen, str(table), references)
    assert [(os.path.basename(s.image), s.identity, s.group) for s in samples] == [("2.png", "astro", "action"),
                                                                                  ("0.png", "astro", "style")]
    table.write_text("image,prompt\nastro/9.png,a woman\n")
    with pytest.raises(EvaluationError, match=r"1 of the 1 images listed in .*prompts.csv are not in .*gen \(first: astro/9.png\)"):
        collect_samples(gen, str(table), references)


def test_missing_model_folders_are_named(tmp_path, clip_dir, dino_dir):
    with pytest.raises(EvaluationError, match=r"DINO folder .*no-dino does not exist .*config.json"):
        DinoEncoder.from_folder(tmp_path / "no-dino")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text('{"model_type": "vit"}')
    with pytest.raises(EvaluationError, match=r"DINO folder .*empty has no weights: expected model.safetensors"):
        DinoEncoder.from_folder(tmp_path / "empty")
    with pytest.raises(EvaluationError, match=r"DINO folder .*clip.* holds a 'clip' model; expected .*dino-vits16"):
        DinoEncoder.from_folder(clip_dir)
    with pytest.raises(EvaluationError, match=r"CLIP folder .*dino-vits16.* has no tokenizer: expected vocab.json"):
        ClipEncoder.from_folder(dino_dir)
    for name in ("model.safetensors", "vocab.json", "merges.txt"):
        (tmp_path / "empty" / name).write_bytes(b"")
    with pytest.raises(EvaluationError, match=r"CLIP folder .*empty holds a 'vit' model"):
        ClipEncoder.from_folder(tmp_path / "empty")
    with pytest.raises(EvaluationError, match=r"FaceSim model folder .*empty has no YuNet detector"):
        load_face_model("sface", tmp_path / "empty")
    with pytest.raises(EvaluationError, match=r"FaceSim model folder .*nowhere does not exist"):
        load_face_model("sface", tmp_path / "nowhere")
    with pytest.raises(EvaluationError, match=r"face parser file .*nope.pth does not exist"):
        cli.load_models("none", parser=str(tmp_path / "nope.pth"))


def test_prompt_protocol_has_45_prompts_in_four_groups():
    prompts = protocol.protocol_prompts()
    assert len(prompts) == 45 and len({p.template for p in prompts}) == 45
    assert protocol.group_sizes() == {"clothing & accessory": 12, "background": 12, "action": 11, "style": 10}
    assert all(p.template.count("{class}") == 1 for p in prompts)
    assert prompts[0].text("man") == "a man wearing a red scarf" and prompts[44].group == "style"


def test_eval_workflows_and_manifest_round_trip(tmp_path):
    refs, _, _ = _layout(tmp_path)
    astronaut(128).save(refs / "bob.jpg")
    (refs / "class_words.json").write_text('{"astro": "woman"}')
    manifest = make_workflows(refs, tmp_path / "set", seeds=[7, 8], class_word="man")
    assert len(manifest["items"]) == 2 * 45 * 2
    item = manifest["items"][3]
    assert (item["identity"], item["prompt"], item["seed"]) == ("astro", "a woman wearing a black leather jacket", 8)
    flow = json.load(open(tmp_path / "set" / item["workflow"]))
    template = json.load(open(os.path.join(os.path.dirname(cli.__file__), "..", "example_workflows", "api",
                                           "sd15_portrait_api.json")))
    assert flow["6"]["inputs"]["image"] == "consistentid_eval/astro.png"
    assert flow["8"]["inputs"]["text"] == "a woman wearing a black leather jacket"
    assert flow["10"]["inputs"]["seed"] == 8 and flow["12"]["inputs"]["filename_prefix"] == "consistentid_eval/astro/p01_s8"
    changed = {k for k in template if flow[k] != template[k]}
    assert changed == {"6", "8", "10", "12"}
    assert (tmp_path / "set" / "input" / "consistentid_eval" / "bob.jpg").is_file()
    bob = [i for i in manifest["items"] if i["identity"] == "bob"][0]
    assert bob["prompt"] == "a man wearing a red scarf"
    output = tmp_path / "comfy_output"
    for it in manifest["items"][1:]:  # ComfyUI's SaveImage naming; the first image is missing
        path = output / (it["output_prefix"] + "_00001_.png")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    with pytest.raises(EvaluationError, match=r"1 of the 180 images listed in .*manifest.json are not in"):
        collect_samples(output, str(tmp_path / "set" / "manifest.json"), load_references(refs))
    (output / (manifest["items"][0]["output_prefix"] + "_00001_.png")).write_bytes(b"")
    samples = collect_samples(output, str(tmp_path / "set" / "manifest.json"), load_references(refs))
    assert len(samples) == 180 and samples[3].prompt == item["prompt"] and samples[3].seed == 8
    (tmp_path / "bad.json").write_text(json.dumps({"1": {"class_type": "KSampler", "inputs": {}}}))
    with pytest.raises(EvaluationError, match="needs one LoadImage, one ConsistentIDApply .*LoadImage x0"):
        make_workflows(refs, tmp_path / "x", template_path=str(tmp_path / "bad.json"))
