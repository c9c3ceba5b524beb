"""From a pretraining config to data streams: manifest -> cache -> datasets -> sharded loaders."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

from medssl.data.cache import build_cache
from medssl.data.datasets import CachedItem, MultiCropSliceDataset, TwoViewStackDataset, cached_items
from medssl.data.errors import ManifestError
from medssl.data.manifest import Manifest, read_manifest
from medssl.data.samplers import BalancedGroupBatchSampler
from medssl.objectives.joint import LossWeights
from medssl.train.config import PretrainConfig
from medssl.train.distributed import DistributedContext
from medssl.train.loaders import ShardedBatchSampler, Stream, balanced_batches, shuffled_batches

log = logging.getLogger(__name__)

STREAMS = ("images", "stacks", "sep")


def streams_of(weights: LossWeights) -> list[str]:
    """The streams that losses with these weights read: ``images`` (L_intra), ``stacks`` (L_inter, L_mask),
    ``sep`` (L_sep)."""
    active = {"images": weights.intra > 0, "stacks": weights.inter > 0 or weights.mask > 0, "sep": weights.sep > 0}
    return [name for name in STREAMS if active[name]]


def needed_streams(config: PretrainConfig) -> list[str]:
    """The streams whose losses can be active at some step (the staged schedule uses 2D and 3D in turn)."""
    method = config.method
    if method.name == "simclr":
        return ["images"]
    objective = method.objective
    streams = streams_of(objective.weights)
    if objective.stages is not None:
        streams = [name for name in STREAMS if name in streams or name in ("images", "stacks")]
    if not streams:
        raise ValueError("method.objective.weights: every loss weight is 0; nothing to train")
    return streams


@dataclass
class PreparedData:
    manifest: Manifest
    items: list[CachedItem]
    images: MultiCropSliceDataset | None
    stacks: TwoViewStackDataset | None
    sep: MultiCropSliceDataset | None
    dropped: list[str] = field(default_factory=list)  # loss terms without data (``inter``, ``mask``: no volumes)


def prepare_data(config: PretrainConfig, streams: list[str], build: bool = True, progress: bool = True) -> PreparedData:
    """Read the manifest, build missing cache entries (``build``; rank 0 only under DDP), open the datasets.

    An archive without 3D volumes leaves the 3D stream empty: its terms (L_inter, L_mask) are dropped and listed in
    ``PreparedData.dropped`` when another active term has data (the joint method then trains its 2D part); a method
    whose every active term reads volumes, or the staged schedule (its later stages are 3D), stops with an error.
    """
    data = config.data
    path = Path(data.manifest)
    if not path.is_file():
        raise ManifestError(f"data.manifest: {path}: no such manifest (make one with `medssl manifest scan DIR`)")
    manifest = read_manifest(path, data.root)
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
    images = stacks = sep = None
    dropped: list[str] = []
    if "images" in streams:
        # SimCLR reads the two global crops only: do not make local crops it would discard
        views = replace(data.views, n_local=0) if config.method.name == "simclr" else data.views
        images = MultiCropSliceDataset(items, views, data.slices, seed=seed)
        if len(images) == 0:
            raise ManifestError(f"data.manifest: {path}: no 2D image or foreground slice for the 2D stream")
    if "stacks" in streams:
        stacks = TwoViewStackDataset(items, data.stacks, seed=seed + 1)
        if len(stacks) == 0:
            objective = config.method.objective
            if objective.stages is not None or streams == ["stacks"]:  # later stages, or every term, need volumes
                staged = objective.stages is not None
                needs = "the staged schedule's masked and 3D stages" if staged else "L_inter, L_mask"
                raise ManifestError(
                    f"data.manifest: {path}: no 3D volume for the 3D stream ({needs}); "
                    "use a 2D method (method=swav2d) or add volumes"
                )
            dropped = [term for term in ("inter", "mask") if getattr(objective.weights, term) > 0]
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
