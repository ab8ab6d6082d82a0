"""The attribute stage of the training CLI on tiny random models: identity frozen, branch trained, file loads."""

import numpy as np
import pytest
import torch
from PIL import Image

from consistentid_core.attributes.branch import attribute_branch_from_extra
from consistentid_core.attributes.photos import ATTRIBUTE_NAMES
from consistentid_core.model.checkpoint import load_checkpoint, save_checkpoint
from consistentid_core.errors import TrainingConfigError
from consistentid_core.face.labels import LABEL_HAIR
from training.base_models import load_base_models
from training.config import make_config
from training.modules import build_trainee
from training.train import main
from training_standins import one_cpu_thread, tiny_world  # noqa: F401

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def identity_file(tiny_world, tmp_path_factory):
    """Identity weights for the tiny UNet (what a finished identity stage or an official file provides)."""
    models = load_base_models(tiny_world.base, tiny_world.vision)
    trainee = build_trainee(models, "custom")
    with torch.no_grad():  # non-zero LoRA ups, so that the frozen identity parts really act
        for name, p in trainee.adapter_modules.named_parameters():
            if "up" in name:
                p.normal_(0, 0.01)
    path = tmp_path_factory.mktemp("identity") / "identity.safetensors"
    save_checkpoint(trainee.to_checkpoint(), path)
    return path


@pytest.fixture(scope="module")
def hairy_world(tiny_world, tmp_path_factory):
    """The tiny data set with hair painted into the top quarter of every label map."""
    import json
    import os
    import shutil

    root = tmp_path_factory.mktemp("hairy")
    shutil.copytree(tiny_world.data, root / "data")
    manifest = json.loads((root / "data" / "manifest.json").read_text())
    entries = manifest["entries"] if isinstance(manifest, dict) else manifest
    for entry in entries:
        labels_path = next(v for k, v in entry.items() if "pars" in k.lower())
        assert not os.path.isabs(labels_path)  # the copy must not paint the shared data set
        path = os.path.join(root / "data", labels_path)
        labels = np.array(Image.open(path))
        labels[: labels.shape[0] // 4] = LABEL_HAIR
        Image.fromarray(labels).save(path)
    return root / "data" / "manifest.json"


def _config(world, manifest, out, init, **settings):
    values = world.config(out, stage="attributes", init_from=str(init), manifest=str(manifest), max_train_steps=6,
                          learning_rate=1e-3, text_drop_rate=0.0, id_drop_rate=0.0, attribute_drop_rate=0.0)
    values.update(settings)
    return make_config(values)


def test_attribute_stage_trains_the_branch_only_and_writes_a_loadable_file(tiny_world, hairy_world, identity_file,
                                                                          tmp_path):
    from training.attribute_stage import AttributeStage

    stage = AttributeStage(_config(tiny_world, hairy_world, tmp_path, identity_file))
    sample = stage.dataset[0]
    assert sample["attribute_valid"][ATTRIBUTE_NAMES.index("hair")]
    assert tuple(sample["attribute_pixels"].shape) == (len(ATTRIBUTE_NAMES), 3, 224, 224)
    identity_before = {k: v.clone() for k, v in stage.trainee.state_dict().items()}
    branch_before = {k: v.clone() for k, v in stage.branch.state_dict().items()}

    # A fixed batch, noise and timestep: the loss before each update measures the fit.
    batch = next(iter(stage.loader))
    losses = []
    for _ in range(6):
        loss = stage.loss(batch, step=0)
        stage.accelerator.backward(loss)
        stage.optimizer.step()
        stage.optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0], losses
    assert all(torch.equal(v, identity_before[k]) for k, v in stage.trainee.state_dict().items())
    changed = [k for k, v in stage.branch.state_dict().items() if not torch.equal(v, branch_before[k])]
    assert any("to_v_attr" in k for k in changed) and any(k.startswith("attribute_proj.") for k in changed)

    result = stage.run()
    assert result.global_step == 6 and len(result.history) == 6
    ckpt = load_checkpoint(result.weights_path)
    branch = attribute_branch_from_extra(ckpt.extra, ckpt.layout)
    assert branch is not None and branch.num_tokens == 4
    assert all(torch.equal(v, stage.branch.state_dict()[k].cpu()) for k, v in branch.state_dict().items())
    identity = load_checkpoint(identity_file)
    assert all(torch.equal(v, identity.facial_encoder.state_dict()[k]) for k, v in ckpt.facial_encoder.state_dict().items())


def test_command_line_attribute_stage(tiny_world, hairy_world, identity_file, tmp_path, capsys):
    args = ["--base-model", tiny_world.base, "--image-encoder", tiny_world.vision, "--manifest", str(hairy_world),
            "--output-dir", str(tmp_path), "--resolution", "64", "--report-to", "none", "--stage", "attributes",
            "--init-from", str(identity_file), "--max-train-steps", "2", "--attribute-tokens", "2"]
    assert main(args) == 0
    assert "trained the attribute branch 2 steps" in capsys.readouterr().out
    ckpt = load_checkpoint(tmp_path / "consistentid_attributes.safetensors")
    assert attribute_branch_from_extra(ckpt.extra, ckpt.layout).num_tokens == 2


def test_attribute_stage_needs_identity_weights_and_sane_rates(tiny_world, tmp_path):
    from training.attribute_stage import AttributeStage

    with pytest.raises(TrainingConfigError, match="the attribute stage trains on top of identity weights: set init_from"):
        AttributeStage(make_config(tiny_world.config(tmp_path, stage="attributes")))
    with pytest.raises(TrainingConfigError, match=r"attribute_drop_rate is a probability \(0..1\), got 1.5"):
        make_config(tiny_world.config(tmp_path, stage="attributes", attribute_drop_rate=1.5))
    with pytest.raises(TrainingConfigError, match="stage must be one of identity, attributes, got 'attribute'"):
        make_config(tiny_world.config(tmp_path, stage="attribute"))
