"""Optimisers: SGD, LARS and AdamW over parameter groups with and without weight decay."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from medssl.train.config import OptimizerConfig


def parameter_groups(module: nn.Module) -> list[dict]:
    """Two groups: weights with weight decay, and biases / norm scales / 1-d parameters without it.

    The no-decay group is also excluded from LARS's trust-ratio adaptation (``lars_exclude``), as in
    SimCLR, BYOL and DINO. Frozen parameters (``requires_grad=False``) are left out.
    """
    decay, no_decay = [], []
    for _, param in module.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 else decay).append(param)
    return [
        {"params": decay, "apply_weight_decay": True, "lars_exclude": False},
        {"params": no_decay, "apply_weight_decay": False, "lars_exclude": True, "weight_decay": 0.0},
    ]


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al., 2017, "Large Batch Training of
    Convolutional Networks"), the optimiser of SwAV/SimCLR at large batch.

    For each parameter ``w`` not excluded: ``g <- g + wd * w``, then ``g <- g * eta * ||w|| / ||g||`` when
    both norms are non-zero, then momentum SGD. Parameter groups with ``lars_exclude`` skip the adaptation.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.001,
    ) -> None:
        if lr <= 0 or eta <= 0 or not 0 <= momentum < 1 or weight_decay < 0:
            raise ValueError(f"invalid LARS settings lr={lr} momentum={momentum} weight_decay={weight_decay} eta={eta}")
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "eta": eta})

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[no-untyped-def, override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            exclude = group.get("lars_exclude", False)
            for w in group["params"]:
                if w.grad is None:
                    continue
                g = w.grad
                if group["weight_decay"] and not exclude:
                    g = g.add(w, alpha=group["weight_decay"])
                if not exclude:
                    w_norm, g_norm = torch.linalg.vector_norm(w), torch.linalg.vector_norm(g)
                    trust = torch.where(
                        (w_norm > 0) & (g_norm > 0), group["eta"] * w_norm / g_norm, torch.ones_like(w_norm)
                    )
                    g = g * trust
                state = self.state[w]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.clone(g).detach()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(g)
                w.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def build_optimizer(module: nn.Module, config: OptimizerConfig) -> torch.optim.Optimizer:
    """The optimiser named by ``config.name`` over :func:`parameter_groups`. Learning rate and weight decay are
    set by the trainer each step from the schedules (``group["weight_decay"]`` only on decayed groups)."""
    groups = parameter_groups(module)
    for group in groups:
        if group["apply_weight_decay"]:
            group["weight_decay"] = config.weight_decay
    if config.name == "sgd":
        return torch.optim.SGD(
            groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov and config.momentum > 0
        )
    if config.name == "lars":
        return LARS(groups, lr=config.lr, momentum=config.momentum, eta=config.lars_eta)
    if config.name == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas))  # type: ignore[arg-type]
    raise ValueError(f"trainer.optimizer.name: unknown optimiser {config.name!r}")


def set_schedule_values(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    """Apply this step's learning rate to every group and its weight decay to the decayed groups."""
    for group in optimizer.param_groups:
        group["lr"] = lr
        if group.get("apply_weight_decay", False):
            group["weight_decay"] = weight_decay
