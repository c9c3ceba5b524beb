"""MLflow tracking: a run in a temporary SQLite store, resume, disabled ranks, params, metrics, artifacts."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shlex
import shutil
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import torch
import yaml
from filelock import FileLock
from matplotlib.figure import Figure
from mlflow import MlflowClient
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH
from sqlalchemy import event
from sqlalchemy.engine import Engine

from medssl.runtime.tracking import (
    TRUNCATION_MARKER,
    Tracker,
    default_tracking_uri,
    flatten_config,
    manifest_fingerprint,
    sanitize_name,
    ui_command,
)


@dataclasses.dataclass
class Template:
    project: Path
    run_id: str
    artifact_uri: str


@pytest.fixture(scope="session")
def template(tmp_path_factory) -> Template:
    """A project whose default store a ``Tracker`` created from nothing; the other tests copy its
    initialised database (20 ms). MLflow creates the SQLite schema through ~100 migrations, each
    committed with an fsync: 1 s on an idle disk, 5-10 s on a busy one. So fsync is off meanwhile,
    and pytest-xdist workers share one template (the first makes it, under a file lock)."""

    def no_fsync(connection, _record) -> None:
        connection.execute("PRAGMA synchronous=OFF")

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # common to the workers of this session
    root = shared / "mlflow-template"
    record = root / "template.json"
    with FileLock(str(shared / "mlflow-template.lock")):
        if not record.is_file():
            (root / "cwd").mkdir(parents=True, exist_ok=True)
            event.listen(Engine, "connect", no_fsync)
            try:
                with pytest.MonkeyPatch.context() as patch:
                    patch.delenv("MLFLOW_TRACKING_URI", raising=False)
                    patch.chdir(root / "cwd")
                    tracker = Tracker(default_tracking_uri(root / "project"), "template")
                    tracker.log_text("x", "x.txt")
                    tracker.finish()
            finally:
                event.remove(Engine, "connect", no_fsync)
            record.write_text(json.dumps([tracker.run_id, tracker.artifact_uri]), encoding="utf-8")
    run_id, artifact_uri = json.loads(record.read_text(encoding="utf-8"))
    return Template(root / "project", run_id, artifact_uri)


@pytest.fixture
def fresh_store(tmp_path, monkeypatch) -> str:
    """The default store of a project in ``tmp_path`` (not created yet), no server configured, a scratch cwd."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return default_tracking_uri(tmp_path / "project")


@pytest.fixture
def store(fresh_store, tmp_path, template) -> str:
    """``fresh_store`` with its database already initialised (a copy of the template's)."""
    target = tmp_path / "project" / "mlruns" / "mlflow.db"
    target.parent.mkdir(parents=True)
    shutil.copyfile(template.project / "mlruns" / "mlflow.db", target)
    return fresh_store


