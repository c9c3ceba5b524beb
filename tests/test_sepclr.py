"""SepCLR (Louiset et al., ICLR 2024): loss terms against plain loops, gradient routing, and a toy separation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from medssl.models.heads import SepCLRHeads
from medssl.objectives.sepclr import SepCLRLoss, align_loss, joint_entropy_loss, uniform_loss

# ---- plainly written references (loops over rows and pairs) ----


def ref_align(x, y, alpha=2.0, tau=0.5):
    total = 0.0
    for i in range(x.shape[0]):
        total = total + torch.sqrt(((x[i] - y[i]) ** 2).sum()) ** alpha
    return total / x.shape[0] / (2 * tau)


def ref_uniform(x, tau=0.5):
    total, count = 0.0, 0
    for i in range(x.shape[0]):
        for j in range(i + 1, x.shape[0]):
            total = total + torch.exp(-((x[i] - x[j]) ** 2).sum() / (2 * tau))
            count += 1
    return torch.log(total / count)


def ref_jem(c, s, tau=0.5):
    n = c.shape[0]
    outer = 0.0
    for i in range(n):
        inner = 0.0
        for j in range(n):
            inner = inner + torch.exp(-((s[i] - s[j]) ** 2).sum() / (2 * tau)) * torch.exp(
                -((c[i] - c[j]) ** 2).sum() / (2 * tau)
            )
        outer = outer + torch.log(inner / n)
    return outer / n


def ref_sepclr(c1, c2, s1, s2, is_target, beta_s, beta_reg, lam, tau, w):
    """The composition of reference/methods.md §3.3 step 3–5, written with the loop references."""
    s1_null = torch.stack([s1[i] if is_target[i] else torch.zeros_like(s1[i]).detach() for i in range(len(s1))])
    s2_null = torch.stack([s2[i] if is_target[i] else torch.zeros_like(s2[i]).detach() for i in range(len(s2))])
    t = [i for i in range(len(is_target)) if is_target[i]]
    b = [i for i in range(len(is_target)) if not is_target[i]]
    common = ref_align(c1, c2, tau=tau) + w * (ref_uniform(c1, tau) + ref_uniform(c2, tau)) / 2
    salient = ref_align(s1[t], s2[t], tau=tau) + w * (ref_uniform(s1_null, tau) + ref_uniform(s2_null, tau)) / 2
    infoless = (ref_align(s1[b], 0 * s1[b].detach(), tau=tau) + ref_align(s2[b], 0 * s2[b].detach(), tau=tau)) / 2
    kjem = (ref_jem(c1, s1_null, tau) + ref_jem(c2, s2_null, tau)) / 2
    return common + beta_s * salient + beta_reg * infoless + lam * kjem


def _leaf(*shape, scale=1.0, normalize=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * scale
    if normalize:
        x = F.normalize(x, dim=1)
    return x.requires_grad_(True)


def _value_and_grad(fn, *inputs):
    value = fn(*inputs)
    grads = torch.autograd.grad(value, inputs)
    return value.detach(), grads


# ---- the three functions ----


@pytest.mark.parametrize("alpha, tau", [(2.0, 0.5), (1.0, 0.5), (2.0, 0.2)])
def test_align_matches_loop(alpha, tau):
    x, y = _leaf(7, 5, seed=1), _leaf(7, 5, seed=2)
    got, got_grads = _value_and_grad(lambda a, b: align_loss(a, b, alpha=alpha, tau=tau), x, y)
    ref, ref_grads = _value_and_grad(lambda a, b: ref_align(a, b, alpha, tau), x, y)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(got_grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("tau, scale", [(0.5, 1.0), (0.3, 0.5)])
def test_uniform_matches_loop(tau, scale):
    x = _leaf(9, 4, scale=scale, seed=3)
    got, (got_grad,) = _value_and_grad(lambda a: uniform_loss(a, tau), x)
    ref, (ref_grad,) = _value_and_grad(lambda a: ref_uniform(a, tau), x)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_grad, ref_grad, rtol=1e-4, atol=1e-5)
    assert got <= 0


def test_uniform_of_identical_rows_is_zero_and_far_rows_stay_finite():
    assert float(uniform_loss(torch.ones(5, 3))) == pytest.approx(0.0, abs=1e-6)
    far = torch.arange(4.0)[:, None] * torch.tensor([[30.0, 0.0]])  # exp(-900) underflows in a naive estimate
    value = uniform_loss(far)
    assert torch.isfinite(value) and value < -800


def test_joint_entropy_matches_loop():
    c = _leaf(8, 4, normalize=True, seed=4)
    s = _leaf(8, 3, seed=5)
    got, got_grads = _value_and_grad(joint_entropy_loss, c, s)
    ref, ref_grads = _value_and_grad(ref_jem, c, s)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(got_grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    assert -math.log(8) - 1e-5 <= float(got) <= 0.0


def test_joint_entropy_runs_in_float32_under_bfloat16_input():
    c, s = _leaf(6, 4, normalize=True, seed=6).detach(), _leaf(6, 4, seed=7).detach()
    got = joint_entropy_loss(c.bfloat16(), s.bfloat16())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref_jem(c.bfloat16().float(), s.bfloat16().float()), rtol=1e-5, atol=1e-5)


# ---- the composed loss ----


def _batch(n=8, dc=4, ds=3, seed=10):
    c1, c2 = _leaf(n, dc, normalize=True, seed=seed), _leaf(n, dc, normalize=True, seed=seed + 1)
    s1, s2 = _leaf(n, ds, seed=seed + 2), _leaf(n, ds, seed=seed + 3)
    is_target = torch.tensor([False, True, False, True, True, False, True, False])[:n]
    return c1, c2, s1, s2, is_target


@pytest.mark.parametrize(
    "beta_s, beta_reg, lam, tau, w",
    [(1.0, 10.0, 10.0, 0.5, 2.0), (3.0, 0.5, 2.0, 0.25, 1.0), (1000.0, 1000.0, 10, 0.5, 2)],
)
def test_sepclr_loss_matches_loop_composition(beta_s, beta_reg, lam, tau, w):
    c1, c2, s1, s2, is_target = _batch()
    criterion = SepCLRLoss(beta_s, beta_reg, lam, tau, w)
    got, got_grads = _value_and_grad(lambda *a: criterion(*a, is_target)[0], c1, c2, s1, s2)
    ref, ref_grads = _value_and_grad(
        lambda *a: ref_sepclr(*a, is_target.tolist(), beta_s, beta_reg, lam, tau, w), c1, c2, s1, s2
    )
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)
    for g, r in zip(got_grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


def test_metrics_report_terms_and_norms():
    c1, c2, s1, s2, is_target = _batch()
    loss, metrics = SepCLRLoss(beta_salient=2.0, beta_infoless=3.0, lambda_jem=4.0)(c1, c2, s1, s2, is_target)
    combined = metrics["common"] + 2 * metrics["salient"] + 3 * metrics["infoless"] + 4 * metrics["kjem"]
    torch.testing.assert_close(loss.detach(), combined)
    bg, tg = ~is_target, is_target
    norms_bg = torch.cat([s1[bg].norm(dim=1), s2[bg].norm(dim=1)]).mean()
    norms_tg = torch.cat([s1[tg].norm(dim=1), s2[tg].norm(dim=1)]).mean()
    torch.testing.assert_close(metrics["salient_norm_background"], norms_bg.detach())
    torch.testing.assert_close(metrics["salient_norm_target"], norms_tg.detach())
    assert all(not v.requires_grad for v in metrics.values())


def test_background_salient_rows_get_gradient_only_from_infoless():
    c1, c2, s1, s2, is_target = _batch()
    bg = ~is_target
    # Without the infoless term, nothing reaches background salient rows (s' replaces them by constants).
    loss, _ = SepCLRLoss(beta_salient=5.0, beta_infoless=0.0, lambda_jem=10.0)(c1, c2, s1, s2, is_target)
    g1, g2 = torch.autograd.grad(loss, (s1, s2))
    assert torch.count_nonzero(g1[bg]) == 0 and torch.count_nonzero(g2[bg]) == 0
    assert g1[is_target].abs().sum() > 0 and g2[is_target].abs().sum() > 0
    # With it, their gradient is exactly that of beta * ½ mean‖s_bg‖²: beta * s / n_bg (tau = 0.5).
    beta = 7.0
    loss, _ = SepCLRLoss(beta_salient=5.0, beta_infoless=beta, lambda_jem=10.0)(c1, c2, s1, s2, is_target)
    g1, g2 = torch.autograd.grad(loss, (s1, s2))
    n_bg = int(bg.sum())
    torch.testing.assert_close(g1[bg], beta * s1[bg].detach() / n_bg)
    torch.testing.assert_close(g2[bg], beta * s2[bg].detach() / n_bg)


def test_missing_group_or_bad_arguments_raise():
    c1, c2, s1, s2, _ = _batch()
    criterion = SepCLRLoss()
    with pytest.raises(ValueError, match="background"):
        criterion(c1, c2, s1, s2, torch.ones(8, dtype=torch.bool))
    with pytest.raises(ValueError, match="target"):
        criterion(c1, c2, s1, s2, torch.zeros(8, dtype=torch.bool))
    with pytest.raises(ValueError, match="is_target"):
        criterion(c1, c2, s1, s2, torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="s1 and s2"):
        criterion(c1, c2, s1, s2[:, :2], torch.ones(8, dtype=torch.bool))
    for kwargs, name in [
        ({"beta_salient": -1.0}, "beta_salient"),
        ({"beta_infoless": -1.0}, "beta_infoless"),
        ({"lambda_jem": -0.1}, "lambda_jem"),
        ({"tau": 0.0}, "tau"),
        ({"uniformity_weight": -2.0}, "uniformity_weight"),
    ]:
        with pytest.raises(ValueError, match=name):
            SepCLRLoss(**kwargs)
    with pytest.raises(ValueError, match="hidden_dim"):
        SepCLRHeads(16, hidden_dim=0)
    with pytest.raises(ValueError, match="tau"):
        uniform_loss(torch.randn(4, 2), tau=-1.0)


# ---- heads ----


def test_heads_shapes_norms_and_two_encoder_variant():
    heads = SepCLRHeads(in_dim=16, common_dim=6, salient_dim=5, hidden_dim=12, salient_in_dim=10)
    c, s = heads(torch.randn(4, 16), torch.randn(4, 10))
    assert c.shape == (4, 6) and s.shape == (4, 5)
    torch.testing.assert_close(c.norm(dim=1), torch.ones(4))
    assert not torch.allclose(s.norm(dim=1), torch.ones(4))
    one_trunk = SepCLRHeads(in_dim=16, common_dim=6, salient_dim=5, hidden_dim=12)
    c, s = one_trunk(torch.randn(4, 16))
    assert c.shape == (4, 6) and s.shape == (4, 5)


# ---- toy problem with a known answer ----


def test_toy_problem_background_salient_collapses_to_zero_and_target_grows():
    """Inputs mix a shared factor u (all samples) and a target-only factor v (0 for background)."""
    torch.manual_seed(0)
    k, batch = 4, 64
    mixing = torch.linalg.qr(torch.randn(2 * k, 2 * k))[0]
    is_target = torch.arange(batch) >= batch // 2

    def sample(g):
        u = torch.randn(batch, k, generator=g)
        v = torch.randn(batch, k, generator=g) * is_target[:, None]
        return torch.cat([u, v], dim=1) @ mixing

    heads = SepCLRHeads(2 * k, common_dim=8, salient_dim=8, hidden_dim=32)
    criterion = SepCLRLoss()  # paper's pretrained-encoder weights: beta_s 1, beta_reg 10, lambda 10
    optimizer = torch.optim.Adam(heads.parameters(), lr=1e-2)

    def salient_norms():
        heads.eval()
        with torch.no_grad():
            _, s = heads(sample(torch.Generator().manual_seed(123)))
        heads.train()
        norms = s.norm(dim=1)
        return float(norms[~is_target].mean()), float(norms[is_target].mean())

    start_bg, _ = salient_norms()
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        x = sample(g)
        c1, s1 = heads(x + 0.1 * torch.randn(x.shape, generator=g))
        c2, s2 = heads(x + 0.1 * torch.randn(x.shape, generator=g))
        loss, _ = criterion(c1, c2, s1, s2, is_target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.isfinite(loss)
    end_bg, end_target = salient_norms()
    assert end_bg < start_bg
    assert end_bg < 0.2 * end_target
