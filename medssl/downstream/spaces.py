"""The SepCLR common and salient spaces as feature extractors (Louiset et al., "SepCLR", ICLR 2024).

SepCLR splits a representation into a *common* space (factors shared by the background, e.g. healthy, and the
target, e.g. patient, group) and a *salient* space (factors present only in the target group). Its evaluation
probes each space separately: a target-only factor (e.g. bacterial vs viral pneumonia) must be predictable from
the salient space and not from the common one.

The heads live in the pretraining checkpoint (a bundle carries the encoder only), so ``model.space=common|salient``
takes a run folder (``outputs/<run>``) or a checkpoint file; ``none`` gives the random-initialisation baseline
(random encoder and heads).
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from medssl.models.joint import JointModel

SPACES = ("backbone", "common", "salient")
_MODEL_PREFIX = "model."


class SpaceEncoder(nn.Module):
    """``[B, C, H, W] -> [B, d]``: the encoder followed by one SepCLR head.

    ``common``: the L2-normalised common embedding ``c`` ``[B, common_dim]``; ``salient``: the salient embedding
    ``s`` ``[B, salient_dim]`` (unnormalised, as in the paper).
    """

    def __init__(self, model: JointModel, space: str) -> None:
        super().__init__()
        if space not in ("common", "salient"):
            raise ValueError(f"model.space must be one of {SPACES}, got {space!r}")
        self.encoder = model.encoder
        self.heads = model.sep_heads
        self.space = space

    def forward(self, x: Tensor) -> Tensor:
        common, salient = self.heads(self.encoder(x))
        return common if self.space == "common" else salient


def load_space_encoder(pretrained: str, encoder: str, space: str) -> tuple[nn.Module, str]:
    """The encoder + SepCLR head of ``space`` from a run folder or checkpoint (or random with ``none``).

    Raises:
        ValueError: a bundle or run id (no heads there), a checkpoint whose model tensors do not all load, a bad
            ``space``.
    """
    from medssl.models.joint import JointModelConfig
    from medssl.runtime.checkpoints import latest_checkpoint, load_checkpoint
    from medssl.train.config import pretrain_config

    if space not in ("common", "salient"):
        raise ValueError(f"model.space must be one of {SPACES}, got {space!r}")
    if pretrained in ("none", "", "null"):
        model = JointModel(JointModelConfig(encoder=encoder))
        return SpaceEncoder(model, space), f"random initialisation ({encoder}, SepCLR {space} head)"
    path = Path(pretrained)
    checkpoint = latest_checkpoint(path) if path.is_dir() else (path if path.is_file() else None)
    if checkpoint is None:
        raise ValueError(
            f"model.pretrained={pretrained}: model.space={space} needs a pretraining run folder or checkpoint file "
            "(bundles and MLflow ids carry the encoder only, not the SepCLR heads)"
        )
    state = load_checkpoint(checkpoint)
    if "objective" not in state or "config" not in state:
        raise ValueError(f"model.pretrained={checkpoint}: not a medssl pretraining checkpoint")
    model = JointModel(pretrain_config(state["config"]).model)
    weights = {k[len(_MODEL_PREFIX) :]: v for k, v in state["objective"].items() if k.startswith(_MODEL_PREFIX)}
    expected = model.state_dict()
    matched = [k for k in expected if k in weights and weights[k].shape == expected[k].shape]
    if len(matched) != len(expected):
        missing = sorted(set(expected) - set(matched))[:3]
        raise ValueError(
            f"model.pretrained={checkpoint}: matched {len(matched)}/{len(expected)} model tensors (missing or "
            f"mis-shaped e.g. {missing}); refusing a partial load"
        )
    model.load_state_dict({k: weights[k] for k in expected}, strict=True)
    weight = (state["config"].get("method", {}).get("objective", {}).get("weights", {}) or {}).get("sep")
    note = "" if weight else " (warning: this run did not train SepCLR: its heads are untrained)"
    message = f"matched {len(matched)}/{len(expected)} pretrained tensors from {checkpoint}, SepCLR {space} head{note}"
    return SpaceEncoder(model, space), message
