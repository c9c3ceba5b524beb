"""The quality benchmark's command line (benchmarks/quality.py): every option reaches the settings, quick defaults,
and a wrong task or method name is refused before hours of pretraining start."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import quality


def test_every_option_reaches_the_settings(tmp_path: Path) -> None:
    args, settings, methods = quality.parse([
        "--tasks", "cxr,hippocampus", "--methods", "swav2d", "--budget-minutes", "15", "--seeds", "2",
        "--out", str(tmp_path), "--override", "model.intra_prototypes=[128]", "--override", "a.b=1", "--reuse",
        "--seg-steps", "120", "--seg-encoder-lr-scale", "0.5", "--finetune-steps", "0", "--seg-mode", "2.5d",
        "--seg-slice-transformer", "random",
        "--section", "variant",
    ])  # fmt: skip
    assert methods == {"cxr": ["random", "swav2d"], "hippocampus": ["random", "swav2d"]}
    assert settings.budget_minutes == 15 and settings.seeds == [0, 1]
    assert settings.overrides == ["model.intra_prototypes=[128]", "a.b=1"]
    assert settings.reuse and settings.seg_steps == 120 and settings.finetune_steps == 0
    assert settings.seg_encoder_lr_scale == 0.5  # not the default (1.0): the option is read
    assert settings.cache_dir == tmp_path / "cache" and settings.seg_mode == "2.5d" and args.section == "variant"
    assert settings.seg_slice_transformer == "random"


def test_quick_shrinks_only_what_was_not_given(tmp_path: Path) -> None:
    _, quick, methods = quality.parse(["--quick", "--out", str(tmp_path)])
    assert quick.budget_minutes == 1.0 and quick.seeds == [0] and quick.encoder == "resnet10"
    assert quick.seg_steps == 40 and quick.finetune_steps == 40 and quick.seg_mode == "2d"
    assert methods == quality.QUICK_METHODS
    _, given, _ = quality.parse(["--quick", "--out", str(tmp_path), "--seg-steps", "80", "--encoder", "resnet34"])
    assert given.seg_steps == 80 and given.encoder == "resnet34"


def test_segmentation_fractions_are_read_and_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, default, _ = quality.parse(["--out", str(tmp_path)])
    assert default.seg_fractions == (0.1, 1.0)
    _, tenth, _ = quality.parse(["--out", str(tmp_path), "--seg-fractions", "0.1"])
    assert tenth.seg_fractions == (0.1,)
    for wrong in ("0", "1.5", "a,b", ","):
        with pytest.raises(SystemExit):
            quality.parse(["--out", str(tmp_path), "--seg-fractions", wrong])
        assert "--seg-fractions" in capsys.readouterr().err


@pytest.mark.parametrize("option", [["--tasks", "cxr,ct"], ["--methods", "swav"]])
def test_a_wrong_name_is_refused(option: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        quality.parse(option)
    assert option[1].split(",")[-1] in capsys.readouterr().err


def test_pretraining_overrides_end_with_the_study_overrides(tmp_path: Path) -> None:
    _, settings, _ = quality.parse(["--out", str(tmp_path), "--override", "model.intra_prototypes=[128]"])
    overrides = quality._pretrain_overrides(settings, tmp_path / "cxr.csv", "cxr", "swav2d", "cxr-swav2d")
    assert overrides[-2:] == ["method=swav2d", "model.intra_prototypes=[128]"]
    assert "data.splits=[train]" in overrides  # pretraining never reads the test split


def test_a_budgeted_schedule_lets_swav_prototypes_train_after_its_first_tenth(tmp_path: Path) -> None:
    from medssl.train.config import compose_pretrain_config

    _, settings, _ = quality.parse(["--out", str(tmp_path), "--budget-minutes", "15"])
    config = compose_pretrain_config(["method=joint", *quality.budget_overrides(settings, 240)])
    assert config.trainer.max_steps == 240 and config.trainer.max_minutes == 15
    assert config.trainer.optimizer.warmup_steps == 24
    assert config.method.objective.freeze_prototypes_steps == 24  # the shipped 300 would outlast the run
    _, settings, _ = quality.parse(["--out", str(tmp_path), "--override", "method.objective.freeze_prototypes_steps=5"])
    config = compose_pretrain_config(["method=joint", *quality.budget_overrides(settings, 240)])
    assert config.method.objective.freeze_prototypes_steps == 5  # --override wins


def test_summary_figure_has_a_panel_per_task_and_a_bar_per_row(tmp_path: Path) -> None:
    pair = (0.9, 0.01)
    results = {
        "tables": {
            "cxr": {"kind": "classification", "rows": [
                {"backbone": b, "protocol": p, "label_fraction": f, "auroc": pair, "accuracy": pair,
                 "balanced_accuracy": pair}
                for b in ("random", "swav2d") for p in ("linear", "knn") for f in (0.1, 1.0)]},
            "hippocampus": {"kind": "segmentation", "rows": [
                {"backbone": b, "label_fraction": f, "dice_mean": pair, "dice/anterior": pair, "dice/posterior": pair}
                for b in ("random", "joint") for f in (0.1, 1.0)]},
        },
        "missing": [],
    }  # fmt: skip
    figure = quality.summary_figure(results)
    axes = figure.get_axes()
    assert [a.get_title() for a in axes] == ["cxr", "hippocampus"]
    assert [len(a.patches) for a in axes] == [8, 4]
    assert axes[0].get_yticklabels()[0].get_text() == "random linear 0.1"
    figure.savefig(tmp_path / "quality.png")
    assert (tmp_path / "quality.png").stat().st_size > 0


def test_segmentation_defaults_match_medssl_finetune(tmp_path: Path) -> None:
    from medssl.downstream.segmentation import SegmentationConfig

    _, settings, _ = quality.parse(["--out", str(tmp_path)])
    assert settings.seg_encoder_lr_scale == SegmentationConfig().encoder_lr_scale == 1.0


def test_segmentation_keeps_every_seed_s_dice_for_the_chosen_fractions(tmp_path: Path, monkeypatch) -> None:
    """Per-seed Dice in the rows (the seed-by-seed differences a study reports), one row per ``--seg-fractions``."""
    import medssl.downstream.segmentation as segmentation

    seen: list[tuple[str, float, int]] = []

    def fake_segmentation(config):
        seen.append((config.model.pretrained, config.data.label_fraction, config.seed))
        dice = 0.7 + config.seed / 100
        return {"dice/anterior": dice, "dice/posterior": dice + 0.01, "dice_mean": dice + 0.005}

    monkeypatch.setattr(segmentation, "run_segmentation", fake_segmentation)
    _, settings, _ = quality.parse(["--out", str(tmp_path), "--seeds", "3", "--seg-fractions", "0.1"])
    rows = quality._segmentation(settings, tmp_path / "m.csv", {"random": "none", "simclr": "/runs/simclr"})
    assert [(r["backbone"], r["label_fraction"]) for r in rows] == [("random", 0.1), ("simclr", 0.1)]
    assert len(seen) == 6 and {fraction for _, fraction, _ in seen} == {0.1}
    assert rows[1]["per_seed"]["seeds"] == [0, 1, 2]
    assert rows[1]["per_seed"]["dice_mean"] == pytest.approx([0.705, 0.715, 0.725])
    assert rows[1]["dice_mean"][0] == pytest.approx(0.715)
    modes: list[tuple[str, tuple[int, ...], int, str]] = []

    def recorded(config):  # type: ignore[no-untyped-def]
        modes.append((config.mode, config.roi, config.batch_size, config.slice_transformer))
        return fake_segmentation(config)

    monkeypatch.setattr(segmentation, "run_segmentation", recorded)
    args = ["--out", str(tmp_path), "--seeds", "1", "--seg-fractions", "0.1", "--seg-mode", "2.5d"]
    _, stacks, _ = quality.parse([*args, "--seg-slice-transformer", "random"])
    quality._segmentation(stacks, tmp_path / "m.csv", {"joint": "/runs/joint"})
    assert modes == [("2.5d", (8, 48, 48), 2, "random")]  # two stacks of 8 slices: 16 slices a step (2d: 8)


def test_fixed_step_budgets_replace_the_wall_clock_cap(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from medssl.train.config import compose_pretrain_config

    _, settings, _ = quality.parse(["--out", str(tmp_path), "--steps", "simclr=880,swav2d=640,*=500"])
    assert settings.steps == {"simclr": 880, "swav2d": 640, "*": 500}
    assert quality.step_budget(settings, "swav2d") == 640 and quality.step_budget(settings, "joint") == 500
    config = compose_pretrain_config(["method=joint", *quality.budget_overrides(settings, 640)])
    assert config.trainer.max_steps == 640 and config.trainer.max_minutes is None  # no cap: a busy machine waits
    assert config.trainer.optimizer.warmup_steps == 64
    _, one, _ = quality.parse(["--out", str(tmp_path), "--steps", "300"])
    assert quality.step_budget(one, "joint-simclr") == 300
    _, none, _ = quality.parse(["--out", str(tmp_path)])
    assert none.steps is None and quality.step_budget(none, "simclr") is None
    _, only, _ = quality.parse(["--out", str(tmp_path), "--steps", "simclr=10"])
    with pytest.raises(ValueError, match="no budget for method 'swav2d'"):
        quality.step_budget(only, "swav2d")
    with pytest.raises(SystemExit):
        quality.parse(["--out", str(tmp_path), "--steps", "simclr=ten"])
    assert "--steps" in capsys.readouterr().err


def test_the_lever_table_reads_each_study_s_own_files(tmp_path: Path) -> None:
    import json
    import math

    import lever_table

    from medssl.runtime.tracking import Tracker

    study = tmp_path / "eps"
    study.mkdir()
    rows = [
        {"backbone": b, "protocol": p, "label_fraction": 0.1, "accuracy": [acc, 0.01]}
        for b, p, acc in (("swav2d", "knn", 0.93), ("random", "knn", 0.91), ("swav2d", "linear", 0.97),
                          ("random", "linear", 0.96))
    ]  # fmt: skip
    (study / "quality.json").write_text(json.dumps({"tables": {"mednist": {"rows": rows}}}))
    (study / "evaluation-mednist").mkdir()
    seeds = [
        {"backbone": b, "protocol": "knn", "label_fraction": 0.1, "seed": seed, "accuracy": acc}
        for b, seed, acc in (("swav2d", 0, 0.94), ("random", 0, 0.90), ("swav2d", 1, 0.92), ("random", 1, 0.93))
    ]
    (study / "evaluation-mednist" / "results.json").write_text(json.dumps({"results": seeds}))
    tracker = Tracker(f"sqlite:///{study / 'mlruns' / 'mlflow.db'}", "medssl-quality", run_name="mednist-swav2d")
    tracker.log_params({"model.intra_prototypes": "[512]"})
    for step, loss, spread, entropy, codes in ((10, 6.4, -2.4, 0.95, 5.5), (300, 5.0, -1.9, 0.80, 4.25)):
        tracker.log_metrics(
            {"loss/intra": loss, "health/intra_uniformity": spread, "health/intra_prediction_entropy": entropy,
             "health/intra_code_entropy": codes}, step
        )  # fmt: skip
    tracker.finish()
    text = lever_table.table("mednist", "swav2d", [("eps 0.03", study)])
    row = text.splitlines()[-1]
    assert row.startswith("| eps 0.03 | 300 | 5.00 |")
    assert f"| {math.log(512) - 5.0:.2f} |" in row and "-2.40 → -1.90" in row and "| 0.800 | 4.25 |" in row
    assert "0.930 ± 0.010 / 0.910" in row and "0.970 ± 0.010 / 0.960" in row
    assert row.endswith("| +0.040, -0.010 |")


def test_the_lever_table_shows_an_instance_method_s_own_loss_and_spread(tmp_path: Path) -> None:
    """SimCLR logs no L_intra: its InfoNCE (loss/total) and health/uniformity fill the row, the SwAV-only columns say
    n/a instead of a gap to a ln K that its loss has no reason to approach."""
    import json

    import lever_table

    from medssl.runtime.tracking import Tracker

    study = tmp_path / "t05"
    study.mkdir()
    rows = [{"backbone": b, "protocol": p, "label_fraction": 0.1, "auroc": [v, 0.0]}
            for b, p, v in (("simclr", "knn", 0.97), ("random", "knn", 0.96), ("simclr", "linear", 0.98),
                            ("random", "linear", 0.98))]  # fmt: skip
    (study / "quality.json").write_text(json.dumps({"tables": {"cxr": {"rows": rows}}}))
    tracker = Tracker(f"sqlite:///{study / 'mlruns' / 'mlflow.db'}", "medssl-quality", run_name="cxr-simclr")
    for step, loss, spread in ((10, 4.1, -2.6), (300, 2.5, -1.7)):
        tracker.log_metrics({"loss/total": loss, "health/uniformity": spread}, step)
    tracker.finish()
    row = lever_table.table("cxr", "simclr", [("t 0.5", study)], metric="auroc").splitlines()[-1]
    assert row.startswith("| t 0.5 | 300 | 2.50 | n/a (InfoNCE) | -2.60 → -1.70 | n/a | n/a |"), row
    assert "0.970 ± 0.000 / 0.960" in row


def test_the_lever_table_averages_each_pretraining_seed_over_the_evaluation_seeds(tmp_path: Path) -> None:
    import json

    import lever_table

    folders = []
    for name, ours in (("s0", (0.90, 0.94)), ("s1", (0.80, 0.86))):
        study = tmp_path / name
        (study / "evaluation-cxr").mkdir(parents=True)
        (study / "quality.json").write_text(json.dumps({"tables": {"cxr": {"rows": []}}}))
        results = [
            {"backbone": b, "protocol": p, "label_fraction": 0.1, "seed": seed, "auroc": value, "accuracy": 0.5,
             "balanced_accuracy": value}
            for p in ("knn", "linear")
            for seed, value, b in ((0, ours[0], "swav2d"), (1, ours[1], "swav2d"), (0, 0.85, "random"),
                                   (1, 0.88, "random"))
        ]  # fmt: skip
        (study / "evaluation-cxr" / "results.json").write_text(json.dumps({"results": results}))
        folders.append(study)
    text = lever_table.seed_table("cxr", "swav2d", [("koleo", folders)], metric="auroc")
    row = text.splitlines()[-1]
    # seed 0: (0.90 - 0.85 + 0.94 - 0.88) / 2 = +0.055; seed 1: (0.80 - 0.85 + 0.86 - 0.88) / 2 = -0.035
    assert row == "| koleo | 2 | +0.055, -0.035 | +0.010 | +0.055, -0.035 | +0.010 |"
    balanced = lever_table.seed_table("cxr", "swav2d", [("koleo", folders)], metric="balanced_accuracy")
    assert "| kNN balanced accuracy − random, per pretraining seed |" in balanced.splitlines()[0]
    assert balanced.splitlines()[-1] == row


def test_the_seed_table_subtracts_any_baseline_at_any_label_fraction(tmp_path: Path) -> None:
    """SepCLR's question: the salient space minus the common space, probes with all the labels."""
    import json

    import lever_table

    folders = []
    for name, salient in (("s0", 0.72), ("s1", 0.69)):
        study = tmp_path / name
        (study / "evaluation-sepclr").mkdir(parents=True)
        (study / "quality.json").write_text(json.dumps({"tables": {"sepclr": {"rows": []}}}))
        results = [
            {"backbone": b, "protocol": p, "label_fraction": f, "seed": 0, "auroc": value}
            for p in ("knn", "linear")
            for b, f, value in (("sepclr/salient", 1.0, salient), ("sepclr/common", 1.0, 0.70),
                                ("sepclr/salient", 0.1, 0.0), ("random", 1.0, 0.5))
        ]  # fmt: skip
        (study / "evaluation-sepclr" / "results.json").write_text(json.dumps({"results": results}))
        folders.append(study)
    text = lever_table.seed_table(
        "sepclr", "sepclr/salient", [("sepclr", folders)], "auroc", baseline="sepclr/common", fraction=1.0
    )
    assert "kNN auroc − sepclr/common, per pretraining seed" in text.splitlines()[0]
    assert text.splitlines()[-1] == "| sepclr | 2 | +0.020, -0.010 | +0.005 | +0.020, -0.010 | +0.005 |"


