"""Embedded demo data: real medical images that ship inside pip-installable packages, plus phantoms.

``assemble_demo_data(out_dir)`` builds a small folder that ``medssl manifest scan`` accepts, with
no download at run time and no data from the user:

* real images copied from installed packages (never fetched): the MNI ICBM152 2009 T1 template
  (``nilearn``), NEMA WG04 radiographs and MR from ``pydicom-data``, small CT/MR slices from
  ``pydicom`` and small brain MRI volumes from ``nibabel``'s test data;
* synthetic phantoms that fill in (``phantoms/``): CT-like torso volumes as DICOM series (HU),
  T1-like head volumes as NIfTI and chest-radiograph-like images as DICOM CR and PNG. Half of
  them carry a "lesion", so ``labels.csv`` gives them a SepCLR ``group`` (background/target).

Layout of ``out_dir``::

    README.txt                 provenance and licence of every file
    labels.csv                 path,modality,group,label (for ``manifest scan --labels``)
    nilearn/ nibabel/ pydicom/ pydicom-data/   real files, neutral names
    phantoms/                  ct_volume_NN/ (DICOM series), mr_volume_NN.nii.gz, xray_NN.dcm|.png
    .medssl_demo.json          what was written, so that re-running only fills in what is missing

Real DICOM files are copied unchanged (the scanner pseudonymises their identifiers), under
names that hold no PatientName/PatientID (the scanner refuses such paths); only an invalid
zero/negative PixelSpacing is removed (RG1: ``0\\0``), and a 4D NIfTI contributes its first volume.
Left out on purpose: the ``*_UNCI`` twins of the ``*_UNCR`` images (same pixels), JPEG 2000,
JPEG-LS and RLE variants (no decoder plugin installed), colour, palette, ultrasound and
secondary-capture test files, SEG/RT/SR objects, display test patterns, Siemens mosaics, a
derived CT perfusion map (``eCT_Supplemental``) and the CQ500 head CT slice (``693_*``: that
dataset's licence is CC BY-NC-SA 4.0, non-commercial).
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import json
import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, NamedTuple

import nibabel as nib
import numpy as np
import pydicom
import SimpleITK as sitk
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from medssl.data.dicom import read_header
from medssl.data.row_transforms import join_labels
from medssl.data.scan import ScanOptions, ScanResult, scan_folder
from medssl.runtime.checks import at_least
from medssl.runtime.files import atomic_write_text, process_alive

LABELS_NAME = "labels.csv"
README_NAME = "README.txt"
STATE_NAME = ".medssl_demo.json"
PHANTOM_FOLDER = "phantoms"
# Files of ours that are not images: leave them out of a scan of the demo folder.
DEMO_SCAN_EXCLUDE = (README_NAME, LABELS_NAME)
# The optional packages that bring real images (the `demo` extra); nibabel and pydicom are core.
DEMO_REQUIREMENTS = ("nilearn>=0.10", "pydicom-data>=1.0")
GENERATOR_VERSION = 2  # bump when the phantoms change: re-running then rewrites them
LABELS_COLUMNS = ("path", "modality", "group", "label")
BACKGROUND, TARGET = "background", "target"

_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
_CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
_UNCOMPRESSED_PHOTOMETRIC = frozenset({"MONOCHROME1", "MONOCHROME2"})


@dataclass(frozen=True)
class DemoSource:
    """One real image inside an installed package.

    ``name``: file name under ``out_dir/<distribution>/`` (holds no patient identifier);
    ``distribution``: the pip name; ``module``: the import name whose folder holds the file;
    ``relative``: the file's path inside that folder; ``extract``: ``""`` (copied as is) or
    ``"first_volume"`` (the first 3D volume of a 4D NIfTI); ``path``: the absolute path, set by
    ``find_demo_sources``.
    """

    name: str
    distribution: str
    module: str
    relative: str
    modality: str
    dims: int
    description: str
    provenance: str
    extract: str = ""
    path: Path | None = None

    @property
    def dest(self) -> str:
        return f"{self.distribution}/{self.name}"


_WG04 = "NEMA WG04 compression test images (ftp://medical.nema.org/MEDICAL/Dicom/DataSets/WG04), via pydicom-data (MIT)"

DEMO_SOURCES: tuple[DemoSource, ...] = (
    DemoSource(
        name="mni152_t1.nii.gz",
        distribution="nilearn",
        module="nilearn",
        relative="datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
        modality="MR",
        dims=3,
        description="MNI ICBM152 2009 nonlinear T1 brain template (average of 152 adult MRI), 1 mm, skull-stripped",
        provenance=(
            "Fonov et al., NeuroImage 2009/2011; (c) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, "
            "Montreal Neurological Institute, McGill University: free to use, copy and distribute with this notice; "
            "shipped by nilearn (BSD-3-Clause) as its bundled MNI152 template"
        ),
    ),
    DemoSource(
        name="cr_chest.dcm",
        distribution="pydicom-data",
        module="data_store",
        relative="data/RG1_UNCR.dcm",
        modality="CR",
        dims=2,
        description="chest radiograph (PA), computed radiography, MONOCHROME1, 15 bit",
        provenance=_WG04 + " (RG1_UNCR)",
    ),
    DemoSource(
        name="cr_leg.dcm",
        distribution="pydicom-data",
        module="data_store",
        relative="data/RG3_UNCR.dcm",
        modality="CR",
        dims=2,
        description="radiograph of the lower leg, computed radiography, MONOCHROME1, 10 bit",
        provenance=_WG04 + " (RG3_UNCR)",
    ),
    DemoSource(
        name="mr_shoulder.dcm",
        distribution="pydicom-data",
        module="data_store",
        relative="data/MR2_UNCR.dcm",
        modality="MR",
        dims=2,
        description="MR slice of a shoulder, 1024 x 1024",
        provenance=_WG04 + " (MR2_UNCR)",
    ),
    DemoSource(
        name="mr_abdomen.dcm",
        distribution="pydicom-data",
        module="data_store",
        relative="data/MR-SIEMENS-DICOM-WithOverlays.dcm",
        modality="MR",
        dims=2,
        description="axial MR slice of the upper abdomen (Siemens), 484 x 484",
        provenance="GDCM test data (MR-SIEMENS-DICOM-WithOverlays), via pydicom-data (MIT)",
    ),
    DemoSource(
        name="mr_head_multiframe.dcm",
        distribution="pydicom-data",
        module="data_store",
        relative="data/emri_small.dcm",
        modality="MR",
        dims=3,
        description="enhanced (multi-frame) MR of the head, 10 frames of 64 x 64, no slice geometry (1 mm assumed)",
        provenance="pydicom test file emri_small, via pydicom-data (MIT)",
    ),
    DemoSource(
        name="ct_slice.dcm",
        distribution="pydicom",
        module="pydicom",
        relative="data/test_files/CT_small.dcm",
        modality="CT",
        dims=2,
        description="CT slice (thoracic spine level), downsized to 128 x 128",
        provenance="pydicom test file CT_small, downsized from NEMA WG04 CT1_UNC; pydicom (MIT)",
    ),
    DemoSource(
        name="mr_slice.dcm",
        distribution="pydicom",
        module="pydicom",
        relative="data/test_files/MR_small.dcm",
        modality="MR",
        dims=2,
        description="MR slice, downsized to 64 x 64",
        provenance="pydicom test file MR_small, downsized from NEMA WG04 MR1_UNC; pydicom (MIT)",
    ),
    DemoSource(
        name="t1_head.nii",
        distribution="nibabel",
        module="nibabel",
        relative="tests/data/anatomical.nii",
        modality="MR",
        dims=3,
        description="T1-weighted brain MRI, 2 mm, 33 x 41 x 25",
        provenance="nibabel test data anatomical.nii; nibabel (MIT)",
    ),
    DemoSource(
        name="epi_head.nii.gz",
        distribution="nibabel",
        module="nibabel",
        relative="tests/data/example4d.nii.gz",
        modality="MR",
        dims=3,
        description="first volume of a functional (EPI) brain MRI series, 2 x 2 x 2.2 mm, 128 x 96 x 24",
        provenance="nibabel test data example4d.nii.gz (FSL-written 4D EPI); nibabel (MIT)",
        extract="first_volume",
    ),
)


@dataclass
class DemoFile:
    """One item written into the demo folder (``path`` is a folder for a DICOM series)."""

    path: str
    origin: str  # the pip distribution it comes from, or "phantom"
    modality: str
    dims: int
    shape: tuple[int, ...]
    description: str
    provenance: str = ""
    source: str = ""  # path inside the package, for real files
    changes: str = ""  # what differs from the packaged file ("" = byte-identical copy)
    group: str = ""
    label: str = ""
    bytes: int = 0
    reused: bool = False

    @property
    def is_phantom(self) -> bool:
        return self.origin == "phantom"


@dataclass
class DemoDataReport:
    out_dir: Path
    files: list[DemoFile]
    skipped: list[tuple[str, str]]  # (source, reason)
    missing_packages: list[str]  # pip distributions that are not installed
    labels_csv: Path
    readme: Path
    seconds: float = 0.0

    @property
    def real(self) -> list[DemoFile]:
        return [f for f in self.files if not f.is_phantom]

    @property
    def phantoms(self) -> list[DemoFile]:
        return [f for f in self.files if f.is_phantom]

    @property
    def total_bytes(self) -> int:
        return sum(f.bytes for f in self.files)

    @property
    def pip_command(self) -> str | None:
        """The command that adds the missing packages, or ``None`` when none is missing."""
        if not self.missing_packages:
            return None
        wanted = [r for r in DEMO_REQUIREMENTS if re.split(r"[<>=!~ ]", r, maxsplit=1)[0] in self.missing_packages]
        return "pip install " + " ".join(f"'{r}'" for r in wanted or self.missing_packages)

    def summary_lines(self) -> list[str]:
        by_origin = Counter(f.origin for f in self.real)
        real = ", ".join(f"{n} from {origin}" for origin, n in sorted(by_origin.items())) or "none"
        dims = Counter((f.is_phantom, f.dims) for f in self.files)
        reused = sum(f.reused for f in self.files)
        lines = [
            f"demo data in {self.out_dir}: {len(self.files)} items, {self.total_bytes / 1e6:.1f} MB "
            f"({reused} already there) in {self.seconds:.1f} s",
            f"  real: {len(self.real)} ({real}): {dims[(False, 2)]} 2D images, {dims[(False, 3)]} 3D volumes",
            f"  phantoms: {len(self.phantoms)}: {dims[(True, 2)]} 2D images, {dims[(True, 3)]} 3D volumes",
            f"  provenance: {self.readme}; labels: {self.labels_csv}",
        ]
        if self.missing_packages:
            lines.append(f"  not installed: {', '.join(self.missing_packages)} (more real images: {self.pip_command})")
        return lines


# --------------------------------------------------------------------------- locating real files


def _module_folder(module: str) -> Path | None:
    """The folder of an installed top-level package, found without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _distribution_version(distribution: str) -> str:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return "?"


