"""The method registry: every registered method trains a few steps through the real trainer (as timm tests every
model), runs are named and tagged after the method, and a method's own options are typed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from training import tiny_overrides, write_training_data

from medssl.train.config import compose_pretrain_config, pretrain_config
from medssl.train.methods import METHODS, method_named
from medssl.train.methods.barlow import BarlowTwinsObjective
from medssl.train.trainer import Trainer

# what a method needs beyond the tiny settings to show its behaviour in a few steps
EXTRA: dict[str, tuple[str, ...]] = {
    "dcv2_2d": ("trainer.batch.images=32",),  # several epochs: k-means runs at each epoch start
    "staged": ("method.objective.stages=[1,2]",),
}
STEPS = {"dcv2_2d": 6}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("methods")
    return folder, write_training_data(folder)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_registered_method_trains(dataset, method):
    folder, manifest = dataset
    seen: list[dict[str, float]] = []
    steps = STEPS.get(method, 3)
    overrides = [f"method={method}", f"trainer.max_steps={steps}", f"run.name={method}", "logging=none"]
    config = compose_pretrain_config(tiny_overrides(manifest, folder, *overrides, *EXTRA.get(method, ())))
    assert config.method.name == method  # each preset names itself
    result = Trainer(config, project_dir=folder, callbacks=[lambda step, metrics: seen.append(metrics)]).fit()
    assert result.status == "finished" and result.step == steps and result.run_id is None
    assert all(torch.isfinite(torch.tensor(m["loss/total"])) for m in seen)
    if method == "joint":
        assert {"loss/intra", "loss/inter", "loss/mask"} <= set(seen[0])
    if method == "sepclr":
        assert "loss/sep" in seen[0] and "loss/intra" not in seen[0]
    if method == "simclr":
        assert "loss/simclr" in seen[0]
    if method == "barlow":
        assert "loss/barlow" in seen[0]
    if method == "staged":
        assert ["loss/intra" in m for m in seen] == [True, False, True]
        assert ["loss/mask" in m for m in seen] == [False, True, True]
    if method == "dcv2_2d":
        assert seen[0]["loss/intra"] == 0.0  # waiting for the first clustering
        assert seen[-1]["loss/intra"] > 0.0


def test_a_preset_run_is_named_and_tagged_after_the_preset(tmp_path):
    """``method=swav2d`` used to inherit the joint method's name: its MLflow run said ``joint``."""
    manifest = write_training_data(tmp_path, volumes=0, images=8)
    config = compose_pretrain_config(tiny_overrides(manifest, tmp_path, "method=swav2d", "trainer.max_steps=1"))
    result = Trainer(config, project_dir=tmp_path).fit()
    run = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}").get_run(result.run_id)
    assert run.data.tags["medssl.method"] == "swav2d" and run.data.params["method.name"] == "swav2d"
    assert result.run_name.startswith("swav2d-")


def test_unknown_methods_and_options_name_the_key():
    with pytest.raises(ValueError, match=r"method.name: 'byol' is not a registered method.*barlow"):
        pretrain_config({"method": {"name": "byol"}})
    with pytest.raises(ValueError, match=r"method.options.lamda"):
        pretrain_config({"method": {"name": "barlow", "options": {"lamda": 0.1}}})
    with pytest.raises(ValueError, match=r"method.options: method=joint takes no options"):
        pretrain_config({"method": {"name": "joint", "options": {"lambd": 0.1}}})
    config = pretrain_config({"method": {"name": "barlow", "options": {"lambd": 0.02}}})
    assert method_named("barlow").read_options(config).lambd == 0.02


def test_barlow_twins_uses_monai_s_loss_on_the_two_global_crops():
    """The example method's loss is MONAI's on the projected global crops (a plain reference: the same call)."""
    from monai.losses import BarlowTwinsLoss

    from medssl.models.joint import JointModel, JointModelConfig

    torch.manual_seed(0)
    model = JointModel(JointModelConfig(encoder="resnet10", projector_hidden=32, projector_dim=16, norm="group"))
    objective = BarlowTwinsObjective(model, lambd=0.01)
    crops = [torch.rand(4, 1, 32, 32), torch.rand(4, 1, 32, 32), torch.rand(4, 1, 16, 16)]
    loss, metrics = objective(crops)
    z1, z2 = (model.projector(f) for f in model.encode(crops[:2]))
    torch.testing.assert_close(loss, BarlowTwinsLoss(lambd=0.01)(z1, z2))
    assert set(metrics) == {"loss/barlow", "loss/total"}


def test_the_readme_shows_the_example_method_as_it_is():
    """README "Adding a method" quotes medssl/train/methods/barlow.py from its options dataclass to the end."""
    repo = Path(__file__).resolve().parents[1]
    source = (repo / "medssl" / "train" / "methods" / "barlow.py").read_text(encoding="utf-8")
    code = source[source.index("@dataclass") :].strip()
    readme = (repo / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("### Adding a method") :]
    quoted = section[section.index("```python") + len("```python") : section.index("```\n\nplus one line")].strip()
    assert quoted == code
    assert len(code.splitlines()) <= 30
