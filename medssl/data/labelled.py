"""Images with their label maps, for segmentation and detection fine-tuning.

A manifest row with a ``mask`` column (a label map on the image's grid, integer class values, 0 = background) is
read into a :class:`LabelledCase`: the image through the same readers and preprocessing as pretraining (RAS+
``[X, Y, Z]`` for volumes, rows x columns for 2D images; resampled to ``preprocess.spacing``; intensities to
``[0, 1]`` per modality), and the label map through the same reader, resampled with nearest neighbour onto the
image's output grid. A bad case (unreadable file, mask of another shape, non-integer labels) is reported by the name
the manifest gives the file (its file key, or its relative path in a manifest without a path map) and skipped; the
others go on.

Fine-tuning sets are small (tens to thousands of cases), so cases are held in memory.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medssl.data.errors import DataError, ManifestError
from medssl.data.manifest import Manifest, ManifestRow
from medssl.data.preprocess import PreprocessConfig, preprocess
from medssl.data.readers import LoadedImage, read_dicom_file, read_image_file, read_nifti, read_row
from medssl.runtime.progress import progress as progress_of

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MAX_CLASS = int(np.iinfo(np.int32).max)
"""The largest class index a label map may hold (labels are resampled as int32)."""


@dataclass
class LabelledCase:
    """One image and its label map on the same grid.

    Attributes:
        image: float32 ``[C, X, Y, Z]`` (volumes) or ``[C, H, W]`` (2D images), in ``[0, 1]``.
        mask: int64 ``[X, Y, Z]`` or ``[H, W]``, class indices (0 = background).
        spacing: mm per spatial axis of ``image``/``mask``.
        zoom: output size / source size per spatial axis (1.0 when nothing was resampled): multiply voxel
            coordinates of the source file by it to get coordinates in ``image``.
    """

    id: str
    subject: str
    split: str
    label: str
    image: np.ndarray
    mask: np.ndarray
    spacing: tuple[float, ...]
    zoom: tuple[float, ...]

    @property
    def dims(self) -> int:
        return self.mask.ndim

    def display(self) -> tuple[np.ndarray, np.ndarray]:
        """Image and mask in the pretrained encoder's axis order (``configs/metadata.json`` -> ``axis_order``).

        Volumes: image ``[C, D, H, W]`` and mask ``[D, H, W]``, ``D`` along Z (axial slices) and each ``[H, W]``
        the axial slice in radiological display orientation (:func:`medssl.data.geometry.slice_to_display`);
        2D images: ``[C, H, W]`` and ``[H, W]`` as stored. Contiguous copies.
        """
        if self.dims == 2:
            return np.ascontiguousarray(self.image), np.ascontiguousarray(self.mask)
        image = np.flip(self.image, axis=(1, 2)).transpose(0, 3, 2, 1)  # [C, X, Y, Z] -> [C, Z, Y, X] flipped
        mask = np.flip(self.mask, axis=(0, 1)).transpose(2, 1, 0)
        return np.ascontiguousarray(image), np.ascontiguousarray(mask)


def read_label_map(path: Path, dims: int) -> LoadedImage:
    """A label map file (NIfTI, PNG/TIFF/..., or a DICOM file), in the readers' canonical orientation."""
    if not path.is_file():
        raise DataError(path, "mask file not found")
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        loaded = read_nifti(path)
    elif name.endswith(IMAGE_SUFFIXES):
        loaded = read_image_file(path)
    else:
        loaded = read_dicom_file(path, apply_voi=False)
    if loaded.dims == 3 and dims == 2 and loaded.array.shape[2] == 1:
        loaded.array = loaded.array[:, :, 0]
        loaded.spacing = loaded.spacing[:2]
    return loaded


