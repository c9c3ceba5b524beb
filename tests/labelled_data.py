"""Small labelled data sets for the segmentation and detection tests: generated volumes/images with label maps,
and a subset of the real MSD hippocampus cases (../shared/data) when present."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from factories import write_nifti, write_png

from medssl.data.manifest import ManifestRow, write_manifest
from medssl.data.row_transforms import assign_splits
from medssl.data.scan import ScanOptions, scan_folder

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
HIPPOCAMPUS = SHARED / "msd-hippocampus"
KERMANY = SHARED / "kermany-cxr-224"


def _ball(shape: tuple[int, ...], centre: np.ndarray, radius: float) -> np.ndarray:
    grid = np.indices(shape).astype(np.float32)
    distance = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)))
    return distance <= radius


def write_segmentation_data(
    folder: Path, volumes: int = 6, images: int = 0, test_every: int = 3, seed: int = 0, shape: int = 24
) -> Path:
    """Noisy volumes (``shape``^3 voxels, 1 mm, MR) and 2D PNG images (``2 * shape`` px) each with two bright
    objects: a ball/disc of class 1 and a smaller, brighter one of class 2; label maps beside them (NIfTI / PNG).
    Every ``test_every``-th case is in the test split; one subject per case. Returns the manifest path."""
    rng = np.random.default_rng(seed)
    data = folder / "data"
    rows: list[ManifestRow] = []
    cases = [(3, i) for i in range(volumes)] + [(2, i) for i in range(images)]
    for dims, i in cases:
        size = (shape,) * 3 if dims == 3 else (2 * shape,) * 2
        image = rng.normal(100.0, 10.0, size).astype(np.float32)
        labels = np.zeros(size, dtype=np.uint8)
        for cls, (radius, value) in enumerate([(size[0] / 5, 300.0), (size[0] / 8, 500.0)], start=1):
            for _ in range(100):  # objects do not touch
                centre = rng.uniform(radius + 1, np.array(size) - radius - 1)
                ball = _ball(size, centre, radius)
                if not (_ball(size, centre, radius + 1) & (labels > 0)).any():
                    break
            image[ball] = value + rng.normal(0, 10.0, int(ball.sum()))
            labels[ball] = cls
        split = "test" if i % test_every == test_every - 1 else "train"
        if dims == 3:
            path, mask = f"vol{i:02d}.nii.gz", f"labels/vol{i:02d}.nii.gz"
            write_nifti(data / path, image)
            write_nifti(data / mask, labels)
        else:
            path, mask = f"img{i:02d}.png", f"labels/img{i:02d}.png"
            write_png(data / path, np.clip(image / 2, 0, 255).astype(np.uint8))
            write_png(data / mask, labels)
        rows.append(
            ManifestRow(
                id=f"{'v' if dims == 3 else 'i'}{i:02d}",
                path=path,
                format="nifti" if dims == 3 else "image",
                dims=dims,
                modality="MR" if dims == 3 else "OT",
                subject=f"s{dims}{i:02d}",
                shape=size,
                spacing=(1.0,) * dims,
                split=split,
                mask=mask,
            )
        )
    manifest = folder / "labelled.csv"
    write_manifest(manifest, rows, data)
    return manifest


def hippocampus_manifest(folder: Path, train: int = 8, test: int = 4) -> Path:
    """A manifest of the first ``train + test`` real MSD hippocampus cases (T1 MR, labels 1 anterior,
    2 posterior); skips the test when ../shared/data is absent."""
    if not HIPPOCAMPUS.is_dir():
        pytest.skip(f"real data not available: {HIPPOCAMPUS} (see ../shared/data/README.md)")
    names = sorted(p.name for p in (HIPPOCAMPUS / "images").glob("*.nii.gz"))[: train + test]
    rows = [
        ManifestRow(
            id=f"h{k:03d}",
            path=f"images/{name}",
            format="nifti",
            dims=3,
            modality="MR",
            subject=name.removesuffix(".nii.gz"),
            split="train" if k < train else "test",
            mask=f"labels/{name}",
        )
        for k, name in enumerate(names)
    ]
    manifest = folder / "hippocampus.csv"
    write_manifest(manifest, rows, HIPPOCAMPUS)
    return manifest


def kermany_manifest(folder: Path, per_class: int, test_fraction: float = 0.4) -> Path:
    """A manifest of ``per_class`` real Kermany radiographs per label (evenly spaced over the sorted files),
    labelled NORMAL/PNEUMONIA and split train/test by patient; skips when ../shared/data is absent."""
    if not KERMANY.is_dir():
        pytest.skip(f"real data not available: {KERMANY} (see ../shared/data/README.md)")
    data = folder / "data"
    for label in ("NORMAL", "PNEUMONIA"):
        files = sorted((KERMANY / "train" / label).glob("*.jp*g"))
        (data / label).mkdir(parents=True)
        for path in files[:: len(files) // per_class][:per_class]:
            shutil.copy(path, data / label / path.name)
    pattern = re.compile(r"(person\d+|NORMAL2-IM-\d+|IM-\d+)")
    rows = scan_folder(data, ScanOptions(salt="t", progress=False, modality="CR", subject_pattern=pattern)).rows
    rows = [type(r)(**{**r.__dict__, "label": r.path.split("/")[0]}) for r in rows]
    rows = assign_splits(rows, {"train": 1 - test_fraction, "test": test_fraction}, salt="t")
    write_manifest(folder / "kermany.csv", rows, data)
    return folder / "kermany.csv"
