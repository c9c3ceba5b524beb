"""The `medssl pretrain` and `medssl demo` commands as a user types them."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from training import write_training_data

from medssl.cli import main
from medssl.demo import evaluation
from medssl.demo.evaluation import PhantomSetSpec

# Fast settings for the demo command (its defaults train for minutes).
FAST_DEMO = [
    "model.projector_hidden=32",
    "model.intra_prototypes=[8]",
    "model.transformer_dim=32",
    "model.inter_prototypes=[4]",
    "data.views.global_size=32",
    "data.views.local_size=16",
    "data.stacks.size=32",
    "trainer.num_workers=0",
    "logging.pictures.samples=16",
]


def test_print_config_shows_the_composed_configuration(capsys):
    assert main(["pretrain", "--print-config", "method=simclr", "trainer.max_steps=7"]) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["method"]["name"] == "simclr"
    assert config["trainer"]["max_steps"] == 7
    assert config["data"]["manifest"] == "data_manifests/demo.csv"
    # overrides may follow a flag, as in any Hydra application
    assert main(["pretrain", "method=simclr", "--print-config", "trainer.max_steps=8"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["trainer"]["max_steps"] == 8


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.max_step=3", "trainer.max_step"),
        ("trainer.optimizer.lr=-1", "trainer.optimizer: lr must be > 0"),
        ("data.views.global_size=big", "data.views.global_size"),
    ],
)
def test_bad_overrides_exit_2_naming_the_key(capsys, override, message):
    assert main(["pretrain", "--print-config", override]) == 2
    assert message in capsys.readouterr().err


def test_missing_manifest_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["pretrain", "data.manifest=nothing_here.csv", "logging=none"]) == 2
    assert "data.manifest: nothing_here.csv: no such manifest" in capsys.readouterr().err


def test_demo_on_a_user_folder(tmp_path, capsys, monkeypatch):
    write_training_data(tmp_path / "user", volumes=3, images=4)
    monkeypatch.chdir(tmp_path)
    code = main(["demo", "--data", str(tmp_path / "user" / "data"), "--out", "demo", "--steps", "2", "--no-progress",
                 *FAST_DEMO])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert "demo data: 7 items (4 2D images, 3 3D volumes)" in out
    assert "mlflow ui --backend-store-uri" in out and "demo finished: backbone" in out
    assert "demo: --data: no closing comparison" in out
    assert out.strip().splitlines()[-1].startswith("demo: pictures of run joint-")  # it ends where the pictures are
    mlflow = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    runs = mlflow.search_runs([mlflow.get_experiment_by_name("medssl-demo").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert "loss/total" in runs[0].data.metrics and runs[0].data.params["method.name"] == "joint"
    assert list((tmp_path / "demo" / "runs").glob("*/backbone.pt"))


@pytest.mark.skipif(
    importlib.util.find_spec("nilearn") is None or importlib.util.find_spec("data_store") is None,
    reason="the demo packages (pip install -e '.[demo]': nilearn, pydicom-data) are not installed",
)
def test_demo_on_the_embedded_data(tmp_path, capsys, monkeypatch):
    """What `make demo` runs, for 2 steps: assemble the real images from pip packages, scan, cache, train, export,
    and the closing comparison on a small labelled set of phantoms."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(evaluation, "DEFAULT_SPEC", PhantomSetSpec(n=24))
    assert main(["demo", "--out", "outputs/demo", "--steps", "2", "--no-progress", *FAST_DEMO]) == 0
    out = capsys.readouterr().out
    assert "real: 10 (2 from nibabel, 1 from nilearn, 2 from pydicom, 5 from pydicom-data)" in out
    assert Path(tmp_path / "outputs" / "demo" / "demo_manifest.csv").is_file()
    assert "demo finished" in out
    assert "demo: exported the encoder as a MONAI bundle" in out
    assert (tmp_path / "outputs" / "demo" / "bundle" / "configs" / "metadata.json").is_file()
    assert re.search(r"matched (\d+)/\1 pretrained tensors", out)
    assert "closing comparison on 24 generated chest-radiograph phantoms (lesion 12, no_lesion 12)" in out
    assert "fitted on 12 images (12 phantoms), tested on 12 (12 phantoms)" in out
    number = r"([0-9.]+) \(95% CI ([0-9.]+) to ([0-9.]+)\)"
    signed = r"([-+][0-9.]+) \(95% CI ([-+][0-9.]+) to ([-+][0-9.]+)\)"
    auroc = re.search(rf"test AUROC \(95% CI from \d+ bootstrap resamples of the test phantoms\): pretrained {number}, "
                      rf"random init {number}; difference {signed}", out)  # fmt: skip
    assert auroc is not None, out
    values = [float(v) for v in auroc.groups()]
    for estimate, low, high in (values[0:3], values[3:6], values[6:9]):
        assert low <= estimate <= high
    low, high = values[7:9]
    sentence = "pretraining helped" if low > 0 else "pretraining did worse" if high < 0 else "no difference"
    lines = out.strip().splitlines()
    assert lines[-3].startswith(f"demo: {sentence} at this budget"), out
    assert lines[-2].startswith("demo finished: backbone")
    assert lines[-1].startswith("demo: pictures of run joint-") and "demo_comparison.png" in lines[-1]
    mlflow = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    (run,) = mlflow.search_runs([mlflow.get_experiment_by_name("medssl-demo").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["demo/auroc_difference_low"] == pytest.approx(low, abs=1e-3)
    assert "demo_comparison.png" in [a.path.split("/")[-1] for a in mlflow.list_artifacts(run.info.run_id, "pictures")]
