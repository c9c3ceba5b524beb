"""Sinkhorn-Knopp, SwAV and DeepCluster-v2 (Caron et al., NeurIPS 2020) against plainly written loop references."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from ranks import spawn_ranks
from torch import nn

from medssl.objectives.deepcluster import (
    IGNORE_INDEX,
    DeepClusterHead,
    DeepClusterV2,
    MemoryBank,
    spherical_kmeans,
)
from medssl.objectives.distributed import all_gather_with_grad, all_reduce_sum, is_distributed, world_size
from medssl.objectives.sinkhorn import sinkhorn_knopp
from medssl.objectives.swav import EmbeddingQueue, SwAVLoss

# ---- plainly written references (loops, float64) ----


def ref_sinkhorn(scores, epsilon=0.05, iterations=3):
    """SwAV's distributed_sinkhorn on one rank, written with explicit loops: returns [B, K] codes."""
    q = torch.exp(scores.detach().double() / epsilon).T.clone()  # [K, B]
    n_protos, batch = q.shape
    q = q / q.sum()
    for _ in range(iterations):
        for k in range(n_protos):
            q[k] = q[k] / q[k].sum() / n_protos
        for b in range(batch):
            q[:, b] = q[:, b] / q[:, b].sum() / batch
    return (q * batch).T


def ref_swav(scores, crops_for_assign, temperature=0.1, epsilon=0.05, iterations=3, queue_scores=None):
    n_crops, batch = len(scores), scores[0].shape[0]
    total = 0.0
    for i, a in enumerate(crops_for_assign):
        s = scores[a].detach().double()
        if queue_scores is not None and queue_scores[i] is not None:
            s = torch.cat([queue_scores[i].detach().double(), s])
        q = ref_sinkhorn(s, epsilon, iterations)[-batch:]
        term = 0.0
        for v in range(n_crops):
            if v == a:
                continue
            for b in range(batch):
                logits = scores[v][b] / temperature
                log_p = logits - torch.logsumexp(logits, dim=0)
                term = term - (q[b] * log_p).sum() / batch
        total = total + term / (n_crops - 1)
    return total / len(crops_for_assign)


def ref_kmeans(x, init_centroids, iterations):
    c = init_centroids.clone()
    for _ in range(iterations):
        labels = [int(torch.argmax(c @ x[n])) for n in range(x.shape[0])]
        new = c.clone()
        for j in range(c.shape[0]):
            members = [x[n] for n in range(x.shape[0]) if labels[n] == j]
            if members:
                mean = torch.stack(members).mean(0)
                new[j] = mean / mean.norm()
        c = new
    labels = torch.tensor([int(torch.argmax(c @ x[n])) for n in range(x.shape[0])])
    return c, labels


def ref_deepcluster(scores, table, index, temperature=0.1):
    total = 0.0
    for h, views in enumerate(scores):
        head, count = 0.0, 0
        for s in views:
            for b in range(index.shape[0]):
                label = int(table[h, index[b]])
                if label == IGNORE_INDEX:
                    continue
                logits = s[b] / temperature
                head = head - (logits[label] - torch.logsumexp(logits, dim=0))
                count += 1
        total = total + (head / count if count else 0.0)
    return total / len(scores)


def unit(*shape, generator, dtype=torch.float64):
    return F.normalize(torch.randn(*shape, generator=generator, dtype=dtype), dim=-1)