def local_path(uri: str) -> Path:
    return Path(unquote(urlparse(uri).path))


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_a_new_project_store_is_created_inside_the_project(template, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    expected = (tmp_path.resolve() / "p" / "mlruns" / "mlflow.db").as_posix()
    assert default_tracking_uri(tmp_path / "p") == "sqlite:///" + expected
    assert not (tmp_path / "p").exists(), "default_tracking_uri creates nothing"
    assert sorted(p.name for p in (template.project / "mlruns").iterdir()) == ["artifacts", "mlflow.db"]
    artifacts = local_path(template.artifact_uri)
    assert artifacts == template.project.resolve() / "mlruns" / "artifacts" / template.run_id / "artifacts"
    assert (artifacts / "x.txt").read_text(encoding="utf-8") == "x"
    assert not any((template.project.parent / "cwd").iterdir()), "nothing in the working folder (no ./mlruns)"


def test_a_run_gets_params_metrics_and_artifacts(store, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_DISABLE_TELEMETRY", raising=False)
    project = tmp_path.resolve() / "project"
    assert store.startswith("sqlite:///") and store.endswith("project/mlruns/mlflow.db")
    tracker = Tracker(store, "pretrain", run_name="smoke", tags={"medssl.method": "joint"})
    run_id = tracker.run_id
    assert logging.getLogger("mlflow.store.db.utils").getEffectiveLevel() >= logging.WARNING, "no INFO chatter"
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true", "MLflow's usage telemetry is off"
    assert run_id and tracker.tracking_uri == store
    artifacts = local_path(tracker.artifact_uri or "")
    assert artifacts.is_relative_to(project / "mlruns" / "artifacts"), tracker.artifact_uri

    tracker.log_params(flatten_config({"optim": {"lr": 0.001, "betas": [0.9, 0.999]}, "seed": 3}))
    for step, loss in enumerate([2.0, 1.5, 1.25]):
        tracker.log_metrics({"loss/total": loss, "health/std_mean": torch.tensor(0.5 + step)}, step=step)
    tracker.log_text("héllo\n", "notes/readme.txt")
    tracker.log_dict({"crop": (96, 96), "path": Path("a/b"), "name": "x"}, "config/resolved.yaml")
    tracker.log_dict({"a": [1, 2]}, "data/summary.json")
    fig = Figure()
    fig.add_subplot(1, 1, 1).plot([0, 1], [1, 0])
    tracker.log_figure(fig, "pictures/curves.png")
    assert not fig.axes, "log_figure closes (clears) the figure"
    extra = tmp_path / "backbone.json"
    extra.write_text('{"ok": true}', encoding="utf-8")
    tracker.log_artifact(extra, "backbone")
    tracker.set_tags({"medssl.resumed": False})
    with pytest.raises(ValueError, match=r"relative file path"):
        tracker.log_text("x", "../escape.txt")
    with pytest.raises(ValueError, match=r"status must be one of"):
        tracker.finish("DONE")
    tracker.finish()
    tracker.finish()  # idempotent
    with pytest.raises(RuntimeError, match=r"already finished"):
        tracker.log_metrics({"loss/total": 1.0}, step=3)

    client = MlflowClient(store)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "smoke"
    assert run.data.params == {"optim.lr": "0.001", "optim.betas": "[0.9, 0.999]", "seed": "3"}
    assert run.data.tags["medssl.method"] == "joint"
    assert run.data.tags["medssl.resumed"] == "False"
    assert history(client, run_id, "loss/total") == [(0, 2.0), (1, 1.5), (2, 1.25)]
    assert history(client, run_id, "health/std_mean") == [(0, 0.5), (1, 1.5), (2, 2.5)]

    listed = {a.path for a in client.list_artifacts(run_id)}
    assert listed == {"notes", "config", "data", "pictures", "backbone"}
    assert (artifacts / "notes" / "readme.txt").read_text(encoding="utf-8") == "héllo\n"
    resolved = yaml.safe_load((artifacts / "config" / "resolved.yaml").read_text(encoding="utf-8"))
    assert resolved == {"crop": [96, 96], "path": "a/b", "name": "x"}
    assert (artifacts / "data" / "summary.json").read_text(encoding="utf-8").startswith("{")
    assert (artifacts / "pictures" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (artifacts / "backbone" / "backbone.json").is_file()
    assert not any((tmp_path / "cwd").iterdir()), "nothing is written to the working folder (no ./mlruns)"


def test_metrics_skip_non_finite_and_non_numeric_values_and_sanitise_names(store):
    tracker = Tracker(store, "pretrain")
    tracker.log_metrics(
        {
            "loss/total": float("nan"),
            "loss/intra": math.inf,
            "stage": "joint",
            "health/ok": 1.0,
            "weird: name?": 2,
            "/health//double/": 3.0,
        },
        step=5,
    )
    tracker.log_metrics({"loss/total": 0.5}, step=6)
    tracker.finish()
    run = MlflowClient(store).get_run(tracker.run_id)
    assert run.data.metrics == {"health/ok": 1.0, "weird_ name_": 2.0, "health/double": 3.0, "loss/total": 0.5}
    assert history(MlflowClient(store), tracker.run_id, "loss/total") == [(6, 0.5)]
    assert sanitize_name("a/./../b") == "a/_/_/b"
    assert sanitize_name("") == "_"


def test_resume_continues_the_same_run(store):
    config = {"optim": {"lr": 0.001}, "trainer": {"max_steps": 10}}
    first = Tracker(store, "pretrain", run_name="r")
    first.log_params(flatten_config(config))
    first.log_metrics({"loss/total": 3.0}, step=0)
    first.log_metrics({"loss/total": 2.0}, step=1)
    first.finish("KILLED")
    client = MlflowClient(store)
    assert client.get_run(first.run_id).info.status == "KILLED"

    second = Tracker(store, "pretrain", run_id=first.run_id, tags={"medssl.resumed": "True"})
    assert second.run_id == first.run_id and second.resumed
    assert second.artifact_uri == first.artifact_uri
    assert client.get_run(first.run_id).info.status == "RUNNING"
    second.log_params(flatten_config(config))  # same values: no error
    second.log_metrics({"loss/total": 1.0}, step=2)
    with pytest.raises(ValueError, match=r"'optim\.lr'.*'0\.001'.*'0\.01'"):
        second.log_params(flatten_config({"optim": {"lr": 0.01}, "trainer": {"max_steps": 10}}))
    second.log_params({"trainer.max_steps": "20", "trainer.new": "1"}, allow_changes=True)
    second.finish()

    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert history(client, first.run_id, "loss/total") == [(0, 3.0), (1, 2.0), (2, 1.0)]
    assert run.data.params == {"optim.lr": "0.001", "trainer.max_steps": "10", "trainer.new": "1"}
    assert run.data.tags["medssl.resumed"] == "True"
    assert run.data.tags["medssl.changed_params"] == "trainer.max_steps"
    assert len(client.search_runs([run.info.experiment_id])) == 1

    with pytest.raises(ValueError, match=r"cannot resume MLflow run 'f+'"):
        Tracker(store, "pretrain", run_id="f" * 32)


def test_context_manager_marks_a_crashed_run_failed(store):
    with pytest.raises(RuntimeError, match=r"boom"), Tracker(store, "pretrain") as tracker:
        tracker.log_metrics({"loss/total": 1.0}, step=0)
        raise RuntimeError("boom")
    assert MlflowClient(store).get_run(tracker.run_id).info.status == "FAILED"


def test_a_disabled_tracker_does_nothing(fresh_store, tmp_path):
    store = fresh_store  # no database yet: a disabled tracker must not create one
    tracker = Tracker(store, "pretrain", run_name="rank1", enabled=False)
    assert tracker.run_id is None and tracker.artifact_uri is None
    tracker.log_params({"a": "1"})
    tracker.log_metrics({"loss/total": 1.0}, step=0)
    tracker.log_text("x", "a.txt")
    tracker.log_dict({"a": 1}, "a.yaml")
    tracker.log_artifact(tmp_path / "missing.bin")
    tracker.set_tags({"a": "b"})
    fig = Figure()
    fig.add_subplot(1, 1, 1)
    tracker.log_figure(fig, "f.png")
    assert not fig.axes, "the figure is closed on every rank"
    tracker.finish("FAILED")
    with Tracker(store, "pretrain", enabled=False):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd"]
    assert not any((tmp_path / "cwd").iterdir())


def test_flatten_config_nested_values():
    @dataclasses.dataclass
    class Views:
        sizes: tuple[int, ...] = (96, 32)
        mode: str = "bilinear"

    config = {
        "model": {"encoder": "resnet18", "intra_prototypes": [512, 256], "embed_dim": None, "multiscale": False},
        "data": {"views": Views(), "root": Path("data/x"), "extra": {}},
        "lists": [{"a": 1}, [2, 3]],
        "seed": 0,
        "long": "x" * (MAX_PARAM_VAL_LENGTH + 50),
    }
    flat = flatten_config(config)
    assert flat["model.encoder"] == "resnet18"
    assert flat["model.intra_prototypes"] == "[512, 256]"
    assert flat["model.embed_dim"] == "None"
    assert flat["model.multiscale"] == "False"
    assert flat["data.views.sizes"] == "[96, 32]"
    assert flat["data.views.mode"] == "bilinear"
    assert flat["data.root"] == "data/x"
    assert flat["data.extra"] == "{}"
    assert flat["lists"] == '[{"a": 1}, [2, 3]]'
    assert flat["seed"] == "0"
    assert len(flat["long"]) == MAX_PARAM_VAL_LENGTH and flat["long"].endswith(TRUNCATION_MARKER)
    assert all(isinstance(v, str) for v in flat.values())
    assert flatten_config({"a": {"b": 1}}, prefix="cfg") == {"cfg.a.b": "1"}


def test_the_environment_tracking_uri_wins(tmp_path, monkeypatch, template):
    (tmp_path / "server").mkdir()
    shutil.copyfile(template.project / "mlruns" / "mlflow.db", tmp_path / "server" / "mlflow.db")
    server_store = f"sqlite:///{(tmp_path / 'server' / 'mlflow.db').as_posix()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server_store)
    monkeypatch.chdir(tmp_path)
    assert default_tracking_uri(tmp_path / "project") == server_store
    tracker = Tracker(None, "from-env")
    tracker.log_metrics({"loss/total": 1.0}, step=0)
    tracker.finish()
    assert tracker.tracking_uri == server_store
    assert MlflowClient(server_store).get_run(tracker.run_id).data.metrics == {"loss/total": 1.0}
    assert local_path(tracker.artifact_uri or "").is_relative_to(tmp_path.resolve() / "server" / "artifacts")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["server"]


def test_ui_command_names_the_store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = default_tracking_uri(tmp_path / "my project")
    command = ui_command(uri)
    assert command.startswith("mlflow ui --backend-store-uri ")
    assert shlex.split(command) == ["mlflow", "ui", "--backend-store-uri", uri]
    assert "http://server:5000" in ui_command("http://server:5000")


def test_manifest_fingerprint_is_a_hash_only(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("# medssl-manifest v1\nid,path\nabc,patient_smith/1.dcm\n", encoding="utf-8")
    fingerprint = manifest_fingerprint(manifest)
    assert fingerprint["sha256"] == hashlib.sha256(manifest.read_bytes()).hexdigest()
    assert fingerprint["sha256_short"] == fingerprint["sha256"][:12]
    assert set(fingerprint) == {"sha256", "sha256_short"}
    assert not any("smith" in v or "m.csv" in v for v in fingerprint.values())
    manifest.write_text("# medssl-manifest v1\nid,path\nabd,patient_smith/1.dcm\n", encoding="utf-8")
    assert manifest_fingerprint(manifest)["sha256"] != fingerprint["sha256"]
