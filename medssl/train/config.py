"""The pretraining configuration (``configs/pretrain.yaml`` and its groups) as typed dataclasses.

Hydra composes the YAML files and the command-line overrides; :func:`pretrain_config` checks the
result against these dataclasses, so that a misspelt key or a wrong value fails before any work
starts, with a message naming the key (``trainer.optimizer.lr: ...``).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from medssl.data.config import DataConfig
from medssl.models.joint import JointModelConfig
from medssl.objectives.joint import JointObjectiveConfig
from medssl.objectives.simclr import SimCLRConfig
from medssl.runtime.configs import structured_config, user_config_dir
from medssl.runtime.hydra_app import config_error, hydra_with_configs

if TYPE_CHECKING:
    from hydra._internal.hydra import Hydra

OPTIMIZERS = ("sgd", "lars", "adamw")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class MethodConfig:
    """``name``: a registered method (:data:`medssl.train.methods.METHODS`: the joint family ``joint``, ``swav2d``,
    ``dcv2_2d``, ``staged``, ``sepclr``; ``simclr``; ``barlow``); ``objective`` configures the joint family,
    ``simclr`` SimCLR, ``options`` any other method's own settings (typed by the method)."""

    name: str = "joint"
    objective: JointObjectiveConfig = field(default_factory=JointObjectiveConfig)
    simclr: SimCLRConfig = field(default_factory=SimCLRConfig)
    options: dict[str, Any] = field(default_factory=dict)
    weight_decay: float | None = None  # the method's own weight decay (start and end); null: trainer.optimizer's

    def __post_init__(self) -> None:
        from medssl.train.methods import method_named  # the methods read this module's types
        from medssl.train.methods.base import check_options

        check_options(method_named(self.name), dict(self.options))
        if self.weight_decay is not None and self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0 or null, got {self.weight_decay}")


@dataclass
class OptimizerConfig:
    """Optimiser and its per-step schedules (linear warm-up, then cosine to ``final_lr``).

    ``scale_lr_with_batch``: multiply ``lr`` by (global 2D batch) / 256 (Goyal et al., 2017).
    ``weight_decay_end``: cosine schedule of the weight decay (DINO); ``null`` keeps it constant.
    """

    name: str = "sgd"
    lr: float = 0.3
    final_lr: float = 0.0
    warmup_steps: int = 100
    start_warmup_lr: float = 0.0
    scale_lr_with_batch: bool = False
    momentum: float = 0.9
    nesterov: bool = False
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 1e-6
    weight_decay_end: float | None = None
    lars_eta: float = 0.001
    clip_grad: float = 0.0  # max global gradient norm; 0 = off

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"name must be one of {OPTIMIZERS}, got {self.name!r}")
        if self.lr <= 0 or self.final_lr < 0 or self.start_warmup_lr < 0:
            raise ValueError(f"lr must be > 0 and final_lr, start_warmup_lr >= 0, got {self.lr}, {self.final_lr}")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.clip_grad < 0:
            raise ValueError("warmup_steps, weight_decay and clip_grad must be >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")


@dataclass
class BatchConfig:
    """Samples per optimiser step, summed over all processes and accumulation steps (the global batch).

    ``images``: 2D samples (each gives ``data.views.n_global + n_local`` crops); ``stacks``: volumes
    (two views of ``data.stacks.n_slices`` slices each); ``sep``: background + target samples for SepCLR.
    Streams whose losses have weight 0 are not loaded.
    """

    images: int = 64
    stacks: int = 8
    sep: int = 32


@dataclass
class TrainerConfig:
    # The schedule's length in optimiser steps. With ``max_minutes`` it is the reference length: the run's length is
    # calibrated and the step counts of the schedule (warm-up, prototype freeze, queue start, stages) scale with it.
    max_steps: int = 1000
    # Wall-clock budget in minutes: the first steps are timed (median seconds per step after the loader has started)
    # and the run's length is set so that the whole schedule ends within the budget (92%); the budget also stays a
    # safety stop (finished, with backbone, after the step that reaches it). null: run max_steps.
    max_minutes: float | None = None
    batch: BatchConfig = field(default_factory=BatchConfig)
    accumulate: int = 1
    num_workers: int = 2
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 on GPUs that support it, fp16 + loss scaling on older ones, fp32 on CPU
    channels_last: bool = True  # CUDA only
    compile: bool = False  # torch.compile the encoder
    sync_batchnorm: bool = True  # SyncBatchNorm under multi-GPU DDP (CUDA only)
    dist_backend: str = "auto"  # auto: nccl on CUDA, gloo on CPU
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    resume: str | None = "auto"  # auto: continue this run name's last checkpoint if there is one; or a path; or null
    # Initialise the model from a finished run before step 0: a run folder, a pretraining checkpoint, an exported bundle
    # folder or a backbone.pt (the encoder at least; ignored when resuming this run's own checkpoint). null: random.
    init_from: str | None = None
    log_every: int = 10
    progress: bool = True

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError(f"max_minutes must be > 0 or null, got {self.max_minutes}")
        if self.accumulate < 1 or self.num_workers < 0 or self.log_every < 1:
            raise ValueError("accumulate and log_every must be >= 1 and num_workers >= 0")
        if self.checkpoint_every < 0 or self.keep_checkpoints < 1:
            raise ValueError("checkpoint_every must be >= 0 (0 = only at the end) and keep_checkpoints >= 1")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.dist_backend not in ("auto", "nccl", "gloo"):
            raise ValueError(f"dist_backend must be auto, nccl or gloo, got {self.dist_backend!r}")


@dataclass
class PicturesConfig:
    samples: int = 256  # 2D samples embedded for the projection and the prototype gallery
    every: int = 0  # steps between picture sets; 0 = at the end only
    gallery: bool = True  # example images per prototype: turn off if pixels may carry burned-in text