def test_calibrate_only_measures_the_budgets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, object] = {}

    def fake_calibrate(settings, methods):  # type: ignore[no-untyped-def]
        seen["methods"], seen["minutes"] = methods, settings.budget_minutes
        return {}

    def no_study(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("--calibrate must not run the study")

    monkeypatch.setattr(quality, "calibrate_budgets", fake_calibrate)
    monkeypatch.setattr(quality, "run", no_study)
    argv = ["--calibrate", "--tasks", "hippocampus", "--methods", "simclr,joint", "--budget-minutes", "15"]
    assert quality.main([*argv, "--out", str(tmp_path)]) == 0
    assert seen == {"methods": {"hippocampus": ["random", "simclr", "joint"]}, "minutes": 15.0}


def test_the_staged_method_starts_from_the_study_s_finished_2d_run(tmp_path: Path, monkeypatch) -> None:
    """``staged-simclr``: SimCLR's run of the same study first (reused when finished), then the joint method with
    ``trainer.init_from`` at it, each at its own step budget."""
    import medssl.train.trainer as trainer_module

    started: list[tuple[str, int, str | None]] = []

    class FakeTrainer:
        def __init__(self, config) -> None:
            self.config = config

        def fit(self):
            name = self.config.run.name
            folder = tmp_path / "runs" / name
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "backbone.pt").write_bytes(b"")
            started.append((name, self.config.trainer.max_steps, self.config.trainer.init_from))
            return type("Result", (), {"step": self.config.trainer.max_steps, "run_id": "r", "output_dir": folder})

    monkeypatch.setattr(trainer_module, "Trainer", FakeTrainer)
    _, settings, _ = quality.parse(["--out", str(tmp_path), "--steps", "simclr=240,staged-simclr=120"])
    manifest = tmp_path / "m.csv"
    quality.pretrain(settings, manifest, "hippocampus", "staged-simclr")
    quality.pretrain(settings, manifest, "hippocampus", "staged-simclr")  # SimCLR's finished run is reused
    simclr_run = str(tmp_path / "runs" / "hippocampus-simclr")
    assert started == [
        ("hippocampus-simclr", 240, None),
        ("hippocampus-staged-simclr", 120, simclr_run),
        ("hippocampus-staged-simclr", 120, simclr_run),
    ]


