"""The SwAV health alarm: uniform predictions (SwAV's trivial solution) and 2D embeddings drawn into a cone, when each
fires, once, and what it says; and the SwAV prediction-entropy metric it reads, against a plainly written reference.
The cone threshold is checked against the uniformity curves of the collapsed and healthy runs named in BENCHMARKS.md."""

from __future__ import annotations

import math

import pytest
import torch

from medssl.objectives.swav import SwAVLoss
from medssl.train.alarms import CONE_THRESHOLD, UniformPredictionAlarm, codes_or_predictions, frozen_prototypes_warning


def reference_prediction_entropy(scores: list[torch.Tensor], temperature: float) -> float:
    """Mean over crops and samples of -sum_k p_k ln p_k, p = softmax(scores / t), divided by ln K: written as loops."""
    k = scores[0].shape[1]
    total, count = 0.0, 0
    for crop in scores:
        for row in crop.tolist():
            exps = [math.exp(v / temperature) for v in row]
            z = sum(exps)
            total += -sum(e / z * math.log(e / z) for e in exps)
            count += 1
    return total / count / math.log(k)


def test_prediction_entropy_matches_the_reference_and_is_one_for_uniform_predictions() -> None:
    g = torch.Generator().manual_seed(0)
    scores = [torch.randn(6, 7, generator=g, dtype=torch.float64) * 0.3 for _ in range(3)]
    criterion = SwAVLoss(temperature=0.1)
    _, metrics = criterion(scores)
    assert float(metrics["prediction_entropy"]) == pytest.approx(reference_prediction_entropy(scores, 0.1), rel=1e-9)
    assert 0.0 < float(metrics["prediction_entropy"]) < 1.0

    collapsed = [torch.full((6, 7), 0.25, dtype=torch.float64) for _ in range(3)]  # every score equal: uniform p
    loss, metrics = criterion(collapsed)
    assert float(metrics["prediction_entropy"]) == pytest.approx(1.0)
    assert float(loss) == pytest.approx(math.log(7))  # the loss sits at ln K


def window(value: float, stream: str = "intra") -> dict[str, float]:
    return {f"health/{stream}_prediction_entropy": value, "loss/total": 1.0}


def test_fires_once_after_patience_consecutive_uniform_windows() -> None:
    alarm = UniformPredictionAlarm(threshold=0.98, patience=3, start_step=0)
    assert alarm.update(10, window(0.99)) == []
    assert alarm.update(20, window(0.995)) == []
    fired = alarm.update(30, window(1.0))
    assert [tag for tag, _ in fired] == ["health_warning_intra"]
    message = fired[0][1]
    assert "step 30" in message and "L_intra" in message and "method.objective.epsilon=0.03" in message
    assert alarm.update(40, window(1.0)) == []  # once per run


def test_a_healthy_window_resets_the_streak_and_streams_are_independent() -> None:
    alarm = UniformPredictionAlarm(threshold=0.98, patience=2)
    assert alarm.update(10, window(0.99)) == []
    assert alarm.update(20, window(0.90)) == []  # learning: the streak starts again
    assert alarm.update(30, window(0.99)) == []
    both = {**window(0.99), **window(1.0, "inter")}
    assert [tag for tag, _ in alarm.update(40, both)] == ["health_warning_intra"]
    inter = alarm.update(50, both)
    assert [tag for tag, _ in inter] == ["health_warning_inter"] and "model.inter_prototypes" in inter[0][1]
    assert alarm.update(60, both) == []


def test_warm_up_windows_and_runs_without_the_metric_are_ignored() -> None:
    alarm = UniformPredictionAlarm(patience=1, start_step=100)
    assert alarm.update(50, window(1.0)) == []
    assert alarm.update(60, {"loss/simclr": 4.0}) == []  # SimCLR logs no prediction entropy
    assert [tag for tag, _ in alarm.update(100, window(1.0))] == ["health_warning_intra"]