def _check_dicom(path: Path, source: DemoSource) -> str | None:
    """Why this DICOM file is not usable as a demo image, or ``None``."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:
        return f"unreadable DICOM ({type(exc).__name__})"
    syntax = UID(str(ds.file_meta.get("TransferSyntaxUID", "") or ""))
    if not syntax or syntax.is_compressed:
        return f"compressed or unknown transfer syntax {syntax.name or syntax or '?'}"
    if str(ds.get("PhotometricInterpretation", "")).upper() not in _UNCOMPRESSED_PHOTOMETRIC:
        return f"not grey-scale ({ds.get('PhotometricInterpretation', '?')})"
    modality = str(ds.get("Modality", "") or "")
    if modality != source.modality:
        return f"modality {modality or '?'} where {source.modality} was expected"
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if (frames > 1) != (source.dims == 3):
        return f"{frames} frame(s) where a {source.dims}D image was expected"
    return None


def _check_nifti(path: Path, source: DemoSource) -> str | None:
    try:
        shape = nib.load(str(path)).shape
    except Exception as exc:
        return f"unreadable NIfTI ({type(exc).__name__})"
    want = 4 if source.extract == "first_volume" else 3
    if len(shape) != want:
        return f"{len(shape)}D NIfTI where {want}D was expected"
    return None


def locate_demo_sources(
    sources: Sequence[DemoSource] = DEMO_SOURCES,
) -> tuple[list[DemoSource], list[tuple[DemoSource, str]]]:
    """The sources found in the installed packages (with ``path`` set), and the others with why."""
    found: list[DemoSource] = []
    skipped: list[tuple[DemoSource, str]] = []
    series_seen: dict[str, str] = {}
    for source in sources:
        folder = _module_folder(source.module)
        if folder is None:
            skipped.append((source, f"package {source.distribution} is not installed"))
            continue
        path = folder / source.relative
        if not path.is_file():
            skipped.append(
                (
                    source,
                    f"{source.relative} is not in {source.distribution} {_distribution_version(source.distribution)}",
                )
            )
            continue
        is_nifti = path.name.endswith((".nii", ".nii.gz"))
        reason = _check_nifti(path, source) if is_nifti else _check_dicom(path, source)
        if reason is None and not is_nifti:
            # two single-frame files of one series would be assembled into one (broken) volume
            series = str(pydicom.dcmread(path, stop_before_pixels=True).get("SeriesInstanceUID", "") or "")
            if series and series in series_seen:
                reason = f"same DICOM series as {series_seen[series]}"
            series_seen.setdefault(series, source.dest)
        if reason is not None:
            skipped.append((source, reason))
            continue
        found.append(replace(source, path=path))
    return found, skipped


def find_demo_sources(sources: Sequence[DemoSource] = DEMO_SOURCES) -> list[DemoSource]:
    """The real demo images present in the installed packages, with their absolute ``path``."""
    return locate_demo_sources(sources)[0]


# --------------------------------------------------------------------------- atomic writes


def _tmp_name(dest: Path, keep_suffix: str = "") -> Path:
    """A hidden temporary name beside ``dest`` (the scanner skips hidden files)."""
    return dest.with_name(f".{dest.name}.{os.getpid()}.tmp{keep_suffix}")


_TMP_PATTERN = re.compile(r"^\..*\.(\d+)\.tmp(\.nii\.gz|\.[a-z]+)?$")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _remove_stale_temporaries(out_dir: Path) -> None:
    """Temporaries left by an interrupted run (whose process is gone)."""
    for folder in [out_dir, *(p for p in out_dir.iterdir() if p.is_dir() and not p.name.startswith("."))]:
        for entry in folder.iterdir():
            match = _TMP_PATTERN.match(entry.name)
            if match and not process_alive(int(match.group(1))):
                _remove(entry)


def _replace_folder(tmp: Path, dest: Path) -> None:
    """Move a finished folder into place (an old one is moved aside first, then deleted)."""
    old = None
    if dest.exists():
        old = _tmp_name(dest, ".old")
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old is not None:
        _remove(old)


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


# --------------------------------------------------------------------------- real files


def _copy_real(source: DemoSource, dest: Path) -> tuple[str, tuple[int, ...]]:
    """Copy (or extract) one real file atomically; returns (changes made, shape)."""
    assert source.path is not None
    dest.parent.mkdir(parents=True, exist_ok=True)
    if source.extract == "first_volume":
        image = nib.load(str(source.path))
        data = np.asanyarray(image.dataobj[..., 0])
        volume = nib.Nifti1Image(data, image.affine, image.header)
        tmp = _tmp_name(dest, ".nii.gz")
        nib.save(volume, str(tmp))
        os.replace(tmp, dest)
        return "first volume of the 4D series only", tuple(int(s) for s in data.shape)
    if source.path.name.endswith((".nii", ".nii.gz")):
        tmp = _tmp_name(dest)
        shutil.copyfile(source.path, tmp)
        os.replace(tmp, dest)
        return "", tuple(int(s) for s in nib.load(str(dest)).shape)
    ds = pydicom.dcmread(source.path, stop_before_pixels=True)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    shape = (int(ds.Rows), int(ds.Columns)) + ((frames,) if frames > 1 else ())
    tmp = _tmp_name(dest)
    shutil.copyfile(source.path, tmp)  # unchanged: the scanner pseudonymises (and copes with RG1's 0\0 spacing)
    os.replace(tmp, dest)
    return "", shape


def _check_path_is_neutral(path: Path, out_dir: Path) -> None:
    """The scanner refuses DICOM files whose path holds a patient identifier: never write one."""
    rel = path.relative_to(out_dir).as_posix()
    if read_header(path, "check", rel).path_has_identifier:
        raise RuntimeError(f"demo file name {rel} contains a patient identifier of the file")


# --------------------------------------------------------------------------- phantoms


class Phantom(NamedTuple):
    """A synthetic image and the mask of its lesion (all False when it has none)."""

    array: np.ndarray
    lesion: np.ndarray


def _smooth_noise(shape: tuple[int, ...], rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Gaussian white noise smoothed with ``sigma`` voxels, scaled to unit standard deviation."""
    image = sitk.GetImageFromArray(rng.standard_normal(shape).astype(np.float32))
    smooth = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(image, float(sigma)))
    return (smooth - smooth.mean()) / (smooth.std() + 1e-6)


