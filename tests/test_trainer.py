"""The pretraining loop end to end on small real files: every method, MLflow content, resume, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import monai.networks.nets as monai_nets
import pytest
import torch
from mlflow import MlflowClient
from training import tiny_overrides, write_training_data

from medssl.data.errors import ManifestError
from medssl.objectives.joint import JointObjective
from medssl.runtime.checkpoints import load_checkpoint
from medssl.train.config import compose_pretrain_config
from medssl.train.trainer import NonFiniteLossError, Trainer


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("train")
    return folder, write_training_data(folder)


def run(folder: Path, manifest: Path, *extra: str, callbacks=None):
    config = compose_pretrain_config(tiny_overrides(manifest, folder, *extra))
    return Trainer(config, project_dir=folder, callbacks=callbacks).fit()


def client(folder: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}")


def artifact_paths(mlflow: MlflowClient, run_id: str, path: str | None = None) -> list[str]:
    found = []
    for item in mlflow.list_artifacts(run_id, path):
        found.extend(artifact_paths(mlflow, run_id, item.path) if item.is_dir else [item.path])
    return found


def test_joint_run_logs_metrics_pictures_and_a_monai_backbone(dataset):
    folder, manifest = dataset
    result = run(folder, manifest, "trainer.max_steps=4", "run.name=joint")
    assert result.status == "finished" and result.step == 4
    mlflow = client(folder)
    logged = mlflow.get_run(result.run_id)
    assert logged.info.status == "FINISHED"
    metrics = logged.data.metrics
    for key in (
        "loss/total",
        "loss/intra",
        "loss/inter",
        "loss/mask",
        "lr",
        "throughput/samples_per_s",
        "throughput/data_wait_fraction",
        "health/intra_effective_prototypes",
        "health/inter_alignment",
    ):
        assert key in metrics, key
    assert [m.step for m in mlflow.get_metric_history(result.run_id, "loss/total")] == [1, 2, 3, 4]
    params = logged.data.params
    assert params["method.name"] == "joint" and params["trainer.max_steps"] == "4"
    assert params["model.encoder"] == "resnet10"
    artifacts = artifact_paths(mlflow, result.run_id)
    assert "config/pretrain.yaml" in artifacts and "data/summary.json" in artifacts
    assert "backbone/backbone.pt" in artifacts and "backbone/backbone.json" in artifacts
    assert any(a.endswith("checkpoints/step_00000004.pt") for a in artifacts)
    for picture in ("curves.png", "embeddings.png", "prototype_gallery.png", "prototype_usage.png"):
        assert any(a.endswith(picture) for a in artifacts), picture

    # The exported backbone is a plain MONAI ResNet: strict loading, same features as the trained encoder.
    meta = json.loads((result.output_dir / "backbone.json").read_text(encoding="utf-8"))
    assert meta["network"] == "monai.networks.nets.ResNet" and meta["run_id"] == result.run_id
    kwargs = dict(meta["kwargs"])
    kwargs["norm"] = tuple(kwargs["norm"]) if isinstance(kwargs["norm"], list) else kwargs["norm"]
    net = monai_nets.ResNet(**kwargs)
    net.load_state_dict(load_checkpoint(result.backbone), strict=True)
    assert net(torch.rand(2, 1, 32, 32)).shape == (2, meta["out_dim"])


def test_sepclr_uses_the_configured_group_names(tmp_path, monkeypatch):
    """``data.background=healthy data.target=patient``: the objective gets the patient rows as targets."""
    from medssl.objectives.sepclr import SepCLRLoss

    manifest = write_training_data(tmp_path, volumes=0, group_names=("healthy", "patient"))
    masks: list[torch.Tensor] = []
    forward = SepCLRLoss.forward

    def spy(self, c1, c2, s1, s2, is_target):  # type: ignore[no-untyped-def]
        masks.append(is_target.detach().cpu().clone())
        return forward(self, c1, c2, s1, s2, is_target)

    monkeypatch.setattr(SepCLRLoss, "forward", spy)
    seen: list[dict[str, float]] = []
    result = run(
        tmp_path,
        manifest,
        "method=sepclr",
        "data.background=healthy",
        "data.target=patient",
        "trainer.max_steps=2",
        "run.name=sepclr_groups",
        "logging=none",
        callbacks=[lambda step, metrics: seen.append(metrics)],
    )
    assert result.status == "finished" and result.step == 2
    # balanced batches of 4: the healthy half first, then the patient half
    assert [m.tolist() for m in masks] == [[False, False, True, True]] * 2
    assert all("health/salient_norm_target" in m and "health/salient_norm_background" in m for m in seen)
    assert all(torch.isfinite(torch.tensor(m["loss/sep"])) for m in seen)


def parameters(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(checkpoint)["objective"]


def test_sigterm_checkpoints_and_resume_matches_an_uninterrupted_run(dataset):
    folder, manifest = dataset
    common = ("trainer.max_steps=6", "trainer.checkpoint_every=0", "trainer.optimizer.warmup_steps=2")
    straight = run(folder, manifest, *common, "run.name=straight")

    def kill_at_3(step: int, metrics: dict[str, float]) -> None:
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    interrupted = run(folder, manifest, *common, "run.name=killed", callbacks=[kill_at_3])
    assert interrupted.status == "interrupted" and interrupted.step == 3
    assert interrupted.checkpoint is not None and interrupted.checkpoint.name == "step_00000003.pt"
    assert client(folder).get_run(interrupted.run_id).info.status == "KILLED"

    resumed = run(folder, manifest, *common, "run.name=killed")  # trainer.resume=auto
    assert resumed.status == "finished" and resumed.step == 6
    assert resumed.run_id == interrupted.run_id  # the MLflow run continues
    history = client(folder).get_metric_history(resumed.run_id, "loss/total")
    assert [m.step for m in history] == [1, 2, 3, 4, 5, 6]
    expected, got = parameters(straight.checkpoint), parameters(resumed.checkpoint)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)
    straight_loss = client(folder).get_metric_history(straight.run_id, "loss/total")
    assert [m.value for m in straight_loss] == [m.value for m in history]


def test_crash_resumes_from_the_last_periodic_checkpoint(dataset):
    folder, manifest = dataset
    common = ("trainer.max_steps=5", "trainer.checkpoint_every=2", "logging=none")
    straight = run(folder, manifest, *common, "run.name=straight-crash")

    def crash_at_3(step: int, metrics: dict[str, float]) -> None:
        if step == 3:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        run(folder, manifest, *common, "run.name=crashed", callbacks=[crash_at_3])
    latest = folder / "outputs" / "crashed" / "checkpoints" / "latest"
    assert latest.read_text(encoding="utf-8").strip() == "step_00000002.pt"
    resumed = run(folder, manifest, *common, "run.name=crashed")
    assert resumed.step == 5
    expected, got = parameters(straight.checkpoint), parameters(resumed.checkpoint)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)
    # keep_checkpoints=2 (trainer/cpu.yaml): older step files are pruned
    kept = sorted(p.name for p in (folder / "outputs" / "crashed" / "checkpoints").glob("step_*.pt"))
    assert kept == ["step_00000004.pt", "step_00000005.pt"]


def test_gradient_accumulation_sees_the_same_samples(dataset):
    folder, manifest = dataset
    result = run(folder, manifest, "trainer.max_steps=2", "trainer.accumulate=2", "run.name=accum", "logging=none")
    state = load_checkpoint(result.checkpoint)
    assert state["streams"] == {"images": 2, "stacks": 2}
    with pytest.raises(ValueError, match=r"trainer\.batch\.stacks=2 must be a multiple of .* = 4"):
        run(folder, manifest, "trainer.accumulate=4", "run.name=accum4", "logging=none")


def test_a_compute_budget_stops_the_run_as_finished_with_its_backbone(dataset, capsys):
    folder, manifest = dataset
    result = run(folder, manifest, "trainer.max_steps=50", "trainer.max_minutes=0.0001", "run.name=budget",
                 "logging=none")  # fmt: skip
    assert result.status == "finished" and result.step == 1
    assert result.backbone is not None and result.backbone.is_file()
    assert "trainer.max_minutes=0.0001 reached at step 1" in capsys.readouterr().out
    with pytest.raises(ValueError, match="max_minutes must be > 0"):
        run(folder, manifest, "trainer.max_minutes=0", "run.name=budget0", "logging=none")


def _logging_health(monkeypatch: pytest.MonkeyPatch, **values: float) -> None:
    """The joint objective reports these ``health/intra_*`` values (a state the alarm must recognise)."""
    original = JointObjective.forward

    def reporting(self, *args, **kwargs):
        loss, metrics = original(self, *args, **kwargs)
        metrics.update({f"health/intra_{name}": torch.tensor(value) for name, value in values.items()})
        return loss, metrics

    monkeypatch.setattr(JointObjective, "forward", reporting)


def test_a_swav_run_in_a_cone_raises_a_health_warning_in_the_log_and_mlflow(dataset, monkeypatch, capsys):
    folder, manifest = dataset
    _logging_health(monkeypatch, prediction_entropy=1.0, uniformity=-0.5)  # trivial solution, embeddings in a cone
    result = run(folder, manifest, "trainer.max_steps=7", "run.name=collapsed", "method=swav2d")
    out = capsys.readouterr().out
    assert out.count("health warning at step 5: the L_intra embeddings are drawn into a cone") == 1  # windows 1..5
    tags = client(folder).get_run(result.run_id).data.tags
    assert tags["health_warning_intra"].startswith("health warning at step 5")
    assert "predictions are (nearly) uniform over the prototypes too" in tags["health_warning_intra"]


def test_uniform_predictions_with_spread_embeddings_are_a_health_note(dataset, monkeypatch, capsys):
    folder, manifest = dataset
    _logging_health(monkeypatch, prediction_entropy=1.0, uniformity=-3.5)  # clustering not started, embeddings spread
    result = run(folder, manifest, "trainer.max_steps=7", "run.name=notstarted", "method=swav2d")
    out = capsys.readouterr().out
    assert out.count("health note at step 5: L_intra predictions are (nearly) uniform") == 1
    assert "health warning" not in out
    tags = client(folder).get_run(result.run_id).data.tags
    assert tags["health_note_intra"].startswith("health note at step 5") and "health_warning_intra" not in tags


def test_a_learning_swav_run_raises_no_health_warning(dataset, monkeypatch, capsys):
    folder, manifest = dataset
    original = JointObjective.forward

    def learning(self, *args, **kwargs):  # 7 steps are too few to leave ln K: report the gap of a learning run
        loss, metrics = original(self, *args, **kwargs)
        assert 0.0 < float(metrics["health/intra_prediction_entropy"]) < 0.98  # the real, non-uniform predictions
        metrics["health/intra_gap_to_uniform"] = torch.tensor(1.3)
        return loss, metrics

    monkeypatch.setattr(JointObjective, "forward", learning)
    result = run(folder, manifest, "trainer.max_steps=7", "run.name=healthy", "method=swav2d")
    assert "health warning" not in capsys.readouterr().out
    metrics = client(folder).get_run(result.run_id).data.metrics
    assert 0.0 < metrics["health/intra_prediction_entropy"] < 0.98
    assert metrics["health/intra_gap_to_uniform"] == pytest.approx(1.3)


def test_prototypes_frozen_for_the_whole_run_raise_a_configuration_warning(dataset, capsys):
    folder, manifest = dataset
    frozen = run(folder, manifest, "trainer.max_steps=3", "run.name=frozen-prototypes",
                 "method.objective.freeze_prototypes_steps=3")  # fmt: skip
    out = capsys.readouterr().out
    assert out.count("the L_intra and L_inter prototypes are frozen for 3 steps") == 1
    tags = client(folder).get_run(frozen.run_id).data.tags
    assert tags["health_warning_prototypes"].startswith("configuration warning")
    moving = run(folder, manifest, "trainer.max_steps=3", "run.name=moving-prototypes",
                 "method.objective.freeze_prototypes_steps=2")  # fmt: skip
    assert "configuration warning" not in capsys.readouterr().out
    assert "health_warning_prototypes" not in client(folder).get_run(moving.run_id).data.tags


def test_non_finite_loss_stops_with_a_clear_message(dataset, monkeypatch):
    folder, manifest = dataset
    original = JointObjective.forward

    def poisoned(self, *args, **kwargs):
        loss, metrics = original(self, *args, **kwargs)
        if kwargs.get("step") == 1:
            loss = loss * float("nan")
            metrics["loss/total"] = loss.detach()
        return loss, metrics

    monkeypatch.setattr(JointObjective, "forward", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 1 .*loss/total=nan"):
        run(folder, manifest, "trainer.max_steps=3", "run.name=nan")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.optimizer.name=adam", r"trainer\.optimizer: name must be one of"),
        ("trainer.max_step=3", r"trainer\.max_step"),
        ("method=byol", r"method/byol.*Available options"),
        ("model.norm=layer", r"model: norm must be one of"),
        ("trainer.resume=/nonexistent/run", r"trainer\.resume: /nonexistent/run"),
        ("data.manifest=/nonexistent.csv", r"data\.manifest: /nonexistent\.csv"),
    ],
)
def test_bad_configuration_names_the_key(dataset, override, message):
    folder, manifest = dataset
    with pytest.raises((ValueError, FileNotFoundError, ManifestError), match=message):
        run(folder, manifest, override, "run.name=bad", "logging=none")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_paths_run_on_cpu(dataset, precision):
    """bf16 autocast, and fp16 with the gradient scaler (unscaled before clipping); the GPU figures are in
    BENCHMARKS.md when a GPU was available."""
    folder, manifest = dataset
    result = run(
        folder, manifest, f"trainer.precision={precision}", "trainer.max_steps=2", f"run.name={precision}",
        "logging=none",
    )  # fmt: skip
    state = load_checkpoint(result.checkpoint)
    assert result.status == "finished"
    assert bool(state["scaler"]) == (precision == "fp16")  # the scaler's state exists only when it is enabled
    assert all(torch.isfinite(v).all() for v in state["objective"].values() if v.is_floating_point())


def test_loader_workers_do_not_change_the_run(dataset):
    """Samples are seeded by (seed, epoch, index): 0 or 2 worker processes give the same parameters."""
    folder, manifest = dataset
    common = ("trainer.max_steps=2", "logging=none")
    serial = run(folder, manifest, *common, "run.name=w0")
    parallel = run(folder, manifest, *common, "run.name=w2", "trainer.num_workers=2")
    expected, got = parameters(serial.checkpoint), parameters(parallel.checkpoint)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)


def test_sigterm_to_the_process_group_with_loader_workers(dataset):
    """As Ctrl-C or a scheduler does it: every process of the group (main and DataLoader workers) gets the signal;
    the workers ignore it, the main process finishes its step, checkpoints and exits 143; the rerun resumes."""
    folder, manifest = dataset
    overrides = tiny_overrides(
        manifest, folder, "trainer.max_steps=400", "trainer.checkpoint_every=1", "trainer.num_workers=2",
        "logging=none", "run.name=group-kill",
    )  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "medssl", "pretrain", *overrides]
    process = subprocess.Popen(command, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)  # fmt: skip
    latest = folder / "outputs" / "group-kill" / "checkpoints" / "latest"
    deadline = time.monotonic() + 240
    while not latest.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    if process.poll() is not None:  # ended before its first checkpoint: show why
        pytest.fail(f"the run ended early (exit {process.returncode}): {process.communicate()[0][-3000:]}")
    os.killpg(process.pid, signal.SIGTERM)
    output, _ = process.communicate(timeout=240)
    assert process.returncode == 143, output[-3000:]
    assert "interrupted at step" in output and "resume with" in output
    step = load_checkpoint(folder / "outputs" / "group-kill" / "checkpoints" / latest.read_text().strip())["step"]
    assert 1 <= step < 400
    resumed = run(folder, manifest, f"trainer.max_steps={step + 1}", "logging=none", "run.name=group-kill")
    assert resumed.status == "finished" and resumed.step == step + 1


def test_a_metric_that_is_not_a_scalar_tensor_stops_the_run_naming_it(tmp_path, monkeypatch):
    """Metrics are 0-d tensors; a float or a vector was dropped silently before (the embedding std was)."""
    from medssl.objectives.baseline import SimCLRObjective

    real_forward = SimCLRObjective.forward

    def with_a_float(self, *args, **kwargs):
        loss, metrics = real_forward(self, *args, **kwargs)
        return loss, {**metrics, "health/as_float": 0.5}

    monkeypatch.setattr(SimCLRObjective, "forward", with_a_float)
    manifest = write_training_data(tmp_path, volumes=2, images=8)
    config = compose_pretrain_config(
        tiny_overrides(manifest, tmp_path, "method=simclr", "trainer.max_steps=1", "logging=none")
    )
    with pytest.raises(TypeError, match="'health/as_float' is a float"):
        Trainer(config, project_dir=tmp_path).fit()