def make_scores(n_crops, batch, k, dim, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    protos = unit(k, dim, generator=g, dtype=dtype)
    z = [unit(batch, dim, generator=g, dtype=dtype) for _ in range(n_crops)]
    return [(zv @ protos.T).requires_grad_() for zv in z], protos


# ---- Sinkhorn-Knopp ----


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sinkhorn_matches_loop_reference_and_marginals(dtype):
    g = torch.Generator().manual_seed(0)
    batch, k = 12, 5
    scores = unit(batch, 4, generator=g) @ unit(k, 4, generator=g).T
    q = sinkhorn_knopp(scores.to(dtype), epsilon=0.05, iterations=3)
    expected = ref_sinkhorn(scores, 0.05, 3)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert q.shape == (batch, k) and q.dtype == dtype
    torch.testing.assert_close(q.double(), expected, atol=tol, rtol=tol)
    p = q.double() / batch  # the transport plan before the final × B
    torch.testing.assert_close(p.sum(1), torch.full((batch,), 1 / batch, dtype=torch.float64), atol=tol, rtol=0)
    torch.testing.assert_close(p.sum(0), expected.sum(0) / batch, atol=tol, rtol=0)

    q50 = sinkhorn_knopp(scores.to(dtype), epsilon=0.05, iterations=50).double() / batch
    assert (q50.sum(0) - 1 / k).abs().max() < 1e-3
    torch.testing.assert_close(q50.sum(1), torch.full((batch,), 1 / batch, dtype=torch.float64), atol=tol, rtol=0)


def test_sinkhorn_equipartition_on_skewed_batch():
    g = torch.Generator().manual_seed(1)
    batch, k = 64, 8
    scores = 0.1 * torch.randn(batch, k, generator=g)
    scores[:, 0] += 0.6  # every sample prefers prototype 0
    softmax_usage = torch.softmax(scores / 0.1, dim=1).mean(0)
    assert softmax_usage[0] > 0.9  # plain softmax collapses onto one prototype
    q = sinkhorn_knopp(scores, epsilon=0.05, iterations=3)
    usage = q.mean(0)
    torch.testing.assert_close(usage, torch.full((k,), 1 / k), atol=0.02, rtol=0)
    torch.testing.assert_close(q.sum(1), torch.ones(batch), atol=1e-5, rtol=0)


def test_sinkhorn_half_precision_large_scores_is_finite():
    g = torch.Generator().manual_seed(2)
    scores = (40 * torch.randn(16, 6, generator=g)).half()
    assert not torch.isfinite(torch.exp(scores.float() / 0.05)).all()  # the naive formula overflows
    q = sinkhorn_knopp(scores, epsilon=0.05, iterations=3)
    assert q.dtype == torch.float32
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.sum(1), torch.ones(16), atol=1e-5, rtol=0)


def test_sinkhorn_has_no_gradient_and_checks_arguments():
    scores = torch.randn(4, 3, requires_grad=True)
    assert not sinkhorn_knopp(scores).requires_grad
    with pytest.raises(ValueError, match="epsilon"):
        sinkhorn_knopp(scores, epsilon=0.0)
    with pytest.raises(ValueError, match="iterations"):
        sinkhorn_knopp(scores, iterations=0)
    with pytest.raises(ValueError, match="scores"):
        sinkhorn_knopp(torch.randn(4))


# ---- SwAV ----


@pytest.mark.parametrize("n_crops", [2, 4])
@pytest.mark.parametrize("with_queue", [False, True])
def test_swav_loss_and_gradient_match_loop_reference(n_crops, with_queue):
    batch, k, dim, length = 6, 5, 4, 9
    scores, protos = make_scores(n_crops, batch, k, dim, seed=10 + n_crops)
    queue_scores = None
    if with_queue:
        g = torch.Generator().manual_seed(3)
        queue_scores = [unit(length, dim, generator=g) @ protos.T for _ in range(2)]
    criterion = SwAVLoss(temperature=0.1, epsilon=0.05, sinkhorn_iterations=3, crops_for_assign=(0, 1))
    loss, metrics = criterion(scores, queue_scores)
    grads = torch.autograd.grad(loss, scores)

    ref_in = [s.detach().clone().requires_grad_() for s in scores]
    expected = ref_swav(ref_in, (0, 1), 0.1, 0.05, 3, queue_scores)
    expected_grads = torch.autograd.grad(expected, ref_in)
    torch.testing.assert_close(loss, expected, atol=1e-10, rtol=1e-10)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-8)
    assert set(metrics) >= {"effective_prototypes", "code_entropy", "loss_crop0", "loss_crop1"}
    assert 1.0 <= float(metrics["effective_prototypes"]) <= k + 1e-6
    assert 0.0 <= float(metrics["code_entropy"]) <= torch.log(torch.tensor(float(k))) + 1e-6
    assert all(not m.requires_grad for m in metrics.values())


