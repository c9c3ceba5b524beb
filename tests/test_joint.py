"""The joint objective: all losses in one step, weights, staged schedule, prototype freezing."""

from __future__ import annotations

import pytest
import torch

from medssl.models.joint import JointModel, JointModelConfig
from medssl.objectives.joint import (
    JointObjective,
    JointObjectiveConfig,
    LossWeights,
    SepBatch,
    StackBatch,
)

TINY = JointModelConfig(
    encoder="resnet10",
    max_pool=True,
    projector_hidden=32,
    projector_dim=16,
    intra_prototypes=[10, 7],
    transformer_dim=16,
    transformer_depth=1,
    transformer_heads=2,
    inter_prototypes=[6],
    sep_common_dim=4,
    sep_salient_dim=4,
    sep_hidden=8,
)


def batches(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    crops = [torch.rand(4, 1, 32, 32, generator=g) for _ in range(2)] + [
        torch.rand(4, 1, 16, 16, generator=g) for _ in range(2)
    ]
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    stacks = StackBatch(
        [torch.rand(2, 6, 1, 32, 32, generator=g) for _ in range(2)], mask, torch.arange(6.0).repeat(2, 1)
    )
    sep = SepBatch([torch.rand(4, 1, 32, 32, generator=g) for _ in range(2)], torch.tensor([False, True, False, True]))
    return crops, stacks, sep


def objective(**kwargs) -> JointObjective:
    torch.manual_seed(0)
    return JointObjective(JointModel(TINY), JointObjectiveConfig(**kwargs))


def test_all_losses_in_one_step_reach_every_part():
    obj = objective(weights=LossWeights(intra=1, inter=1, mask=1, sep=0.5), freeze_prototypes_steps=0)
    crops, stacks, sep = batches()
    loss, metrics = obj(crops, stacks, sep, step=10)
    expected = metrics["loss/intra"] + metrics["loss/inter"] + metrics["loss/mask"] + 0.5 * metrics["loss/sep"]
    torch.testing.assert_close(loss.detach(), expected)
    loss.backward()
    obj.after_backward(10)
    model = obj.model
    for name, part in [
        ("encoder", model.encoder),
        ("projector", model.projector),
        ("intra prototypes", model.intra_prototypes),
        ("transformer", model.transformer),
        ("inter prototypes", model.inter_prototypes),
        ("sep heads", model.sep_heads),
    ]:
        grads = [p.grad for p in part.parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads), f"{name} got no gradient"
    assert model.masked.mask_token.grad is not None
    for key in ("health/intra_effective_prototypes", "health/inter_alignment", "health/salient_norm_target"):
        assert torch.isfinite(torch.as_tensor(metrics[key]))


def test_one_encoder_pass_per_resolution_and_no_pass_on_padding():
    obj = objective(weights=LossWeights(intra=1, inter=1, mask=1, sep=1))
    calls: list[int] = []
    obj.model.encoder.register_forward_hook(lambda _m, inputs, _o: calls.append(inputs[0].shape[0]))
    crops, stacks, sep = batches()
    obj(crops, stacks, sep)
    real_slices = int(stacks.mask.sum())
    assert sorted(calls) == sorted([2 * 4 + 2 * real_slices + 2 * 4, 2 * 4])


def test_zero_weight_skips_a_loss():
    obj = objective(weights=LossWeights(intra=1, inter=0, mask=0, sep=0))
    crops, stacks, sep = batches()
    loss, metrics = obj(crops, stacks, sep)
    assert "loss/inter" not in metrics and "loss/mask" not in metrics and "loss/sep" not in metrics
    torch.testing.assert_close(loss.detach(), metrics["loss/intra"])
    with pytest.raises(ValueError, match="no active loss"):
        obj(None, stacks, sep)


def test_staged_schedule_freezes_the_encoder_in_the_masked_stage():
    obj = objective(stages=[2, 4], freeze_prototypes_steps=0)
    crops, stacks, sep = batches()
    stages = []
    for step in range(6):
        obj.zero_grad(set_to_none=True)
        loss, metrics = obj(crops, stacks, sep, step=step)
        loss.backward()
        stages.append(obj.plan(step).name)
        encoder_grad = any(p.grad is not None for p in obj.model.encoder.parameters())
        if stages[-1] == "masked":
            assert not encoder_grad and "loss/mask" in metrics and "loss/intra" not in metrics
            assert obj.model.masked.mask_token.grad is not None
        else:
            assert encoder_grad
    assert stages == ["2d", "2d", "masked", "masked", "3d", "3d"]


def test_prototypes_are_frozen_then_learn_and_stay_normalised():
    obj = objective(freeze_prototypes_steps=3)
    crops, stacks, sep = batches()
    for step in (0, 5):
        obj.zero_grad(set_to_none=True)
        obj.normalize_prototypes()
        for head in obj.model.intra_prototypes.heads:
            torch.testing.assert_close(head.weight.norm(dim=1), torch.ones(head.weight.shape[0]))
        loss, _ = obj(crops, stacks, sep, step=step)
        loss.backward()
        obj.after_backward(step)
        has_grad = all(p.grad is not None for p in obj.model.intra_prototypes.parameters())
        assert has_grad == (step >= 3)


def test_bad_config_values_name_the_key():
    with pytest.raises(ValueError, match=r"weights\.inter"):
        LossWeights(inter=-1)
    with pytest.raises(ValueError, match="stages"):
        JointObjectiveConfig(stages=[5, 2])


def test_swav_queue_fills_then_joins_the_codes():
    reference = objective(weights=LossWeights(intra=1, inter=0, mask=0))
    obj = objective(weights=LossWeights(intra=1, inter=0, mask=0), queue_length=8)
    assert obj.queue is not None and not obj.queue.is_full
    obj(batches(seed=1)[0], step=0)
    assert not obj.queue.is_full  # 4 of 8 rows
    obj(batches(seed=2)[0], step=1)
    assert obj.queue.is_full
    crops = batches(seed=0)[0]
    without, _ = reference(crops, step=2)
    with_queue, _ = obj(crops, step=2)
    assert without.item() != with_queue.item(), "a full queue of other samples changes the codes"


def test_simclr_baseline_runs_on_the_same_model():
    from medssl.objectives.baseline import SimCLRObjective

    torch.manual_seed(0)
    model = JointModel(TINY)
    crops, _, _ = batches()
    loss, metrics = SimCLRObjective(model, temperature=0.2)(crops)
    loss.backward()
    assert all(p.grad is not None for p in model.encoder.parameters())
    assert metrics["loss/total"] == loss.detach()
    assert "health/accuracy" in metrics


def test_deepcluster_streams_wait_for_a_clustering_then_train_against_it():
    torch.manual_seed(0)
    obj = JointObjective(
        JointModel(TINY),
        JointObjectiveConfig(intra_clustering="deepcluster", inter_clustering="deepcluster", freeze_prototypes_steps=0),
        dataset_sizes=(12, 6),
    )
    weights = LossWeights(intra=1, inter=1, mask=0)
    obj.config.weights = weights
    for b in range(3):  # fill both memory banks
        crops, stacks, _ = batches(seed=b)
        stacks.index = torch.tensor([2 * b, 2 * b + 1])
        loss, metrics = obj(crops, stacks, crop_index=torch.arange(4 * b, 4 * b + 4))
        assert loss.item() == 0.0 and metrics["loss/intra"] == 0.0, "no pseudo-labels before the first clustering"
    metrics = obj.cluster(torch.Generator().manual_seed(0))
    assert any(key.startswith("cluster/intra") for key in metrics) and any(
        k.startswith("cluster/inter") for k in metrics
    )
    for head in obj.model.intra_prototypes.heads:
        torch.testing.assert_close(head.weight.norm(dim=1), torch.ones(head.weight.shape[0]))
    crops, stacks, _ = batches(seed=0)
    stacks.index = torch.tensor([0, 1])
    loss, metrics = obj(crops, stacks, crop_index=torch.arange(4))
    assert metrics["loss/intra"] > 0 and metrics["loss/inter"] > 0
    loss.backward()
    obj.after_backward(step=100)
    assert all(p.grad is None for p in obj.model.intra_prototypes.parameters()), "k-means sets the prototypes"
    assert any(p.grad is not None for p in obj.model.encoder.parameters())
    with pytest.raises(ValueError, match="indices"):
        obj(crops, stacks)
    with pytest.raises(ValueError, match="dataset_sizes"):
        JointObjective(JointModel(TINY), JointObjectiveConfig(inter_clustering="deepcluster"))
    with pytest.raises(ValueError, match="intra_clustering"):
        JointObjectiveConfig(intra_clustering="kmeans")
