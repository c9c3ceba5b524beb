"""SimCLR InfoNCE (Chen et al., ICML 2020) and MoCHi hard negative mixing (Kalantidis et al., NeurIPS 2020)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ranks import spawn_ranks

from medssl.objectives.simclr import InfoNCELoss, MoCHiConfig, mix_hard_negatives


def ref_info_nce(z1, z2, temperature, extra=None):
    """Plain loop: 2B anchors, softmax over the other 2B - 1 embeddings (plus optional extra keys per anchor)."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n, b = z.shape[0], z1.shape[0]
    total = 0.0
    for a in range(n):
        positive = (a + b) % n
        candidates = [torch.dot(z[a], z[j]) / temperature for j in range(n) if j != a]
        if extra is not None:
            candidates += [torch.dot(z[a], k) / temperature for k in extra[a]]
        total = total - (torch.dot(z[a], z[positive]) / temperature - torch.logsumexp(torch.stack(candidates), 0))
    return total / n


def _views(b=6, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(b, d, generator=g).requires_grad_(True)
    z2 = torch.randn(b, d, generator=g).requires_grad_(True)
    return z1, z2


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_info_nce_matches_loop(temperature):
    z1, z2 = _views()
    loss, metrics = InfoNCELoss(temperature)(z1, z2)
    got_grads = torch.autograd.grad(loss, (z1, z2))
    ref = ref_info_nce(z1, z2, temperature)
    ref_grads = torch.autograd.grad(ref, (z1, z2))
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(got_grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    a, b = F.normalize(z1.detach(), dim=1), F.normalize(z2.detach(), dim=1)
    torch.testing.assert_close(metrics["positive_similarity"], (a * b).sum(1).mean())
    assert set(metrics) == {"positive_similarity", "negative_similarity", "accuracy"}


def test_identical_orthogonal_views_give_near_zero_loss():
    z = torch.eye(4, 8) * 3.0  # norms do not matter
    loss, metrics = InfoNCELoss(temperature=0.05)(z, z.clone())
    assert float(loss) < 1e-6
    assert float(metrics["accuracy"]) == 1.0
    assert float(metrics["positive_similarity"]) == pytest.approx(1.0)
    assert float(metrics["negative_similarity"]) == pytest.approx(0.0, abs=1e-6)


def test_logits_layout_masks_self_and_points_at_other_view():
    z1, z2 = _views(b=3)
    out = InfoNCELoss(0.2).logits(z1, z2)
    assert out.logits.shape == (6, 6) and out.n_real == 6
    assert out.targets.tolist() == [3, 4, 5, 0, 1, 2]
    assert torch.isinf(out.logits.diagonal()).all()
    assert torch.isfinite(out.logits[~torch.eye(6, dtype=torch.bool)]).all()


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="temperature"):
        InfoNCELoss(temperature=0.0)
    for kwargs, name in [
        ({"n_hardest": 0}, "n_hardest"),
        ({"n_synthetic": -1}, "n_synthetic"),
        ({"n_synthetic_query": -1}, "n_synthetic_query"),
        ({"start_step": -1}, "start_step"),
    ]:
        with pytest.raises(ValueError, match=name):
            MoCHiConfig(**kwargs)
    with pytest.raises(ValueError, match="hard_negative_mixing"):
        InfoNCELoss(hard_negative_mixing={"n_hardest": 4})  # type: ignore[arg-type]
    z1, z2 = _views()
    with pytest.raises(ValueError, match="z1 and z2"):
        InfoNCELoss()(z1, z2[:, :3])


# ---- MoCHi ----


def _anchors_keys(a=5, k=12, d=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    anchors = F.normalize(torch.randn(a, d, generator=g), dim=1).requires_grad_(True)
    keys = F.normalize(torch.randn(k, d, generator=g), dim=1).requires_grad_(True)
    return anchors, keys


def test_synthetic_negatives_are_unit_norm_detached_and_seeded():
    anchors, keys = _anchors_keys()
    mask = torch.ones(5, 12, dtype=torch.bool)
    config = MoCHiConfig(n_hardest=4, n_synthetic=6, n_synthetic_query=3)
    synthetic = mix_hard_negatives(anchors, keys, mask, config, torch.Generator().manual_seed(0))
    assert synthetic.shape == (5, 9, 8)
    assert not synthetic.requires_grad and synthetic.grad_fn is None
    torch.testing.assert_close(synthetic.norm(dim=-1), torch.ones(5, 9))
    again = mix_hard_negatives(anchors, keys, mask, config, torch.Generator().manual_seed(0))
    torch.testing.assert_close(synthetic, again)
    other = mix_hard_negatives(anchors, keys, mask, config, torch.Generator().manual_seed(1))
    assert not torch.allclose(synthetic, other)


def test_mixing_uses_the_hardest_allowed_negative():
    anchors, keys = _anchors_keys()
    mask = torch.rand(5, 12, generator=torch.Generator().manual_seed(2)) > 0.4
    mask[:, 0] = True
    # n_hardest=1: mixing a negative with itself returns it, so every synthetic key is the hardest allowed negative.
    config = MoCHiConfig(n_hardest=1, n_synthetic=3, n_synthetic_query=2)
    synthetic = mix_hard_negatives(anchors, keys, mask, config)
    sim = (anchors @ keys.T).detach().masked_fill(~mask, -2.0)
    hardest = keys.detach()[sim.argmax(dim=1)]  # [A, D]
    torch.testing.assert_close(synthetic[:, :3], hardest[:, None].expand(5, 3, 8))
    # Query mixing, beta in [0, 0.5], moves the key toward the query: at least as similar as the hardest negative.
    query_sim = torch.einsum("ad,asd->as", anchors.detach(), synthetic[:, 3:])
    assert (query_sim >= sim.max(dim=1).values[:, None] - 1e-6).all()
    assert (query_sim < 1.0).all()


def _mochi_loss(config, **kwargs):
    return InfoNCELoss(temperature=0.2, hard_negative_mixing=config, **kwargs)


def test_mixing_adds_columns_and_makes_the_loss_harder():
    z1, z2 = _views(b=8)
    config = MoCHiConfig(n_hardest=5, n_synthetic=4, n_synthetic_query=2)
    criterion = _mochi_loss(config)
    out = criterion.logits(z1, z2, step=0, generator=torch.Generator().manual_seed(0))
    assert out.logits.shape == (16, 16 + 6) and out.n_real == 16
    plain, _ = InfoNCELoss(temperature=0.2)(z1, z2)
    mixed, metrics = criterion(z1, z2, generator=torch.Generator().manual_seed(0))
    assert float(mixed.detach()) > float(plain.detach())
    assert "synthetic_similarity" in metrics


def test_mixing_value_and_gradient_treat_synthetic_keys_as_constants():
    z1, z2 = _views(b=5, d=6, seed=3)
    config = MoCHiConfig(n_hardest=3, n_synthetic=2, n_synthetic_query=2)
    loss, _ = _mochi_loss(config)(z1, z2, generator=torch.Generator().manual_seed(7))
    got_grads = torch.autograd.grad(loss, (z1, z2))
    # Rebuild the same synthetic keys (same generator seed), then use them as constants in the loop reference.
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    idx = torch.arange(10)
    mask = ~((idx[None] == idx[:, None]) | (idx[None] == ((idx + 5) % 10)[:, None]))
    synthetic = mix_hard_negatives(z, z, mask, config, torch.Generator().manual_seed(7))
    ref = ref_info_nce(z1, z2, 0.2, extra=synthetic)
    ref_grads = torch.autograd.grad(ref, (z1, z2))
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(got_grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_start_step_and_eval_mode_are_respected():
    z1, z2 = _views()
    criterion = _mochi_loss(MoCHiConfig(n_hardest=4, n_synthetic=3, n_synthetic_query=1, start_step=2))
    plain, _ = InfoNCELoss(temperature=0.2)(z1, z2)
    # explicit step
    assert criterion.logits(z1, z2, step=1).logits.shape[1] == 12
    assert criterion.logits(z1, z2, step=2).logits.shape[1] == 16
    # internal counter: calls 0 and 1 are plain, call 2 mixes
    for expected_mixing in (False, False, True):
        loss, metrics = criterion(z1, z2)
        assert ("synthetic_similarity" in metrics) is expected_mixing
        assert torch.allclose(loss, plain) is not expected_mixing
    criterion.eval()
    loss, metrics = criterion(z1, z2, step=100)
    assert "synthetic_similarity" not in metrics
    torch.testing.assert_close(loss, plain)


# ---- two CPU ranks (gloo): gathered negatives and rank offsets ----


def _two_rank_worker(rank, init_file, z1, z2, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        b = z1.shape[0] // 2
        local1 = z1[rank * b : (rank + 1) * b].clone().requires_grad_(True)
        local2 = z2[rank * b : (rank + 1) * b].clone().requires_grad_(True)
        loss, _ = InfoNCELoss(temperature=0.3)(local1, local2)
        loss.backward()
        torch.save({"loss": loss.detach(), "g1": local1.grad, "g2": local2.grad}, f"{out_dir}/rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()), reason="needs the gloo backend"
)
def test_two_ranks_see_the_global_batch(tmp_path):
    z1, z2 = _views(b=6, d=5, seed=4)
    z1, z2 = z1.detach(), z2.detach()
    spawn_ranks(_two_rank_worker, (z1, z2, str(tmp_path)))
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    full1, full2 = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    # Single process on the global batch, with the pairs in rank-major order.
    global_loss, _ = InfoNCELoss(temperature=0.3)(full1, full2)
    global_loss.backward()
    torch.testing.assert_close((results[0]["loss"] + results[1]["loss"]) / 2, global_loss.detach())
    # all_gather's backward sums the ranks' gradients: each rank holds the grad of (L_0 + L_1) = 2 * global loss.
    for r in range(2):
        torch.testing.assert_close(results[r]["g1"], 2 * full1.grad[r * 3 : (r + 1) * 3], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(results[r]["g2"], 2 * full2.grad[r * 3 : (r + 1) * 3], rtol=1e-4, atol=1e-6)