@pytest.mark.parametrize("kwargs", [{"threshold": 0.0}, {"threshold": 1.5}, {"patience": 0}, {"start_step": -1}])
def test_bad_settings_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="threshold must be in"):
        UniformPredictionAlarm(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cone_threshold"):
        UniformPredictionAlarm(cone_threshold=0.5)


def test_frozen_prototypes_warn_only_when_the_freeze_outlasts_the_run() -> None:
    assert frozen_prototypes_warning(["intra"], freeze_steps=299, max_steps=300) is None
    assert frozen_prototypes_warning([], freeze_steps=300, max_steps=240) is None  # SimCLR, DeepCluster-v2
    message = frozen_prototypes_warning(["intra", "inter"], freeze_steps=300, max_steps=240)
    assert message is not None
    assert "L_intra and L_inter prototypes are frozen for 300 steps" in message
    assert "method.objective.freeze_prototypes_steps" in message and "trainer.max_steps" in message
    assert "e.g. 24" in message
    assert "L_intra prototypes" in (frozen_prototypes_warning(["intra"], 300, 300) or "")


def test_a_loss_stuck_just_under_ln_k_fires_although_the_entropy_is_below_its_threshold() -> None:
    alarm = UniformPredictionAlarm(threshold=0.98, gap_threshold=0.5, patience=2)
    soft = {"health/intra_prediction_entropy": 0.95, "health/intra_gap_to_uniform": 0.2}
    assert alarm.update(10, soft) == []
    fired = alarm.update(20, soft)
    assert [tag for tag, _ in fired] == ["health_warning_intra"] and "0.20 nat below ln K" in fired[0][1]


def test_a_loss_well_below_ln_k_stays_silent() -> None:
    alarm = UniformPredictionAlarm(gap_threshold=0.5, patience=1)
    learning = {"health/intra_prediction_entropy": 0.95, "health/intra_gap_to_uniform": 1.3}
    assert alarm.update(10, learning) == [] and alarm.update(20, learning) == []
    with pytest.raises(ValueError, match="gap_threshold"):
        UniformPredictionAlarm(gap_threshold=-1.0)


def spread_window(entropy: float, uniformity: float, gap: float = 0.1) -> dict[str, float]:
    return {
        "health/intra_prediction_entropy": entropy,
        "health/intra_gap_to_uniform": gap,
        "health/intra_uniformity": uniformity,
    }


def test_uniform_predictions_with_spread_embeddings_are_a_note_and_a_later_cone_a_warning() -> None:
    """At a short budget the clustering of a healthy run has not started: its predictions are uniform while its
    embeddings spread (KoLeo). That is said once, as a note; if the embeddings then draw into a cone, the warning."""
    alarm = UniformPredictionAlarm(patience=2)
    assert alarm.update(10, spread_window(0.99, -3.5)) == []
    noted = alarm.update(20, spread_window(0.99, -3.6))
    assert [tag for tag, _ in noted] == ["health_note_intra"]
    assert noted[0][1].startswith("health note at step 20") and "uniformity -3.60" in noted[0][1]
    assert alarm.update(30, spread_window(0.99, -3.6)) == []  # said once
    assert alarm.update(40, spread_window(0.99, -1.0)) == []
    warned = alarm.update(50, spread_window(0.99, -0.9))
    assert [tag for tag, _ in warned] == ["health_warning_intra"]
    assert "drawn into a cone (uniformity -0.90 above -1.75" in warned[0][1]
    assert "predictions are (nearly) uniform over the prototypes too" in warned[0][1]
    assert "method.objective.koleo_weight" in warned[0][1]
    assert alarm.update(60, spread_window(0.99, -0.9)) == []


def test_a_cone_warns_even_when_the_predictions_are_not_uniform_and_only_for_the_2d_stream() -> None:
    alarm = UniformPredictionAlarm(patience=2)
    peaked = spread_window(0.80, -0.6, gap=1.5)
    volumes = {
        "health/inter_prediction_entropy": 0.8,
        "health/inter_gap_to_uniform": 1.5,
        "health/inter_uniformity": -0.1,
    }
    assert alarm.update(10, {**peaked, **volumes}) == []
    fired = alarm.update(20, {**peaked, **volumes})
    assert [tag for tag, _ in fired] == ["health_warning_intra"]  # volume embeddings start near one point: not judged
    assert "too" not in fired[0][1]
    healthy = UniformPredictionAlarm(patience=1)
    assert healthy.update(10, spread_window(0.80, -3.0, gap=1.5)) == []


def _curve(text: str) -> list[float]:
    return [float(u) for u in text.split()]


# health/intra_uniformity of 2D SwAV runs at 300 steps, every logging window from the first tenth (the alarm's start)
# to the end, rounded to 0.01: what BENCHMARKS.md's health-alarm calibration names. Collapsed: Kermany, no spreading
# term (BENCHMARKS.md's c-baseline study, kNN AUROC 0.868 vs random 0.964). Healthy: Kermany with KoLeo 0.1, the shipped
# default (c-koleo01, kNN AUROC 0.969 vs 0.964).
COLLAPSED_KERMANY = _curve(
    """-0.86 -0.79 -0.74 -0.62 -0.58 -0.55 -0.52 -0.53 -0.51 -0.51 -0.5 -0.51 -0.52
    -0.51 -0.52 -0.52 -0.53 -0.53 -0.51 -0.5 -0.52 -0.54 -0.55 -0.55 -0.55 -0.55 -0.55 -0.55"""
)
HEALTHY_KERMANY = _curve(
    """-2.03 -2.99 -3.43 -3.44 -3.48 -3.52 -3.56 -3.52 -3.59 -3.59 -3.59 -3.59 -3.61
    -3.59 -3.63 -3.63 -3.62 -3.63 -3.66 -3.67 -3.68 -3.67 -3.7 -3.69 -3.7 -3.7 -3.69 -3.69"""
)


@pytest.mark.parametrize(("curve", "fires"), [(COLLAPSED_KERMANY, True), (HEALTHY_KERMANY, False)])
def test_the_cone_threshold_separates_the_calibration_runs(curve: list[float], fires: bool) -> None:
    alarm = UniformPredictionAlarm()
    tags = [tag for i, u in enumerate(curve) for tag, _ in alarm.update(30 + 10 * i, spread_window(0.99, u))]
    assert ("health_warning_intra" in tags) is fires
    assert ("health_note_intra" in tags) is not fires
    assert max(HEALTHY_KERMANY) < CONE_THRESHOLD < min(COLLAPSED_KERMANY)


def stuck_window(loss: float, code_entropy: float, k: int = 512) -> dict[str, float]:
    """A 2D SwAV window whose predictions are nearly uniform, with its loss, gap and codes' entropy."""
    return {
        "loss/intra": loss,
        "health/intra_gap_to_uniform": math.log(k) - loss,
        "health/intra_code_entropy": code_entropy,
        "health/intra_prediction_entropy": 0.99,
        "health/intra_uniformity": -3.5,
    }


def test_a_stuck_stream_says_whether_the_codes_or_the_predictions_hold_the_loss() -> None:
    """The windows at the end of two Kermany runs (BENCHMARKS.md, issue 14, 300 steps, seed 0): epsilon 0.05, loss
    6.14 over codes of 5.68 nats (flat: 0.56 nat of room under ln 512), and epsilon 0.02, loss 5.90 over codes of
    4.06 nats (room 2.18 nats; the predictions miss the codes by 1.84)."""
    flat = UniformPredictionAlarm(patience=1).update(300, stuck_window(6.14, 5.68))
    assert [tag for tag, _ in flat] == ["health_note_intra"]
    assert "targets themselves are flat: their entropy, 5.68 nats, leaves the loss at most 0.56 nat under" in flat[0][1]
    sharp = UniformPredictionAlarm(patience=1).update(300, stuck_window(5.90, 4.06))
    assert "predictions miss them by 1.84 nats" in sharp[0][1] and "room for the loss to fall 2.18 nat" in sharp[0][1]
    assert "flat" not in sharp[0][1]
    assert "By predicting crop" not in sharp[0][1]  # no split logged: runs before it, or no local crops
    split = {**stuck_window(5.90, 4.06), "health/intra_gap_to_uniform_assigned": 0.9}
    split["health/intra_gap_to_uniform_other"] = 0.12
    said = UniformPredictionAlarm(patience=1).update(300, split)[0][1]
    assert "global crops predict each other's codes 0.90 nat under ln K, the local crops 0.12." in said
    no_codes = stuck_window(6.14, 5.68)
    del no_codes["health/intra_code_entropy"]  # runs logged before the codes' entropy, DeepCluster-v2
    assert codes_or_predictions("intra", no_codes) == ""
    warned = UniformPredictionAlarm(patience=1).update(
        300, {**stuck_window(6.14, 5.68), "health/intra_uniformity": -0.5}
    )
    assert "cone" in warned[0][1]  # a cone's warning is about the spread, not the codes
