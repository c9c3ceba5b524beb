"""L_mask: masked slice-embedding prediction (the head in models/, the loss in objectives/)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medssl.models.masked import MaskedSliceHead, sample_slice_mask
from medssl.objectives.masked import masked_slice_loss


@dataclass
class Output:
    tokens: torch.Tensor
    volume: torch.Tensor


class PositionwiseTransformer(nn.Module):
    """Stand-in for the slice transformer that acts on each slice alone (so positions do not mix)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, tokens, mask=None, positions=None):
        out = torch.tanh(self.linear(tokens))
        return Output(out, out.mean(dim=1))


def batch(lengths=(7, 12, 3), dim=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    n = max(lengths)
    tokens = torch.randn(len(lengths), n, dim, generator=generator)
    valid = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]
    return tokens, valid


def test_mask_counts_respect_ratio_and_never_touch_padding():
    _, valid = batch(lengths=(1, 2, 7, 20))
    for seed in range(5):
        masked = sample_slice_mask(valid, 0.15, torch.Generator().manual_seed(seed))
        assert not (masked & ~valid).any()
        # ceil(0.15 L), at least 1, at most L - 1: L = 1, 2, 7, 20 -> 0, 1, 2, 3
        assert masked.sum(dim=1).tolist() == [0, 1, 2, 3]
    a = sample_slice_mask(valid, 0.5, torch.Generator().manual_seed(0))
    b = sample_slice_mask(valid, 0.5, torch.Generator().manual_seed(1))
    assert not torch.equal(a, b)


def test_loss_matches_a_plain_reference_and_ignores_unmasked_slices():
    tokens, valid = batch()
    masked = sample_slice_mask(valid, 0.3, torch.Generator().manual_seed(3))
    transformer = PositionwiseTransformer(6, 5)
    module = MaskedSliceHead(token_dim=6, model_dim=5, mask_ratio=0.3)
    loss, metrics = masked_slice_loss(module(tokens, valid, transformer, masked=masked))

    # plain reference: loop over masked slices
    total, count = 0.0, 0
    for b in range(tokens.shape[0]):
        for i in range(tokens.shape[1]):
            if masked[b, i]:
                prediction = module.decoder(torch.tanh(transformer.linear(module.mask_token)))
                target = F.layer_norm(tokens[b, i], (6,))
                total = total + ((prediction - target) ** 2).mean()
                count += 1
    torch.testing.assert_close(loss, total / count)
    assert metrics["masked_fraction"] == pytest.approx(masked.sum().item() / valid.sum().item())

    changed = tokens.clone()
    changed[~masked] = torch.randn_like(changed[~masked]) * 10
    again, _ = masked_slice_loss(module(changed, valid, transformer, masked=masked))
    torch.testing.assert_close(again, loss)


def test_targets_are_stop_gradient_and_the_mask_token_learns():
    tokens, valid = batch()
    tokens.requires_grad_(True)
    masked = sample_slice_mask(valid, 0.3, torch.Generator().manual_seed(0))
    module = MaskedSliceHead(token_dim=6, model_dim=6, mask_ratio=0.3)
    loss, _ = masked_slice_loss(module(tokens, valid, PositionwiseTransformer(6, 6), masked=masked))
    loss.backward()
    assert tokens.grad is not None
    assert torch.count_nonzero(tokens.grad[masked]) == 0, "masked slices are only targets (detached)"
    assert module.mask_token.grad is not None and module.mask_token.grad.abs().sum() > 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="mask_ratio"):
        MaskedSliceHead(4, 4, mask_ratio=0.0)
    tokens, valid = batch()
    module = MaskedSliceHead(6, 6)
    with pytest.raises(ValueError, match="real slices"):
        module(tokens, valid, PositionwiseTransformer(6, 6), masked=~valid)