def test_the_alarm_calibration_replays_a_study_s_logged_windows(tmp_path: Path) -> None:
    import json

    import alarm_calibration

    from medssl.runtime.tracking import Tracker

    def study(name: str, spread: list[float], knn: float) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        rows = [{"backbone": b, "protocol": "knn", "label_fraction": 0.1, "auroc": [v, 0.0]} for b, v in
                (("swav2d", knn), ("random", 0.96))]  # fmt: skip
        (folder / "quality.json").write_text(json.dumps({"tables": {"cxr": {"rows": rows}}}))
        tracker = Tracker(f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}", "medssl-quality", run_name="cxr-swav2d")
        tracker.log_params({"trainer.optimizer.warmup_steps": 20, "method.objective.freeze_prototypes_steps": 30})
        for i, u in enumerate(spread):
            tracker.log_metrics(
                {
                    "health/intra_uniformity": u,
                    "health/intra_prediction_entropy": 0.99,
                    "health/intra_gap_to_uniform": 0.05,
                },
                10 * (i + 1),
            )
        tracker.finish()
        return folder

    cone = study("cone", [-2.5, -1.0, -0.7, -0.6, -0.6, -0.6, -0.6, -0.6, -0.6], 0.87)
    spread = study("spread", [-2.6, -2.9, -3.3, -3.4, -3.5, -3.5, -3.6, -3.6, -3.6], 0.97)
    rows = alarm_calibration.table("cxr", "swav2d", [("cone", cone), ("spread", spread)], "auroc").splitlines()
    # the alarm starts at step 30 (the freeze outlasts the warm-up); 5 windows from there: steps 30..70
    assert rows[-2] == "| cone | 90 | 30 | -0.70 | -0.60 | -0.60 | warning intra at step 70 | 0.870 / 0.960 |"
    assert rows[-1] == "| spread | 90 | 30 | -3.30 | -3.30 | -3.60 | note intra at step 70 | 0.970 / 0.960 |"