def test_swav_queue_changes_codes():
    scores, protos = make_scores(2, 4, 5, 3, seed=4)
    g = torch.Generator().manual_seed(5)
    queue_scores = [unit(20, 3, generator=g) @ protos.T for _ in range(2)]
    criterion = SwAVLoss()
    assert not torch.allclose(criterion.codes(scores[0]), criterion.codes(scores[0], queue_scores[0]))


def test_swav_float32_close_to_float64_reference():
    scores64, _ = make_scores(4, 8, 6, 5, seed=6)
    scores32 = [s.detach().float().requires_grad_() for s in scores64]
    loss, _ = SwAVLoss(crops_for_assign=(0, 1))(scores32)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref_swav(scores64, (0, 1)), atol=1e-5, rtol=1e-5)


def test_swav_codes_carry_no_gradient():
    batch, tau = 8, 0.1
    scores, _ = make_scores(2, batch, 6, 4, seed=7)
    loss, _ = SwAVLoss(temperature=tau)(scores)
    (grad0,) = torch.autograd.grad(loss, scores[0])
    # only the prediction term 0.5 · CE(q_1, softmax(s_0 / τ)) depends on s_0: d/ds_0 = (p_0 − q_1) / (2 B τ)
    q1 = ref_sinkhorn(scores[1])
    expected = (torch.softmax(scores[0].detach() / tau, dim=1) - q1) / (2 * batch * tau)
    torch.testing.assert_close(grad0, expected, atol=1e-10, rtol=1e-8)

    # a crop that is only assigned (never predicts) receives no gradient at all
    scores3, _ = make_scores(3, batch, 6, 4, seed=8)
    loss3, _ = SwAVLoss(crops_for_assign=(0,))(scores3)
    grads = torch.autograd.grad(loss3, scores3, allow_unused=True)
    assert grads[0] is None or torch.count_nonzero(grads[0]) == 0
    assert torch.count_nonzero(grads[1]) > 0 and torch.count_nonzero(grads[2]) > 0


def test_swav_argument_and_shape_checks():
    with pytest.raises(ValueError, match="temperature"):
        SwAVLoss(temperature=0)
    with pytest.raises(ValueError, match="epsilon"):
        SwAVLoss(epsilon=-1)
    with pytest.raises(ValueError, match="sinkhorn_iterations"):
        SwAVLoss(sinkhorn_iterations=0)
    with pytest.raises(ValueError, match="crops_for_assign"):
        SwAVLoss(crops_for_assign=(0, 0))
    with pytest.raises(ValueError, match="crops_for_assign"):
        SwAVLoss(crops_for_assign=())
    criterion = SwAVLoss(crops_for_assign=(0, 2))
    with pytest.raises(ValueError, match="crops_for_assign"):
        criterion([torch.randn(4, 3), torch.randn(4, 3)])
    with pytest.raises(ValueError, match="at least 2"):
        SwAVLoss()([torch.randn(4, 3)])
    with pytest.raises(ValueError, match="scores\\[1\\]"):
        SwAVLoss()([torch.randn(4, 3), torch.randn(5, 3)])
    with pytest.raises(ValueError, match="queue_scores"):
        SwAVLoss()([torch.randn(4, 3), torch.randn(4, 3)], [torch.randn(6, 3)])


# ---- embedding queue ----


