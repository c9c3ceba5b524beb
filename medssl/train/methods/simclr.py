"""SimCLR (Chen et al., ICML 2020): InfoNCE on the two global crops, negatives gathered across processes, optional
MoCHi hard negative mixing (Kalantidis et al., NeurIPS 2020)."""

from __future__ import annotations

import copy

from torch import nn

from medssl.models.joint import JointModel
from medssl.objectives.baseline import SimCLRObjective
from medssl.train.methods.base import Method, MethodSettings, StepCounts
from medssl.train.prepared import PreparedData


class SimCLR(Method):
    """``method.simclr``: temperature and MoCHi; the MoCHi start step scales with a calibrated run length."""

    def build(self, model: JointModel, config: MethodSettings, data: PreparedData) -> nn.Module:
        settings = config.method.simclr
        return SimCLRObjective(model, settings.temperature, copy.deepcopy(settings.hard_negative_mixing))

    def step_counts(self, config: MethodSettings) -> StepCounts:
        mixing = config.method.simclr.hard_negative_mixing
        return {"mixing_start_step": mixing.start_step if mixing is not None else None}

    def set_step_counts(self, objective: nn.Module, counts: StepCounts) -> None:
        mixing = objective.loss.hard_negative_mixing  # type: ignore[union-attr]
        if mixing is not None and counts.get("mixing_start_step") is not None:
            mixing.start_step = int(counts["mixing_start_step"])
