"""``medssl finetune``: the task dispatcher, and classification (frozen-feature linear probe and kNN, or full
fine-tuning of the encoder with a linear head).

The pretrained encoder comes from a MONAI bundle (``medssl export``), an MLflow run id, or nothing
(random initialisation, the baseline). Its weights must load completely: the number of matched
tensors is printed and a mismatch is an error, never a warning.
"""

from __future__ import annotations

import copy
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn

from medssl.data.datasets import cached_items
from medssl.data.errors import ManifestError
from medssl.data.manifest import read_manifest
from medssl.data.preprocess import PreprocessConfig
from medssl.downstream.classifier import FinetuneSchedule, finetune_classifier
from medssl.downstream.common import (
    FinetuneModelConfig,
    TaskConfig,
    load_backbone,
    log_finetune_run,
)
from medssl.downstream.probes import (
    LabelledImageDataset,
    check_disjoint_subjects,
    extract_features,
    knn_probe,
    label_fraction_subset,
    linear_probe,
)
from medssl.downstream.spaces import SPACES, load_space_encoder
from medssl.runtime.configs import structured_config
from medssl.runtime.devices import resolve_device
from medssl.runtime.seeding import seed_everything

PROTOCOLS = ("linear", "knn", "finetune")


@dataclass
class FinetuneDataConfig:
    manifest: str = "data_manifests/labelled.csv"
    root: str | None = None  # the archive root (default: the path map's)
    path_map: str | None = None  # the manifest's path map (default: the one it names)
    cache_dir: str = "cache"
    cache_workers: int = 2
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    size: int = 96  # images are resized to size x size (the pretraining crop size is in the bundle's metadata)
    train_split: str = "train"
    test_split: str = "test"
    label_fraction: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.label_fraction <= 1:
            raise ValueError(f"label_fraction must be in (0, 1], got {self.label_fraction}")


@dataclass
class ClassificationModelConfig(FinetuneModelConfig):
    space: str = "backbone"  # backbone | common | salient (SepCLR heads; needs a run folder or checkpoint)

    def __post_init__(self) -> None:
        if self.space not in SPACES:
            raise ValueError(f"model.space must be one of {SPACES}, got {self.space!r}")


