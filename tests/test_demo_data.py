"""Demo data: real images from installed packages plus phantoms, scanned, cached and sampled."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from sklearn.metrics import roc_auc_score

from medssl.data.cache import build_cache
from medssl.data.datasets import MultiCropSliceDataset, StackConfig, TwoViewStackDataset, cached_items
from medssl.data.manifest import read_manifest, write_manifest
from medssl.data.preprocess import PreprocessConfig
from medssl.data.samplers import BalancedGroupBatchSampler
from medssl.data.scan import ScanOptions, scan_folder
from medssl.data.views import MultiCropConfig
from medssl.demo import data as demo_data
from medssl.demo import evaluation
from medssl.demo.data import (
    DEMO_REQUIREMENTS,
    LABELS_NAME,
    README_NAME,
    assemble_demo_data,
    ct_phantom,
    find_demo_sources,
    locate_demo_sources,
    mr_phantom,
    scan_demo_data,
    xray_phantom,
)
from medssl.demo.evaluation import (
    DEFAULT_SPEC,
    LESION,
    NO_LESION,
    Interval,
    PhantomSetSpec,
    compare_encoders,
    paired_bootstrap_auroc,
    phantom_images,
    split_by_subject,
    verdict,
)

N_PHANTOMS = 2  # of each kind: 2 CT volumes, 2 MR volumes, 2 X-ray images
HAS_NILEARN = importlib.util.find_spec("nilearn") is not None
HAS_PYDICOM_DATA = importlib.util.find_spec("data_store") is not None
needs_nilearn = pytest.mark.skipif(not HAS_NILEARN, reason="nilearn not installed (pip install 'medssl[demo]')")
needs_pydicom_data = pytest.mark.skipif(
    not HAS_PYDICOM_DATA, reason="pydicom-data not installed (pip install 'medssl[demo]')"
)
SMALL = PreprocessConfig(spacing=[4.0, 4.0, 4.0], max_side_2d=128)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One assembled, scanned and cached demo folder shared by the tests of this module."""
    base = tmp_path_factory.mktemp("demo")
    out = base / "data"
    report = assemble_demo_data(out, n_phantoms=N_PHANTOMS, seed=0)
    result, warnings = scan_demo_data(out, ScanOptions(salt="test", progress=False))
    write_manifest(base / "demo.csv", result.rows, out)
    manifest = read_manifest(base / "demo.csv")
    cache = build_cache(manifest, base / "cache", SMALL, workers=1, progress=False)
    return {
        "out": out,
        "base": base,
        "report": report,
        "result": result,
        "warnings": warnings,
        "manifest": manifest,
        "cache": cache,
    }


def is_phantom(path: str) -> bool:
    return path.startswith("phantoms/")


def test_the_scanner_accepts_every_file_we_wrote(demo):
    plain = scan_folder(demo["out"], ScanOptions(salt="test", progress=False))
    # only our two text files are not images; everything copied or generated is accepted
    assert sorted(path for path, _ in plain.errors) == sorted([LABELS_NAME, README_NAME])
    assert demo["result"].errors == []
    assert demo["warnings"] == []
    rows = demo["result"].rows
    report = demo["report"]
    assert len(rows) == len(report.files)
    assert {r.path for r in rows} == {f.path for f in report.files}
    assert {r.dims for r in rows} == {2, 3}
    assert sum(r.dims == 2 for r in rows) >= 6 and sum(r.dims == 3 for r in rows) >= 6
    # pydicom and nibabel are core dependencies: their real images are always there
    real = [r for r in rows if not is_phantom(r.path)]
    assert any(r.dims == 2 for r in real), "a real 2D image (pydicom's CT/MR slices)"
    assert any(r.dims == 3 for r in real), "a real 3D volume (nibabel's brain MRI)"
    series = [r for r in rows if r.format == "dicom_series"]
    assert len(series) == N_PHANTOMS and all(r.shape == (96, 96, 48) for r in series)


