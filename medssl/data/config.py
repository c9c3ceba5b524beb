"""The data section of the configuration (``configs/data/*.yaml``) as typed dataclasses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig

from medssl.data.datasets import SliceConfig, StackConfig
from medssl.data.preprocess import PreprocessConfig
from medssl.data.views import MultiCropConfig
from medssl.runtime.configs import structured_config


@dataclass
class DataConfig:
    """Where the data is, how it is preprocessed and how samples are drawn.

    ``root``: the archive root (default: the one in the manifest's path map); ``path_map``: the manifest's path map
    (default: the one the manifest names, ``<manifest stem>.paths.csv`` beside it).
    ``splits``: manifest splits used for pretraining (``""`` = rows without a split).
    ``background``/``target``: manifest ``group`` values for SepCLR's balanced batches.
    """

    manifest: str = "data_manifests/demo.csv"
    root: str | None = None
    path_map: str | None = None
    cache_dir: str = "cache"
    cache_workers: int = 2
    splits: list[str] | None = None
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    views: MultiCropConfig = field(default_factory=MultiCropConfig)
    slices: SliceConfig = field(default_factory=SliceConfig)
    stacks: StackConfig = field(default_factory=StackConfig)
    background: str = "background"
    target: str = "target"


def data_config(values: DictConfig | dict[str, Any] | None = None, overrides: list[str] | None = None) -> DataConfig:
    """Typed ``DataConfig`` from a config mapping plus ``key=value`` overrides.

    A wrong key or value raises ``ValueError`` naming it as ``data.<key>``.
    """
    return structured_config(DataConfig, values, overrides, prefix="data.")
