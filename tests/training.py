"""Helpers (not tests) for the trainer tests: a small real-file dataset and a tiny, fast configuration."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

from medssl.data.manifest import write_manifest
from medssl.data.scan import ScanOptions, scan_folder


def write_training_data(
    folder: Path,
    volumes: int = 4,
    images: int = 8,
    seed: int = 0,
    group_names: tuple[str, str] = ("background", "target"),
) -> Path:
    """NIfTI volumes (blobs in a body-like ellipsoid) and PNG images, scanned into ``folder/manifest.csv``.

    Half of the images are in group ``group_names[0]`` (background), half in ``group_names[1]`` (target, a bright
    spot), for SepCLR.
    """
    rng = np.random.default_rng(seed)
    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    zz, yy, xx = np.mgrid[0:24, 0:32, 0:32]
    for v in range(volumes):
        body = ((xx - 16) / 13) ** 2 + ((yy - 16) / 11) ** 2 < 1
        volume = np.where(body, 60.0, 0.0) + rng.normal(0, 4, size=body.shape)
        for _ in range(3):
            c = rng.uniform([6, 8, 8], [18, 24, 24])
            blob = ((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) < rng.uniform(6, 20)
            volume[blob & body] += rng.uniform(30, 80)
        affine = np.diag([1.2, 1.2, 2.0, 1.0])
        nib.save(
            nib.Nifti1Image(np.transpose(volume, (2, 1, 0)).astype(np.float32), affine), str(data / f"vol{v}.nii.gz")
        )
    groups = {}
    for i in range(images):
        y, x = np.mgrid[0:64, 0:56]
        image = 90 + 60 * np.exp(-(((x - 28) / 20) ** 2 + ((y - 30) / 24) ** 2)) + rng.normal(0, 8, size=y.shape)
        if i % 2:
            cy, cx = rng.uniform(15, 45, size=2)
            image += 80 * np.exp(-(((x - cx) / 4) ** 2 + ((y - cy) / 4) ** 2))
        name = f"img{i}.png"
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(data / name)
        groups[name] = group_names[1] if i % 2 else group_names[0]
    rows = scan_folder(data, ScanOptions(salt="tests", progress=False, modality="MR")).rows
    rows = [type(r)(**{**r.__dict__, "group": groups.get(Path(r.path).name, "")}) for r in rows]
    manifest = folder / "manifest.csv"
    write_manifest(manifest, rows, data)
    return manifest


def tiny_overrides(manifest: Path, folder: Path, *extra: str) -> list[str]:
    """Hydra overrides for a fast CPU run: ResNet-10 on 32/16 px crops, small heads, tiny batches."""
    return [
        f"data.manifest={manifest}",
        f"data.cache_dir={folder / 'cache'}",
        "data.cache_workers=1",
        "data.preprocess.percentiles=[0,100]",
        "data.views.global_size=32",
        "data.views.local_size=16",
        "data.views.n_local=2",
        "data.stacks.n_slices=6",
        "data.stacks.size=32",
        "model=small",
        "model.projector_hidden=32",
        "model.projector_dim=16",
        "model.intra_prototypes=[8]",
        "model.transformer_dim=32",
        "model.inter_prototypes=[4]",
        "trainer=cpu",
        "trainer.batch.images=4",
        "trainer.batch.stacks=2",
        "trainer.batch.sep=4",
        "trainer.num_workers=0",
        "trainer.progress=false",
        "trainer.log_every=1",
        "trainer.optimizer.warmup_steps=1",
        "method.objective.freeze_prototypes_steps=1",
        f"run.output_dir={folder / 'outputs'}",
        f"logging.tracking_uri=sqlite:///{folder / 'mlruns' / 'mlflow.db'}",
        "logging.pictures.samples=8",
        "logging.log_model=false",  # 3-8 s per finished run; tests/test_mlflow_model.py turns it on
        *extra,
    ]