def test_queue_is_fifo_and_fills():
    queue = EmbeddingQueue(length=5, dim=3, n_assign=2)
    pushed: list[list[torch.Tensor]] = [[], []]
    g = torch.Generator().manual_seed(9)
    for step in range(4):
        batch = [unit(2, 3, generator=g, dtype=torch.float32) for _ in range(2)]
        queue.push(batch)
        for i in range(2):
            pushed[i].extend(batch[i])
        assert queue.is_full == (2 * (step + 1) >= 5)
        assert int(queue.filled) == min(2 * (step + 1), 5)
        eye = torch.eye(3)
        got = queue.scores(eye)  # identity prototypes: scores are the stored rows
        for i in range(2):
            want = torch.stack(pushed[i][-5:])  # the last 5 rows, oldest first
            torch.testing.assert_close(got[i], want)
    # a batch larger than the queue keeps its last `length` rows
    big = [unit(7, 3, generator=g, dtype=torch.float32) for _ in range(2)]
    queue.push(big)
    torch.testing.assert_close(queue.queue, torch.stack([b[-5:] for b in big]))


def test_queue_normalises_and_scores_with_current_prototypes():
    queue = EmbeddingQueue(length=4, dim=3, n_assign=1)
    queue.push([torch.tensor([[3.0, 0.0, 4.0], [0.0, 2.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, -5.0]])])
    torch.testing.assert_close(queue.queue[0].norm(dim=1), torch.ones(4))
    protos = nn.Linear(3, 6, bias=False)
    (before,) = queue.scores(protos.weight)
    torch.testing.assert_close(before, queue.queue[0] @ protos.weight.detach().T)
    assert before.shape == (4, 6) and not before.requires_grad
    with torch.no_grad():
        protos.weight.mul_(-2.0)
    (after,) = queue.scores(protos.weight)
    torch.testing.assert_close(after, -2.0 * before)

    restored = EmbeddingQueue(length=4, dim=3, n_assign=1)
    restored.load_state_dict(queue.state_dict())
    assert restored.is_full
    with pytest.raises(ValueError, match="length"):
        EmbeddingQueue(length=0, dim=3)
    with pytest.raises(ValueError, match="dim"):
        EmbeddingQueue(length=2, dim=0)
    with pytest.raises(ValueError, match="n_assign"):
        EmbeddingQueue(length=2, dim=3, n_assign=0)
    with pytest.raises(ValueError, match="embedding"):
        queue.push([torch.randn(2, 3), torch.randn(2, 3)])
    with pytest.raises(ValueError, match="prototype_weight"):
        queue.scores(torch.randn(5, 4))


# ---- spherical k-means ----


def _separated_clusters(seed):
    g = torch.Generator().manual_seed(seed)
    centers = torch.eye(8)[:3]
    labels = torch.arange(3).repeat_interleave(20)
    x = F.normalize(centers[labels] + 0.05 * torch.randn(60, 8, generator=g), dim=1)
    perm = torch.randperm(60, generator=g)
    return x[perm], labels[perm]


def test_spherical_kmeans_recovers_separated_clusters():
    x, truth = _separated_clusters(seed=11)
    # Random initialisation (as in DeepCluster-v2) succeeds when it draws one sample per cluster: take such a seed.
    seed = next(
        s
        for s in range(100)
        if len(set(truth[torch.randperm(60, generator=torch.Generator().manual_seed(s))[:3]].tolist())) == 3
    )
    centroids, labels = spherical_kmeans(x, 3, iterations=10, generator=torch.Generator().manual_seed(seed))
    assert centroids.shape == (3, 8) and labels.shape == (60,) and labels.dtype == torch.long
    torch.testing.assert_close(centroids.norm(dim=1), torch.ones(3))
    for c in range(3):  # purity 1 and a bijection between true and found clusters
        assert len(set(labels[truth == c].tolist())) == 1
    assert len(set(labels.tolist())) == 3
    for c in range(3):
        assert (centroids[labels[truth == c][0]] @ torch.eye(8)[c]) > 0.99


