"""The SimCLR baseline every result is compared against (Chen et al., ICML 2020).

Same encoder and projector as the joint method, InfoNCE on the two global crops (negatives
gathered across ranks), optionally with MoCHi hard negative mixing (Kalantidis et al., 2020).
"""

from __future__ import annotations

from torch import Tensor, nn

from medssl.models.joint import JointModel
from medssl.objectives.health import per_dimension_std, uniformity
from medssl.objectives.simclr import InfoNCELoss, MoCHiConfig


class SimCLRObjective(nn.Module):
    """``forward(crops, step)`` with ``crops`` the multi-crop views ``[B, C, h, w]`` (2 global first;
    local crops are ignored, as in SimCLR)."""

    def __init__(
        self, model: JointModel, temperature: float = 0.1, hard_negative_mixing: MoCHiConfig | None = None
    ) -> None:
        super().__init__()
        self.model = model
        self.loss = InfoNCELoss(temperature, gather_distributed=True, hard_negative_mixing=hard_negative_mixing)

    def forward(self, crops: list[Tensor], step: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
        if len(crops) < 2:
            raise ValueError(f"SimCLR needs two views, got {len(crops)}")
        f1, f2 = self.model.encode(crops[:2])
        z1, z2 = self.model.projector(f1), self.model.projector(f2)
        loss, m = self.loss(z1, z2, step=step)
        metrics: dict[str, Tensor] = {"loss/simclr": loss.detach(), "loss/total": loss.detach()}
        metrics.update({f"health/{k}": v for k, v in m.items()})
        if z1.shape[0] > 1:
            metrics["health/uniformity"] = uniformity(z1.detach())
            metrics["health/std_mean"] = per_dimension_std(z1).mean()
        return loss, metrics
