"""Trainer start-up features on tiny runs: a wall-clock budget that schedules the run (``trainer.max_minutes``), a
2D-only archive under the joint method, and ``trainer.init_from``. Budgets run on a fake clock: nothing here depends
on how fast the machine is."""

from __future__ import annotations

import math
import os
import re
import signal
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from training import tiny_overrides, write_training_data

from medssl.data.errors import ManifestError
from medssl.objectives.joint import JointObjective
from medssl.runtime.checkpoints import load_checkpoint, save_checkpoint
from medssl.train.config import compose_pretrain_config
from medssl.train.schedules import warmup_cosine
from medssl.train.trainer import BUDGET_MARGIN, Trainer, TrainResult, calibrate_schedule


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("budget")
    return folder, write_training_data(folder)


class FakeClock:
    """Seconds that move only when a step ends (``tick``): every step takes ``seconds_per_step``."""

    def __init__(self, seconds_per_step: float) -> None:
        self.now = 0.0
        self.seconds_per_step = seconds_per_step

    def __call__(self) -> float:
        return self.now

    def tick(self, step: int, metrics: dict[str, float]) -> None:
        self.now += self.seconds_per_step


def run(folder: Path, manifest: Path, *extra: str, callbacks=None, clock=None) -> TrainResult:
    config = compose_pretrain_config(tiny_overrides(manifest, folder, *extra))
    return Trainer(config, project_dir=folder, callbacks=callbacks, clock=clock).fit()


def client(folder: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}")


# ---------------------------------------------------------------- trainer.max_minutes
def test_calibration_takes_the_median_after_the_first_steps_and_scales_the_schedule():
    config = compose_pretrain_config(
        ["method=staged", "trainer.max_steps=100", "trainer.optimizer.warmup_steps=10",
         "method.objective.freeze_prototypes_steps=20", "method.objective.queue_start_step=50"]
    )  # fmt: skip
    stamps = [0.0, 10.0, 15.0, 18.0, 21.0, 24.5, 27.5, 30.5, 33.5]  # loader start-up in the first two steps
    calibration = calibrate_schedule(config, stamps, done=8, max_minutes=1)
    assert calibration["seconds_per_step"] == 3.0  # median of the 6 steps after the first two
    left = 60 * BUDGET_MARGIN - 33.5
    assert calibration["max_steps"] == 8 + math.floor(left / 3.0) == 15
    assert calibration["ratio"] == 15 / 100
    assert calibration["warmup_steps"] == 2 and calibration["freeze_prototypes_steps"] == 3
    assert calibration["queue_start_step"] == 8 and calibration["stages"] == [45, 90]  # the preset's [300, 600]
    # a budget already spent: the run ends now
    assert calibrate_schedule(config, stamps, done=8, max_minutes=0.1)["max_steps"] == 8


STAGED_BUDGET = (
    "method=staged",
    "method.objective.stages=[40,80]",
    "trainer.max_steps=100",
    "trainer.max_minutes=1",
    "trainer.optimizer.warmup_steps=10",
    "method.objective.freeze_prototypes_steps=20",
    "trainer.checkpoint_every=0",
)