def test_spherical_kmeans_matches_loop_reference_with_empty_clusters():
    # exact duplicates (basis vectors) guarantee empty clusters: two initial centroids on the same point tie, and
    # argmax gives every row to the first of them
    g = torch.Generator().manual_seed(12)
    eye = torch.eye(3, dtype=torch.float64)
    x = torch.cat([eye[[0] * 4 + [1] * 4 + [2] * 3], unit(3, 3, generator=g)])
    k = 8
    init = x[torch.randperm(14, generator=torch.Generator().manual_seed(5))[:k]]
    for iterations in (0, 1, 4):
        centroids, labels = spherical_kmeans(x, k, iterations, generator=torch.Generator().manual_seed(5))
        ref_c, ref_labels = ref_kmeans(x, init, iterations)
        torch.testing.assert_close(centroids, ref_c)
        assert torch.equal(labels, ref_labels)
    assert len(set(labels.tolist())) < k  # some clusters emptied and kept their previous centroid


def test_spherical_kmeans_argument_checks():
    x = unit(4, 3, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="k="):
        spherical_kmeans(x, 5)
    with pytest.raises(ValueError, match="k must"):
        spherical_kmeans(x, 0)
    with pytest.raises(ValueError, match="iterations"):
        spherical_kmeans(x, 2, iterations=-1)


# ---- DeepCluster-v2 ----


def test_memory_bank_update():
    bank = MemoryBank(size=6, dim=3, n_views=2)
    assert not bank.is_full
    bank.update(
        torch.tensor([4, 1]), [torch.tensor([[2.0, 0, 0], [0, 3.0, 0]]), torch.tensor([[0, 0, 1.0], [1.0, 1, 0]])]
    )
    assert bank.filled.tolist() == [False, True, False, False, True, False]
    torch.testing.assert_close(bank.embeddings[0, 4], torch.tensor([1.0, 0, 0]))
    torch.testing.assert_close(bank.embeddings[1, 1], torch.tensor([1.0, 1, 0]) / 2**0.5)
    assert bank.embeddings[:, [0, 2, 3, 5]].abs().sum() == 0
    with pytest.raises(ValueError, match="embedding"):
        bank.update(torch.tensor([0]), [torch.randn(1, 3)])
    with pytest.raises(ValueError, match="size"):
        MemoryBank(size=0, dim=3)
    with pytest.raises(ValueError, match="n_views"):
        MemoryBank(size=2, dim=3, n_views=0)


def test_deepcluster_loss_and_gradient_match_reference_with_ignored_rows():
    g = torch.Generator().manual_seed(13)
    n_prototypes, size, batch, n_views = [4, 3], 10, 5, 3
    criterion = DeepClusterV2(n_prototypes, temperature=0.1)
    table = torch.stack([torch.randint(0, k, (size,), generator=g) for k in n_prototypes])
    table[0, [2, 7]] = IGNORE_INDEX
    table[1, 7] = IGNORE_INDEX
    criterion.assignments = table.clone()
    index = torch.tensor([7, 2, 0, 9, 2])
    scores = [
        [torch.randn(batch, k, generator=g, dtype=torch.float64).requires_grad_() for _ in range(n_views)]
        for k in n_prototypes
    ]
    flat = [s for views in scores for s in views]
    loss, metrics = criterion(scores, index)
    grads = torch.autograd.grad(loss, flat)
    expected = ref_deepcluster(scores, table, index)
    expected_grads = torch.autograd.grad(expected, flat)
    torch.testing.assert_close(loss, expected, atol=1e-10, rtol=1e-10)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-8)
    for s_grad in grads[:n_views]:  # head 0: rows 0, 1, 4 (indices 7, 2, 2) are unknown -> no gradient
        assert torch.count_nonzero(s_grad[[0, 1, 4]]) == 0 and torch.count_nonzero(s_grad[[2, 3]]) > 0
    torch.testing.assert_close(metrics["unassigned_fraction"], torch.tensor(4 / 10))
    assert {"loss_head0", "loss_head1", "effective_prototypes"} <= set(metrics)

    # a head whose batch is entirely unknown contributes 0, not NaN
    criterion.assignments[1].fill_(IGNORE_INDEX)
    loss_unknown, _ = criterion(scores, index)
    assert torch.isfinite(loss_unknown)
    torch.testing.assert_close(loss_unknown, ref_deepcluster(scores, criterion.assignments, index))


