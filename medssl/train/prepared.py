"""What a run trains on, once the manifest is read and cached: the datasets of its streams and the loss terms left
without data. :func:`medssl.train.pipeline.prepare_data` makes it; a method's ``build`` reads it."""

from __future__ import annotations

from dataclasses import dataclass, field

from medssl.data.datasets import CachedItem, MultiCropSliceDataset, TwoViewStackDataset
from medssl.data.manifest import Manifest


@dataclass
class PreparedData:
    """The manifest, its cached items and the datasets of the ``images`` (2D multi-crop), ``stacks`` (3D two-view)
    and ``sep`` (SepCLR's balanced groups) streams, None where the method does not read one."""

    manifest: Manifest
    items: list[CachedItem]
    images: MultiCropSliceDataset | None
    stacks: TwoViewStackDataset | None
    sep: MultiCropSliceDataset | None
    dropped: list[str] = field(default_factory=list)  # loss terms without data (``inter``, ``mask``: no volumes)
