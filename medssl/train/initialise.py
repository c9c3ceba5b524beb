"""``trainer.init_from``: start a pretraining run from the weights of a finished one.

The released paper code starts its 3D stage from a converged 2D SwAV encoder; with ``trainer.init_from`` the staged
preset (``method=staged``) starts from a finished ``method=swav2d`` run the same way. The source is

* a run folder (``outputs/<run>``): its latest pretraining checkpoint, else its ``backbone.pt``;
* a pretraining checkpoint (``checkpoints/step_*.pt``);
* an exported MONAI bundle folder (``models/model.pt``, :mod:`medssl.export.bundle`);
* a ``backbone.pt`` (the encoder's MONAI ResNet weights, as the trainer exports them).

Loading is strict: the encoder must match tensor for tensor (names and shapes), or the run stops with an error naming
the file. From a pretraining checkpoint, the heads that the source trained (projector and 2D prototypes for L_intra,
the slice transformer and volume prototypes for L_inter, ...) load too when they match this run's model config
exactly; a head either loads completely or keeps its random initialisation, and the report says which.
Files are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from medssl.runtime.checkpoints import latest_checkpoint, load_checkpoint
from medssl.train.methods import method_named

ENCODER = "encoder"


@dataclass
class InitSource:
    """What ``trainer.init_from`` points at, read.

    ``weights``: for a pretraining checkpoint, the model's state dict (keys ``encoder.backbone.conv1.weight``, ...);
    for a bundle or ``backbone.pt``, the encoder's MONAI ResNet state dict (keys ``conv1.weight``, ...).
    ``modules``: the model's modules the source trained (``encoder`` first).
    """

    path: Path
    kind: str  # "checkpoint" or "backbone"
    weights: dict[str, Tensor]
    modules: tuple[str, ...] = (ENCODER,)
    step: int | None = None


@dataclass
class InitReport:
    """What :func:`initialise_model` loaded: ``matched`` of the model's ``total`` tensors."""

    source: InitSource
    loaded: list[str]
    matched: int
    total: int
    skipped: dict[str, str] = field(default_factory=dict)  # module -> why it kept its random initialisation

    def message(self) -> str:
        """``init_from: matched N/M tensors from <file> (encoder, ...)`` and the heads left at random."""
        text = (
            f"init_from: matched {self.matched}/{self.total} tensors from {self.source.path} "
            f"({', '.join(self.loaded)}"
            f"{f', step {self.source.step}' if self.source.step is not None else ''}); "
            f"the other {self.total - self.matched} keep their random initialisation"
        )
        if self.skipped:
            text += "; not loaded: " + "; ".join(f"{name} ({why})" for name, why in self.skipped.items())
        return text


def find_init_source(source: str | Path) -> Path:
    """The file ``trainer.init_from`` names: a run folder's latest checkpoint (else its ``backbone.pt``), a bundle's
    ``models/model.pt``, or the file itself."""
    path = Path(source)
    if path.is_file():
        return path
    if path.is_dir():
        for candidate in (latest_checkpoint(path), path / "models" / "model.pt", path / "backbone.pt"):
            if candidate is not None and candidate.is_file():
                return candidate
        raise FileNotFoundError(
            f"trainer.init_from: {path}: no checkpoints/latest, models/model.pt (bundle) or backbone.pt in this folder"
        )
    raise FileNotFoundError(f"trainer.init_from: {path}: no such run folder, checkpoint, bundle folder or backbone.pt")


def _trained_modules(state: Mapping[str, Any]) -> tuple[str, ...]:
    """The model's modules a pretraining checkpoint's run trained (its method says which, from its config and
    step)."""
    name = str(state.get("config", {}).get("method", {}).get("name", "joint"))
    return (ENCODER, *method_named(name).trained_modules(dict(state)))


def read_init_source(source: str | Path) -> InitSource:
    """Read what ``trainer.init_from`` names.

    Raises:
        FileNotFoundError: nothing there.
        ValueError: a file that is neither a medssl pretraining checkpoint nor a backbone state dict.
    """
    path = find_init_source(source)
    state = load_checkpoint(path)
    if isinstance(state, dict) and isinstance(state.get("objective"), Mapping) and "config" in state:
        weights = {k[len("model.") :]: v for k, v in state["objective"].items() if k.startswith("model.")}
        return InitSource(path, "checkpoint", weights, _trained_modules(state), int(state.get("step", 0)))
    if isinstance(state, dict) and state and all(isinstance(v, Tensor) for v in state.values()):
        return InitSource(path, "backbone", dict(state))
    raise ValueError(
        f"trainer.init_from: {path}: neither a medssl pretraining checkpoint nor an encoder state dict "
        "(backbone.pt, a bundle's models/model.pt)"
    )


def _mismatch(target: Mapping[str, Tensor], source: Mapping[str, Tensor]) -> str | None:
    """Why ``source`` does not load into ``target`` with ``strict=True`` (None when it does)."""
    missing = sorted(set(target) - set(source))
    extra = sorted(set(source) - set(target))
    if missing:
        return f"{len(missing)} tensors missing, e.g. {missing[0]}"
    if extra:
        return f"{len(extra)} unexpected tensors, e.g. {extra[0]}"
    for key, value in target.items():
        if tuple(source[key].shape) != tuple(value.shape):
            return f"{key} has shape {tuple(source[key].shape)}, this model {tuple(value.shape)}"
    return None


def _prefixed(weights: Mapping[str, Tensor], module: str) -> dict[str, Tensor]:
    return {k[len(module) + 1 :]: v for k, v in weights.items() if k.startswith(module + ".")}


def initialise_model(model: nn.Module, source: str | Path) -> InitReport:
    """Load the encoder (and the heads the source trained, where they match) of ``source`` into ``model`` (a
    :class:`medssl.models.joint.JointModel`).

    Raises:
        ValueError: the source's encoder does not match this model's (the message names the file and a tensor).
    """
    read = read_init_source(source)
    total = len(model.state_dict())
    encoder: nn.Module = model.encoder  # type: ignore[assignment]
    if read.kind == "checkpoint":
        target, weights = encoder, _prefixed(read.weights, ENCODER)
    else:  # MONAI ResNet weights: the encoder's backbone (a multi-scale projection, if any, stays random)
        target, weights = encoder.backbone, read.weights  # type: ignore[assignment]
    problem = _mismatch(target.state_dict(), weights)
    if problem is not None:
        raise ValueError(
            f"trainer.init_from: {read.path}: its encoder does not match this run's model config ({problem}); "
            "use a source pretrained with the same model.* settings"
        )
    target.load_state_dict(weights, strict=True)
    loaded, matched, skipped = [ENCODER], len(weights), {}
    for name in read.modules[1:]:
        module: nn.Module = getattr(model, name)
        part = _prefixed(read.weights, name)
        problem = _mismatch(module.state_dict(), part)
        if problem is not None:
            skipped[name] = f"differs from this run's model config: {problem}"
            continue
        module.load_state_dict(part, strict=True)
        loaded.append(name)
        matched += len(part)
    return InitReport(read, loaded, matched, total, skipped)