def test_deepcluster_cluster_writes_prototypes_in_place():
    x, _ = _separated_clusters(seed=14)  # [60, 8]
    bank = MemoryBank(size=70, dim=8, n_views=2)
    index = torch.arange(5, 65)
    bank.update(
        index, [x, F.normalize(x + 0.3 * torch.randn(60, 8, generator=torch.Generator().manual_seed(0)), dim=1)]
    )
    heads = [nn.Linear(8, 3, bias=False), nn.Linear(8, 4, bias=False), nn.Linear(8, 5, bias=False)]
    for head in heads:
        head.weight.requires_grad_(False)
    pointers = [head.weight.data_ptr() for head in heads]
    criterion = DeepClusterV2([3, 4, 5], temperature=0.1, kmeans_iterations=5)
    with pytest.raises(RuntimeError, match="cluster"):
        criterion([[torch.randn(2, 3)], [torch.randn(2, 4)], [torch.randn(2, 5)]], torch.tensor([5, 6]))
    metrics = criterion.cluster(bank, [head.weight for head in heads], generator=torch.Generator().manual_seed(3))

    ref_gen = torch.Generator().manual_seed(3)
    assert criterion.assignments.shape == (3, 70)
    for h, head in enumerate(heads):
        want_c, want_labels = spherical_kmeans(bank.embeddings[h % 2, index], head.weight.shape[0], 5, ref_gen)
        assert head.weight.data_ptr() == pointers[h]
        torch.testing.assert_close(head.weight, want_c)
        assert torch.equal(criterion.assignments[h, index], want_labels)
        assert (criterion.assignments[h, :5] == IGNORE_INDEX).all() and (
            criterion.assignments[h, 65:] == IGNORE_INDEX
        ).all()
        assert 1.0 <= float(metrics[f"effective_prototypes_h{h}"]) <= head.weight.shape[0] + 1e-6

    # the scores of the bank's own embeddings against the new prototypes give a low loss, and the table survives a
    # save/load into a fresh module
    scores = [[bank.embeddings[v, index] @ head.weight.T for v in range(2)] for head in heads]
    loss, metrics = criterion(scores, index)
    assert torch.isfinite(loss)
    fresh = DeepClusterV2([3, 4, 5])
    fresh.load_state_dict(criterion.state_dict())
    assert torch.equal(fresh.assignments, criterion.assignments)
    with pytest.raises(ValueError, match="prototypes_weights"):
        criterion.cluster(bank, [heads[0].weight, heads[0].weight, heads[2].weight])


def test_deepcluster_effective_prototypes_and_argument_checks():
    criterion = DeepClusterV2([4])
    criterion.assignments = torch.tensor([[0, 1, 2, 3, 0, 0, 0, 0]])
    _, uniform = criterion([[torch.randn(4, 4)]], torch.tensor([0, 1, 2, 3]))
    _, single = criterion([[torch.randn(4, 4)]], torch.tensor([4, 5, 6, 7]))
    torch.testing.assert_close(uniform["effective_prototypes"], torch.tensor(4.0))
    torch.testing.assert_close(single["effective_prototypes"], torch.tensor(1.0))
    with pytest.raises(ValueError, match="n_prototypes"):
        DeepClusterV2([])
    with pytest.raises(ValueError, match="temperature"):
        DeepClusterV2([3], temperature=0)
    with pytest.raises(ValueError, match="kmeans_iterations"):
        DeepClusterV2([3], kmeans_iterations=-1)
    with pytest.raises(ValueError, match="scores"):
        criterion([[torch.randn(4, 5)]], torch.tensor([0, 1, 2, 3]))