def _ellipsoid(coords: Sequence[np.ndarray], center: Sequence[float], radii: Sequence[float]) -> np.ndarray:
    """Normalised distance to ``center`` (< 1 inside the ellipsoid/ellipse with semi-axes ``radii``)."""
    return np.sqrt(sum(((c - m) / r) ** 2 for c, m, r in zip(coords, center, radii, strict=True)))


def _lesion_in(
    organ_depth: np.ndarray, coords: Sequence[np.ndarray], radius: float, rng: np.random.Generator
) -> np.ndarray:
    """A sphere of ``radius`` mm centred on a random voxel well inside an organ.

    ``organ_depth`` is the organ's normalised distance map (< 1 inside); the centre is drawn
    among the voxels with a value below 0.6, so the lesion always lies (mostly) in the organ.
    """
    candidates = np.flatnonzero(organ_depth.ravel() < 0.6)
    if candidates.size == 0:
        candidates = np.array([int(np.argmin(organ_depth))])
    centre_index = int(rng.choice(candidates))
    centre = [float(c.ravel()[centre_index]) for c in coords]
    return (_ellipsoid(coords, centre, (radius,) * len(coords)) < 1) & (organ_depth < 1)


def ct_phantom(rng: np.random.Generator, lesion: bool, shape_zyx: tuple[int, int, int] = (48, 96, 96)) -> Phantom:
    """A CT-like torso (lower chest and upper abdomen) in HU, ``[z, y, x]``, 4 x 4 x 5 mm voxels, LPS.

    Air, subcutaneous and intra-abdominal fat, muscle, lungs, heart, aorta, liver, spleen,
    kidneys, stomach gas, ribs, sternum and vertebrae; with ``lesion`` a hypodense liver lesion
    or a solid lung nodule.
    """
    nz, ny, nx = shape_zyx
    z, y, x = np.meshgrid(
        (np.arange(nz) - (nz - 1) / 2) * 5.0,
        (np.arange(ny) - (ny - 1) / 2) * 4.0,
        (np.arange(nx) - (nx - 1) / 2) * 4.0,
        indexing="ij",
    )  # mm; +x patient left, +y posterior, +z superior
    s = rng.uniform(0.9, 1.08)

    def jitter(spread: float) -> float:
        return float(rng.uniform(-spread, spread))

    hu = np.full(shape_zyx, -1000.0)
    body_a, body_b = 165 * s * (1 + 0.04 * np.cos(z / 60)), 110 * s
    body = _ellipsoid((x, y), (0, 5), (body_a, body_b)) < 1
    inner = _ellipsoid((x, y), (0, 5), (body_a - 16 * s, body_b - 12 * s)) < 1
    hu[body] = -100 + jitter(10)  # subcutaneous fat
    hu[inner] = 45 + jitter(5)  # muscle / soft tissue
    diaphragm = 5 + 25 * np.cos(x / 70) + jitter(8)  # dome height (mm) per column
    abdomen = inner & (z < diaphragm) & (_ellipsoid((x, y), (0, 0), (body_a - 30 * s, body_b - 28 * s)) < 1)
    fat = _smooth_noise(shape_zyx, rng, 1.2) > 0.3  # bowel loops and mesenteric fat
    hu[abdomen & fat] = -90 + jitter(10)
    hu[abdomen & ~fat] = 30 + jitter(5)
    lung_depth = np.full(shape_zyx, np.inf)
    for side in (-1, 1):
        d = _ellipsoid((x, y, z), (side * 66 * s, 8, 70), (56 * s, 80 * s, 95))
        lung_depth = np.minimum(lung_depth, d)
    lungs = (lung_depth < 1) & inner & (z > diaphragm)
    lung_depth[~lungs] = np.inf
    hu[lungs] = -860 + jitter(30)
    vessels = _smooth_noise(shape_zyx, rng, 0.8) > 2.0
    hu[lungs & vessels] = -500  # vessels in the lungs
    heart = _ellipsoid((x, y, z), (18 + jitter(6), -28, 30), (55 * s, 48 * s, 45)) < 1
    hu[heart & (z > diaphragm - 10)] = 40 + jitter(5)
    liver_depth = _ellipsoid((x, y, z), (-55 * s, -5, -50), (88 * s, 72 * s, 60))
    liver = (liver_depth < 1) & inner & (z < diaphragm + 5)
    liver_depth[~liver] = np.inf
    hu[liver] = 60 + jitter(6)
    hu[(_ellipsoid((x, y, z), (80 * s, 40, -35), (30, 45, 40)) < 1) & inner] = 50  # spleen
    stomach = _ellipsoid((x, y, z), (55 * s, -30, -30), (38, 32, 30)) < 1
    hu[stomach] = 20
    hu[stomach & (y < -42)] = -900  # gas above the fluid level (supine: anterior)
    for side in (-1, 1):
        kidney = _ellipsoid((x, y, z), (side * 66 * s, 52, -95), (26, 22, 45))
        hu[kidney < 1] = 150 + jitter(20)  # enhancing cortex
        hu[kidney < 0.45] = 30  # sinus
    hu[_ellipsoid((x, y), (15, 30), (11, 11)) < 1] = 180 + jitter(20)  # aorta (contrast)
    hu[(_ellipsoid((x, y), (-22, 30), (11, 9)) < 1) & (z < diaphragm)] = 120  # inferior vena cava
    disc = np.mod(z + jitter(10), 30) >= 24
    vertebral_body = _ellipsoid((x, y), (0, 64), (19, 17)) < 1
    hu[vertebral_body] = np.where(disc[vertebral_body], 80, 300 + jitter(40))
    canal = _ellipsoid((x, y), (0, 88), (7, 7)) < 1
    arch = (_ellipsoid((x, y), (0, 90), (17, 15)) < 1) & ~canal & ~disc
    hu[arch] = 600
    hu[canal] = 10
    shell = (_ellipsoid((x, y), (0, 5), (body_a - 18 * s, body_b - 14 * s)) < 1) & ~(
        _ellipsoid((x, y), (0, 5), (body_a - 26 * s, body_b - 22 * s)) < 1
    )
    slope = 40 * (y - 5) / body_b  # ribs run down from the spine to the front
    ribs = shell & (np.mod(z - slope + jitter(12), 26) < 8) & (z > -70) & ~((np.abs(x) < 30) & (y < 0))
    hu[ribs] = 700 + jitter(60)
    hu[shell & (np.abs(x) < 14) & (y < 0) & (z > -20)] = 400  # sternum
    mask = np.zeros(shape_zyx, bool)
    if lesion:
        if rng.random() < 0.5:
            mask = _lesion_in(liver_depth, (x, y, z), rng.uniform(10, 18), rng)
            hu[mask] = 15 + jitter(8)
        else:
            mask = _lesion_in(lung_depth, (x, y, z), rng.uniform(7, 13), rng)
            hu[mask] = 35 + jitter(10)
    hu += 8 * _smooth_noise(shape_zyx, rng, 1.5) * body + rng.normal(0, 12, shape_zyx)
    return Phantom(np.clip(hu, -1024, 3071).astype(np.int16), mask)


