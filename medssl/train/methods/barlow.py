"""Barlow Twins (Zbontar et al., ICML 2021) with MONAI's ``BarlowTwinsLoss``: the README's example of adding a method
(this module and one line in ``METHODS``). The cross-correlation is per process (not gathered under DDP)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from monai.losses import BarlowTwinsLoss
from torch import Tensor, nn

from medssl.models.joint import JointModel
from medssl.train.methods.base import Method


@dataclass
class BarlowTwinsOptions:
    lambd: float = 0.005  # weight of the off-diagonal terms of the cross-correlation (the paper's lambda)


class BarlowTwinsObjective(nn.Module):
    """Two global crops -> encoder -> projector ``[B, D]`` each -> MONAI's Barlow Twins loss."""

    def __init__(self, model: JointModel, lambd: float) -> None:
        super().__init__()
        self.model, self.loss = model, BarlowTwinsLoss(lambd=lambd)

    def forward(self, crops: list[Tensor], step: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
        f1, f2 = self.model.encode(crops[:2])
        loss = self.loss(self.model.projector(f1), self.model.projector(f2))
        return loss, {"loss/barlow": loss.detach(), "loss/total": loss.detach()}


class BarlowTwins(Method):
    options = BarlowTwinsOptions  # method.options.lambd

    def build(self, model: JointModel, config: Any, data: Any) -> nn.Module:
        return BarlowTwinsObjective(model, self.read_options(config).lambd)