@needs_nilearn
@needs_pydicom_data
def test_real_images_from_the_demo_packages(demo):
    rows = {r.path: r for r in demo["result"].rows}
    assert rows["nilearn/mni152_t1.nii.gz"].shape == (197, 233, 189)
    assert rows["nilearn/mni152_t1.nii.gz"].modality == "MR"  # from labels.csv
    assert rows["pydicom-data/cr_chest.dcm"].modality == "CR"
    assert rows["pydicom-data/mr_head_multiframe.dcm"].dims == 3
    origins = {f.origin for f in demo["report"].real}
    assert origins == {"nilearn", "pydicom-data", "pydicom", "nibabel"}
    assert demo["report"].missing_packages == []
    assert demo["report"].pip_command is None
    # RG1 says PixelSpacing 0\0, copied unchanged: the scanner treats it as absent (1 mm)
    assert rows["pydicom-data/cr_chest.dcm"].spacing == (1.0, 1.0)
    original = pydicom.dcmread(find_source("cr_chest.dcm"))
    copied = pydicom.dcmread(demo["out"] / "pydicom-data/cr_chest.dcm")
    assert copied == original


def find_source(name: str) -> Path:
    return next(s.path for s in find_demo_sources() if s.name == name)


def test_labels_give_phantoms_a_group_and_nifti_png_a_modality(demo):
    rows = demo["result"].rows
    phantoms = [r for r in rows if is_phantom(r.path)]
    assert len(phantoms) == 3 * N_PHANTOMS
    assert {r.group for r in phantoms} == {"background", "target"}
    assert all((r.group == "target") == (r.label == "lesion") for r in phantoms)
    assert all(r.group == "" for r in rows if not is_phantom(r.path))
    assert all(r.modality == "MR" for r in rows if r.format == "nifti")
    assert all(r.modality == "DX" for r in rows if r.format == "image")
    assert {r.modality for r in phantoms if r.format == "dicom_series"} == {"CT"}


def test_cache_and_datasets_have_items(demo):
    cache = demo["cache"]
    assert cache.errors == []
    assert cache.built == len(demo["manifest"].rows)
    items = cached_items(demo["manifest"], demo["base"] / "cache", SMALL)
    assert len(items) == len(demo["manifest"].rows)
    slices = MultiCropSliceDataset(items, views=MultiCropConfig(global_size=32, local_size=16, n_local=2))
    assert len(slices) > len(items)
    views = slices.sample_views(len(slices) - 1)
    assert [tuple(v.shape) for v in views] == [(1, 32, 32)] * 2 + [(1, 16, 16)] * 2
    stacks = TwoViewStackDataset(items, StackConfig(n_slices=4, size=32))
    assert len(stacks) == sum(r.dims == 3 for r in demo["manifest"].rows)
    assert [tuple(v.shape) for v in stacks.sample_views(0)] == [(4, 1, 32, 32)] * 2
    # SepCLR can draw balanced batches from the phantoms' groups
    sampler = BalancedGroupBatchSampler(slices.groups, batch_size=4, background="background", target="target")
    batch = next(iter(sampler))
    assert sorted(slices.groups[i] for i in batch) == ["background"] * 2 + ["target"] * 2


def test_no_patient_identifier_of_a_copied_dicom_reaches_the_manifest(demo):
    text = (demo["base"] / "demo.csv").read_text(encoding="utf-8").lower()
    dicoms = [p for p in demo["out"].rglob("*.dcm")]
    assert dicoms
    values = set()
    for path in dicoms:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for keyword in ("PatientID", "PatientName", "OtherPatientIDs", "AccessionNumber"):
            value = str(ds.get(keyword, "") or "")
            values.add(value)
            values.update(part for part in value.replace("^", " ").split() if len(part) >= 4)
    values = {v for v in values if len(v) >= 3}
    assert values, "the copied test files do carry identifiers (that the scanner must not copy)"
    leaked = sorted(v for v in values if v.lower() in text)
    assert leaked == []
    leaked_in_paths = sorted(
        v for v in values for p in dicoms if v.lower() in p.relative_to(demo["out"]).as_posix().lower()
    )
    assert leaked_in_paths == []


