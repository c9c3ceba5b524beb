"""Canonical orientation and slice geometry shared by the scanner and the readers.

Canonical volume layout (MONAI/nibabel convention): a ``float32`` array indexed ``[X, Y, Z]``
whose axes point (closest to) Right, Anterior, Superior (RAS+), with a 4x4 RAS affine mapping
voxel indices to millimetres. Axial slices are ``volume[:, :, k]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from nibabel import orientations

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
PLANE_AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}


def affine_from_lps(direction: np.ndarray, spacing: Sequence[float], origin: Sequence[float]) -> np.ndarray:
    """RAS affine from ITK/DICOM (LPS) geometry: ``direction`` [3, 3] has the axis cosines as columns."""
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(direction, dtype=float) @ np.diag(np.asarray(spacing, dtype=float))
    affine[:3, 3] = np.asarray(origin, dtype=float)
    return LPS_TO_RAS @ affine


def canonical_shape_spacing(
    shape: Sequence[int], spacing: Sequence[float], affine_ras: np.ndarray
) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Shape and spacing after reorientation to RAS, computed from geometry only (no pixels)."""
    ornt = orientations.io_orientation(affine_ras)
    out_shape = [0, 0, 0]
    out_spacing = [0.0, 0.0, 0.0]
    for in_axis, (out_axis, _flip) in enumerate(ornt):
        out_shape[int(out_axis)] = int(shape[in_axis])
        out_spacing[int(out_axis)] = float(spacing[in_axis])
    return tuple(out_shape), tuple(out_spacing)


def to_canonical(array_xyz: np.ndarray, affine_ras: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorient ``array_xyz`` [X, Y, Z] with its RAS affine to the closest RAS+ axes.

    Returns the reoriented array (a contiguous copy) and its affine. This is what
    ``nibabel.as_closest_canonical`` does, applied to any reader's output.
    """
    ornt = orientations.io_orientation(affine_ras)
    if np.array_equal(ornt, [[0, 1], [1, 1], [2, 1]]):
        return np.ascontiguousarray(array_xyz), np.asarray(affine_ras, dtype=float)
    reoriented = orientations.apply_orientation(array_xyz, ornt)
    new_affine = affine_ras @ orientations.inv_ornt_aff(ornt, array_xyz.shape)
    return np.ascontiguousarray(reoriented), new_affine


def spacing_from_affine(affine: np.ndarray) -> tuple[float, float, float]:
    return tuple(float(v) for v in np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0)))  # type: ignore[return-value]


def slice_normal(orientation: Sequence[float]) -> np.ndarray:
    """Unit normal of a DICOM ImageOrientationPatient (row cosines x column cosines)."""
    row = np.asarray(orientation[:3], dtype=float)
    col = np.asarray(orientation[3:6], dtype=float)
    normal = np.cross(row, col)
    return normal / np.linalg.norm(normal)


def check_slice_positions(positions: Sequence[float], what: str, tolerance: float = 0.05) -> float:
    """Validate sorted slice positions (mm along the normal) and return the slice spacing.

    Raises ``ValueError`` with a message (no identifiers) for duplicate positions, a missing
    slice (a gap larger than the others) or mixed spacing.
    """
    pos = np.asarray(positions, dtype=float)
    if pos.size < 2:
        return 1.0
    steps = np.diff(pos)
    if np.any(steps < 1e-4):
        dup = int(np.sum(steps < 1e-4))
        raise ValueError(f"{what}: {dup} slice(s) share a position (several stacks or echoes in one series?)")
    median = float(np.median(steps))
    deviation = np.abs(steps - median) / median
    if np.any(deviation > tolerance):
        gaps = steps[deviation > tolerance]
        multiples = gaps / median
        if np.all(np.abs(multiples - np.round(multiples)) < tolerance) and np.all(multiples > 1.5):
            missing = int(np.round(multiples - 1).sum())
            raise ValueError(
                f"{what}: {missing} missing slice(s) (gap of {gaps.max():.3g} mm, spacing {median:.3g} mm)"
            )
        raise ValueError(
            f"{what}: mixed slice spacing ({steps.min():.3g} to {steps.max():.3g} mm, median {median:.3g} mm)"
        )
    return median


def slice_to_display(slice_2d: np.ndarray) -> np.ndarray:
    """Turn a canonical slice into radiological display orientation ``[H, W]``.

    For all three planes of a RAS ``[X, Y, Z]`` volume, ``volume.take(k, axis)`` flipped on
    both axes and transposed puts superior/anterior at the top and the patient's right on the
    left of the screen.
    """
    return np.flip(slice_2d, axis=(-2, -1)).swapaxes(-2, -1)