@dataclass
class FinetuneConfig(TaskConfig):
    """``configs/finetune/classification.yaml`` (``medssl finetune task=classification key=value ...``)."""

    TASK: ClassVar[str] = "classification"
    task: str = "classification"
    protocol: str = "linear"
    knn_k: int = 20
    finetune: FinetuneSchedule = field(default_factory=FinetuneSchedule)  # protocol=finetune
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    model: ClassificationModelConfig = field(default_factory=ClassificationModelConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")


TASKS: dict[str, tuple[str, str, str]] = {
    "classification": ("medssl.downstream.finetune", "FinetuneConfig", "run_classification"),
    "segmentation": ("medssl.downstream.segmentation", "SegmentationConfig", "run_segmentation"),
    "detection": ("medssl.downstream.detection", "DetectionConfig", "run_detection"),
}
"""task -> (module, config dataclass, runner): ``runner(config, project_dir) -> dict`` of metrics."""


def _task_entry(task: str) -> tuple[type, Any]:
    if task not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {task!r}")
    module_name, schema, runner = TASKS[task]
    module = importlib.import_module(module_name)
    return getattr(module, schema), getattr(module, runner)


def finetune_config(values: Any = None, overrides: list[str] | None = None, task: str = "classification") -> Any:
    return structured_config(_task_entry(task)[0], values, overrides)


def compose_finetune_config(overrides: list[str] | None = None, directory: str | Path | None = None) -> Any:
    """``finetune/<task>.yaml`` (``task=...``, default classification) plus Hydra-style overrides, typed by the
    task's config dataclass (:data:`TASKS`). The file comes from the user's ``directory`` (or ``$MEDSSL_CONFIG_DIR``:
    ``<dir>/finetune/<task>.yaml`` or ``<dir>/<task>.yaml``) when it has one, else from the shipped configs."""
    from medssl.runtime.configs import config_dir, user_config_dir

    overrides = list(overrides or [])
    task = next((o.split("=", 1)[1] for o in overrides if o.startswith("task=")), "classification")
    user = user_config_dir(directory)
    folders = [user / "finetune", user] if user is not None else []
    folders.append(config_dir() / "finetune")
    path = next((f / f"{task}.yaml" for f in folders if (f / f"{task}.yaml").is_file()), None)
    if path is None:
        available = sorted({p.stem for f in folders for p in f.glob("*.yaml")})
        raise ValueError(f"task={task}: no {task}.yaml in {', '.join(map(str, folders))} (available: {available})")
    return finetune_config(OmegaConf.load(path), overrides, task)


def run_finetune(config: Any, project_dir: Path | None = None) -> dict[str, Any]:
    """Run the fine-tuning task that ``config.task`` names."""
    return _task_entry(config.task)[1](config, project_dir)


def load_encoder(
    pretrained: str, encoder: str, tracking_uri: str | None = None, space: str = "backbone"
) -> tuple[nn.Module, str]:
    """The 2D feature extractor ``[B, C, H, W] -> [B, D]`` and a line saying what was loaded (``matched N/N
    pretrained tensors``): the encoder, or the encoder + a SepCLR head (:mod:`medssl.downstream.spaces`)."""
    if space != "backbone":
        return load_space_encoder(pretrained, encoder, space)
    loaded = load_backbone(pretrained, encoder, spatial_dims=2, tracking_uri=tracking_uri)
    return loaded.network, loaded.message


@dataclass
class Features:
    """Frozen features of the labelled splits: ``train_x [N, D]``, ``train_y [N]``, ``test_x [M, D]``, ``test_y [M]``
    (labels as strings)."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


def labelled_splits(data: FinetuneDataConfig, progress: bool = True) -> tuple[list[Any], list[Any]]:
    """The cached items of the train and test splits (cache built if needed, its progress reported when
    ``progress``), checked patient-disjoint."""
    from medssl.data.cache import build_cache

    path = Path(data.manifest)
    if not path.is_file():
        raise ManifestError(f"data.manifest: {path}: no such manifest")
    manifest = read_manifest(path, data.root, data.path_map)
    build_cache(manifest, Path(data.cache_dir), data.preprocess, workers=data.cache_workers, progress=progress)
    train = cached_items(manifest, Path(data.cache_dir), data.preprocess, [data.train_split])
    test = cached_items(manifest, Path(data.cache_dir), data.preprocess, [data.test_split])
    if not train or not test:
        raise ManifestError(
            f"data.manifest: {path}: needs rows in split {data.train_split!r} ({len(train)}) "
            f"and {data.test_split!r} ({len(test)})"
        )
    check_disjoint_subjects([i.row for i in train], [i.row for i in test])
    return train, test


def encode_splits(
    network: nn.Module, train: list[Any], test: list[Any], size: int, device: torch.device, progress: bool = True
) -> Features:
    network.to(device)
    train_x, train_y = extract_features(
        network, LabelledImageDataset(train, size), device=device, progress=progress, desc="features train"
    )
    test_x, test_y = extract_features(
        network, LabelledImageDataset(test, size), device=device, progress=progress, desc="features test"
    )
    return Features(train_x, train_y, test_x, test_y)


def probe(features: Features, protocol: str, label_fraction: float, seed: int, knn_k: int = 20) -> dict[str, Any]:
    """One protocol on a stratified ``label_fraction`` of the training labels; metrics plus ``train_samples``."""
    keep = label_fraction_subset(features.train_y, label_fraction, seed)
    x, y = features.train_x[keep], features.train_y[keep]
    if protocol == "linear":
        result = linear_probe(x, y, features.test_x, features.test_y, seed=seed)
    else:
        result = knn_probe(x, y, features.test_x, features.test_y, k=knn_k)
    return {**result.metrics, "train_samples": len(keep), "test_samples": len(features.test_y)}


def finetune_result(
    network: nn.Module,
    train: list[Any],
    test: list[Any],
    size: int,
    label_fraction: float,
    seed: int,
    schedule: FinetuneSchedule,
    device: torch.device,
    progress: bool = True,
) -> dict[str, Any]:
    """Full fine-tuning of a copy of ``network`` (+ a linear head) on a stratified ``label_fraction`` of the
    training labels; test metrics plus ``train_samples``."""
    train_set, test_set = LabelledImageDataset(train, size), LabelledImageDataset(test, size)
    keep = label_fraction_subset(train_set.labels, label_fraction, seed)
    result = finetune_classifier(copy.deepcopy(network), train_set, test_set, schedule, seed, device, keep, progress)
    return {**result.metrics, "train_samples": len(keep), "test_samples": len(test_set)}


def run_classification(config: FinetuneConfig, project_dir: Path | None = None) -> dict[str, Any]:
    """Classification with frozen features (linear, kNN) or full fine-tuning; returns the metrics (and logs them
    to MLflow)."""
    data = config.data
    train, test = labelled_splits(data, config.progress)
    model = config.model
    seed_everything(config.seed)  # before the network: a random initialisation is the seed's
    network, loaded = load_encoder(model.pretrained, model.encoder, config.tracking_uri, model.space)
    print(f"medssl finetune: {loaded}")
    device = resolve_device(config.device)
    if config.protocol == "finetune":
        result = finetune_result(network, train, test, data.size, data.label_fraction, config.seed, config.finetune,
                                 device, config.progress)  # fmt: skip
        what = f"full fine-tuning ({config.finetune.steps} steps)"
    else:
        features = encode_splits(network, train, test, data.size, device, config.progress)
        result = probe(features, config.protocol, data.label_fraction, config.seed, config.knn_k)
        what = f"{config.protocol} probe"
    metrics = {k: float(result[k]) for k in ("accuracy", "balanced_accuracy", "auroc", "train_samples", "test_samples")}
    print(
        f"medssl finetune: {what}, {result['train_samples']} training labels "
        f"({data.label_fraction:g}), {result['test_samples']} test: AUROC {metrics['auroc']:.4f}, "
        f"accuracy {metrics['accuracy']:.4f}, balanced accuracy {metrics['balanced_accuracy']:.4f}"
    )
    if config.mlflow:
        result["run_id"] = log_finetune_run(
            config, metrics, loaded, f"{config.task}-{config.protocol}", project_dir, {"result": result}
        )
    return {**result, "loaded": loaded}
