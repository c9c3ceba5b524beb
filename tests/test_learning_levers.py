"""Issue 14's levers for the clustering streams: spreading terms, the instance-level intra term, queues, health that
tells the truth, per-stream prototype freezing, float32 prototype scores and per-method weight decay."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from medssl.models.joint import JointModel
from medssl.objectives import joint as joint_module
from medssl.objectives.joint import JointObjective, JointObjectiveConfig, LossWeights
from medssl.objectives.simclr import InfoNCELoss
from medssl.objectives.spreading import koleo_loss, uniformity_loss
from medssl.objectives.swav import SwAVLoss
from medssl.train.config import PretrainConfig, optimizer_settings, pretrain_config
from tests.test_joint import TINY, batches


def objective(**kwargs) -> JointObjective:
    torch.manual_seed(0)
    return JointObjective(JointModel(TINY), JointObjectiveConfig(**kwargs))


# ---------------------------------------------------------------- spreading terms against plain references
def reference_koleo(z: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Loop version: each row's distance to its nearest other row, ``-mean log(d + eps)``."""
    x = [row / row.norm().clamp_min(eps) for row in z]
    terms = []
    for i, xi in enumerate(x):
        distances = [torch.sqrt(((xi - xj + eps) ** 2).sum()) for j, xj in enumerate(x) if j != i]
        terms.append(-torch.log(torch.stack(distances).min() + eps))
    return torch.stack(terms).mean()