def mr_phantom(rng: np.random.Generator, lesion: bool, shape_xyz: tuple[int, int, int] = (72, 88, 64)) -> Phantom:
    """A T1-weighted-like head, ``[x, y, z]`` in RAS with 2.5 mm voxels, int16 intensities.

    Scalp fat (bright), skull (dark), CSF, cortex, white matter with folded borders, deep grey
    nuclei and lateral ventricles, a smooth bias field and Rician noise; with ``lesion`` a
    white-matter lesion (hypo- or hyperintense).
    """
    x, y, z = np.meshgrid(*((np.arange(n) - (n - 1) / 2) * 2.5 for n in shape_xyz), indexing="ij")
    s = rng.uniform(0.9, 1.05)
    radii = np.array([70.0, 90.0, 68.0]) * s
    c = (rng.uniform(-4, 4), rng.uniform(-4, 4), rng.uniform(-8, -2))
    fold = _smooth_noise(shape_xyz, rng, 1.6)
    d = _ellipsoid((x, y, z), c, radii)
    intensity = np.zeros(shape_xyz)
    for scale, value in ((1.0, 0.75), (0.94, 0.06), (0.88, 0.18), (0.86, 0.5)):  # scalp, skull, CSF, cortex
        intensity[d < scale + 0.012 * fold] = value
    sulci = (d < 0.86) & (d > 0.7) & (np.abs(fold) < 0.12)
    intensity[sulci] = 0.2  # CSF in the sulci
    white = d < 0.7 + 0.07 * fold
    intensity[white] = 0.82 + rng.uniform(-0.03, 0.03)
    for side in (-1, 1):
        intensity[_ellipsoid((x, y, z), (c[0] + side * 20, c[1] + 8, c[2] + 2), (9, 14, 10)) < 1] = 0.6  # nuclei
        ventricle = _ellipsoid((x, y, z), (c[0] + side * 9, c[1] + 4, c[2] + 14), (6, 28 * s, 9))
        intensity[ventricle < 1] = 0.16
    mask = np.zeros(shape_xyz, bool)
    if lesion:
        wm_depth = np.where(white & (intensity > 0.7), d / 0.7, np.inf)
        mask = _lesion_in(wm_depth, (x, y, z), rng.uniform(5, 10), rng) & white
        intensity[mask] = 0.3 if rng.random() < 0.5 else 1.0
    signal = intensity * (1 + 0.12 * _smooth_noise(shape_xyz, rng, 12.0))  # bias field
    sigma = 0.02
    noisy = np.sqrt((signal + rng.normal(0, sigma, shape_xyz)) ** 2 + rng.normal(0, sigma, shape_xyz) ** 2)
    return Phantom(np.round(noisy * 1000).astype(np.int16), mask)


