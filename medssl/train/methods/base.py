"""What a pretraining method is to the trainer: the streams it reads, the objective it builds, what it does between
steps. The trainer and the data pipeline ask the method (``method.name`` picks it from
:data:`medssl.train.methods.METHODS`); nothing outside the methods package branches on a method's name.

The defaults describe a two-view method on the 2D images stream without prototypes or schedules (SimCLR, Barlow
Twins): a new method of that kind overrides :meth:`Method.build` only.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from torch import nn

from medssl.data.errors import ManifestError
from medssl.data.views import MultiCropConfig
from medssl.models.joint import JointModel
from medssl.objectives.joint import JointObjectiveConfig
from medssl.objectives.simclr import SimCLRConfig
from medssl.runtime.configs import structured_config
from medssl.train.prepared import PreparedData

StepCounts = dict[str, Any]  # step counts a trainer.max_minutes calibration scales: int, list[int] or None each


class MethodSection(Protocol):
    """What a method reads of ``method.*`` (:class:`medssl.train.config.MethodConfig`)."""

    @property
    def objective(self) -> JointObjectiveConfig: ...
    @property
    def simclr(self) -> SimCLRConfig: ...
    @property
    def options(self) -> dict[str, Any]: ...


class DataSection(Protocol):
    """What a method reads of ``data.*`` (:class:`medssl.data.config.DataConfig`)."""

    @property
    def views(self) -> MultiCropConfig: ...


class MethodSettings(Protocol):
    """The part of the pretraining config a method reads; :class:`medssl.train.config.PretrainConfig` has it.

    A protocol rather than the config class itself: the config checks ``method.name`` and ``method.options``
    against the methods' registry, so the methods must not import the config module (one direction only).
    """

    @property
    def method(self) -> MethodSection: ...
    @property
    def data(self) -> DataSection: ...


class Method:
    """One pretraining method. Subclass it, override what differs from the defaults, add it to ``METHODS``.

    A method's own settings live under ``method.options`` (a mapping); ``options`` names the dataclass that types
    them, checked when the config is read (an unknown key or a wrong type names ``method.options.<key>``).

    Args:
        name: the ``method.name`` it is registered under (several names may share a class, as the joint family).
    """

    options: type | None = None

    def __init__(self, name: str) -> None:
        self.name = name

    def read_options(self, config: MethodSettings) -> Any:
        """``method.options`` as an instance of ``options``; an error naming the key when they do not fit."""
        return check_options(self, config.method.options)

    # ------------------------------------------------------------------ data
    def streams(self, config: MethodSettings) -> list[str]:
        """The streams the method reads at some step, of ``images`` (2D crops), ``stacks`` (3D), ``sep``."""
        return ["images"]

    def image_views(self, config: MethodSettings) -> MultiCropConfig:
        """The views of the ``images`` stream: the two global crops (no local crops it would discard)."""
        return replace(config.data.views, n_local=0)

    def terms_without_volumes(self, config: MethodSettings, manifest: Path) -> list[str]:
        """The loss terms to drop when the archive has no 3D volume for the ``stacks`` stream; raises when the
        method cannot train without them."""
        raise ManifestError(f"data.manifest: {manifest}: no 3D volume for method={self.name}")

    # ------------------------------------------------------------------ objective
    def build(self, model: JointModel, config: MethodSettings, data: PreparedData) -> nn.Module:
        """The objective over ``model``: ``forward(**inputs, step=step) -> (loss, {name: 0-d tensor})``."""
        raise NotImplementedError(f"method {self.name!r} does not build an objective")

    def inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The keyword arguments of the objective's forward, from the trainer's batch inputs (``crops``,
        ``crop_index``, ``stacks``, ``sep``)."""
        return {"crops": inputs["crops"]}

    # ------------------------------------------------------------------ between steps
    def active_streams(self, objective: nn.Module, step: int) -> list[str] | None:
        """The streams this step reads (None: all of the run's streams)."""
        return None

    def before_step(self, objective: nn.Module, step: int, epoch_start: bool, seed: int) -> dict[str, float]:
        """Work before the step's forward (k-means at an epoch start, prototype normalisation); returns metrics to
        log once (``seed`` seeds anything random)."""
        return {}

    def after_backward(self, objective: nn.Module, step: int) -> None:
        """Work between the backward pass and the optimiser step (frozen prototypes drop their gradients)."""

    # ------------------------------------------------------------------ schedule
    def step_counts(self, config: MethodSettings) -> StepCounts:
        """The method's step counts, relative to ``trainer.max_steps`` (a ``trainer.max_minutes`` calibration scales
        them with the run's length)."""
        return {}

    def set_step_counts(self, objective: nn.Module, counts: StepCounts) -> None:
        """Apply the calibrated ``step_counts`` to the objective."""

    def quiet_steps(self, objective: nn.Module) -> int:
        """Steps during which a health alarm would mislead (prototypes frozen)."""
        return 0

    # ------------------------------------------------------------------ health, pictures, initialisation
    def prototype_streams(self, config: MethodSettings, dropped: list[str]) -> list[str]:
        """The streams clustered by SwAV prototypes (their freeze is checked against the run's length)."""
        return []

    def trains_intra_prototypes(self, config: MethodSettings) -> bool:
        """Whether the 2D prototypes learn (their pictures would mislead otherwise)."""
        return False

    def without_volumes_message(self, config: MethodSettings, dropped: list[str]) -> str:
        """What a run whose volume terms were dropped trains."""
        return f"no 3D volume in the manifest: {', '.join(dropped)} dropped"

    def trained_modules(self, state: dict[str, Any]) -> list[str]:
        """The model's modules (besides the encoder) that a finished run of this method trained, from its
        checkpoint (``config``, ``step``, ...)."""
        return ["projector"]


def check_options(method: Method, values: dict[str, Any]) -> Any:
    """``values`` typed by ``method.options``; a method without options accepts none."""
    if method.options is None:
        if values:
            raise ValueError(f"method.options: method={method.name} takes no options, got {sorted(values)}")
        return None
    return structured_config(method.options, values, prefix="method.options.")
