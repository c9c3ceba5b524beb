"""The backbone as an MLflow model: logged at the end of a pretraining run (offline), loaded with
``mlflow.pytorch.load_model`` to the bundle's features, registered with ``logging.register_as`` and used as
``model.pretrained=models:/NAME@ALIAS`` by ``medssl finetune`` and ``medssl export``; the run's provenance tags."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import socket
import subprocess
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pytorch
import monai
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from mlflow.models import Model
from sqlalchemy import event
from sqlalchemy.engine import Engine
from training import tiny_overrides, write_training_data

from medssl.cli import main
from medssl.data.manifest import read_manifest, write_manifest
from medssl.downstream.common import load_backbone
from medssl.export.bundle import export_bundle
from medssl.export.sources import EXAMPLE_BATCH, MODEL_NAME, resolve_source
from medssl.runtime.checkpoints import load_checkpoint
from medssl.runtime.tracking import git_state, provenance_tags, use_tracking_uri
from medssl.train.config import compose_pretrain_config
from medssl.train.trainer import Trainer, TrainResult

REGISTERED = "medssl-test-backbone"


@dataclasses.dataclass
class Pretrained:
    folder: Path
    labelled: Path  # a manifest labelled for a classification probe
    uri: str  # the tracking URI
    result: TrainResult
    connections: list[Any]  # network connections attempted during the run


def _no_fsync(connection: Any, _record: Any) -> None:
    """MLflow creates a SQLite store through ~100 migrations, each fsynced: seconds on a busy disk."""
    connection.execute("PRAGMA synchronous=OFF")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Pretrained:
    """A two-step SimCLR run on 12 images that logs and registers its backbone model, with the network cut off."""
    folder = tmp_path_factory.mktemp("mlflow-model")
    manifest = write_training_data(folder, volumes=0, images=12)
    rows = []
    for row in read_manifest(manifest).rows:
        number = int(Path(row.path).stem.removeprefix("img"))
        rows.append(type(row)(**{**row.__dict__, "label": row.group, "split": "test" if number >= 8 else "train"}))
    labelled = folder / "labelled.csv"
    write_manifest(labelled, rows, folder / "data")
    uri = f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}"
    overrides = tiny_overrides(manifest, folder, "method=simclr", "trainer.max_steps=2", "run.name=pre",
                               "logging.pictures.samples=0", "logging.log_model=true",
                               f"logging.register_as={REGISTERED}")  # fmt: skip
    config = compose_pretrain_config(overrides)
    connections: list[Any] = []

    def refuse(sock: socket.socket, address: Any) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            connections.append(address)
            raise OSError(f"network access in a test: {address}")
        return original(sock, address)

    original = socket.socket.connect
    event.listen(Engine, "connect", _no_fsync)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.delenv("MLFLOW_TRACKING_URI", raising=False)
            patch.setattr(socket.socket, "connect", refuse)
            result = Trainer(config, project_dir=folder).fit()
    finally:
        event.remove(Engine, "connect", _no_fsync)
    assert result.status == "finished"
    return Pretrained(folder, labelled, uri, result, connections)


def finetune(pre: Pretrained, *extra: str) -> int:
    """A linear probe (the quickest ``medssl finetune``) on the labelled images at 32 px."""
    return main(["finetune", f"data.manifest={pre.labelled}", f"data.cache_dir={pre.folder / 'cache'}",
                 "data.cache_workers=1", "data.preprocess.percentiles=[0,100]", "data.size=32",
                 "model.encoder=resnet10", f"tracking_uri={pre.uri}", "progress=false", *extra])  # fmt: skip


def test_the_logged_model_loads_offline_and_gives_the_bundles_features(pretrained, tmp_path, capsys):
    pre = pretrained
    assert pre.connections == [], "logging the model reached for the network"
    run = MlflowClient(pre.uri).get_run(pre.result.run_id or "")
    tags = run.data.tags
    assert "medssl.model_error" not in tags
    assert tags["medssl.model_uri"].startswith("models:/m-")
    assert tags["medssl.registered_model"] == f"models:/{REGISTERED}/1"
    assert tags["medssl.registered_alias"] == f"models:/{REGISTERED}@current"
    assert (pre.result.output_dir / "backbone.pt").is_file(), "today's files are kept"
    assert {a.path for a in MlflowClient(pre.uri).list_artifacts(run.info.run_id, "backbone")} >= {
        "backbone/backbone.pt",
        "backbone/backbone.json",
    }

    with use_tracking_uri(pre.uri):
        model = mlflow.pytorch.load_model(f"models:/{REGISTERED}@current")
        local = Path(mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/{MODEL_NAME}", dst_path=tmp_path))
    assert not mlflow.is_tracking_uri_set(), "the global tracking URI is restored"

    bundle = export_bundle(str(pre.result.output_dir), tmp_path / "bundle", log_to_mlflow=False)
    network = load_backbone(str(bundle)).network.eval()
    torch.manual_seed(0)
    for shape in [(3, 1, 32, 32), (1, 1, 40, 48)]:  # any batch and size: the example's batch 2 kept them dynamic
        images = torch.rand(shape)
        with torch.no_grad():
            expected = network(images)
            torch.testing.assert_close(model(images), expected, rtol=1e-5, atol=1e-5)
    weights = load_checkpoint(pre.result.output_dir / "backbone.pt")
    assert set(model.state_dict()) == set(weights)
    for key, value in weights.items():
        torch.testing.assert_close(model.state_dict()[key].cpu(), value, rtol=0, atol=0)

    mlmodel = Model.load(str(local))
    assert mlmodel.run_id == run.info.run_id
    assert mlmodel.metadata["medssl"]["run_name"] == "pre" and mlmodel.metadata["medssl"]["out_dim"] == 512
    assert (local / "data" / "model.pt2").is_file(), "torch.export format: loads without pickle or medssl"
    assert mlmodel.signature.inputs.inputs[0].shape == (-1, 1, -1, -1)
    assert mlmodel.signature.outputs.inputs[0].shape == (-1, 512)
    example = np.asarray(json.loads((local / "input_example.json").read_text(encoding="utf-8")))
    assert example.shape == (EXAMPLE_BATCH, 1, 32, 32)  # the run's channels and global crop size
    requirements = (local / "requirements.txt").read_text(encoding="utf-8").split()
    assert f"medssl=={importlib.metadata.version('medssl')}" in requirements
    assert f"torch=={torch.__version__.split('+')[0]}" in requirements
    assert f"monai=={monai.__version__}" in requirements


def test_the_run_is_tagged_with_the_versions_and_git_commit_of_the_code(pretrained, tmp_path, monkeypatch):
    tags = MlflowClient(pretrained.uri).get_run(pretrained.result.run_id or "").data.tags
    assert tags["medssl.version"] == importlib.metadata.version("medssl")
    assert tags["torch.version"] == torch.__version__
    assert tags["monai.version"] == monai.__version__
    package = Path(__file__).resolve().parents[1] / "medssl"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=package, capture_output=True, text=True, check=False)
    if head.returncode == 0:  # tests run from a checkout
        assert tags["medssl.git_commit"] == tags["mlflow.source.git.commit"] == head.stdout.strip()
        assert tags["medssl.git_dirty"] in ("true", "false")
    else:  # an unpacked source tree
        assert "medssl.git_commit" not in tags
    # no checkout, or no git at all: no git tags, no error
    (tmp_path / "__init__.py").write_text("", encoding="utf-8")
    assert git_state(tmp_path) == {}
    monkeypatch.setenv("PATH", str(tmp_path))
    assert git_state() == {}
    assert "medssl.git_commit" not in provenance_tags() and "torch.version" in provenance_tags()


def test_a_registered_model_serves_finetune_and_export(pretrained, tmp_path, capsys):
    pre = pretrained
    weights = load_checkpoint(pre.result.output_dir / "backbone.pt")
    assert finetune(pre, f"model.pretrained=models:/{REGISTERED}@current") == 0
    out = capsys.readouterr().out
    assert f"matched {len(weights)}/{len(weights)} pretrained tensors" in out
    assert f"(run {pre.result.run_id})" in out
    client = MlflowClient(pre.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("medssl-finetune").experiment_id])
    pretraining = client.get_run(pre.result.run_id or "").data.tags
    for key in ("medssl.version", "torch.version", "monai.version", "medssl.git_commit"):
        assert run.data.tags.get(key) == pretraining.get(key), key  # the fine-tuning run is tagged too

    out_dir = tmp_path / "bundle"
    command = ["export", f"models:/{REGISTERED}/1", "--out", str(out_dir), "--tracking-uri", pre.uri, "--no-mlflow"]
    assert main(command) == 0
    exported = torch.load(out_dir / "models" / "model.pt", weights_only=True)
    assert set(exported) == set(weights) and all(torch.equal(exported[k], weights[k]) for k in weights)
    metadata = json.loads((out_dir / "configs" / "metadata.json").read_text(encoding="utf-8"))["medssl"]
    assert metadata["run_id"] == pre.result.run_id and metadata["method"] == "simclr", "the source run's config"

    by_run = resolve_source(f"runs:/{pre.result.run_id}/{MODEL_NAME}", pre.uri)
    assert by_run.run_name == "pre" and all(torch.equal(by_run.weights[k], weights[k]) for k in weights)


def test_a_model_uri_that_does_not_resolve_names_the_store(pretrained, tmp_path, capsys):
    pre = pretrained
    command = ["export", f"models:/{REGISTERED}@nope", "--out", str(tmp_path / "b"), "--tracking-uri", pre.uri]
    assert main(command) == 2
    err = capsys.readouterr().err
    assert f"models:/{REGISTERED}@nope: not found in the MLflow store {pre.uri}" in err
    assert finetune(pre, "model.pretrained=models:/no-such-model/1", "mlflow=false") == 2
    assert f"not found in the MLflow store {pre.uri}" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_a_model_that_fails_to_log_is_a_warning_not_a_failed_run(monkeypatch, capsys):
    import medssl.train.backbone_model as backbone_model

    class Recorder:
        enabled, run_id = True, "r"

        def __init__(self) -> None:
            self.tags: dict[str, str] = {}

        def set_tags(self, tags: dict[str, str]) -> None:
            self.tags.update(tags)

    def broken(*_args: Any, **_kwargs: Any) -> str:
        raise OSError("artifact store unreachable")

    monkeypatch.setattr(backbone_model, "log_backbone_model", broken)
    tracker = Recorder()
    trainer = Trainer(compose_pretrain_config([]))
    trainer._log_backbone_model(tracker, {"run_name": "pre"}, {})
    assert (
        "backbone not logged as an MLflow model (OSError: artifact store unreachable)"
        in tracker.tags["medssl.model_error"]
    )
    assert "pre: warning: backbone not logged as an MLflow model" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("logging.register_alias=latest", r"logging\.register_alias: .*reserves"),
        ("logging.register_alias=v2", r"logging\.register_alias"),
        ("logging.register_as=a/b", r"logging\.register_as: a model name without"),
    ],
)
def test_bad_registration_settings_name_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        compose_pretrain_config([override])
    with pytest.raises(ValueError, match=r"logging\.register_as needs .*log_model=true"):
        compose_pretrain_config(["logging.register_as=x", "logging.log_model=false"])


def test_a_registered_model_serves_embed(pretrained, tmp_path, capsys):
    """``medssl embed model.pretrained=models:/NAME@ALIAS``: the registered backbone, rows as many as the manifest's."""
    from medssl.data.manifest import read_manifest
    from medssl.downstream.embed import read_embeddings

    pre = pretrained
    out = tmp_path / "embeddings.pt"
    command = ["embed", f"model.pretrained=models:/{REGISTERED}@current", f"data.manifest={pre.labelled}",
               f"data.cache_dir={pre.folder / 'cache'}", "data.preprocess.percentiles=[0,100]", "data.size=32",
               "model.encoder=resnet10", f"tracking_uri={pre.uri}", f"out={out}"]  # fmt: skip
    assert main(command) == 0, capsys.readouterr().err
    weights = load_checkpoint(pre.result.output_dir / "backbone.pt")
    assert f"matched {len(weights)}/{len(weights)} pretrained tensors" in capsys.readouterr().out
    table = read_embeddings(out)
    rows = read_manifest(pre.labelled).rows
    assert set(table.ids) == {row.id for row in rows} and table.embeddings.shape[0] >= len(rows)