def xray_phantom(rng: np.random.Generator, lesion: bool, shape: tuple[int, int] = (256, 256)) -> Phantom:
    """A chest-radiograph-like image ``[rows, columns]`` in ``[0, 1]`` (bright = attenuating).

    Body, lungs, heart and mediastinum, spine, ribs, clavicles and diaphragm domes as projected
    thicknesses; with ``lesion`` a round nodule in one lung.
    """
    rows, cols = shape
    v, u = np.meshgrid(np.linspace(-1, 1, rows), np.linspace(-1, 1, cols), indexing="ij")  # v down, u right
    s = rng.uniform(0.92, 1.05)

    def thickness(center: tuple[float, float], radii: tuple[float, float]) -> np.ndarray:
        d = _ellipsoid((u, v), center, radii)
        return np.sqrt(np.clip(1 - d**2, 0, None))

    att = 1.0 * thickness((0, 0.2), (0.9 * s, 1.3))
    lung_centres = []
    lungs = np.zeros(shape)
    for side in (-1, 1):
        centre = (side * 0.36 * s, -0.1 + rng.uniform(-0.03, 0.03))
        lung_centres.append(centre)
        lungs = np.maximum(lungs, thickness(centre, (0.26 * s, 0.56 + rng.uniform(-0.04, 0.04))))
    att -= 0.8 * lungs
    att += 0.5 * thickness((0.09 + rng.uniform(-0.03, 0.03), 0.24), (0.27 * s, 0.23))  # heart
    att += 0.25 * thickness((0, -0.15), (0.11, 0.7))  # mediastinum
    spine = np.clip(1 - np.abs(u) / 0.07, 0, 1) * (0.75 + 0.25 * np.cos(v * 38))
    att += 0.35 * spine * (v > -0.9)
    chest = thickness((0, -0.08), (0.78 * s, 0.78)) > 0
    for k in range(10):
        arc = -0.7 + 0.12 * k - 0.3 * np.abs(u) + 0.75 * u**2  # posterior ribs: up from the spine, then down
        att += 0.2 * (np.abs(v - arc) < 0.02 + 0.005 * k / 10) * chest * (np.abs(u) > 0.06)
    for side in (-1, 1):
        clavicle = np.abs(v - (-0.72 + 0.2 * side * u)) < 0.025
        att += 0.3 * clavicle * (side * u > 0.05) * (side * u < 0.6)
    att += 0.4 * thickness((0, 1.0), (0.92 * s, 0.5)) * (v > 0.45)  # abdomen below the domes
    mask = np.zeros(shape, bool)
    if lesion:
        centre = lung_centres[int(rng.integers(2))]
        centre = (centre[0] + rng.uniform(-0.1, 0.1), centre[1] + rng.uniform(-0.25, 0.25))
        radius = rng.uniform(0.035, 0.07)
        nodule = thickness(centre, (radius, radius))
        att += 0.35 * nodule
        mask = nodule > 0
    image = (1 - np.exp(-1.6 * np.clip(att, 0, None))).astype(np.float32)
    image = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(sitk.GetImageFromArray(image), 1.0))
    image = image + rng.normal(0, 0.012, shape) + 0.02 * _smooth_noise(shape, rng, 8.0)
    return Phantom(np.clip(image, 0, 1), mask)