def reference_uniformity(z: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    x = [row / row.norm() for row in z]
    kernels = [torch.exp(-t * ((a - b) ** 2).sum()) for a, b in itertools.combinations(x, 2)]
    return torch.log(torch.stack(kernels).mean())


@pytest.mark.parametrize("seed", [0, 1])
def test_koleo_and_uniformity_match_loop_references_with_gradients(seed: int) -> None:
    z = torch.randn(9, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64, requires_grad=True)
    for loss_fn, reference in ((koleo_loss, reference_koleo), (uniformity_loss, reference_uniformity)):
        got = loss_fn(z)
        want = reference(z)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
        (grad,) = torch.autograd.grad(got, z)
        (want_grad,) = torch.autograd.grad(want, z)
        torch.testing.assert_close(grad, want_grad, rtol=1e-7, atol=1e-9)


def test_spreading_terms_are_lower_for_spread_embeddings() -> None:
    g = torch.Generator().manual_seed(0)
    spread = torch.randn(64, 16, generator=g)
    cone = torch.ones(64, 16) + 0.05 * torch.randn(64, 16, generator=g)
    assert koleo_loss(spread) < koleo_loss(cone)
    assert uniformity_loss(spread) < uniformity_loss(cone) < 0
    assert math.isfinite(float(koleo_loss(torch.ones(4, 3))))  # identical rows: large but finite
    with pytest.raises(ValueError, match="B >= 2"):
        koleo_loss(torch.ones(1, 3))


# ---------------------------------------------------------------- SwAV health measured on the predictions
def test_swav_health_is_measured_on_predictions_not_codes() -> None:
    g = torch.Generator().manual_seed(2)
    k, temperature = 8, 0.1
    scores = [F.normalize(torch.randn(6, k, generator=g), dim=1) for _ in range(3)]
    loss, metrics = SwAVLoss(temperature=temperature)(scores)
    torch.testing.assert_close(metrics["gap_to_uniform"], math.log(k) - loss.detach())
    mean_prediction = torch.cat([torch.softmax(s / temperature, dim=1) for s in scores]).mean(dim=0)
    expected = math.exp(-sum(float(p) * math.log(float(p)) for p in mean_prediction))
    assert float(metrics["effective_prototypes"]) == pytest.approx(expected, rel=1e-5)

    # Every sample predicts the same prototype: the codes are still equipartitioned (they used to report ~K), the
    # predictions say one prototype.
    same = torch.zeros(6, k)
    same[:, 3] = 1.0
    _, collapsed = SwAVLoss(temperature=0.01)([same, same.clone()])
    assert float(collapsed["effective_prototypes"]) == pytest.approx(1.0, abs=1e-3)


def test_swav_gap_split_by_predicting_crop_matches_a_loop_reference() -> None:
    """Two global crops (assigned) and three local ones: the gap of the global crops predicting each other's codes and
    the gap of the local crops predicting them, each against a loop over the terms; without local crops only the
    assigned split is reported."""
    g = torch.Generator().manual_seed(5)
    k, temperature = 8, 0.1
    scores = [F.normalize(torch.randn(6, k, generator=g, dtype=torch.float64), dim=1) for _ in range(5)]
    criterion = SwAVLoss(temperature=temperature, crops_for_assign=(0, 1))
    loss, metrics = criterion(scores)
    codes = {a: criterion.codes(scores[a]) for a in (0, 1)}

    def term(a: int, v: int) -> torch.Tensor:
        log_p = torch.log_softmax(scores[v] / temperature, dim=1)
        return torch.stack([-(codes[a][b] * log_p[b]).sum() for b in range(6)]).mean()

    assigned = torch.stack([term(0, 1), term(1, 0)]).mean()
    other = torch.stack([term(a, v) for a in (0, 1) for v in (2, 3, 4)]).mean()
    torch.testing.assert_close(metrics["gap_to_uniform_assigned"], math.log(k) - assigned)
    torch.testing.assert_close(metrics["gap_to_uniform_other"], math.log(k) - other)
    # Each assigned crop has one assigned and three other predictors, so the loss weighs them 1 : 3.
    torch.testing.assert_close(loss.detach(), (assigned + 3 * other) / 4)

    _, two_crops = criterion(scores[:2])
    assert "gap_to_uniform_other" not in two_crops
    torch.testing.assert_close(two_crops["gap_to_uniform_assigned"], two_crops["gap_to_uniform"])


# ---------------------------------------------------------------- the instance-level intra term
def test_intra_simclr_is_infonce_on_the_global_crops_and_ignores_local_crops() -> None:
    obj = objective(weights=LossWeights(intra=1, inter=0, mask=0), intra_clustering="simclr", instance_temperature=0.2)
    crops, _, _ = batches()
    calls: list[tuple[int, ...]] = []
    obj.model.encoder.register_forward_hook(lambda _m, inputs, _o: calls.append(tuple(inputs[0].shape)))
    loss, metrics = obj(crops, step=3)
    assert all(shape[-1] == 32 for shape in calls), f"local crops were encoded: {calls}"
    obj.eval()
    with torch.no_grad():
        loss_eval, _ = obj(crops, step=3)
        f1, f2 = obj.model.encode(crops[:2])
        want, _ = InfoNCELoss(0.2)(obj.model.projector(f1), obj.model.projector(f2))
    torch.testing.assert_close(loss_eval, want)
    assert "health/intra_prediction_entropy" not in metrics and "loss/intra" in metrics
    loss.backward()
    obj.after_backward(10)  # the unused 2D prototypes never move
    assert all(p.grad is None for p in obj.model.intra_prototypes.parameters())


def test_intra_simclr_composes_with_the_3d_terms() -> None:
    obj = objective(weights=LossWeights(intra=1, inter=1, mask=1), intra_clustering="simclr", freeze_prototypes_steps=0)
    crops, stacks, _ = batches()
    loss, metrics = obj(crops, stacks, step=5)
    torch.testing.assert_close(loss.detach(), metrics["loss/intra"] + metrics["loss/inter"] + metrics["loss/mask"])


def test_bad_clustering_names_the_key() -> None:
    with pytest.raises(ValueError, match="inter_clustering"):
        JointObjectiveConfig(inter_clustering="simclr")
    with pytest.raises(ValueError, match="koleo_weight"):
        JointObjectiveConfig(koleo_weight=-1.0)


# ---------------------------------------------------------------- spreading terms in the joint objective
def test_spreading_terms_add_their_weighted_loss() -> None:
    crops, _, _ = batches()
    plain = objective(weights=LossWeights(intra=1, inter=0, mask=0))
    plain.eval()
    spread = objective(weights=LossWeights(intra=1, inter=0, mask=0), koleo_weight=0.1, uniformity_weight=0.5)
    spread.eval()
    with torch.no_grad():
        base, _ = plain(crops, step=0)
        total, metrics = spread(crops, step=0)
        z = [spread.model.projector(f) for f in spread.model.encode(crops[:2])]
    koleo = koleo_loss(z[0]) + koleo_loss(z[1])
    uniform = (uniformity_loss(z[0]) + uniformity_loss(z[1])) / 2
    torch.testing.assert_close(metrics["loss/koleo"], koleo)
    torch.testing.assert_close(metrics["loss/uniformity"], uniform)
    torch.testing.assert_close(total, base + 0.1 * koleo + 0.5 * uniform)


# ---------------------------------------------------------------- health metrics reach the trainer as tensors
def test_every_metric_of_a_step_is_a_tensor() -> None:
    obj = objective(weights=LossWeights(intra=1, inter=1, mask=1))
    crops, stacks, _ = batches()
    _, metrics = obj(crops, stacks, step=0)
    assert "health/intra_std_mean" in metrics and "health/intra_gap_to_uniform" in metrics
    assert "health/intra_gap_to_uniform_assigned" in metrics and "health/intra_gap_to_uniform_other" in metrics
    for key, value in metrics.items():
        assert isinstance(value, torch.Tensor) and value.ndim == 0, f"{key} is a {type(value).__name__}"


def test_the_intra_loss_is_at_least_its_codes_entropy() -> None:
    """SwAV's loss is a cross-entropy of the codes and the predictions: H(codes) + KL >= H(codes), term by term, and
    each global crop's codes enter as many terms; so ``loss/intra >= health/intra_code_entropy >= 0`` (one head)."""
    obj = objective(weights=LossWeights(intra=1, inter=0, mask=0))
    obj.eval()
    crops, _, _ = batches()
    with torch.no_grad():
        _, metrics = obj(crops, step=0)
    assert 0.0 <= float(metrics["health/intra_code_entropy"]) <= float(metrics["loss/intra"]) + 1e-6


# ---------------------------------------------------------------- prototype freezing per stream
def test_staged_inter_prototypes_are_frozen_from_the_start_of_the_3d_stage() -> None:
    obj = objective(weights=LossWeights(intra=1, inter=1, mask=1), stages=[2, 4], freeze_prototypes_steps=3)
    crops, stacks, _ = batches()

    def inter_grads_after(step: int) -> bool:
        obj.zero_grad(set_to_none=True)
        loss, _ = obj(crops, stacks, step=step)
        loss.backward()
        obj.after_backward(step)
        return any(p.grad is not None for p in obj.model.inter_prototypes.parameters())

    assert not inter_grads_after(5)  # 3D stage started at step 4: its prototypes wait 3 steps, as L_intra's did
    assert inter_grads_after(7)


# ---------------------------------------------------------------- queues
def test_queues_hold_the_world_size_share_and_the_inter_queue_fills(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(joint_module, "world_size", lambda: 2)
    obj = objective(weights=LossWeights(intra=1, inter=1, mask=0), queue_length=16, inter_queue_length=8)
    assert obj.queue is not None and obj.queue.length == 8
    assert obj.inter_queue is not None and obj.inter_queue.length == 4
    crops, stacks, _ = batches()
    obj(crops, stacks, step=0)
    obj(crops, stacks, step=1)
    assert int(obj.inter_queue.filled) == 4 and obj.inter_queue.is_full
    with pytest.raises(ValueError, match="inter_queue_length"):
        objective(inter_queue_length=1)


# ---------------------------------------------------------------- float32 prototype scores
def test_prototype_scores_are_float32_under_bf16_autocast(monkeypatch: pytest.MonkeyPatch) -> None:
    obj = objective(weights=LossWeights(intra=1, inter=0, mask=0))
    seen: list[torch.dtype] = []
    original = obj.swav.forward

    def spy(scores, queue_scores=None):
        seen.extend(s.dtype for s in scores)
        return original(scores, queue_scores)

    monkeypatch.setattr(obj.swav, "forward", spy)
    crops, _, _ = batches()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        obj(crops, step=0)
    assert seen and set(seen) == {torch.float32}


# ---------------------------------------------------------------- per-method weight decay
def test_method_weight_decay_replaces_the_trainer_value() -> None:
    config = pretrain_config(
        overrides=["trainer.optimizer.weight_decay=0.05", "trainer.optimizer.weight_decay_end=0.1"]
    )
    assert optimizer_settings(config).weight_decay == 0.05
    swav = pretrain_config(overrides=["trainer.optimizer.weight_decay=0.05", "method.weight_decay=0.000001"])
    settings = optimizer_settings(swav)
    assert settings.weight_decay == 1e-6 and settings.weight_decay_end is None
    assert PretrainConfig().trainer.optimizer.weight_decay == pretrain_config().trainer.optimizer.weight_decay
    with pytest.raises(ValueError, match="weight_decay"):
        pretrain_config(overrides=["method.weight_decay=-1"])