def resample_labels(labels: np.ndarray, spacing: Sequence[float], shape: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour resampling of a label map ``[X, Y(, Z)]`` onto a grid of ``shape`` covering the same extent
    (the grid :func:`medssl.data.preprocess.preprocess` resamples images onto)."""
    if tuple(labels.shape) == tuple(shape):
        return labels
    image = sitk.GetImageFromArray(np.ascontiguousarray(labels.T.astype(np.int32)))
    image.SetSpacing([float(s) for s in spacing])
    target = [n * s / m for n, s, m in zip(labels.shape, spacing, shape, strict=True)]
    resampled = sitk.Resample(
        image,
        [int(m) for m in shape],
        sitk.Transform(),
        sitk.sitkNearestNeighbor,
        image.GetOrigin(),
        target,
        image.GetDirection(),
        0,
        sitk.sitkInt32,
    )
    return sitk.GetArrayFromImage(resampled).T.copy()


def load_case(row: ManifestRow, source: Manifest | Path, config: PreprocessConfig) -> LabelledCase:
    """Read, preprocess and pair one row's image and mask.

    ``source``: the manifest (files resolved through its path map, if any), or the root of a manifest that holds
    paths. :class:`DataError` names the file at fault as the manifest does (``row.path`` or ``row.mask``).
    """
    if not row.mask:
        raise DataError(row.path, "row has no mask (manifest column 'mask')")
    if isinstance(source, Manifest):
        image_path, mask_path = source.resolve(row), source.resolve_mask(row)
    else:
        image_path, mask_path = Path(source) / row.path, Path(source) / row.mask
    try:
        loaded = read_row(row, image_path)
    except DataError as exc:
        raise DataError(row.path, exc.reason) from None
    try:
        labels = read_label_map(mask_path, loaded.dims)
    except DataError as exc:
        raise DataError(row.mask, exc.reason) from None
    if labels.array.shape != loaded.array.shape:
        raise DataError(
            row.mask, f"mask shape {labels.array.shape} differs from its image's {loaded.array.shape} ({row.path})"
        )
    values = labels.array
    if np.any(values < 0) or not np.array_equal(values, np.round(values)):
        raise DataError(row.mask, "mask values must be non-negative integers (class indices)")
    if values.size and values.max() > MAX_CLASS:  # a float label map can hold integers no class index reaches
        raise DataError(row.mask, f"mask values must be class indices up to {MAX_CLASS} (found {values.max():.3g})")
    source_shape = loaded.array.shape
    processed = preprocess(loaded, config, source=row.path)
    shape = processed.array.shape[1:]
    mask = resample_labels(values.astype(np.int64), labels.spacing, shape).astype(np.int64)
    return LabelledCase(
        id=row.id,
        subject=row.subject,
        split=row.split,
        label=row.label,
        image=processed.array,
        mask=mask,
        spacing=tuple(float(s) for s in processed.spacing),
        zoom=tuple(m / n for m, n in zip(shape, source_shape, strict=True)),
    )


def load_cases(
    manifest: Manifest,
    config: PreprocessConfig,
    splits: Sequence[str] | None = None,
    workers: int = 2,
    progress: bool = True,
) -> tuple[list[LabelledCase], list[DataError]]:
    """Every row with a mask (optionally only of ``splits``), in manifest order, and the errors of the bad ones;
    ``progress`` reports the cases read (:func:`medssl.runtime.progress.progress`).

    Raises:
        ManifestError: if no row of the selected splits has a mask.
    """
    rows = [r for r in manifest.rows if r.mask and (splits is None or r.split in splits)]
    if not rows:
        raise ManifestError(
            f"no rows with a 'mask' in splits {list(splits) if splits is not None else 'any'} "
            "(pair label maps with `medssl manifest scan --masks DIR` or a labels CSV with a mask column)"
        )

    def load(row: ManifestRow) -> LabelledCase | DataError:
        try:
            return load_case(row, manifest, config)
        except DataError as exc:
            return exc

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(progress_of(pool.map(load, rows), total=len(rows), desc="cases", unit="case", enabled=progress))
    cases = [r for r in results if isinstance(r, LabelledCase)]
    errors = [r for r in results if isinstance(r, DataError)]
    for error in errors:
        log.warning("skipped: %s", error)
    return cases, errors