def test_deepcluster_clusters_only_the_rows_written_since_the_last_clustering():
    # epoch 1 fills rows 0-29 around e0, e1, e2; epoch 2 fills rows 30-59 around e3, e4, e5; rows 60-79 never
    x, _ = _separated_clusters(seed=15)  # [60, 8] around e0, e1, e2
    epoch1, epoch2 = x[:30], torch.roll(x[30:], shifts=3, dims=1)  # epoch 2: around e3, e4, e5
    bank = MemoryBank(size=80, dim=8, n_views=1)
    criterion = DeepClusterV2([3], kmeans_iterations=5)
    weight = torch.zeros(3, 8)
    bank.update(torch.arange(0, 30), [epoch1])
    criterion.cluster(bank, [weight], generator=torch.Generator().manual_seed(4))

    bank.update(torch.arange(30, 45), [torch.randn(15, 8)])  # overwritten below: only the newest write counts
    bank.update(torch.arange(30, 60), [epoch2])
    saved = {k: v.clone() for k, v in bank.state_dict().items()}
    criterion.cluster(bank, [weight], generator=torch.Generator().manual_seed(4))
    want_c, want_labels = spherical_kmeans(epoch2, 3, 5, torch.Generator().manual_seed(4))
    torch.testing.assert_close(weight, want_c)  # epoch 1's rows and the never-written zero rows do not count
    assert weight[:, :3].abs().max() < 0.3 and weight[:, 3:6].max(dim=0).values.min() > 0.9  # around e3, e4, e5
    assert torch.equal(criterion.assignments[0, 30:60], want_labels)
    unlabelled = torch.cat([criterion.assignments[0, :30], criterion.assignments[0, 60:]])
    assert (unlabelled == IGNORE_INDEX).all()
    assert not bank.fresh.any() and bank.filled[:60].all()  # reset after clustering; the embeddings stay
    resumed = MemoryBank(size=80, dim=8, n_views=1)  # the rows written since the last clustering survive a checkpoint
    resumed.load_state_dict(saved)
    assert torch.equal(resumed.rows_to_cluster(), torch.arange(30, 60))

    # a clustering with nothing written since the last one keeps the prototypes and the pseudo-labels
    head = DeepClusterHead(size=80, dim=8, n_prototypes=[3], kmeans_iterations=5)
    prototypes = [nn.Linear(8, 3, bias=False)]
    head.bank.update(torch.arange(30, 60), [epoch2, epoch2])
    assert set(head.cluster(prototypes, torch.Generator().manual_seed(4))) == {"effective_prototypes_h0"}
    before = prototypes[0].weight.detach().clone(), head.deepcluster.assignments.clone()
    assert head.cluster(prototypes, torch.Generator().manual_seed(5)) == {}
    assert torch.equal(prototypes[0].weight, before[0]) and torch.equal(head.deepcluster.assignments, before[1])


# ---- distributed (2 CPU ranks over gloo) ----


def test_distributed_helpers_are_identities_in_one_process():
    assert not is_distributed() and world_size() == 1
    t = torch.randn(3, 2, requires_grad=True)
    assert all_gather_with_grad(t) is t
    s = torch.ones(2)
    assert all_reduce_sum(s) is s and s.tolist() == [1.0, 1.0]


