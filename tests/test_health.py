"""Health metrics (DESIGN §2.4): collapsed and isotropic embeddings, and plain references."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from medssl.objectives.health import (
    alignment,
    collapse_report,
    effective_prototypes,
    embedding_std,
    similarity_histograms,
    uniformity,
)


def ref_alignment(x, y, alpha=2.0):
    x, y = F.normalize(x, dim=1), F.normalize(y, dim=1)
    return sum(float(torch.sqrt(((x[i] - y[i]) ** 2).sum())) ** alpha for i in range(len(x))) / len(x)


def ref_uniformity(x, t=2.0):
    x = F.normalize(x, dim=1)
    terms = [math.exp(-t * float(((x[i] - x[j]) ** 2).sum())) for i in range(len(x)) for j in range(i + 1, len(x))]
    return math.log(sum(terms) / len(terms))


@pytest.mark.parametrize("alpha", [2.0, 1.0])
def test_alignment_matches_loop(alpha):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(10, 6, generator=g), torch.randn(10, 6, generator=g)
    assert float(alignment(x, y, alpha)) == pytest.approx(ref_alignment(x, y, alpha), rel=1e-5)


@pytest.mark.parametrize("t", [2.0, 0.5])
def test_uniformity_matches_loop(t):
    x = torch.randn(12, 5, generator=torch.Generator().manual_seed(1))
    assert float(uniformity(x, t)) == pytest.approx(ref_uniformity(x, t), rel=1e-5)


def test_metrics_do_not_track_gradients():
    x = torch.randn(6, 4, requires_grad=True)
    assert not alignment(x, x * 2).requires_grad
    assert not uniformity(x).requires_grad


def test_collapsed_embedding_is_flagged():
    z = torch.randn(1, 8).repeat(32, 1)
    stds = embedding_std(z)
    assert stds["std_mean"] == pytest.approx(0.0, abs=1e-6) and stds["std_min"] == pytest.approx(0.0, abs=1e-6)
    assert float(uniformity(z)) == pytest.approx(0.0, abs=1e-6)
    assert float(alignment(z, z)) == pytest.approx(0.0, abs=1e-10)
    one_hot = F.one_hot(torch.full((32,), 3), num_classes=10).float()
    assert effective_prototypes(one_hot) == pytest.approx(1.0)
    assert effective_prototypes(torch.full((32,), 3), num_prototypes=10) == pytest.approx(1.0)
    report = collapse_report(z, z)
    assert report["std_min"] == pytest.approx(0.0, abs=1e-6)
    assert report["uniformity"] == pytest.approx(0.0, abs=1e-6)
    assert report["alignment"] == pytest.approx(0.0, abs=1e-10)
    assert report["negative_similarity"] == pytest.approx(1.0, abs=1e-5)


def test_isotropic_embedding_is_healthy():
    dim = 16
    z = torch.randn(4000, dim, generator=torch.Generator().manual_seed(2)) * 5.0  # scale is irrelevant
    stds = embedding_std(z)
    expected = 1 / math.sqrt(dim)
    assert stds["std_isotropic"] == pytest.approx(expected)
    assert stds["std_mean"] == pytest.approx(expected, rel=0.2)
    assert stds["std_min"] == pytest.approx(expected, rel=0.2)
    # Uniform points on S^15: E exp(-2‖a-b‖²) = e^-4 E exp(4 cos) is about e^-4 * 1.6, far below 0 in log.
    assert float(uniformity(z[:500])) < -3.0


def test_effective_prototypes_of_uniform_usage_is_k():
    k = 7
    assert effective_prototypes(torch.full((20, k), 1.0 / k)) == pytest.approx(k, rel=1e-5)
    labels = torch.arange(70) % k
    assert effective_prototypes(labels, num_prototypes=k) == pytest.approx(k, rel=1e-5)
    random_labels = torch.randint(k, (5000,), generator=torch.Generator().manual_seed(3))
    assert effective_prototypes(random_labels, num_prototypes=k) == pytest.approx(k, rel=0.02)
    half = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    assert effective_prototypes(half) == pytest.approx(2.0, rel=1e-5)


def test_effective_prototypes_rejects_bad_input():
    with pytest.raises(ValueError, match="num_prototypes"):
        effective_prototypes(torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        effective_prototypes(torch.tensor([0, 3]), num_prototypes=3)
    with pytest.raises(ValueError, match="num_prototypes"):
        effective_prototypes(torch.full((4, 5), 0.2), num_prototypes=4)


def test_similarity_histograms_of_identical_orthogonal_views():
    z = torch.eye(6, 8)  # 6 orthogonal unit vectors
    positive, negative = similarity_histograms(z, z.clone(), bins=20)
    assert positive.shape == negative.shape == (20,)
    assert float(positive.sum()) == pytest.approx(1.0) and float(negative.sum()) == pytest.approx(1.0)
    assert float(positive[-1]) == pytest.approx(1.0)  # every positive has cosine 1
    assert float(negative[10]) == pytest.approx(1.0)  # every negative has cosine 0: bin [0, 0.1)


def test_similarity_histograms_count_the_right_pairs():
    g = torch.Generator().manual_seed(4)
    z1, z2 = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    positive, negative = similarity_histograms(z1, z2, bins=4)
    a, b = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    pos = (a * b).sum(dim=1)
    allz = torch.cat([a, b])
    neg = [float(allz[i] @ allz[j]) for i in range(10) for j in range(i + 1, 10) if j != i + 5]
    assert len(neg) == 40
    edges = [-1.0, -0.5, 0.0, 0.5, 1.0001]
    ref_pos = [sum(lo <= float(v) < hi for v in pos) / 5 for lo, hi in itertools.pairwise(edges)]
    ref_neg = [sum(lo <= v < hi for v in neg) / 40 for lo, hi in itertools.pairwise(edges)]
    torch.testing.assert_close(positive, torch.tensor(ref_pos))
    torch.testing.assert_close(negative, torch.tensor(ref_neg))


def test_collapse_report_is_plain_floats():
    g = torch.Generator().manual_seed(5)
    z1, z2 = torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g)
    report = collapse_report(z1, z2)
    assert set(report) == {
        "uniformity",
        "std_mean",
        "std_min",
        "std_isotropic",
        "alignment",
        "positive_similarity",
        "negative_similarity",
    }
    assert all(isinstance(v, float) for v in report.values())
    assert set(collapse_report(z1)) == {"uniformity", "std_mean", "std_min", "std_isotropic"}