def _ds(value: float) -> str:
    text = f"{float(value):.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _write_ct_series(folder: Path, hu_zyx: np.ndarray, patient_id: str, uid_seed: list[str]) -> None:
    """An axial single-frame CT series through SimpleITK/GDCM, 4 x 4 x 5 mm, centred at the origin."""
    nz, ny, nx = hu_zyx.shape
    spacing = (4.0, 4.0, 5.0)
    origin = tuple(-(n - 1) / 2 * sp for n, sp in zip((nx, ny, nz), spacing, strict=True))
    image = sitk.GetImageFromArray(hu_zyx)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    tags = {
        "0008|0060": "CT",
        "0008|0016": _CT_IMAGE_STORAGE,
        "0008|0020": "20000101",  # fixed dates: GDCM would stamp today, and the files would differ per run
        "0008|0030": "000000",
        "0008|0021": "20000101",
        "0008|0031": "000000",
        "0008|0008": "DERIVED\\SECONDARY\\AXIAL",
        "0008|0070": "medssl",
        "0008|103e": "medssl synthetic CT phantom",
        "0010|0010": "",
        "0010|0020": patient_id,
        "0020|000d": generate_uid(entropy_srcs=[*uid_seed, "study"]),
        "0020|000e": generate_uid(entropy_srcs=[*uid_seed, "series"]),
        "0020|0011": "1",
        "0020|0037": "1\\0\\0\\0\\1\\0",
        "0028|0030": f"{_ds(spacing[1])}\\{_ds(spacing[0])}",
        "0018|0050": _ds(spacing[2]),
        "0028|1050": "40",
        "0028|1051": "400",
    }
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(nz):
        image_slice = image[:, :, k]
        for tag, value in tags.items():
            image_slice.SetMetaData(tag, value)
        position = (origin[0], origin[1], origin[2] + k * spacing[2])
        image_slice.SetMetaData("0020|0032", "\\".join(_ds(p) for p in position))
        image_slice.SetMetaData("0020|0013", str(k + 1))
        image_slice.SetMetaData("0008|0018", generate_uid(entropy_srcs=[*uid_seed, "slice", str(k)]))
        writer.SetFileName(str(folder / f"IM{k + 1:04d}.dcm"))
        writer.Execute(image_slice)


def _write_cr(path: Path, image: np.ndarray, patient_id: str, uid_seed: list[str]) -> None:
    """A single-frame 12-bit MONOCHROME2 CR image through pydicom."""
    pixels = np.round(image * 4095).astype(np.uint16)
    sop_uid = generate_uid(entropy_srcs=[*uid_seed, "sop"])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = _CR_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = _CR_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[*uid_seed, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[*uid_seed, "series"])
    ds.Modality = "CR"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.Manufacturer = "medssl"
    ds.SeriesDescription = "medssl synthetic chest radiograph phantom"
    ds.PatientName = ""
    ds.PatientID = patient_id
    ds.BodyPartExamined = "CHEST"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Rows, ds.Columns = (int(n) for n in pixels.shape)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.ImagerPixelSpacing = [1.6, 1.6]
    ds.WindowCenter = "2048"
    ds.WindowWidth = "4096"
    ds.PixelData = pixels.tobytes()
    pydicom.dcmwrite(path, ds, enforce_file_format=True)


@dataclass(frozen=True)
class _PhantomPlan:
    kind: str  # "ct", "mr" or "xray"
    index: int
    lesion: bool
    path: str  # relative to out_dir
    fmt: str  # "dicom_series", "nifti", "dicom" or "png"

    @property
    def spec(self) -> dict[str, Any]:
        return {"generator": GENERATOR_VERSION, "kind": self.kind, "index": self.index, "lesion": self.lesion}