def test_a_budget_sets_the_run_length_scales_the_schedule_and_resumes_with_it(dataset, monkeypatch, capsys):
    """4 s per step on the fake clock, 1 minute: calibrated after 8 steps (32 s) to 8 + (55.2 - 32) // 4 = 13 steps;
    warm-up, prototype freeze and stages are scaled by 13/100 and the cosine ends at the last step. Killed after
    its calibration and resumed on a slower clock, the run keeps its 13 steps and ends bit for bit the same."""
    folder, manifest = dataset
    seen: dict[int, dict[str, float]] = {}
    objective_steps: dict[int, tuple[int, list[int]]] = {}
    original = JointObjective.after_backward

    def spy(self, step):  # the step counts the objective reads at each step
        objective_steps[step] = (self.config.freeze_prototypes_steps, list(self.schedule.boundaries))
        return original(self, step)

    monkeypatch.setattr(JointObjective, "after_backward", spy)
    clock = FakeClock(4.0)
    result = run(folder, manifest, *STAGED_BUDGET, "run.name=budget-staged", clock=clock,
                 callbacks=[clock.tick, lambda step, metrics: seen.update({step: metrics})])  # fmt: skip
    assert result.status == "finished" and result.step == 13
    calibration = load_checkpoint(result.checkpoint)["calibration"]
    assert calibration["max_steps"] == 13 and calibration["seconds_per_step"] == 4.0 and calibration["at_step"] == 8
    assert calibration["warmup_steps"] == 1 and calibration["freeze_prototypes_steps"] == 3
    assert calibration["stages"] == [5, 10]
    assert objective_steps[7] == (20, [40, 80])  # the reference schedule while the steps are timed
    assert all(objective_steps[s] == (3, [5, 10]) for s in range(8, 13))
    # steps 1-8 ran 2D (reference stages); then masked until step 10, then 3D to the end
    assert all("loss/mask" in seen[s] and "loss/intra" not in seen[s] for s in (9, 10))
    assert all("loss/inter" in seen[s] for s in (11, 12, 13))
    # the learning rate follows the schedule rebuilt for 13 steps and ends it at the last step
    cfg = compose_pretrain_config(tiny_overrides(manifest, folder, *STAGED_BUDGET)).trainer.optimizer
    schedule = warmup_cosine(cfg.lr, cfg.final_lr, 13, 1, cfg.start_warmup_lr)
    assert [seen[s]["lr"] for s in range(9, 14)] == pytest.approx(schedule[8:13].tolist(), rel=1e-12)
    last = cfg.final_lr + 0.5 * (cfg.lr - cfg.final_lr) * (1 + math.cos(math.pi * 11 / 12))  # t = T - 1
    assert seen[13]["lr"] == pytest.approx(last)
    assert seen[13]["lr"] - cfg.final_lr < 0.02 * (cfg.lr - cfg.final_lr)  # finished, not cut at step 13 of 100
    out = capsys.readouterr().out
    assert "trainer.max_minutes=1: 4 s/step (median of steps 3-8): the run is 13 steps" in out
    logged = client(folder).get_run(result.run_id).data
    assert logged.params["trainer.calibrated_max_steps"] == "13"
    assert logged.tags["medssl.calibration"].startswith("trainer.max_minutes=1: 4 s/step")

    clock = FakeClock(4.0)

    def kill_at_10(step: int, metrics: dict[str, float]) -> None:
        if step == 10:
            os.kill(os.getpid(), signal.SIGTERM)

    killed = run(folder, manifest, *STAGED_BUDGET, "run.name=budget-killed", "logging=none", clock=clock,
                 callbacks=[clock.tick, kill_at_10])  # fmt: skip
    assert killed.status == "interrupted" and killed.step == 10
    assert load_checkpoint(killed.checkpoint)["calibration"]["max_steps"] == 13
    slow = FakeClock(6.0)  # a slower machine: the length stays the checkpoint's
    resumed = run(folder, manifest, *STAGED_BUDGET, "run.name=budget-killed", "logging=none", clock=slow,
                  callbacks=[slow.tick])  # fmt: skip
    assert resumed.status == "finished" and resumed.step == 13
    assert "keeping the calibrated length of 13 steps from the checkpoint" in capsys.readouterr().out
    expected, got = load_checkpoint(result.checkpoint)["objective"], load_checkpoint(resumed.checkpoint)["objective"]
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)