def test_reassembling_is_idempotent_and_follows_the_phantom_count(tmp_path):
    out = tmp_path / "data"
    first = assemble_demo_data(out, n_phantoms=2, seed=1)
    listing = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = assemble_demo_data(out, n_phantoms=2, seed=1)
    assert all(f.reused for f in again.files)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == listing
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == mtimes
    assert again.total_bytes == first.total_bytes
    assert not [p for p in out.rglob("*.tmp*")]
    # fewer phantoms: the extra ones go; a stale temporary of a dead process goes too
    stale = out / "phantoms" / ".xray_09.png.999999.tmp"
    stale.write_bytes(b"partial")
    fewer = assemble_demo_data(out, n_phantoms=1, seed=1)
    assert not stale.exists()
    assert len(fewer.phantoms) == 3
    assert sorted(p.name for p in (out / "phantoms").iterdir()) == [
        "ct_volume_01",
        "mr_volume_01.nii.gz",
        "xray_01.dcm",
    ]
    assert [f.reused for f in fewer.phantoms] == [True, True, True]
    # another seed rewrites the phantoms (same names), not the real files
    other = assemble_demo_data(out, n_phantoms=1, seed=2)
    assert not any(f.reused for f in other.phantoms) and all(f.reused for f in other.real)


def test_without_the_demo_packages_it_uses_core_packages_and_says_what_to_install(tmp_path, monkeypatch):
    real_folder = demo_data._module_folder
    monkeypatch.setattr(
        demo_data, "_module_folder", lambda module: None if module in ("nilearn", "data_store") else real_folder(module)
    )
    found, skipped = locate_demo_sources()
    assert {s.distribution for s in found} <= {"pydicom", "nibabel"}
    assert {s.distribution for s, _ in skipped} >= {"nilearn", "pydicom-data"}
    report = assemble_demo_data(tmp_path / "data", n_phantoms=2)
    assert report.missing_packages == ["nilearn", "pydicom-data"]
    assert report.pip_command == "pip install " + " ".join(f"'{r}'" for r in DEMO_REQUIREMENTS)
    assert any("not installed" in line for line in report.summary_lines())
    assert {f.origin for f in report.real} <= {"pydicom", "nibabel"}
    # pydicom's CT and MR slices, nibabel's two brain MRI volumes, and the phantoms
    assert sum(f.dims == 2 and not f.is_phantom for f in report.files) >= 2
    assert sum(f.dims == 3 and not f.is_phantom for f in report.files) >= 2
    readme = (tmp_path / "data" / README_NAME).read_text(encoding="utf-8")
    assert "package nilearn is not installed" in readme
    result, _ = scan_demo_data(tmp_path / "data", ScanOptions(salt="t", progress=False))
    assert result.errors == []
    assert {r.dims for r in result.rows} == {2, 3}


@pytest.mark.parametrize("make", [ct_phantom, mr_phantom, xray_phantom])
def test_phantoms_have_a_lesion_exactly_when_asked(make):
    for seed in range(2):
        with_lesion = make(np.random.default_rng(seed), True)
        without = make(np.random.default_rng(seed), False)
        assert with_lesion.lesion.sum() >= 10
        assert not without.lesion.any()
        assert np.isfinite(with_lesion.array).all() and with_lesion.array.std() > 0


def test_ct_phantom_has_plausible_hounsfield_units():
    phantom = ct_phantom(np.random.default_rng(0), lesion=False)
    hu = phantom.array.astype(float)
    assert hu.min() >= -1024 and hu.max() <= 3071
    assert np.median(hu[0]) < -900  # air around the body
    assert (hu < -700).mean() > 0.3 and (hu > 300).mean() > 0.001  # air/lungs and bone


def test_readme_lists_every_file_with_its_provenance(demo):
    readme = (demo["out"] / README_NAME).read_text(encoding="utf-8")
    for f in demo["report"].files:
        assert f.path in readme
    assert "provenance:" in readme and "labels.csv" in readme
    # the bookkeeping file is hidden: the scanner skips it
    assert (demo["out"] / ".medssl_demo.json").is_file() and demo["result"].hidden_skipped == 1