def test_the_segmentation_table_compares_studies_seed_by_seed(tmp_path: Path) -> None:
    """seg_table: per-seed Dice from each study's quality.json, differences from the baseline row matched by seed."""
    import json

    import seg_table

    def study(name: str, rows: dict[str, list[float]]) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        table = [{"backbone": b, "label_fraction": 0.1, "per_seed": {"seeds": [0, 1, 2], "dice_mean": v}}
                 for b, v in rows.items()]  # fmt: skip
        (folder / "quality.json").write_text(json.dumps({"tables": {"hippocampus": {"rows": table}}}))
        return folder

    a = study("a", {"random": [0.70, 0.72, 0.74], "simclr": [0.72, 0.71, 0.77]})
    b = study("b", {"joint-simclr": [0.75, 0.75, 0.75]})
    entries = [seg_table.parse_entry(f"random={a}:random"), seg_table.parse_entry(f"SimCLR={a}:simclr"),
               seg_table.parse_entry(f"joint={b}:joint-simclr")]  # fmt: skip
    lines = seg_table.table(entries, "random", 0.1).splitlines()
    assert lines[3] == "| SimCLR | 0.733 ± 0.026 | 0.720, 0.710, 0.770 | +2.0, -1.0, +3.0 | +1.3 |"
    assert lines[4].endswith("| +5.0, +3.0, +1.0 | +3.0 |")
    # one study per pretraining seed: the j-th joint study against the j-th SimCLR study, and a row over all of them
    c = study("c", {"simclr": [0.70, 0.70, 0.70], "joint-simclr": [0.71, 0.72, 0.73]})
    entries = [seg_table.parse_entry(f"SimCLR={a}:simclr,{c}:simclr"),
               seg_table.parse_entry(f"joint={b}:joint-simclr,{c}:joint-simclr")]  # fmt: skip
    lines = seg_table.table(entries, "SimCLR", 0.1).splitlines()
    assert lines[5].endswith("| +3.0, +4.0, -2.0 | +1.7 |")  # b against a
    assert lines[6].startswith("| joint (c) |") and lines[6].endswith("| +1.0, +2.0, +3.0 | +2.0 |")  # c against c
    assert lines[7] == "| joint, all 2 | 0.735 ± 0.016 | 6 runs | paired by study | +1.8 |"
    lone = seg_table.table([*entries[:1], seg_table.parse_entry(f"joint={b}:joint-simclr")], "SimCLR", 0.1)
    assert lone.splitlines()[5].endswith("| +3.0, +4.0, -2.0 | +1.7 |")  # one study: against the first
    old = tmp_path / "old"
    old.mkdir()
    (old / "quality.json").write_text(json.dumps({"tables": {"hippocampus": {"rows": [
        {"backbone": "random", "label_fraction": 0.1, "dice_mean": [0.7, 0.0]}]}}}))  # fmt: skip
    with pytest.raises(SystemExit, match="no per-seed Dice"):
        seg_table.table([seg_table.parse_entry(f"random={old}:random")], None, 0.1)
    with pytest.raises(SystemExit, match="LABEL=STUDY:BACKBONE"):
        seg_table.parse_entry("no-equals-sign")


