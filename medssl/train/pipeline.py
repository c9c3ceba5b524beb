"""From a pretraining config to data streams: manifest -> cache -> datasets -> sharded loaders."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from medssl.data.cache import build_cache
from medssl.data.datasets import MultiCropSliceDataset, TwoViewStackDataset, cached_items
from medssl.data.errors import ManifestError
from medssl.data.manifest import read_manifest
from medssl.data.samplers import BalancedGroupBatchSampler
from medssl.train.config import PretrainConfig
from medssl.train.distributed import DistributedContext
from medssl.train.loaders import ShardedBatchSampler, Stream, balanced_batches, shuffled_batches
from medssl.train.methods import method_named
from medssl.train.prepared import PreparedData

log = logging.getLogger(__name__)


def needed_streams(config: PretrainConfig) -> list[str]:
    """The streams the configured method reads at some step."""
    return method_named(config.method.name).streams(config)


def prepare_data(config: PretrainConfig, streams: list[str], build: bool = True, progress: bool = True) -> PreparedData:
    """Read the manifest, build missing cache entries (``build``; rank 0 only under DDP), open the datasets.

    An archive without 3D volumes leaves the 3D stream empty: the method says which terms to drop (listed in
    ``PreparedData.dropped``; the joint method then trains its 2D part) or stops with an error.
    """
    data = config.data
    path = Path(data.manifest)
    if not path.is_file():
        raise ManifestError(f"data.manifest: {path}: no such manifest (make one with `medssl manifest scan DIR`)")
    manifest = read_manifest(path, data.root, data.path_map)
    if build:
        report = build_cache(
            manifest, Path(data.cache_dir), data.preprocess, workers=data.cache_workers, progress=progress
        )
        if report.errors:
            log.warning("%d manifest rows could not be preprocessed; see %s", len(report.errors), report.errors_path)
    items = cached_items(manifest, Path(data.cache_dir), data.preprocess, data.splits)
    if not items:
        raise ManifestError(f"data.manifest: {path}: no usable rows (splits {data.splits}) after preprocessing")
    seed = config.seed
    method = method_named(config.method.name)
    images = stacks = sep = None
    dropped: list[str] = []
    if "images" in streams:
        images = MultiCropSliceDataset(items, method.image_views(config), data.slices, seed=seed)
        if len(images) == 0:
            raise ManifestError(f"data.manifest: {path}: no 2D image or foreground slice for the 2D stream")
    if "stacks" in streams:
        stacks = TwoViewStackDataset(items, data.stacks, seed=seed + 1)
        if len(stacks) == 0:
            dropped = method.terms_without_volumes(config, path)  # raises when the method cannot do without
            stacks = None
    if "sep" in streams:
        views = replace(data.views, n_local=0)  # SepCLR uses two global views
        sep = MultiCropSliceDataset(items, views, data.slices, seed=seed + 2)
    return PreparedData(manifest, items, images, stacks, sep, dropped)


def _check_divisible(name: str, batch: int, parts: int, balanced: bool) -> None:
    unit = parts * (2 if balanced else 1)
    if batch < unit or batch % unit:
        extra = " x 2 (background and target halves)" if balanced else ""
        raise ValueError(
            f"trainer.batch.{name}={batch} must be a multiple of processes x trainer.accumulate{extra} = {unit}"
        )


def build_streams(
    config: PretrainConfig, data: PreparedData, ctx: DistributedContext, pin_memory: bool = False
) -> dict[str, Stream]:
    """One :class:`Stream` per dataset present, sharded for this process."""
    trainer = config.trainer
    parts = ctx.world_size * trainer.accumulate
    streams: dict[str, Stream] = {}
    seed = config.seed

    def make(name: str, dataset, epoch_batches, balanced: bool) -> Stream:  # type: ignore[no-untyped-def]
        sampler = ShardedBatchSampler(epoch_batches, ctx.world_size, ctx.rank, trainer.accumulate, balanced)
        return Stream(name, dataset, sampler, trainer.num_workers, pin_memory)

    if data.images is not None:
        batch, size = trainer.batch.images, len(data.images)
        _check_divisible("images", batch, parts, False)
        streams["images"] = make("images", data.images, lambda e: shuffled_batches(size, batch, seed, e), False)
    if data.stacks is not None:
        batch_3d, size_3d = trainer.batch.stacks, len(data.stacks)
        _check_divisible("stacks", batch_3d, parts, False)
        streams["stacks"] = make(
            "stacks", data.stacks, lambda e: shuffled_batches(size_3d, batch_3d, seed + 1, e), False
        )
    if data.sep is not None:
        _check_divisible("sep", trainer.batch.sep, parts, True)
        try:
            balanced = BalancedGroupBatchSampler(
                data.sep.groups, trainer.batch.sep, config.data.background, config.data.target, seed=seed + 2
            )
        except ValueError as exc:
            raise ValueError(f"data.background/data.target: {exc}") from None
        streams["sep"] = make("sep", data.sep, lambda e: balanced_batches(balanced, e), True)
    return streams