def _budget_rank(rank: int, init_file: str, folder: str, manifest: str) -> None:
    """One of two DDP ranks whose clocks disagree: rank 0 takes 4 s a step, rank 1 4.5 s (alone it would calibrate
    8 + (55.2 - 36) // 4.5 = 12 steps)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank)})
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    clock = FakeClock(4.0 if rank == 0 else 4.5)
    result = run(Path(folder), Path(manifest), "method=swav2d", "trainer.max_steps=100", "trainer.max_minutes=1",
                 "trainer.checkpoint_every=0", "logging=none", "run.name=budget-ddp", clock=clock,
                 callbacks=[clock.tick])  # fmt: skip
    Path(folder, f"budget-ddp-rank{rank}.txt").write_text(f"{result.status} {result.step}")


def test_ddp_ranks_run_the_length_rank_0_calibrated(dataset):
    from ranks import spawn_ranks

    folder, manifest = dataset
    spawn_ranks(_budget_rank, (str(folder), str(manifest)))
    assert [Path(folder, f"budget-ddp-rank{r}.txt").read_text() for r in (0, 1)] == ["finished 13"] * 2
    calibration = load_checkpoint(folder / "outputs" / "budget-ddp" / "checkpoints" / "step_00000013.pt")["calibration"]
    assert calibration["max_steps"] == 13 and calibration["seconds_per_step"] == 4.0


# ---------------------------------------------------------------- 2D-only archives
@pytest.fixture(scope="module")
def images_only(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("images-only")
    return folder, write_training_data(folder, volumes=0)


def test_the_joint_method_on_a_2d_only_archive_trains_its_2d_part(images_only, capsys):
    folder, manifest = images_only
    seen: list[dict[str, float]] = []
    result = run(folder, manifest, "trainer.max_steps=2", "run.name=joint-2d-only",
                 callbacks=[lambda step, metrics: seen.append(metrics)])  # fmt: skip
    assert result.status == "finished" and result.step == 2
    assert all("loss/intra" in m and "loss/inter" not in m and "loss/mask" not in m for m in seen)
    message = (
        "no 3D volume in the manifest: L_inter and L_mask have nothing to read and are dropped; this run is 2D SwAV"
    )
    assert message in capsys.readouterr().out
    assert client(folder).get_run(result.run_id).data.tags["medssl.streams_dropped"].startswith(message)
    assert load_checkpoint(result.checkpoint)["streams_dropped"] == ["inter", "mask"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("method.objective.weights.intra=0", r"no 3D volume for the 3D stream \(L_inter, L_mask\)"),
        ("method=staged", r"no 3D volume .*staged schedule's masked and 3D stages"),
    ],
)
def test_a_2d_only_archive_stops_a_method_with_nothing_to_train(images_only, override, message):
    folder, manifest = images_only
    with pytest.raises(ManifestError, match=message):
        run(folder, manifest, override, "run.name=nothing-2d", "logging=none")


# ---------------------------------------------------------------- trainer.init_from
def test_init_from_starts_the_staged_preset_from_a_finished_swav2d_run(dataset, monkeypatch, capsys, tmp_path):
    from medssl.export.bundle import export_bundle

    folder, manifest = dataset
    source = run(folder, manifest, "method=swav2d", "trainer.max_steps=2", "run.name=init-source", "logging=none")
    weights = load_checkpoint(source.checkpoint)["objective"]
    loaded = [k for k in weights if k.startswith(("model.encoder.", "model.projector.", "model.intra_prototypes."))]
    capsys.readouterr()

    at_step_0: list[dict[str, torch.Tensor]] = []
    original = JointObjective.forward

    def spy(self, *args, **kwargs):
        if kwargs.get("step") == 0:
            at_step_0.append({k: v.detach().clone() for k, v in self.model.state_dict().items()})
        return original(self, *args, **kwargs)

    monkeypatch.setattr(JointObjective, "forward", spy)
    staged = ("method=staged", "method.objective.stages=[1,2]", "trainer.max_steps=1")
    result = run(folder, manifest, *staged, f"trainer.init_from={source.output_dir}", "run.name=init-staged")
    total = len(at_step_0[0])
    out = capsys.readouterr().out
    assert f"init_from: matched {len(loaded)}/{total} tensors from {source.checkpoint} " in out
    assert "(encoder, projector, intra_prototypes, step 2)" in out
    for key in loaded:  # the source's encoder, projector and 2D prototypes at step 0
        expected = weights[key]
        if "prototypes" in key:  # SwAV puts the prototypes back on the sphere before every step
            expected = torch.nn.functional.normalize(expected, dim=1)
        torch.testing.assert_close(at_step_0[0][key[len("model.") :]], expected, rtol=0, atol=0, msg=key)
    tags = client(folder).get_run(result.run_id).data.tags
    assert tags["medssl.init_from"].startswith(f"init_from: matched {len(loaded)}/{total} tensors")

    # an exported bundle and a backbone.pt give the encoder's backbone
    bundle = export_bundle(str(source.output_dir), tmp_path / "bundle", log_to_mlflow=False)
    backbone = load_checkpoint(source.output_dir / "backbone.pt")
    for init_from, name in ((bundle, "bundle"), (source.output_dir / "backbone.pt", "backbone")):
        at_step_0.clear()
        run(folder, manifest, *staged, f"trainer.init_from={init_from}", f"run.name=init-{name}", "logging=none")
        assert f"init_from: matched {len(backbone)}/{total} tensors" in capsys.readouterr().out
        for key, value in backbone.items():
            torch.testing.assert_close(at_step_0[0][f"encoder.backbone.{key}"], value, rtol=0, atol=0, msg=key)

    # resuming the run's own checkpoint wins over init_from
    run(folder, manifest, *staged, "trainer.max_steps=2", f"trainer.init_from={source.output_dir}",
        "run.name=init-backbone", "logging=none")  # fmt: skip
    out = capsys.readouterr().out
    assert f"trainer.init_from={source.output_dir} ignored: resuming from" in out and "init_from: matched" not in out


def test_init_from_refuses_an_encoder_that_does_not_match(dataset, tmp_path):
    from medssl.models.joint import JointModel

    folder, manifest = dataset
    config = compose_pretrain_config(tiny_overrides(manifest, folder))
    weights = JointModel(config.model).encoder.backbone.state_dict()
    wrong = save_checkpoint(tmp_path / "backbone.pt", {**weights, "conv1.weight": torch.zeros(3, 3)})
    match = (
        rf"trainer\.init_from: {re.escape(str(wrong))}: its encoder does not match .*conv1\.weight has shape \(3, 3\)"
    )
    with pytest.raises(ValueError, match=match):
        run(
            folder, manifest, "trainer.max_steps=1", f"trainer.init_from={wrong}", "run.name=init-wrong", "logging=none"
        )
    with pytest.raises(FileNotFoundError, match=r"trainer\.init_from: /nonexistent/run"):
        run(folder, manifest, "trainer.init_from=/nonexistent/run", "run.name=init-none", "logging=none")