def _plan_phantoms(n_phantoms: int) -> list[_PhantomPlan]:
    """``n_phantoms`` of each kind; numbers 02, 04, ... carry a lesion; X-rays come as DICOM/PNG pairs."""
    plans = []
    for i in range(1, n_phantoms + 1):
        lesion = i % 2 == 0
        plans.append(_PhantomPlan("ct", i, lesion, f"{PHANTOM_FOLDER}/ct_volume_{i:02d}", "dicom_series"))
        plans.append(_PhantomPlan("mr", i, lesion, f"{PHANTOM_FOLDER}/mr_volume_{i:02d}.nii.gz", "nifti"))
        fmt = "dicom" if ((i - 1) // 2) % 2 == 0 else "png"
        plans.append(
            _PhantomPlan("xray", i, lesion, f"{PHANTOM_FOLDER}/xray_{i:02d}.{'dcm' if fmt == 'dicom' else 'png'}", fmt)
        )
    return plans


_PHANTOM_INFO = {  # kind -> (modality, dims, description)
    "ct": ("CT", 3, "synthetic CT torso phantom (HU), DICOM series, 4 x 4 x 5 mm"),
    "mr": ("MR", 3, "synthetic T1-like head phantom, NIfTI, 2.5 mm"),
    "xray": ("DX", 2, "synthetic chest radiograph phantom, 1.6 mm pixels"),
}


def _write_phantom(plan: _PhantomPlan, out_dir: Path, seed: int) -> tuple[int, ...]:
    kinds = {"ct": 1, "mr": 2, "xray": 3}
    rng = np.random.default_rng([seed, kinds[plan.kind], plan.index, int(plan.lesion)])
    dest = out_dir / plan.path
    dest.parent.mkdir(parents=True, exist_ok=True)
    patient_id = f"SYNTH-{plan.kind.upper()}-{seed}-{plan.index:02d}"
    uid_seed = ["medssl-demo", str(GENERATOR_VERSION), str(seed), plan.kind, str(plan.index)]
    if plan.kind == "ct":
        volume = ct_phantom(rng, plan.lesion).array
        tmp = _tmp_name(dest)
        _remove(tmp)
        tmp.mkdir()
        _write_ct_series(tmp, volume, patient_id, uid_seed)
        _replace_folder(tmp, dest)
        nz, ny, nx = volume.shape
        return (nx, ny, nz)
    if plan.kind == "mr":
        volume = mr_phantom(rng, plan.lesion).array
        affine = np.diag([2.5, 2.5, 2.5, 1.0])
        affine[:3, 3] = [-(n - 1) / 2 * 2.5 for n in volume.shape]
        image = nib.Nifti1Image(volume, affine)
        image.header["descrip"] = b"medssl synthetic T1-like head phantom"
        image.header.set_xyzt_units("mm")
        tmp = _tmp_name(dest, ".nii.gz")
        nib.save(image, str(tmp))
        os.replace(tmp, dest)
        return tuple(int(s) for s in volume.shape)
    picture = xray_phantom(rng, plan.lesion).array
    tmp = _tmp_name(dest)
    if plan.fmt == "dicom":
        _write_cr(tmp, picture, patient_id, uid_seed)
    else:
        Image.fromarray(np.round(picture * 255).astype(np.uint8)).save(tmp, format="PNG")
    os.replace(tmp, dest)
    return tuple(int(s) for s in picture.shape)


# --------------------------------------------------------------------------- assembly


def _load_state(out_dir: Path) -> dict[str, Any]:
    try:
        state = json.loads((out_dir / STATE_NAME).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return state.get("entries", {}) if isinstance(state, dict) else {}


def _source_spec(source: DemoSource) -> dict[str, Any]:
    assert source.path is not None
    stat = source.path.stat()
    return {"source": str(source.path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "extract": source.extract}


def assemble_demo_data(
    out_dir: Path,
    n_phantoms: int = 4,
    seed: int = 0,
    sources: Sequence[DemoSource] = DEMO_SOURCES,
) -> DemoDataReport:
    """Fill ``out_dir`` with the real demo images found in installed packages and with phantoms.

    ``n_phantoms`` of each kind are written (CT volume, MR volume, chest X-ray image); every
    second one has a lesion (``group`` target, the others background). Re-running is cheap: what
    is already there from the same source or the same phantom settings is kept, what is no
    longer wanted (fewer phantoms, a package removed) is deleted. Every file and series folder is
    written under a hidden temporary name and renamed, so an interrupted run leaves no partial item.
    """
    at_least(0, n_phantoms=n_phantoms)
    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(out_dir)
    previous = _load_state(out_dir)
    entries: dict[str, Any] = {}
    files: list[DemoFile] = []
    found, skipped = locate_demo_sources(sources)

    for source in found:
        dest = out_dir / source.dest
        spec = _source_spec(source)
        old = previous.get(source.dest)
        reused = bool(old and old.get("spec") == spec and dest.is_file())
        if reused:
            changes, shape = old["changes"], tuple(old["shape"])
        else:
            changes, shape = _copy_real(source, dest)
        if dest.suffix == ".dcm":
            _check_path_is_neutral(dest, out_dir)
        entries[source.dest] = {"spec": spec, "changes": changes, "shape": list(shape)}
        version_text = _distribution_version(source.distribution)
        files.append(
            DemoFile(
                path=source.dest,
                origin=source.distribution,
                modality=source.modality,
                dims=source.dims,
                shape=shape,
                description=source.description,
                provenance=f"{source.provenance} [{source.distribution} {version_text}]",
                source=f"{source.module}/{source.relative}",
                changes=changes,
                bytes=_size(dest),
                reused=reused,
            )
        )

    for plan in _plan_phantoms(n_phantoms):
        dest = out_dir / plan.path
        old = previous.get(plan.path)
        spec = {**plan.spec, "seed": seed}
        reused = bool(old and old.get("spec") == spec and dest.exists())
        shape = tuple(old["shape"]) if reused else _write_phantom(plan, out_dir, seed)
        if plan.fmt == "dicom":
            _check_path_is_neutral(dest, out_dir)
        elif plan.fmt == "dicom_series":
            _check_path_is_neutral(next(iter(sorted(dest.iterdir()))), out_dir)
        entries[plan.path] = {"spec": spec, "shape": list(shape)}
        modality, dims, description = _PHANTOM_INFO[plan.kind]
        if plan.kind == "xray":
            modality = "CR" if plan.fmt == "dicom" else "DX"
        files.append(
            DemoFile(
                path=plan.path,
                origin="phantom",
                modality=modality,
                dims=dims,
                shape=shape,
                description=description + (", with a lesion" if plan.lesion else ""),
                provenance=f"generated by medssl (generator v{GENERATOR_VERSION}, seed {seed}); public domain",
                group=TARGET if plan.lesion else BACKGROUND,
                label="lesion" if plan.lesion else "no_lesion",
                bytes=_size(dest),
                reused=reused,
            )
        )

    for rel in set(previous) - set(entries):  # written by an earlier run, no longer wanted
        target = (out_dir / rel).resolve()
        if target.is_relative_to(out_dir.resolve()) and target != out_dir.resolve():
            _remove(target)

    labels_csv = out_dir / LABELS_NAME
    readme = out_dir / README_NAME
    _write_if_changed(labels_csv, _labels_text(files))
    skipped_text = [(f"{s.distribution}: {s.relative}", reason) for s, reason in skipped]
    _write_if_changed(readme, _readme_text(files, skipped_text, seed, n_phantoms))
    _write_if_changed(out_dir / STATE_NAME, json.dumps({"version": 1, "entries": entries}, indent=1, sort_keys=True))
    missing = sorted(
        {s.distribution for s, _ in skipped if _module_folder(s.module) is None},
    )
    return DemoDataReport(
        out_dir=out_dir,
        files=files,
        skipped=skipped_text,
        missing_packages=missing,
        labels_csv=labels_csv,
        readme=readme,
        seconds=time.perf_counter() - start,
    )


def _write_if_changed(path: Path, text: str) -> None:
    try:
        if path.read_text(encoding="utf-8") == text:
            return
    except OSError:
        pass
    atomic_write_text(path, text)


def _labels_text(files: Sequence[DemoFile]) -> str:
    """``labels.csv``: the modality of files that do not record one, and the phantoms' group/label."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(LABELS_COLUMNS)
    for f in files:
        records_modality = f.path.endswith((".nii", ".nii.gz", ".png"))
        modality = f.modality if records_modality else ""
        if modality or f.group or f.label:
            writer.writerow((f.path, modality, f.group, f.label))
    return buffer.getvalue()


def _readme_text(files: Sequence[DemoFile], skipped: Sequence[tuple[str, str]], seed: int, n_phantoms: int) -> str:
    lines = [
        "medssl demo data",
        "================",
        "",
        "Assembled by `medssl.demo.data.assemble_demo_data` from files that ship inside installed",
        "Python packages (nothing was downloaded) and from synthetic phantoms (phantoms/,",
        f"{n_phantoms} of each kind, seed {seed}). The real images are public test and template data;",
        "their DICOM headers are kept as published (the medssl scanner pseudonymises identifiers).",
        "",
        f"{LABELS_NAME} (for `medssl manifest scan DIR --labels {LABELS_NAME}`), one row per item that needs it:",
        "  path      relative to this folder (a folder for a DICOM series)",
        "  modality  for files that do not record one (NIfTI: MR, PNG: DX); empty for DICOM",
        f"  group     phantoms only: {BACKGROUND} (no lesion) or {TARGET} (with a lesion), for SepCLR",
        "  label     phantoms only: no_lesion or lesion",
        "",
        "Files",
        "-----",
    ]
    for f in files:
        shape = " x ".join(str(s) for s in f.shape)
        lines.append(f"{f.path}")
        lines.append(f"  {f.modality}, {f.dims}D, {shape}: {f.description}")
        if f.source:
            lines.append(f"  from: {f.source}")
        if f.changes:
            lines.append(f"  changed: {f.changes}")
        if f.group:
            lines.append(f"  group: {f.group}, label: {f.label}")
        lines.append(f"  provenance: {f.provenance}")
    if skipped:
        lines += ["", "Not included", "------------"]
        lines += [f"{source}: {reason}" for source, reason in skipped]
    return "\n".join(lines) + "\n"


def scan_demo_data(data_dir: Path, options: ScanOptions) -> tuple[ScanResult, list[str]]:
    """Scan an assembled demo folder (leaving out README/labels) and join its ``labels.csv``.

    Returns the scan result with the labelled rows, and the join's warnings.
    """
    data_dir = Path(data_dir)
    options = replace(options, exclude=(*options.exclude, *DEMO_SCAN_EXCLUDE))
    result = scan_folder(data_dir, options)
    warnings: list[str] = []
    labels = data_dir / LABELS_NAME
    if labels.is_file():
        rows, warnings = join_labels(result.rows, labels, data_dir, options.salt)
        result = replace(result, rows=rows)
    return result, warnings


__all__ = [
    "DEMO_REQUIREMENTS",
    "DEMO_SCAN_EXCLUDE",
    "DEMO_SOURCES",
    "DemoDataReport",
    "DemoFile",
    "DemoSource",
    "Phantom",
    "assemble_demo_data",
    "ct_phantom",
    "find_demo_sources",
    "locate_demo_sources",
    "mr_phantom",
    "scan_demo_data",
    "xray_phantom",
]