def test_the_curves_script_prints_a_run_s_logged_points(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import curves

    from medssl.runtime.tracking import Tracker

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}", "medssl-quality", run_name="hip-joint")
    for step, loss in ((10, 4.95), (20, 4.5), (30, 4.1)):
        tracker.log_metrics({"loss/inter": loss}, step)
    tracker.finish()
    assert curves.main([str(tmp_path), "hip-joint", "loss/inter", "health/x", "--every", "2"]) == 0
    assert capsys.readouterr().out.splitlines() == ["loss/inter: 10:4.95 30:4.10", "health/x: not logged"]
    with pytest.raises(SystemExit, match="no run named 'other'"):
        curves.main([str(tmp_path), "other", "loss/inter"])


def test_random_init_is_the_pretrained_backbones_network(tmp_path: Path, monkeypatch) -> None:
    """Random init is evaluated with the first pretrained bundle as its architecture (a ``model.max_pool=true`` study
    compares like with like), in the classification and the segmentation tasks; the study's encoder name when
    nothing is pretrained."""
    import medssl.downstream.evaluate as evaluate
    import medssl.downstream.segmentation as segmentation

    encoders: list[tuple[str, str, str]] = []

    def fake_evaluate(config):
        encoders.extend(("evaluate", source, config.encoder) for source in config.backbones.values())
        return {"summary": []}

    def fake_segmentation(config):
        encoders.append(("segmentation", config.model.pretrained, config.model.encoder))
        return {"dice/anterior": 0.7, "dice/posterior": 0.7, "dice_mean": 0.7}

    monkeypatch.setattr(evaluate, "run_evaluate", fake_evaluate)
    monkeypatch.setattr(segmentation, "run_segmentation", fake_segmentation)
    monkeypatch.setattr(quality, "prepare_manifests", lambda s: {"cxr": tmp_path / "c.csv", "hippocampus": tmp_path})
    monkeypatch.setattr(quality, "pretrain", lambda s, manifest, task, method: tmp_path / "runs" / f"{task}-{method}")
    monkeypatch.setattr(quality, "bundle", lambda s, run_dir: f"/bundles/{run_dir.name}")
    args = ["--out", str(tmp_path), "--seeds", "1", "--seg-fractions", "0.1", "--finetune-steps", "0"]
    _, settings, _ = quality.parse([*args, "--override", "model.max_pool=true"])
    quality.run(settings, ["cxr", "hippocampus"], {"cxr": ["random", "simclr"], "hippocampus": ["random", "joint"]})
    assert encoders == [
        ("evaluate", "none", "/bundles/cxr-simclr"),
        ("evaluate", "/bundles/cxr-simclr", "/bundles/cxr-simclr"),
        ("segmentation", "none", "/bundles/hippocampus-joint"),
        ("segmentation", "/bundles/hippocampus-joint", "/bundles/hippocampus-joint"),
    ]
    encoders.clear()
    quality.run(settings, ["cxr"], {"cxr": ["random"]})
    assert encoders == [("evaluate", "none", "resnet18")]