def test_phantoms_are_byte_identical_for_one_seed(tmp_path):
    def digests(root: Path) -> dict[str, str]:
        return {
            p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))
            if p.is_file() and p.suffix != ".json"
        }

    first = assemble_demo_data(tmp_path / "a", n_phantoms=2, seed=3, sources=())
    assemble_demo_data(tmp_path / "b", n_phantoms=2, seed=3, sources=())
    assert first.real == [] and len(first.phantoms) == 6
    assert digests(tmp_path / "a") == digests(tmp_path / "b")
    assemble_demo_data(tmp_path / "c", n_phantoms=2, seed=4, sources=())
    assert digests(tmp_path / "a") != digests(tmp_path / "c")


# --------------------------------------------------------------------------- the closing comparison's labelled set

SMALL_SET = PhantomSetSpec(n=24)


@pytest.fixture(scope="module")
def phantoms():
    return phantom_images(SMALL_SET, size=32)


def test_the_default_labelled_set_has_a_few_hundred_phantoms_apart_from_pretraining():
    assert DEFAULT_SPEC.n >= 300 and DEFAULT_SPEC.n % 2 == 0  # half with a nodule
    assert DEFAULT_SPEC.seed != 0  # the demo folder's phantoms (seed 0) are pretraining data


def test_labelled_phantoms_have_the_intended_size_labels_and_range(phantoms):
    assert len(phantoms) == 24 and phantoms.images.shape == (24, 1, 32, 32) and phantoms.images.dtype == np.float32
    assert (phantoms.labels == LESION).sum() == (phantoms.labels == NO_LESION).sum() == 12
    assert phantoms.images.min() >= 0 and phantoms.images.max() <= 1 and phantoms.images.std() > 0.05
    assert phantoms.describe() == "24 generated chest-radiograph phantoms (lesion 12, no_lesion 12)"
    assert len(set(phantoms.subjects.tolist())) == 24  # one image per phantom
    assert phantom_images(PhantomSetSpec(n=7), size=8).labels.tolist().count(LESION) == 4  # rounded up to even


def test_labelled_phantoms_split_is_subject_disjoint_and_stratified(phantoms):
    train, test = set(phantoms.subjects[~phantoms.test].tolist()), set(phantoms.subjects[phantoms.test].tolist())
    assert train and test and not train & test
    for side in (~phantoms.test, phantoms.test):
        assert (phantoms.labels[side] == LESION).sum() == (phantoms.labels[side] == NO_LESION).sum() == 6


def test_labelled_phantoms_are_deterministic_and_not_the_pretraining_phantoms(phantoms):
    again = phantom_images(SMALL_SET, size=32)
    assert np.array_equal(again.images, phantoms.images) and np.array_equal(again.test, phantoms.test)
    assert not np.allclose(phantom_images(PhantomSetSpec(n=24, seed=2), size=32).images, phantoms.images)
    # the demo folder's X-ray phantoms (pretraining data: _write_phantom's generator streams, seed 0) are not among them
    config = PreprocessConfig()
    for index in range(1, 5):
        lesion = index % 2 == 0
        seen = xray_phantom(np.random.default_rng([0, 3, index, int(lesion)]), lesion).array
        image = evaluation._resized(evaluation.normalise_intensity(seen, "DX", config)[0], 32)
        assert np.abs(phantoms.images - image).mean(axis=(1, 2, 3)).min() > 0.005


def test_split_by_subject_keeps_subjects_whole_and_stratifies():
    subjects = np.array(["a", "a", "b", "c", "c", "d", "e", "f"])
    labels = np.array(["x", "x", "x", "x", "x", "y", "y", "y"])
    test = split_by_subject(subjects, labels, 0.5, seed=0)
    for s in set(subjects.tolist()):
        assert len(set(test[subjects == s].tolist())) == 1
    assert set(labels[test].tolist()) == set(labels[~test].tolist()) == {"x", "y"}
    assert np.array_equal(test, split_by_subject(subjects, labels, 0.5, seed=0))