def _distributed_worker(rank, init_file, world, batch, k):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        assert is_distributed() and world_size() == world
        g = torch.Generator().manual_seed(21)
        # Sinkhorn on each rank's shard == Sinkhorn on the global batch in one process
        full = unit(world * batch, 4, generator=g) @ unit(k, 4, generator=g).T
        shard = full[rank * batch : (rank + 1) * batch]
        torch.testing.assert_close(sinkhorn_knopp(shard), ref_sinkhorn(full)[rank * batch : (rank + 1) * batch])

        # all_gather_with_grad: rank-major concat; backward sums every rank's gradient of its own slice
        t = torch.full((2, 3), float(rank), requires_grad=True)
        gathered = all_gather_with_grad(t)
        assert gathered.shape == (2 * world, 3)
        assert gathered[:, 0].tolist() == [float(r) for r in range(world) for _ in range(2)]
        weights = torch.arange(2 * world * 3, dtype=torch.float32).reshape(2 * world, 3)
        (gathered * weights).sum().backward()
        torch.testing.assert_close(t.grad, world * weights[2 * rank : 2 * rank + 2])
        assert all_reduce_sum(torch.tensor([1.0])).item() == world

        # k-means with rank 0's initialisation and all-reduced sums == one-process k-means on all rows
        x = unit(world * 10, 3, generator=g)
        local = x[rank * 10 : (rank + 1) * 10]
        centroids, labels = spherical_kmeans(local, 4, iterations=3, generator=torch.Generator().manual_seed(2))
        init = x[:10][torch.randperm(10, generator=torch.Generator().manual_seed(2))[:4]]
        ref_c, ref_labels = ref_kmeans(x, init, 3)
        torch.testing.assert_close(centroids, ref_c)
        assert torch.equal(labels, ref_labels[rank * 10 : (rank + 1) * 10])

        # DeepClusterV2.cluster: each rank labels its own indices, the tables are merged
        bank = MemoryBank(size=world * 10, dim=3, n_views=1)
        bank.update(torch.arange(rank * 10, (rank + 1) * 10), [local])
        criterion = DeepClusterV2([4], kmeans_iterations=3)
        criterion.cluster(bank, [torch.zeros(4, 3)], generator=torch.Generator().manual_seed(2))
        assert torch.equal(criterion.assignments[0], ref_labels)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_distributed_sinkhorn_gather_and_kmeans_match_single_process():
    world = 2
    spawn_ranks(_distributed_worker, (world, 5, 4), nprocs=world)


def _distributed_bank_worker(rank, init_file, world):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(31)
        first = unit(20, 3, generator=g, dtype=torch.float32)  # epoch 1: rank r writes indices 10r..10r+9
        second = unit(22, 3, generator=g, dtype=torch.float32)  # epoch 2: the ranks swap, and both write index 20
        bank = MemoryBank(size=30, dim=3, n_views=1)
        criterion = DeepClusterV2([4], kmeans_iterations=3)
        own = torch.arange(rank * 10, (rank + 1) * 10)
        bank.update(own, [first[own]])
        criterion.cluster(bank, [torch.zeros(4, 3)], generator=torch.Generator().manual_seed(2))

        other = torch.arange((1 - rank) * 10, (2 - rank) * 10)
        stale = unit(1, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float32)
        bank.update(other, [second[other]])  # step 1 of epoch 2 (and rank 0 writes index 20, soon overwritten)
        if rank == 0:
            bank.update(torch.tensor([20, 21]), [torch.cat([stale, second[21:22]])])  # step 2
        else:
            bank.update(torch.tensor([20]), [second[20:21]])  # step 2: rank 1 writes index 20 last
        weight = torch.zeros(4, 3)
        criterion.cluster(bank, [weight], generator=torch.Generator().manual_seed(2))

        # == one-process k-means on epoch 2's 22 rows (index 20: rank 1's newest write), initialised from rank 0's
        rank0_rows = torch.tensor([*range(10, 20), 21])
        init = second[rank0_rows][torch.randperm(11, generator=torch.Generator().manual_seed(2))[:4]]
        ref_c, ref_labels = ref_kmeans(second, init, 3)
        torch.testing.assert_close(weight, ref_c)
        assert torch.equal(criterion.assignments[0, :22], ref_labels)
        assert (criterion.assignments[0, 22:] == IGNORE_INDEX).all()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_distributed_deepcluster_clusters_each_fresh_index_once_across_ranks():
    world = 2
    spawn_ranks(_distributed_bank_worker, (world,), nprocs=world)