def test_the_machine_line_names_the_cpu_model_and_torch_s_kernel_level(tmp_path: Path) -> None:
    """Studies compare only on one machine (bit-reproducible there, not across CPUs): quality.md names the CPU."""
    import _report
    import torch

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Example CPU @ 2.0GHz\nflags\t: avx2\n", encoding="utf-8")
    line = _report.machine_description(cpuinfo)
    assert "(Example CPU @ 2.0GHz)" in line and "CPU cores" in line
    assert f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()} kernels)" in line
    import platform

    fallback = platform.processor() or "unknown CPU"  # no /proc/cpuinfo (macOS, Windows)
    assert f"({fallback})" in _report.machine_description(tmp_path / "absent")


def test_pretraining_seeds_are_read_and_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args, _, _ = quality.parse(["--out", str(tmp_path), "--pretrain-seeds", "0,1,2"])
    assert args.pretrain_seeds == [0, 1, 2]
    assert quality.parse(["--out", str(tmp_path)])[0].pretrain_seeds == []
    for wrong in (["--pretrain-seeds", "0,0"], ["--pretrain-seeds", "a"], ["--pretrain-seeds", ","],
                  ["--pretrain-seeds", "0,1", "--override", "seed=3"]):  # fmt: skip
        with pytest.raises(SystemExit):
            quality.parse(["--out", str(tmp_path), *wrong])
        assert "--pretrain-seeds" in capsys.readouterr().err