@dataclass
class LoggingConfig:
    mlflow: bool = True
    tracking_uri: str | None = None  # null: $MLFLOW_TRACKING_URI, else a local store in the project folder
    experiment: str = "medssl-pretrain"
    log_checkpoints: bool = True
    pictures: PicturesConfig = field(default_factory=PicturesConfig)
    log_model: bool = True  # the backbone as the MLflow model backbone_model (mlflow.pytorch.load_model)
    register_as: str | None = None  # register that model under this name in the MLflow model registry
    register_alias: str | None = "current"  # alias of the new version: models:/<register_as>@<alias>; null: none

    def __post_init__(self) -> None:
        if self.register_as is not None and (not self.register_as.strip() or any(c in self.register_as for c in "/@")):
            raise ValueError(f"logging.register_as: a model name without '/' or '@', got {self.register_as!r}")
        if self.register_as is not None and not (self.mlflow and self.log_model):
            raise ValueError("logging.register_as needs logging.mlflow=true and logging.log_model=true")
        alias = self.register_alias
        if alias is not None and (not re.fullmatch(r"[\w\-]+", alias) or alias.lower() == "latest"
                                  or re.fullmatch(r"v\d+", alias)):  # fmt: skip
            raise ValueError(
                f"logging.register_alias: letters, digits, '_' and '-', not 'latest' or v<number> (MLflow reserves "
                f"them; models:/<name>/latest is the newest version), got {alias!r}"
            )


@dataclass
class RunConfig:
    name: str | None = None  # null: <method>-<YYYYmmdd-HHMMSS>
    output_dir: str = "outputs"  # checkpoints and pictures go to <output_dir>/<name>/


@dataclass
class PretrainConfig:
    seed: int = 0
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: JointModelConfig = field(default_factory=JointModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def optimizer_settings(config: PretrainConfig) -> OptimizerConfig:
    """``trainer.optimizer`` with the method's own defaults applied: ``method.weight_decay`` (when set) replaces the
    weight decay and its end value (the public SwAV / DeepCluster-v2 recipes use 1e-6, where others use more)."""
    optimizer = config.trainer.optimizer
    if config.method.weight_decay is None:
        return optimizer
    return replace(optimizer, weight_decay=config.method.weight_decay, weight_decay_end=None)


def _section_of(exc: BaseException) -> str:
    """Best guess of the config section whose ``__post_init__`` raised, from the traceback."""
    tb = exc.__traceback__
    section = ""
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        name = type(owner).__name__ if owner is not None else ""
        section = _SECTIONS.get(name, section)
        tb = tb.tb_next
    return section


_SECTIONS = {
    "DataConfig": "data",
    "PreprocessConfig": "data.preprocess",
    "MultiCropConfig": "data.views",
    "AugmentConfig": "data.*.augment",
    "SliceConfig": "data.slices",
    "StackConfig": "data.stacks",
    "JointModelConfig": "model",
    "MethodConfig": "method",
    "JointObjectiveConfig": "method.objective",
    "LossWeights": "method.objective",
    "TrainerConfig": "trainer",
    "OptimizerConfig": "trainer.optimizer",
}


def pretrain_config(
    values: DictConfig | dict[str, Any] | None = None, overrides: list[str] | None = None
) -> PretrainConfig:
    """Typed ``PretrainConfig`` from a composed config plus ``key=value`` overrides.

    Raises:
        ValueError: naming the key, for unknown keys, wrong types and out-of-range values.
    """
    return structured_config(PretrainConfig, values, overrides, section_of=_section_of)


def to_container(config: PretrainConfig) -> dict[str, Any]:
    """The resolved configuration as plain nested dicts/lists (for YAML, MLflow params and checkpoints)."""
    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True)  # type: ignore[return-value]


@contextlib.contextmanager
def shipped_configs_with(user: Path | None, task_name: str = "medssl") -> Iterator[Hydra]:
    """Hydra initialised as ``medssl pretrain`` is (:func:`medssl.runtime.hydra_app.hydra_with_configs`): the shipped
    configs (``pkg://medssl.configs``) as the primary config path and ``user`` where Hydra's own ``--config-dir``
    puts it (the user's folder adds group options and top-level configs; a name in both is the shipped file), with
    :class:`PretrainConfig` as the typed schema under the YAML files. Yields the Hydra object; the global Hydra
    state is restored afterwards."""
    # The typed schema under the YAML files: every key of PretrainConfig exists (and can be overridden) even
    # where a group's YAML leaves it out, and Hydra checks types while it composes.
    with hydra_with_configs(user, task_name, schema=PretrainConfig) as hydra:
        yield hydra


def compose_pretrain_config(
    overrides: list[str] | None = None, config_name: str = "pretrain", directory: str | Path | None = None
) -> PretrainConfig:
    """Compose ``<config_name>.yaml`` with its groups and Hydra ``overrides`` (``method=simclr``,
    ``trainer.max_steps=200``, ``+extra=...``), then type-check it. The configs come from the installed package
    (``medssl/configs``); a user's ``directory`` (or ``$MEDSSL_CONFIG_DIR``) adds its files on top, as Hydra's
    ``--config-dir`` does: new options of the shipped groups (``data/archive.yaml``) and top-level configs.

    Raises:
        ValueError: an unknown group option, key or bad value, naming it.
    """
    from hydra import compose
    from hydra.errors import HydraException

    try:
        with shipped_configs_with(user_config_dir(directory)):
            composed = compose(config_name=config_name, overrides=list(overrides or []))
    except (HydraException, OmegaConfBaseException) as exc:
        raise config_error(exc) from None
    return pretrain_config(composed)
