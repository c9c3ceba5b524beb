"""SwAV projection head and prototypes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medssl.models.heads import ProjectionHead, Prototypes


def test_projection_head_outputs_unit_rows_in_train_mode_with_batch_2():
    torch.manual_seed(0)
    head = ProjectionHead(in_dim=32, hidden_dim=64, out_dim=16).train()
    assert any(isinstance(m, nn.BatchNorm1d) for m in head.modules())
    z = head(torch.randn(2, 32))
    assert z.shape == (2, 16)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(2))
    z.sum().backward()
    assert all(p.grad is not None for p in head.parameters())


def test_projection_head_variants():
    single = ProjectionHead(in_dim=32, hidden_dim=0, out_dim=8, normalize=False)
    linears = [m for m in single.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 1 and not any(isinstance(m, nn.BatchNorm1d) for m in single.modules())
    x = torch.randn(3, 32)
    torch.testing.assert_close(single(x), linears[0](x))
    no_bn = ProjectionHead(in_dim=32, hidden_dim=16, out_dim=8, batch_norm=False)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in no_bn.modules())
    assert no_bn(torch.randn(1, 32)).shape == (1, 8)
    for kwargs, arg in (({"in_dim": 0}, "in_dim"), ({"hidden_dim": -1}, "hidden_dim"), ({"out_dim": 0}, "out_dim")):
        with pytest.raises(ValueError, match=arg):
            ProjectionHead(**{"in_dim": 4, **kwargs})


def test_prototypes_multi_head_scores_equal_plain_matmul():
    torch.manual_seed(0)
    protos = Prototypes(16, [10, 7, 5])
    assert protos.n_heads == 3 and protos.n_prototypes == [10, 7, 5]
    assert all(head.bias is None for head in protos.heads)
    z = torch.nn.functional.normalize(torch.randn(4, 16), dim=1)
    scores = protos(z)
    assert [tuple(s.shape) for s in scores] == [(4, 10), (4, 7), (4, 5)]
    for s, head in zip(scores, protos.heads, strict=True):
        torch.testing.assert_close(s, z @ head.weight.T)
        torch.testing.assert_close(head.weight.norm(dim=1), torch.ones(head.weight.shape[0]))  # normalised at init
    single = Prototypes(16, 12)
    assert single.n_heads == 1 and [tuple(s.shape) for s in single(z)] == [(4, 12)]


def test_normalize_gives_unit_rows_without_tracking_grad():
    protos = Prototypes(8, [6, 4])
    with torch.no_grad():
        for head in protos.heads:
            head.weight.mul_(3.0)
    protos.normalize_()  # grad mode on: must not record the in-place op on a leaf
    for head in protos.heads:
        assert head.weight.is_leaf and head.weight.grad_fn is None and head.weight.grad is None
        torch.testing.assert_close(head.weight.norm(dim=1), torch.ones(head.weight.shape[0]))
    sum(s.sum() for s in protos(torch.randn(2, 8))).backward()
    assert all(p.grad is not None for p in protos.parameters())


def test_cancel_gradients_clears_grads_after_backward():
    protos = Prototypes(8, [6, 4])
    sum(s.square().sum() for s in protos(torch.randn(3, 8))).backward()
    assert all(p.grad is not None for p in protos.parameters())
    protos.cancel_gradients()
    assert all(p.grad is None for p in protos.parameters())


@pytest.mark.parametrize(("args", "arg"), [((0, 4), "dim"), ((4, 0), "n_prototypes"), ((4, []), "n_prototypes")])
def test_prototypes_bad_arguments(args, arg):
    with pytest.raises(ValueError, match=arg):
        Prototypes(*args)