def test_pretraining_seeds_run_one_study_each_and_pool_them(tmp_path: Path, monkeypatch) -> None:
    """--pretrain-seeds: each seed's study in its own folder with seed=S on its pretraining runs, then the pooled
    comparison read from those studies' files (seed 0: ahead of random init, seed 1: behind)."""
    import json

    runs: list[tuple[Path, list[str]]] = []
    ahead = {"seed=0": 0.04, "seed=1": -0.02}

    def fake_run(settings, tasks, methods):  # type: ignore[no-untyped-def]
        runs.append((settings.out, list(settings.overrides)))
        folder = settings.out / "evaluation-cxr"
        folder.mkdir(parents=True)
        rows = [{"backbone": b, "protocol": p, "label_fraction": 0.1, "seed": e, "auroc": value + 0.01 * e,
                 "accuracy": value, "balanced_accuracy": value}
                for p in ("knn", "linear") for e in (0, 1)
                for b, value in (("random", 0.90), ("swav2d", 0.90 + ahead[settings.overrides[-1]]))]  # fmt: skip
        (folder / "results.json").write_text(json.dumps({"results": rows}))
        return {"tables": {"cxr": {"kind": "classification", "rows": [], "minutes": 0.0}}, "missing": []}

    monkeypatch.setattr(quality, "run", fake_run)
    monkeypatch.setattr(quality, "log_summary", lambda settings, files: "run-id")
    argv = ["--out", str(tmp_path), "--tasks", "cxr", "--methods", "swav2d", "--steps", "10", "--seeds", "2",
            "--override", "a.b=1", "--pretrain-seeds", "0,1", "--update", str(tmp_path / "B.md"),
            "--section", "s"]  # fmt: skip
    assert quality.main(argv) == 0
    assert runs == [(tmp_path / "pretrain-seed-0", ["a.b=1", "seed=0"]),
                    (tmp_path / "pretrain-seed-1", ["a.b=1", "seed=1"])]  # fmt: skip
    assert all((out / "quality.md").is_file() and (out / "quality.json").is_file() for out, _ in runs)
    pooled = (tmp_path / "quality.md").read_text(encoding="utf-8")
    assert "| swav2d | random | knn @10% | auroc | +0.040, -0.020 | +0.010 | no |" in pooled
    assert "| swav2d | random | linear @10% | balanced accuracy | +0.040, -0.020 | +0.010 | no |" in pooled
    assert "pretraining seeds 0, 1" in pooled and "pretrain-seed-1/quality.md" in pooled
    assert "<!-- s:start -->" in (tmp_path / "B.md").read_text(encoding="utf-8")