def test_paired_bootstrap_intervals_bracket_the_estimates():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 60)
    good = labels + rng.normal(0, 0.8, 120)  # AUROC about 0.8
    noise = rng.normal(0, 1, 120)  # about 0.5
    clusters = np.repeat(np.arange(40), 3)  # 3 items per subject, one label each
    result = paired_bootstrap_auroc(labels, good, noise, clusters, resamples=500, seed=0)
    for interval in (result.a, result.b, result.difference):
        assert interval.low <= interval.estimate <= interval.high
    assert result.a.estimate == pytest.approx(roc_auc_score(labels, good))
    assert result.difference.estimate == pytest.approx(result.a.estimate - result.b.estimate)
    assert result.a.low > 0.6 and result.b.low < 0.5 < result.b.high and result.difference.low > 0
    assert result.resamples == 500 and result.differences.shape == (500,)
    same = paired_bootstrap_auroc(labels, good, good, clusters, resamples=200)  # paired: identical scores, zero width
    assert same.difference == Interval(0.0, 0.0, 0.0)
    again = paired_bootstrap_auroc(labels, good, noise, clusters, resamples=500, seed=0)
    assert again.a == result.a and again.difference == result.difference
    with pytest.raises(ValueError, match="both classes"):
        paired_bootstrap_auroc(np.ones(4), good[:4], noise[:4])


@pytest.mark.parametrize(
    ("difference", "opening"),
    [
        (Interval(0.06, 0.02, 0.10), "pretraining helped at this budget: test AUROC +0.060 (95% CI +0.020 to +0.100)"),
        (Interval(-0.06, -0.10, -0.01), "pretraining did worse than random initialisation at this budget"),
        (Interval(0.02, -0.03, 0.07), "no difference at this budget: the test AUROC difference +0.020 (95% CI -0.030"),
        (Interval(0.03, 0.0, 0.06), "no difference at this budget"),  # an interval that touches 0 includes it
        (Interval(-0.03, -0.06, 0.0), "no difference at this budget"),
    ],
)
def test_the_closing_sentence_follows_the_sign_of_the_interval(difference, opening):
    assert verdict(difference).startswith(opening)


def test_compare_encoders_scores_both_encoders_on_the_same_test_images(phantoms):
    torch.manual_seed(0)

    def encoder() -> torch.nn.Module:
        return torch.nn.Sequential(
            torch.nn.Conv2d(1, 8, 3),
            torch.nn.BatchNorm2d(8),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(2),
            torch.nn.Flatten(),
        )

    encoders = {"pretrained": encoder(), "random init": encoder()}
    comparison = compare_encoders(encoders, phantoms, resamples=200)
    norm = encoders["pretrained"][1]
    assert norm.running_mean.abs().max() == 0 and norm.num_batches_tracked == 0  # the callers' networks untouched
    as_they_are = compare_encoders(encoders, phantoms, resamples=200, batchnorm_from_training=False)
    assert as_they_are.bootstrap.a != comparison.bootstrap.a  # the recomputed statistics change the features
    assert comparison.n_train + comparison.n_test == len(phantoms) and comparison.n_test == int(phantoms.test.sum())
    assert comparison.train_subjects + comparison.test_subjects == len(set(phantoms.subjects.tolist()))
    assert list(comparison.probabilities) == ["pretrained", "random init"]
    assert all(p.shape == (comparison.n_test,) for p in comparison.probabilities.values())
    boot = comparison.bootstrap
    for interval in (boot.a, boot.b, boot.difference):
        assert interval.low <= interval.estimate <= interval.high
    assert comparison.sentence == verdict(boot.difference)
    assert len(comparison.figure().axes) == 2  # ROC curves, bootstrap of the difference
    assert set(comparison.metrics()) >= {
        "demo/auroc_pretrained",
        "demo/auroc_random_init_low",
        "demo/auroc_difference_high",
    }
