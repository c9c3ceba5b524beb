"""Patient-named paths (PACS exports): they scan, and no output but the private path map names them.

The archive below names folders and files after the patient (name, ID, study date), as PACS exports do, for DICOM
series, single DICOM images, NIfTI and PNG files and label maps. The scan works; the manifest and errors CSV hold file
keys only; the path map holds the paths with permissions no wider than the archive's; moving the archive needs only
the map rewritten (the cache is reused as it is); a missing map is a clear error; a tiny pretraining and export on it
leave no identifier in any file written (manifest, errors, cache, MLflow store and artifacts, outputs, bundle) nor in
the console or the log.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
from factories import PACS_TAGS, write_dicom_2d, write_dicom_series, write_nifti, write_png
from training import tiny_overrides

from medssl.cli import main
from medssl.data.cache import build_cache, open_cache
from medssl.data.datasets import MultiCropSliceDataset, cached_items
from medssl.data.errors import ManifestError
from medssl.data.labelled import load_cases
from medssl.data.manifest import read_manifest, validate_manifest, write_manifest
from medssl.data.pathmap import default_map_path, file_key, private_mode, read_path_map, rewrite_root
from medssl.data.preprocess import PreprocessConfig
from medssl.data.scan import ScanOptions, scan_folder
from medssl.data.views import MultiCropConfig

SALT = "patient-paths-test-salt"
TAGS = PACS_TAGS
IDENTIFIERS = ("Zyxwvut", "Quorabelle", "ZQ-99173-PX", "19530612", "ACC-77Q31", "Klinikum Ostwind", "19890417")
PATIENT = "ZYXWVUT^QUORABELLE_ZQ-99173-PX"  # the PACS export's patient folder
CONFIG = PreprocessConfig(percentiles=[0, 100])


def _volume(seed: int, shape_zyx: tuple[int, int, int] = (12, 32, 32)) -> np.ndarray:
    """A body-like ellipsoid with a few bright blobs (int16), so slices have foreground."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.mgrid[0 : shape_zyx[0], 0 : shape_zyx[1], 0 : shape_zyx[2]]
    body = ((xx - 16) / 13) ** 2 + ((yy - 16) / 11) ** 2 < 1
    volume = np.where(body, 300.0, 0.0) + rng.normal(0, 20, size=body.shape)
    for _ in range(3):
        c = rng.uniform([3, 8, 8], [shape_zyx[0] - 3, 24, 24])
        volume[((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 < 12) & body] += 400
    return np.clip(volume, 0, None).astype(np.int16)


def _image(seed: int, shape: tuple[int, int] = (48, 40)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : shape[0], 0 : shape[1]]
    image = 90 + 80 * np.exp(-(((x - shape[1] / 2) / 12) ** 2 + ((y - shape[0] / 2) / 14) ** 2))
    return np.clip(image + rng.normal(0, 8, size=shape), 0, 255).astype(np.uint8)


def write_pacs_archive(root: Path) -> Path:
    """A PACS-style export: ``<NAME^GIVEN_ID>/<date>_<modality>/<ID>_IM....dcm``, plus NIfTI, PNG and label maps
    in folders named after the patient."""
    patient = root / PATIENT
    write_dicom_series(patient / "19890417_MR_HEAD", _volume(1), (1.2, 1.2, 2.0), prefix="ZQ-99173-PX_IM", **TAGS)
    write_dicom_series(patient / "19890417_CT_ABDOMEN", _volume(2), (1.0, 1.0, 2.5), modality="CT",
                       prefix="Zyxwvut_CT", **TAGS)  # fmt: skip
    for k in range(2):
        pixels = (_image(10 + k).astype(np.uint16) * 16).astype(np.uint16)
        write_dicom_2d(patient / "19890417_CR_CHEST" / f"Zyxwvut_Quorabelle_{k}.dcm", pixels, **TAGS)
    other = root / "Quorabelle Zyxwvut (ZQ-99173-PX)"
    write_nifti(other / "t1_ZQ-99173-PX.nii.gz", _volume(3).astype(np.float32), (1.0, 1.0, 2.0))
    for k in range(2):
        write_png(other / f"chest_19890417_{k}.png", _image(20 + k))
    (other / "notes_Zyxwvut.dcm").write_text("a text file named like a DICOM\n" * 10)  # an error, by key
    return root


def scan_cli(archive: Path, out: Path, *extra: str) -> int:
    argv = ["manifest", "scan", str(archive), "--out", str(out), "--salt", SALT, "--no-progress", "--workers", "2"]
    return main([*argv, *extra])


def assert_no_identifier(blob: bytes, where: str) -> None:
    lowered = blob.lower()
    for identifier in IDENTIFIERS:
        assert identifier.lower().encode() not in lowered, f"{identifier!r} leaked into {where}"


@pytest.fixture
def scanned(tmp_path: Path) -> tuple[Path, Path]:
    archive = write_pacs_archive(tmp_path / "archive")
    out = tmp_path / "manifests" / "pacs.csv"
    assert scan_cli(archive, out) == 0
    return archive, out


def test_a_pacs_export_scans_and_only_the_map_names_its_files(scanned, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    archive, out = scanned
    assert main(["manifest", "validate", str(out)]) == 0
    captured = capsys.readouterr()
    manifest = read_manifest(out)
    assert len(manifest.rows) == 2 + 2 + 1 + 2  # two series, two CR, one NIfTI, two PNG
    assert {r.format for r in manifest.rows} == {"dicom_series", "dicom", "nifti", "image"}
    assert len({r.subject for r in manifest.rows if r.format.startswith("dicom")}) == 1  # one PatientID
    for row in manifest.rows:
        assert row.path.startswith("p") and len(row.path) == 21 and manifest.resolve(row).exists()
    errors_csv = out.with_name("pacs.errors.csv")
    (error,) = errors_csv.read_text().splitlines()[1:]
    key = file_key("Quorabelle Zyxwvut (ZQ-99173-PX)/notes_Zyxwvut.dcm", SALT)
    assert error.startswith(f"{key},not a DICOM file")
    for where, blob in {
        "manifest": out.read_bytes(),
        "errors": errors_csv.read_bytes(),
        "stdout": captured.out.encode(),
        "stderr": captured.err.encode(),
        "log": caplog.text.encode(),
    }.items():
        assert_no_identifier(blob, where)
    path_map = read_path_map(default_map_path(out))
    assert path_map.root.resolve() == archive.resolve()
    assert f"{PATIENT}/19890417_MR_HEAD" in path_map.paths.values()
    assert len(path_map) == len(manifest.rows) + 1  # the rows and the failed file
    assert "ZQ-99173-PX" in default_map_path(out).read_text()  # the map is where the names are


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_the_map_is_no_more_readable_than_the_archive(tmp_path):
    archive = write_pacs_archive(tmp_path / "archive")
    out = tmp_path / "m.csv"
    for root_mode, expected in ((0o700, 0o600), (0o750, 0o640), (0o755, 0o644)):
        archive.chmod(root_mode)
        assert scan_cli(archive, out) == 0
        assert stat.S_IMODE(default_map_path(out).stat().st_mode) == expected, oct(root_mode)
        assert default_map_path(out).stat().st_gid == archive.stat().st_gid
    # a private file in an open archive makes the map private too (it lists that file)
    private = archive / PATIENT / "19890417_CR_CHEST" / "Zyxwvut_Quorabelle_0.dcm"
    private.chmod(0o600)
    assert private_mode(archive, [f"{PATIENT}/19890417_CR_CHEST/Zyxwvut_Quorabelle_0.dcm"])[0] == 0o600
    assert scan_cli(archive, out) == 0
    assert stat.S_IMODE(default_map_path(out).stat().st_mode) == 0o600
    assert not list(tmp_path.glob(".*.tmp"))
    # validate warns when the map was opened up afterwards
    default_map_path(out).chmod(0o644)
    archive.chmod(0o700)
    report = validate_manifest(out)
    assert report.ok and any("readable by users the archive root does not let in" in w for w in report.warnings)


def test_moving_the_archive_needs_only_the_map_rewritten(scanned, tmp_path, capsys):
    archive, out = scanned
    cache = tmp_path / "cache"
    assert main(["manifest", "preprocess", str(out), "--cache", str(cache), "--workers", "1", "--no-progress"]) == 0
    first = capsys.readouterr().out
    assert "7 built, 0 already cached, 0 failed" in first
    entries = {rid: entry.key for rid, entry in open_cache(read_manifest(out), cache, PreprocessConfig()).items()}
    manifest_bytes = out.read_bytes()

    moved = tmp_path / "elsewhere" / "archive-moved"
    moved.parent.mkdir()
    shutil.move(str(archive), str(moved))
    assert main(["manifest", "validate", str(out)]) == 1  # the map still names the old root
    text = capsys.readouterr().out
    assert "file not found" in text and "rewrite the root" in text
    assert_no_identifier(text.encode(), "validate output")

    # --root at run time, without touching anything
    args = ["manifest", "preprocess", str(out), "--cache", str(cache), "--workers", "1", "--no-progress"]
    assert main([*args, "--root", str(moved)]) == 0
    assert "0 built, 7 already cached, 0 failed" in capsys.readouterr().out

    # or rewrite the map's root once: the manifest and the cache keys stay the same
    assert main(["manifest", "relocate", str(out), str(moved)]) == 0
    assert "path map rewritten to the new root" in capsys.readouterr().out
    assert out.read_bytes() == manifest_bytes
    assert read_path_map(default_map_path(out)).root.resolve() == moved.resolve()
    assert main(["manifest", "validate", str(out)]) == 0
    assert main(args) == 0
    assert "0 built, 7 already cached, 0 failed" in capsys.readouterr().out
    manifest = read_manifest(out)
    assert {rid: entry.key for rid, entry in open_cache(manifest, cache, PreprocessConfig()).items()} == entries
    items = cached_items(manifest, cache, PreprocessConfig())
    dataset = MultiCropSliceDataset(items, views=MultiCropConfig(global_size=32, local_size=16, n_local=2))
    sample = dataset[0]
    assert sample and len(dataset) > len(items)
    for blob in (p.read_bytes() for p in cache.rglob("*") if p.is_file()):
        assert_no_identifier(blob, "cache")
    assert_no_identifier(str([p.relative_to(cache) for p in cache.rglob("*")]).encode(), "cache names")

    # editing the '# root:' line by hand works the same (what the README describes)
    back = tmp_path / "archive"
    shutil.move(str(moved), str(back))
    map_file = default_map_path(out)
    lines = map_file.read_text().splitlines(keepends=True)
    map_file.write_text("".join(f"# root: {back}\n" if line.startswith("# root:") else line for line in lines))
    assert validate_manifest(out).ok
    before = dict(read_path_map(map_file).paths)
    rewrite_root(map_file, back)  # the library call behind `medssl manifest relocate` keeps every entry
    assert dict(read_path_map(map_file).paths) == before and validate_manifest(out).ok


def test_a_patient_named_root_is_never_printed(tmp_path, capsys):
    """A one-patient PACS export: the archive root itself is named after the patient. ``validate``'s missing-file
    message names the file by key and the root by a phrase; ``relocate`` names the map, not the new root."""
    archive = write_pacs_archive(tmp_path / PATIENT)
    out = tmp_path / "manifests" / "one.csv"
    assert scan_cli(archive, out) == 0
    assert_no_identifier(capsys.readouterr().out.encode(), "scan output")
    removed = archive / "Quorabelle Zyxwvut (ZQ-99173-PX)" / "chest_19890417_0.png"
    removed.unlink()
    assert main(["manifest", "validate", str(out)]) == 1
    captured = capsys.readouterr()
    key = file_key(removed.relative_to(archive).as_posix(), SALT)
    missing = [line for line in captured.out.splitlines() if "file not found" in line]
    assert len(missing) == 1 and missing[0].endswith(
        f"file not found: key {key} under the path map's root (moved? rewrite the root of one.paths.csv "
        "with `medssl manifest relocate` or pass --root)"
    ), captured.out
    assert_no_identifier((captured.out + captured.err).encode(), "validate output")
    assert main(["manifest", "validate", str(out), "--root", str(archive)]) == 1
    captured = capsys.readouterr()
    assert "under the root given (--root)" in captured.out
    assert_no_identifier((captured.out + captured.err).encode(), "validate --root output")

    moved = tmp_path / "moved" / f"{PATIENT}_19890417"
    moved.parent.mkdir()
    shutil.move(str(archive), str(moved))
    assert main(["manifest", "relocate", str(out), str(moved)]) == 0
    captured = capsys.readouterr()
    assert f"{default_map_path(out)}: path map rewritten to the new root" in captured.out, captured.out
    assert "1 of 8 mapped files are not under the new root" in captured.err
    assert_no_identifier((captured.out + captured.err).encode(), "relocate output")
    assert read_path_map(default_map_path(out)).root.resolve() == moved.resolve()
    assert main(["manifest", "relocate", str(out), str(tmp_path / f"{PATIENT}_gone")]) == 2
    captured = capsys.readouterr()
    assert "the new root given is not a folder" in captured.err
    assert_no_identifier((captured.out + captured.err).encode(), "relocate error")


def test_a_missing_map_is_a_clear_error_and_rows_work_without_it(scanned, tmp_path, capsys):
    _, out = scanned
    config = PreprocessConfig()  # what `medssl manifest preprocess` uses by default
    cache = tmp_path / "cache"
    build_cache(read_manifest(out), cache, config, workers=1, progress=False)
    map_file = default_map_path(out)
    kept = tmp_path / "vault" / "pacs.paths.csv"
    kept.parent.mkdir()
    shutil.move(str(map_file), str(kept))

    manifest = read_manifest(out)  # rows and the built cache need no map (the manifest is shareable alone)
    assert len(cached_items(manifest, cache, config)) == 7
    with pytest.raises(ManifestError, match=r"path map .*pacs\.paths\.csv is missing.*--paths FILE.*data\.path_map"):
        manifest.resolve(manifest.rows[0])
    assert main(["manifest", "preprocess", str(out), "--cache", str(cache), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(map_file) in err and "--paths" in err
    assert main(["manifest", "validate", str(out)]) == 1
    assert "is missing" in capsys.readouterr().out
    assert main(["manifest", "validate", str(out), "--no-files"]) == 0

    # pointing at the map where it is now
    args = ["manifest", "preprocess", str(out), "--cache", str(cache), "--no-progress", "--paths", str(kept)]
    assert main(args) == 0
    assert "0 built, 7 already cached" in capsys.readouterr().out
    assert main(["manifest", "validate", str(out), "--paths", str(kept)]) == 0
    assert len(cached_items(read_manifest(out, paths=kept), cache, config)) == 7


def test_cache_failures_are_named_by_key(scanned, tmp_path):
    archive, out = scanned
    (archive / "Quorabelle Zyxwvut (ZQ-99173-PX)" / "t1_ZQ-99173-PX.nii.gz").unlink()
    report = build_cache(read_manifest(out), tmp_path / "cache", CONFIG, workers=1, progress=False)
    ((name, reason),) = report.errors
    assert name == file_key("Quorabelle Zyxwvut (ZQ-99173-PX)/t1_ZQ-99173-PX.nii.gz", SALT)
    assert "not found" in reason
    assert_no_identifier(report.errors_path.read_bytes(), "cache errors")


def test_a_cache_build_and_the_datasets_never_hold_the_path_map(scanned, tmp_path, monkeypatch):
    # a keyed manifest's build reads the map in step with its rows (both in key order); the datasets read only the
    # cache: neither reads the whole map
    import medssl.data.manifest as manifest_module
    import medssl.data.pathmap as pathmap_module

    _, out = scanned

    def whole_map(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("the whole path map was read")

    monkeypatch.setattr(pathmap_module, "read_path_map", whole_map)
    monkeypatch.setattr(manifest_module, "read_path_map", whole_map)
    report = build_cache(read_manifest(out), tmp_path / "cache", CONFIG, workers=1, progress=False)
    assert report.built == 7 and not report.errors
    assert len(MultiCropSliceDataset(cached_items(read_manifest(out), tmp_path / "cache", CONFIG))) > 7


def test_masks_in_patient_folders_are_keyed_too(tmp_path, capsys):
    data = tmp_path / "archive"
    volume = _volume(5).astype(np.float32)
    labels = (volume > 500).astype(np.uint8)
    for k in range(2):
        write_nifti(data / "Zyxwvut_Quorabelle" / f"ZQ-99173-PX_{k}.nii.gz", volume, (1.0, 1.0, 2.0))
        write_nifti(data / "labels" / f"ZQ-99173-PX_{k}.nii.gz", labels, (1.0, 1.0, 2.0))
    out = tmp_path / "seg.csv"
    assert scan_cli(data, out, "--masks", "labels", "--split-fractions", "train=1") == 0
    assert_no_identifier(out.read_bytes() + capsys.readouterr().err.encode(), "manifest")
    manifest = read_manifest(out)
    assert all(r.mask.startswith("p") and manifest.resolve_mask(r).is_file() for r in manifest.rows)
    cases, errors = load_cases(manifest, PreprocessConfig(spacing=None, max_side_2d=None), workers=1, progress=False)
    assert len(cases) == 2 and not errors
    (data / "labels" / "ZQ-99173-PX_1.nii.gz").unlink()
    cases, errors = load_cases(manifest, PreprocessConfig(spacing=None, max_side_2d=None), workers=1, progress=False)
    assert len(cases) == 1 and "mask file not found" in str(errors[0])
    assert_no_identifier(str(errors[0]).encode(), "labelled-case error")
    assert str(errors[0]).startswith(file_key("labels/ZQ-99173-PX_1.nii.gz", SALT))


def test_an_old_manifest_with_plain_paths_still_works(tmp_path):
    data = tmp_path / "data"
    write_png(data / "a" / "x.png", _image(1))
    write_png(data / "b.png", _image(2))
    rows = scan_folder(data, ScanOptions(salt=SALT, progress=False)).rows
    write_manifest(tmp_path / "old.csv", rows, data)
    assert "# root: data" in (tmp_path / "old.csv").read_text()
    manifest = read_manifest(tmp_path / "old.csv")
    assert manifest.path_map_file is None and [r.path for r in manifest.rows] == ["a/x.png", "b.png"]
    assert manifest.resolve(manifest.rows[0]) == data / "a" / "x.png"
    assert validate_manifest(tmp_path / "old.csv").ok
    report = build_cache(manifest, tmp_path / "cache", CONFIG, workers=1, progress=False)
    assert report.built == 2 and len(cached_items(manifest, tmp_path / "cache", CONFIG)) == 2


def test_pretraining_and_export_on_a_pacs_export_write_no_identifier(scanned, tmp_path, capsys, caplog):
    """The acceptance check: scan, validate, pretrain (a few steps), export; then every file written anywhere but in
    the archive and the path map is searched for every identifier, as are the console and the log."""
    caplog.set_level(logging.DEBUG)
    archive, out = scanned
    folder = tmp_path / "work"
    overrides = tiny_overrides(out, folder, "trainer.max_steps=2", "trainer.checkpoint_every=1")
    assert main(["pretrain", *overrides]) == 0
    (backbone,) = (folder / "outputs").glob("*/backbone.pt")
    uri = f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}"
    assert main(["export", str(backbone.parent), "--out", str(folder / "bundle"), "--tracking-uri", uri]) == 0
    assert (folder / "bundle" / "configs" / "metadata.json").is_file()
    captured = capsys.readouterr()

    written = [p for p in tmp_path.rglob("*") if p.is_file() and archive not in p.parents]
    written.remove(default_map_path(out))
    assert {p.relative_to(tmp_path).parts[0] for p in written} >= {"manifests", "work"}
    assert any(p.suffix == ".npy" for p in written) and any(p.name == "model.pt" for p in written)
    assert any("mlruns" in p.parts and "artifacts" in p.parts for p in written)
    for path in written:
        assert_no_identifier(str(path.relative_to(tmp_path)).encode(), f"the name {path}")
        assert_no_identifier(path.read_bytes(), str(path.relative_to(tmp_path)))
    for where, text in {"stdout": captured.out, "stderr": captured.err, "log": caplog.text}.items():
        assert_no_identifier(text.encode(), where)


def test_an_older_file_hash_memo_keyed_by_paths_is_scrubbed(scanned, tmp_path):
    archive, out = scanned
    cache = tmp_path / "cache"
    cache.mkdir()
    old = {str(archive / PATIENT / "19890417_CR_CHEST" / "Zyxwvut_Quorabelle_0.dcm"): [1, 2, "0" * 32]}
    (cache / "file_hashes.json").write_text(json.dumps(old))
    build_cache(read_manifest(out), cache, CONFIG, workers=1, progress=False)
    memo = json.loads((cache / "file_hashes.json").read_text())
    assert memo and all(re.fullmatch(r"\d+:\d+", key) for key in memo)  # device:inode, no path
    assert_no_identifier((cache / "file_hashes.json").read_bytes(), "file-hash memo")


def test_a_map_entry_that_leaves_the_root_is_refused_without_quoting_it(scanned):
    _, out = scanned
    map_file = default_map_path(out)
    text = map_file.read_text()
    map_file.write_text(text.replace(f"{PATIENT}/19890417_MR_HEAD", f"../{PATIENT}/19890417_MR_HEAD"))
    manifest = read_manifest(out)  # the map's root line only: its entries are read when a file is first located
    with pytest.raises(ManifestError, match=r"without '\.\.'") as info:
        manifest.resolve(manifest.rows[0])
    assert_no_identifier(str(info.value).encode(), "the error")


def test_two_paths_with_one_file_key_stop_the_scan_before_anything_is_written(tmp_path, monkeypatch):
    import medssl.data.scan_writer as scan_writer_module
    from medssl.data.scan import write_scan

    data = tmp_path / "archive"
    for name in ("a.png", "b.png"):
        write_png(data / name, np.full((8, 8), 100, np.uint8))
    result = scan_folder(data, ScanOptions(salt=SALT, progress=False))
    monkeypatch.setattr(scan_writer_module, "file_key", lambda relative, salt: "p-collision")
    with pytest.raises(ManifestError, match="share one file key"):
        write_scan(tmp_path / "out" / "m.csv", result.rows, result.errors, data, SALT)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir()), "nothing written"