def test_the_pooled_hippocampus_table_compares_each_joint_variant_with_its_2d_counterpart(tmp_path: Path) -> None:
    import json

    import pretrain_seeds

    dice = {0: {"random": 0.70, "simclr": 0.74, "joint-simclr": 0.77}, 1: {"random": 0.70, "simclr": 0.73,
            "joint-simclr": 0.72}}  # fmt: skip
    for seed, backbones in dice.items():
        folder = pretrain_seeds.study_folder(tmp_path, seed)
        folder.mkdir()
        rows = [{"backbone": b, "label_fraction": 0.1, "per_seed": {"seeds": [0, 1], "dice_mean": [v - 0.01, v + 0.01]}}
                for b, v in backbones.items()]  # fmt: skip
        (folder / "quality.json").write_text(json.dumps({"tables": {"hippocampus": {"rows": rows}}}))
    methods = {"hippocampus": ["random", "simclr", "joint-simclr"], "cxr": ["random", "simclr"]}
    text = pretrain_seeds.report(["## pooled", ""], methods, [0, 1], tmp_path, [0.1], {"hippocampus": "Hippocampus"})
    lines = text.splitlines()
    assert "| simclr | random | fine-tuned @10% | Dice x 100 | +4.0, +3.0 | +3.5 | yes |" in lines
    assert "| joint-simclr | random | fine-tuned @10% | Dice x 100 | +7.0, +2.0 | +4.5 | yes |" in lines
    assert "| joint-simclr | simclr | fine-tuned @10% | Dice x 100 | +3.0, -1.0 | +1.0 | no |" in lines
    assert "- not pooled: cxr (a pretraining seed's study has no cxr table)" in lines


def test_pretraining_seeds_fine_tune_random_init_once_and_copy_its_rows(tmp_path: Path, monkeypatch) -> None:
    """Random init does not depend on the pretraining seed: the hippocampus fine-tunes of random init run in the first
    seed's study only, the later studies carry the same rows, and the pooled table subtracts them per seed."""
    calls: list[list[str]] = []

    def fake_segmentation(settings, manifest, backbones):  # type: ignore[no-untyped-def]
        calls.append(list(backbones))
        seed = int(settings.overrides[-1].split("=")[1])
        rows = []
        for name in backbones:
            dice = {"random": 0.70, "simclr": 0.73 + 0.01 * seed}[name]
            rows.append({"backbone": name, "label_fraction": 0.1, "seeds": 1, "dice/anterior": (dice, 0.0),
                         "dice/posterior": (dice, 0.0), "dice_mean": (dice, 0.0),
                         "per_seed": {"seeds": [0], "dice_mean": [dice]}})  # fmt: skip
        return rows

    monkeypatch.setattr(quality, "prepare_manifests", lambda settings: {"hippocampus": tmp_path / "h.csv"})
    monkeypatch.setattr(quality, "pretrain", lambda s, manifest, task, method: tmp_path / "runs" / f"{task}-{method}")
    monkeypatch.setattr(quality, "bundle", lambda s, run_dir: f"/bundles/{run_dir.name}")
    monkeypatch.setattr(quality, "_segmentation", fake_segmentation)
    monkeypatch.setattr(quality, "log_summary", lambda settings, files: "run-id")
    argv = ["--out", str(tmp_path), "--tasks", "hippocampus", "--methods", "simclr", "--steps", "10", "--seeds", "1",
            "--seg-fractions", "0.1", "--seg-mode", "2.5d", "--pretrain-seeds", "0,1,2"]  # fmt: skip
    assert quality.main(argv) == 0
    assert calls == [["random", "simclr"], ["simclr"], ["simclr"]]
    later = (tmp_path / "pretrain-seed-2" / "quality.md").read_text(encoding="utf-8")
    assert "Random init's hippocampus rows are the first pretraining seed's study's" in later
    assert "| random | 0.1 |" in later
    pooled = (tmp_path / "quality.md").read_text(encoding="utf-8")
    assert "| simclr | random | fine-tuned @10% | Dice x 100 | +3.0, +4.0, +5.0 | +4.0 | yes |" in pooled
