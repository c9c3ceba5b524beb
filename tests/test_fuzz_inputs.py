"""Fuzzing (issue 18): mutated DICOM, NIfTI, PNG/JPEG files and manifest CSVs through scan, validate and cache build;
multi-frame DICOM files the same way; labels CSVs through ``manifest scan --labels``; segmentation masks through the
fine-tuning loader; path maps through reading, validate and cache build; file and folder names with control
characters, quotes and CSV separators through scan, labels join, validate and cache build.

Every case runs under a watchdog (no hang); the properties are: no uncaught exception, every bad file named in the
errors with a reason, the CLI answers with an exit code (never a traceback), and the cache holds no partial entry.
Hypothesis runs derandomized so CI is deterministic. Each bug fuzzing found has a test of its own (and often an
``@example`` of the input that found it). benchmarks/fuzz_atheris.py fuzzes the same calls with atheris.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL.Image import DecompressionBombError

hypothesis = pytest.importorskip("hypothesis")
from factories import random_volume, write_dicom_2d, write_dicom_series, write_jpeg, write_nifti, write_png  # noqa: E402
from hypothesis import HealthCheck, event, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from medssl.cli import main  # noqa: E402
from medssl.data.cache import build_cache, open_cache  # noqa: E402
from medssl.data.errors import DataError, ManifestError  # noqa: E402
from medssl.data.manifest import read_manifest, validate_manifest  # noqa: E402
from medssl.data.pathmap import read_path_map, root_escape  # noqa: E402
from medssl.data.preprocess import PreprocessConfig  # noqa: E402

CASE_TIMEOUT_S = 30.0
FUZZ = settings(
    max_examples=int(os.environ.get("MEDSSL_FUZZ_EXAMPLES", "40")),  # more for a deeper local run
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SALT = "fuzz-salt"
# Cases write a few small files each (scan outputs, cache entries; several fsync'd): on a RAM disk where there is one,
# ten times faster than on a slow /tmp, and nothing the properties depend on.
FAST_TMP = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def _with_watchdog(fn: Callable[[], Any], timeout: float = CASE_TIMEOUT_S) -> Any:
    """Run ``fn`` in a thread; fail on a hang, re-raise its exception here (so the traceback is the test's)."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # handed to the test thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        pytest.fail(f"case did not finish within {timeout} s (hang)")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def _cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


# --- seeds -----------------------------------------------------------------------------------------------------------

_SEEDS: dict[str, dict[str, bytes]] = {}


def _seeds() -> dict[str, dict[str, bytes]]:
    """Small valid archives, one per format: relative path -> bytes (built once, kept in memory)."""
    if _SEEDS:
        return _SEEDS
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(dir=FAST_TMP) as tmp:
        root = Path(tmp)
        write_dicom_2d(root / "dx" / "img.dcm", rng.integers(0, 4000, size=(16, 12)), modality="DX")
        write_dicom_series(root / "ct" / "series", random_volume((3, 8, 8)), spacing=(1.0, 1.0, 2.0), modality="CT")
        write_nifti(root / "nii" / "vol.nii", random_volume((4, 8, 8)).astype(np.float32), spacing=(1.0, 1.0, 2.0))
        write_nifti(root / "niigz" / "vol.nii.gz", random_volume((4, 8, 8)), spacing=(1.0, 1.0, 2.0))
        write_png(root / "png" / "img.png", rng.integers(0, 255, size=(16, 16)).astype(np.uint8))
        write_jpeg(root / "jpg" / "img.jpg", rng.integers(0, 255, size=(16, 16)).astype(np.uint8))
        for fmt in ("dx", "ct", "nii", "niigz", "png", "jpg"):
            _SEEDS[fmt] = {
                p.relative_to(root / fmt).as_posix(): p.read_bytes()
                for p in sorted((root / fmt).rglob("*"))
                if p.is_file()
            }
    return _SEEDS


# --- byte mutations --------------------------------------------------------------------------------------------------

_fraction = st.floats(0.0, 1.0, allow_nan=False)
_chunk = st.binary(min_size=1, max_size=64)
_special = st.sampled_from([b"\x00" * 8, b"\xff" * 8, b"\x7f\xff\xff\xff", b"\x80\x00\x00\x00", b"\xff\xff\xff\x7f"])

MUTATIONS = st.one_of(
    st.tuples(st.just("truncate"), _fraction, st.just(b"")),
    st.tuples(st.just("flip"), st.lists(_fraction, min_size=1, max_size=16), st.integers(1, 255)),
    st.tuples(st.just("insert"), _fraction, _chunk),
    st.tuples(st.just("delete"), _fraction, st.integers(1, 256)),
    st.tuples(st.just("header"), st.floats(0.0, 1.0), st.one_of(_special, _chunk)),  # first 400 bytes
)


def mutate(data: bytes, mutation: tuple[str, Any, Any]) -> bytes:
    kind, where, what = mutation
    n = len(data)
    if kind == "truncate":
        return data[: int(where * n)]
    if kind == "flip":
        out = bytearray(data)
        for fraction in where:
            i = min(int(fraction * n), n - 1)
            out[i] ^= what
        return bytes(out)
    if kind == "insert":
        i = int(where * n)
        return data[:i] + what + data[i:]
    if kind == "delete":
        i = int(where * n)
        return data[:i] + data[i + what :]
    i = int(where * min(n, 400))  # header: overwrite in place
    return data[:i] + what + data[i + len(what) :]


# --- the pipeline ----------------------------------------------------------------------------------------------------


def _check_cache(cache: Path, manifest_path: Path, outcomes: list[str]) -> None:
    manifest = read_manifest(manifest_path)
    report = build_cache(manifest, cache, PreprocessConfig(), workers=1, progress=False)
    named = {name for name, reason in report.errors if reason}
    outcomes.append("cache: some rows failed" if report.errors else "cache: all built")
    outcomes.extend(f"cache: {reason}" for _, reason in report.errors if reason.startswith("preprocessing failed"))
    assert all(reason for _, reason in report.errors), report.errors
    index = open_cache(manifest, cache, PreprocessConfig())
    for row in manifest.rows:
        assert row.id in index or row.path in named, f"row {row.id} neither cached nor reported"
    leftovers = [p.name for p in report.directory.rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers, f"temporary files left in the cache: {leftovers}"
    npy = {p.stem for p in report.directory.glob("*.npy")}
    meta = {p.stem for p in report.directory.glob("*.json") if p.name != "settings.json"}
    assert npy == meta, f"partial cache entries: {sorted(npy ^ meta)}"
    for entry in index.values():
        assert entry.key in meta, f"index names entry {entry.key} that is not in the cache"


def _pipeline(
    work: Path, fmt: str, target: str, data: bytes, outcomes: list[str], seeds: dict[str, bytes] | None = None
) -> None:
    root = work / "archive"
    for rel, seed in (_seeds()[fmt] if seeds is None else seeds).items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data if rel == target else seed)
    out = work / "m.csv"
    code, _, err = _cli(
        ["manifest", "scan", str(root), "--out", str(out), "--salt", SALT, "--workers", "1", "--no-progress"]
    )
    assert code in (0, 2) and "Traceback" not in err, (code, err)
    assert (work / "m.paths.csv").exists(), f"the scan stopped instead of reporting the bad file: {err}"
    path_map = read_path_map(work / "m.paths.csv")
    with open(work / "m.errors.csv", newline="", encoding="utf-8") as handle:
        errors = {r["path"]: r["reason"] for r in csv.DictReader(handle)}
    assert all(errors.values()), f"an error without a reason: {errors}"
    errored = {path_map.paths[key] for key in errors}
    listed: set[str] = set()
    if out.exists():
        listed = {path_map.paths[r.path] for r in read_manifest(out).rows}
    parent = target.rsplit("/", 1)[0] if "/" in target else "."
    assert {target, parent} & (listed | errored), f"{target} neither scanned nor reported ({code}, {err})"
    outcomes.append("scan: reported" if {target, parent} & errored else "scan: listed")
    if code == 2:
        assert not out.exists()
        return
    code, _, err = _cli(["manifest", "validate", str(out)])
    assert code in (0, 1, 2) and "Traceback" not in err, (code, err)
    _check_cache(work / "cache", out, outcomes)


def _fuzz_files(fmt: str, mutation: tuple[str, Any, Any], pick: float) -> None:
    files = sorted(_seeds()[fmt])
    target = files[min(int(pick * len(files)), len(files) - 1)]
    data = mutate(_seeds()[fmt][target], mutation)
    with tempfile.TemporaryDirectory(dir=FAST_TMP) as tmp:
        outcomes: list[str] = []
        _with_watchdog(lambda: _pipeline_of(Path(tmp), fmt, target, data, outcomes))
    for outcome in outcomes:
        event(outcome)


@pytest.mark.parametrize("fmt", ["dx", "ct", "nii", "niigz", "png", "jpg"])
@FUZZ
@given(mutation=MUTATIONS, pick=_fraction)
@example(mutation=("header", 0.75, b"\x00" * 8), pick=0.0)  # found: a NIfTI with a zero affine axis stopped the scan
def test_mutated_files_are_scanned_or_reported(fmt: str, mutation: tuple[str, Any, Any], pick: float) -> None:
    _fuzz_files(fmt, mutation, pick)


def test_seed_archives_scan_clean(tmp_path: Path) -> None:
    """The seeds themselves are valid: a mutation is what makes a file bad."""
    for fmt, files in _seeds().items():
        work = tmp_path / fmt
        target = sorted(files)[0]
        _pipeline(work, fmt, target, files[target], [])
        with open(work / "m.errors.csv", newline="", encoding="utf-8") as handle:
            assert list(csv.DictReader(handle)) == [], fmt


# --- manifest mutations ----------------------------------------------------------------------------------------------

_BAD_VALUES = st.one_of(
    st.sampled_from(
        [
            "",
            "nan",
            "inf",
            "-inf",
            "-1",
            "0",
            "1e308",
            "9" * 40,
            "NaNx2x3",
            "1xinfx1",
            "-1x-2x-3",
            "0x0x0",
            "2.5",
            "abc",
            "x",
            "xx",
            "\u00e9\u6f22\u5b57",
            "\x00",
            '"',
            "../../etc/passwd",
            "/abs/path",
            "C:\\x",
        ]
    ),
    st.text(max_size=20),
)


def _manifest_seed(work: Path) -> tuple[Path, list[str]]:
    root = work / "archive"
    for fmt in ("dx", "nii", "png"):
        for rel, data in _seeds()[fmt].items():
            (root / fmt / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / fmt / rel).write_bytes(data)
    out = work / "m.csv"
    code, _, err = _cli(
        ["manifest", "scan", str(root), "--out", str(out), "--salt", SALT, "--workers", "1", "--no-progress"]
    )
    assert code == 0, err
    return out, out.read_text(encoding="utf-8").splitlines(keepends=True)


MANIFEST_MUTATIONS = st.one_of(
    st.tuples(st.just("cell"), st.tuples(_fraction, _fraction), _BAD_VALUES),
    st.tuples(st.just("drop_column"), _fraction, st.none()),
    st.tuples(st.just("duplicate_column"), _fraction, st.none()),
    st.tuples(st.just("empty"), st.none(), st.none()),
    st.tuples(st.just("no_header"), st.none(), st.none()),
    st.tuples(st.just("short_row"), _fraction, st.integers(0, 12)),
    st.tuples(st.just("long_row"), _fraction, _BAD_VALUES),
    st.tuples(st.just("bytes"), st.tuples(_fraction, _fraction), _chunk),
)


def mutate_manifest(lines: list[str], mutation: tuple[str, Any, Any]) -> bytes:
    kind, where, what = mutation
    comments = [ln for ln in lines if ln.startswith("#")]
    table = list(csv.reader(ln for ln in lines if not ln.startswith("#")))
    header, body = table[0], table[1:]
    if kind == "empty":
        return b""
    if kind == "no_header":
        table = body
    elif kind == "cell":
        r = min(int(where[0] * len(body)), len(body) - 1)
        c = min(int(where[1] * len(header)), len(header) - 1)
        body[r][c] = what
    elif kind in ("drop_column", "duplicate_column"):
        c = min(int(where * len(header)), len(header) - 1)
        for row in table:
            if kind == "drop_column":
                del row[c]
            else:
                row.append(row[c])
    elif kind == "short_row":
        r = min(int(where * len(body)), len(body) - 1)
        body[r] = body[r][:what]
    elif kind == "long_row":
        r = min(int(where * len(body)), len(body) - 1)
        body[r] = [*body[r], what]
    buffer = io.StringIO()
    buffer.writelines(comments)
    csv.writer(buffer, lineterminator="\n").writerows(table)
    data = buffer.getvalue().encode("utf-8", errors="surrogatepass")
    if kind == "bytes":
        i = int(where[0] * len(data))
        data = data[:i] + what + data[i + int(where[1] * 16) :]
    return data


def _manifest_pipeline(work: Path, data: bytes, outcomes: list[str]) -> None:
    out = work / "m.csv"
    out.write_bytes(data)
    try:
        report = validate_manifest(out)
    except (ManifestError, DataError) as exc:
        assert str(exc)
        outcomes.append(f"validate raised {type(exc).__name__}")
    else:
        assert all(report.errors) and all(report.warnings)
        outcomes.append("validate: ok" if report.ok else "validate: errors")
    code, _, err = _cli(["manifest", "validate", str(out)])
    assert code in (0, 1, 2) and "Traceback" not in err, (code, err)
    try:
        read_manifest(out)
    except (ManifestError, DataError) as exc:
        assert str(exc)
        return
    try:
        _check_cache(work / "cache", out, outcomes)
    except ManifestError as exc:  # documented: a keyed manifest whose path map is missing stops the build
        assert "path map" in str(exc), exc
        outcomes.append("cache: ManifestError (path map missing)")


@FUZZ
@given(mutation=MANIFEST_MUTATIONS)
@example(mutation=("short_row", 0.0, 3))  # found by this test: a row cut before ``dims`` raised TypeError
@example(mutation=("bytes", (0.0, 0.0), b"\x80"))  # found by this test: not UTF-8 raised UnicodeDecodeError
@example(mutation=("cell", (0.0, 8 / 13), "nan"))  # found by this test: NaN spacing passed validation
@example(mutation=("bytes", (0.09375, 0.0), b"\x00"))  # the '# paths:' line names a missing map
def test_mutated_manifests_are_reported(mutation: tuple[str, Any, Any]) -> None:
    with tempfile.TemporaryDirectory(dir=FAST_TMP) as tmp:
        work = Path(tmp)
        _, lines = _manifest_seed(work)
        data = mutate_manifest(lines, mutation)
        outcomes: list[str] = []
        _with_watchdog(lambda: _manifest_pipeline(work, data, outcomes))
    for outcome in outcomes:
        event(outcome)


@pytest.mark.parametrize("value", ["nan", "inf", "1xnanx1", "-infx1x1"])
def test_validate_rejects_non_finite_spacing(tmp_path: Path, value: str) -> None:
    out, lines = _manifest_seed(tmp_path)
    header = next(csv.reader([next(ln for ln in lines if not ln.startswith("#"))]))
    data = mutate_manifest(lines, ("cell", (0.0, header.index("spacing") / len(header)), value))
    out.write_bytes(data)
    report = validate_manifest(out)
    assert any("spacing" in e for e in report.errors), report.errors


def test_manifest_that_is_not_utf8_or_has_a_short_row_is_a_manifest_error(tmp_path: Path) -> None:
    header = "id,path,series,format,dims,modality,subject,shape,spacing,split,group,label,mask\n"
    out = tmp_path / "m.csv"
    out.write_bytes(b"\x80" + header.encode())
    with pytest.raises(ManifestError, match="UTF-8"):
        validate_manifest(out)
    out.write_text(header + "a,b,,nifti\n", encoding="utf-8")
    with pytest.raises(ManifestError, match="line 2: the row has fewer fields"):
        validate_manifest(out)
    assert _cli(["manifest", "validate", str(out)])[0] == 2


def test_nifti_with_a_degenerate_affine_or_negative_dimension_is_reported(tmp_path: Path) -> None:
    import nibabel as nib

    from medssl.data.readers import read_nifti
    from medssl.data.scan import ScanOptions, scan_folder

    good = tmp_path / "good.nii"
    nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)).to_filename(good)
    data = bytearray(good.read_bytes())
    data[42:44] = (-4).to_bytes(2, "little", signed=True)  # dim[1] < 0 (OverflowError when read)
    (tmp_path / "negative.nii").write_bytes(bytes(data))
    data = bytearray(good.read_bytes())
    data[296:312] = bytes(16)  # srow_y zero: no orientation (stopped the whole scan with ValueError)
    (tmp_path / "flat.nii").write_bytes(bytes(data))
    result = scan_folder(tmp_path, ScanOptions(salt=SALT, workers=1, progress=False))
    reasons = dict(result.errors)
    assert "orient" in reasons["flat.nii"] and "positive" in reasons["negative.nii"], reasons
    assert [r.path for r in result.rows] == ["good.nii"]
    with pytest.raises(DataError):
        read_nifti(tmp_path / "negative.nii")


# === multi-frame DICOM, labels CSVs, segmentation masks and the path map (issue 18, scope 2) =========================

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
NATIVE = PreprocessConfig(spacing=None, max_side_2d=None)
RESAMPLED = PreprocessConfig(spacing=[2.0, 2.0, 2.0], max_side_2d=8)  # also resamples every label map


def _testdata_file(name: str) -> Path | None:
    """A file of pydicom's test data (``rtdose.dcm`` ships with pydicom; ``emri_small.dcm`` with pydicom-data)."""
    from pydicom.data import get_testdata_file

    try:
        found = get_testdata_file(name, download=False)
    except Exception:  # no data source installed
        return None
    return Path(found) if isinstance(found, str) else None


EMRI = _testdata_file("emri_small.dcm")  # real Enhanced MR Image Storage, 10 frames of 64x64
RTDOSE = _testdata_file("rtdose.dcm")  # real RT Dose, 15 frames of 10x10, implicit VR


def write_multiframe(path: Path, volume_zyx: np.ndarray, spacing: tuple[float, float, float], enhanced: bool) -> Path:
    """One multi-frame MR file through pydicom: the legacy MR IOD with NumberOfFrames and the geometry at the top
    level, or (``enhanced``) the Enhanced MR IOD with shared and per-frame functional groups."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian

    uid = "1.2.826.0.1.3680043.8.498.18"  # fixed UIDs: the same bytes on every run, for @example offsets
    path.parent.mkdir(parents=True, exist_ok=True)
    volume = np.asarray(volume_zyx, dtype=np.uint16)
    sop_class = "1.2.840.10008.5.1.4.1.1.4.1" if enhanced else "1.2.840.10008.5.1.4.1.1.4"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid = f"{uid}.1"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = f"{uid}.0"
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = f"{uid}.2", f"{uid}.3"
    ds.Modality, ds.PatientID, ds.PatientName = "MR", "P0001", "Anon^Subject"
    ds.NumberOfFrames = volume.shape[0]
    ds.Rows, ds.Columns = volume.shape[1:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    orientation, pixel_spacing = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0], [spacing[1], spacing[0]]
    if enhanced:
        plane, measures = Dataset(), Dataset()
        plane.ImageOrientationPatient = orientation
        measures.PixelSpacing, measures.SliceThickness, measures.SpacingBetweenSlices = (
            pixel_spacing,
            spacing[2],
            spacing[2],
        )
        shared = Dataset()
        shared.PlaneOrientationSequence, shared.PixelMeasuresSequence = Sequence([plane]), Sequence([measures])
        ds.SharedFunctionalGroupsSequence = Sequence([shared])
        frames = []
        for k in range(volume.shape[0]):
            position, frame = Dataset(), Dataset()
            position.ImagePositionPatient = [0.0, 0.0, k * spacing[2]]
            frame.PlanePositionSequence = Sequence([position])
            frames.append(frame)
        ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    else:
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [0.0, 0.0, 0.0], orientation
        ds.PixelSpacing, ds.SliceThickness, ds.SpacingBetweenSlices = pixel_spacing, spacing[2], spacing[2]
    ds.PixelData = volume.tobytes()
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


_MF_SEEDS: dict[str, dict[str, bytes]] = {}


def _multiframe_seeds() -> dict[str, dict[str, bytes]]:
    """Multi-frame archives (one file each): generated legacy (``mf``) and enhanced (``emf``) MR, and pydicom's real
    RT Dose (``rtdose``) and Enhanced MR (``emri``) files where installed."""
    if _MF_SEEDS:
        return _MF_SEEDS
    volume = random_volume((3, 8, 6), low=0, high=3000)
    with tempfile.TemporaryDirectory(dir=FAST_TMP) as tmp:
        for name, enhanced in (("mf", False), ("emf", True)):
            path = write_multiframe(Path(tmp) / f"{name}.dcm", volume, (1.0, 1.0, 2.0), enhanced)
            _MF_SEEDS[name] = {"mr/multiframe.dcm": path.read_bytes()}
    for name, path in (("rtdose", RTDOSE), ("emri", EMRI)):
        if path is not None:
            _MF_SEEDS[name] = {f"{name}/{path.name}": path.read_bytes()}
    return _MF_SEEDS


def _seeds_of(fmt: str) -> dict[str, bytes]:
    return _multiframe_seeds()[fmt] if fmt in ("mf", "emf", "rtdose", "emri") else _seeds()[fmt]


def _pipeline_of(work: Path, fmt: str, target: str, data: bytes, outcomes: list[str]) -> None:
    """:func:`_pipeline` for any seed archive."""
    _pipeline(work, fmt, target, data, outcomes, _seeds_of(fmt))


@pytest.mark.parametrize(
    "fmt",
    [
        "mf",
        "emf",
        pytest.param("rtdose", marks=pytest.mark.skipif(RTDOSE is None, reason="pydicom's rtdose.dcm not found")),
        pytest.param("emri", marks=pytest.mark.skipif(EMRI is None, reason="pydicom-data (emri_small.dcm) missing")),
    ],
)
@FUZZ
@given(mutation=MUTATIONS)
@example(mutation=("flip", [0.3563], 0x61))  # found: a bad VR (UI -> U() decoded only when read stopped the scan
def test_mutated_multiframe_dicom_is_scanned_or_reported(fmt: str, mutation: tuple[str, Any, Any]) -> None:
    target = sorted(_seeds_of(fmt))[0]
    data = mutate(_seeds_of(fmt)[target], mutation)
    with tempfile.TemporaryDirectory(dir=FAST_TMP) as tmp:
        outcomes: list[str] = []
        _with_watchdog(lambda: _pipeline_of(Path(tmp), fmt, target, data, outcomes))
    for outcome in outcomes:
        event(outcome)


def test_dicom_whose_elements_fail_to_decode_is_reported(tmp_path: Path) -> None:
    """pydicom decodes an element when it is first read: a bad VR or a non-integer NumberOfFrames raised from
    ``read_header`` (stopping the whole scan) and from ``read_dicom_file`` (a bare ValueError at cache build)."""
    from medssl.data.dicom import read_header
    from medssl.data.readers import read_dicom_file
    from medssl.data.scan import ScanOptions, scan_folder

    seed = _multiframe_seeds()["mf"]["mr/multiframe.dcm"]
    uid_vr = seed.index(b"\x08\x00\x18\x00UI") + 4  # SOPInstanceUID's VR
    (tmp_path / "bad_vr.dcm").write_bytes(seed[:uid_vr] + b"U(" + seed[uid_vr + 2 :])
    frames = seed.index(b"\x28\x00\x08\x00IS") + 8  # NumberOfFrames: "3 " -> "3Q"
    (tmp_path / "bad_frames.dcm").write_bytes(seed[:frames] + b"3Q" + seed[frames + 2 :])
    with pytest.raises(DataError, match="corrupt DICOM header"):
        read_header(tmp_path / "bad_vr.dcm", SALT, "bad_vr.dcm")
    with pytest.raises(DataError, match="corrupt DICOM file"):
        read_dicom_file(tmp_path / "bad_frames.dcm")
    result = scan_folder(tmp_path, ScanOptions(salt=SALT, workers=1, progress=False))
    assert dict(result.errors)["bad_vr.dcm"].startswith("corrupt DICOM header"), result.errors


def test_enhanced_multiframe_without_a_usable_orientation_is_reported(tmp_path: Path) -> None:
    """Found by fuzzing: SimpleITK reads an all-zero direction for an enhanced multi-frame file whose orientation is
    unusable, and ``multiframe_info``'s ValueError stopped the whole scan."""
    import pydicom

    from medssl.data.readers import read_dicom_file
    from medssl.data.scan import ScanOptions, scan_folder

    path = write_multiframe(tmp_path / "flat.dcm", random_volume((3, 8, 6), low=0), (1.0, 1.0, 2.0), enhanced=True)
    ds = pydicom.dcmread(path)
    ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient = [1, 0, 0, 1, 0, 0]
    ds.save_as(path)
    with pytest.raises(DataError):  # the reader names it
        read_dicom_file(path)
    result = scan_folder(tmp_path, ScanOptions(salt=SALT, workers=1, progress=False))
    assert dict(result.errors)["flat.dcm"].startswith("multi-frame DICOM without a usable orientation")


def _huge_image(path: Path) -> Path:
    """A TGA header (Pillow opens it whatever the file's name) giving 40000 x 40000 pixels, and a few bytes."""
    import struct

    header = bytes([0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0]) + struct.pack("<HH", 40000, 40000) + bytes([8, 0])
    path.write_bytes(header + bytes(64))  # grey, 8 bits
    return path


def test_image_reader_names_an_image_with_a_huge_header_size(tmp_path: Path) -> None:
    """Found by the atheris harness: Pillow raises DecompressionBombError (not an OSError) for a header of over
    2 x 179 M pixels, which escaped ``read_image_file`` (the cache build said only 'preprocessing failed')."""
    from medssl.data.readers import read_image_file

    with pytest.raises(DataError, match="more pixels than Pillow decodes safely"):
        read_image_file(_huge_image(tmp_path / "big.png"))
    with pytest.raises(DataError, match=r"unreadable or truncated image file \(ValueError\)"):
        read_image_file(_truncated_png(tmp_path / "cut.png"))


def _truncated_png(path: Path) -> Path:
    """A PNG signature and an IHDR chunk of 4 bytes instead of 13."""
    import struct

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 4) + b"IHDR" + bytes(8))
    return path


@pytest.mark.parametrize(
    ("make", "kind"),
    [(_huge_image, DecompressionBombError), (_truncated_png, ValueError)],
    ids=["huge", "truncated-ihdr"],
)
def test_image_with_a_huge_or_truncated_header_is_reported(
    tmp_path: Path, make: Callable[[Path], Path], kind: type[Exception]
) -> None:
    """Found by benchmarks/fuzz_atheris.py: Pillow raises ValueError ('Truncated IHDR chunk') and
    DecompressionBombError (a header of over 2 x 179 M pixels), which ``image_info`` let out: one such file stopped
    the whole scan."""
    from medssl.data.scan import ScanOptions, scan_folder

    make(tmp_path / "bad.png")
    result = scan_folder(tmp_path, ScanOptions(salt=SALT, workers=1, progress=False))
    assert dict(result.errors)["bad.png"] == f"unreadable image file ({kind.__name__})"


# --- labels CSVs (``manifest scan --labels``: split/group/label/subject/modality/mask joined by path) ----------------

_LABELS_SEEDS: dict[str, tuple[dict[str, bytes], str]] = {}


def _labels_seeds() -> dict[str, tuple[dict[str, bytes], str]]:
    """Archives with a labels CSV: files (relative to the work folder) and the CSV's relative path.

    ``generated``: the DX/NIfTI/PNG seeds, a PNG label map (excluded from the scan), and a CSV beside the archive
    with every column; ``mednist``: three real MedNIST JPEGs with the first rows of the real labels.csv, inside the
    archive (as shipped), when ../shared/data is there.
    """
    if _LABELS_SEEDS:
        return _LABELS_SEEDS
    files = {f"archive/{fmt}/{rel}": data for fmt in ("dx", "nii", "png") for rel, data in _seeds()[fmt].items()}
    files["archive/masks/img.png"] = files["archive/png/img.png"]
    files["labels.csv"] = (
        b"path,split,group,label,subject,modality,mask\n"
        b"archive/dx/img.dcm,train,a,cat,person1,DX,\n"
        b"archive/nii/vol.nii,val,b,dog,person2,MR,\n"
        b"archive/png/img.png,test,a,cat,person3,,archive/masks/img.png\n"
    )
    _LABELS_SEEDS["generated"] = (files, "labels.csv")
    mednist = SHARED / "mednist-subset"
    if (mednist / "labels.csv").is_file():
        lines = (mednist / "labels.csv").read_text(encoding="utf-8").splitlines(keepends=True)
        rows = [lines[0], *(next(ln for ln in lines if ln.startswith(c)) for c in ("Hand/", "CXR/", "HeadCT/"))]
        real = {f"archive/{line.split(',', 1)[0]}": (mednist / line.split(",", 1)[0]).read_bytes() for line in rows[1:]}
        real["archive/labels.csv"] = "".join(rows).encode()
        _LABELS_SEEDS["mednist"] = (real, "archive/labels.csv")
    return _LABELS_SEEDS


def _labels_pipeline(work: Path, seed: str, data: bytes, outcomes: list[str]) -> None:
    from medssl.data.labelled import load_cases
    from medssl.data.row_transforms import join_labels
    from medssl.data.scan import ScanOptions, scan_folder

    files, labels_rel = _labels_seeds()[seed]
    for rel, content in files.items():
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).write_bytes(data if rel == labels_rel else content)
    root, labels = work / "archive", work / labels_rel
    exclude = ["masks/*", "labels.csv"]
    scanned = scan_folder(root, ScanOptions(salt=SALT, exclude=exclude, workers=1, progress=False))
    try:
        rows, warnings = join_labels(scanned.rows, labels, root, SALT)
    except DataError as exc:
        assert exc.path == str(labels) and exc.reason, exc
        outcomes.append(f"labels: DataError ({exc.reason.split(' (')[0]})")
    else:
        assert all(w.startswith(f"{labels}:") for w in warnings), warnings
        assert all(r.split in ("", "train", "val", "test") for r in rows)
        outcomes.append("labels: joined with warnings" if warnings else "labels: joined")
    out = work / "m.csv"
    argv = ["manifest", "scan", str(root), "--out", str(out), "--labels", str(labels), "--salt", SALT]
    code, _, err = _cli([*argv, *(f"--exclude={e}" for e in exclude), "--workers", "1", "--no-progress"])
    assert code in (0, 2) and "Traceback" not in err, (code, err)
    if code == 2:
        assert str(labels) in err, err
        return
    code, _, err = _cli(["manifest", "validate", str(out)])
    assert code in (0, 1) and "Traceback" not in err, (code, err)
    manifest = read_manifest(out)
    if any(row.mask for row in manifest.rows):  # what fine-tuning reads: every row a case or a named error
        cases, errors = load_cases(manifest, NATIVE, workers=1, progress=False)
        named = {e.path for e in errors}
        assert all(e.reason for e in errors)
        assert all(r.id in {c.id for c in cases} or {r.path, r.mask} & named for r in manifest.rows if r.mask)
        outcomes.append(f"finetune: {len(cases)} cases, {len(errors)} named errors")


LABELS_MUTATIONS = st.one_of(
    MANIFEST_MUTATIONS,
    st.tuples(st.just("duplicate_row"), _fraction, _BAD_VALUES),
    st.tuples(st.just("blank_lines"), _fraction, st.integers(1, 3)),
)


def mutate_rows(lines: list[str], mutation: tuple[str, Any, Any]) -> bytes:
    """Row-level mutations of a CSV (``duplicate_row``: a row again with its last field changed; ``blank_lines``),
    else :func:`mutate_manifest`."""
    kind, where, what = mutation
    if kind == "duplicate_row":
        table = list(csv.reader(lines))
        r = 1 + min(int(where * (len(table) - 1)), len(table) - 2)
        table.insert(r + 1, [*table[r][:-1], what])
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows(table)
        return buffer.getvalue().encode("utf-8", errors="surrogatepass")
    if kind == "blank_lines":
        i = 1 + min(int(where * (len(lines) - 1)), len(lines) - 1)
        return "".join([*lines[:i], "\n" * what, *lines[i:]]).encode()
    return mutate_manifest(lines, mutation)


@pytest.mark.parametrize(
    "seed",
    [
        "generated",
        pytest.param(
            "mednist",
            marks=pytest.mark.skipif(
                not (SHARED / "mednist-subset").is_dir(), reason=f"real data not available: {SHARED}/mednist-subset"
            ),
        ),
    ],
)
@FUZZ
@given(mutation=LABELS_MUTATIONS)
def test_mutated_labels_csv_is_joined_or_reported(seed: str, mutation: tuple[str, Any, Any]) -> None:
    files, labels_rel = _labels_seeds()[seed]
    data = mutate_rows(files[labels_rel].decode().splitlines(keepends=True), mutation)
    with tempfile.TemporaryDirectory(dir=FAST_TMP) as tmp:
        outcomes: list[str] = []
        _with_watchdog(lambda: _labels_pipeline(Path(tmp), seed, data, outcomes))
    for outcome in outcomes:
        event(outcome)


def _labels_case(tmp_path: Path, text: bytes) -> tuple[Path, list[Any]]:
    from medssl.data.scan import ScanOptions, scan_folder

    files, _ = _labels_seeds()["generated"]
    for rel, content in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(content)
    (tmp_path / "labels.csv").write_bytes(text)
    options = ScanOptions(salt=SALT, exclude=["masks/*"], workers=1, progress=False)
    return tmp_path / "labels.csv", scan_folder(tmp_path / "archive", options).rows


@pytest.mark.parametrize(
    ("text", "error", "warning"),
    [
        pytest.param(b"path,split\narchive/png/img.png,\xff\n", "not a UTF-8 text file", None, id="not-utf8"),
        pytest.param(
            b'path,split\narchive/png/img.png,"' + b"x" * 140_000 + b'"\n',
            "line 2: unreadable CSV (field larger than field limit",
            None,
            id="field-over-128KiB",
        ),
        pytest.param(b"split,path\ntrain\n", None, "the row has fewer fields than the header", id="row-without-path"),
        pytest.param(
            b"path,mask\narchive/png/img.png,archive/\x00.png\n",
            None,
            "the mask holds a NUL character",
            id="nul-in-mask",
        ),
        pytest.param(b"path,split\narchive/\x00.png,train\n", None, "the path holds a NUL character", id="nul-in-path"),
    ],
)
def test_unreadable_labels_csv_is_a_data_error_naming_it(
    tmp_path: Path, text: bytes, error: str | None, warning: str | None
) -> None:
    """Found by fuzzing: each of these stopped ``manifest scan --labels`` with an exception that did not name the
    labels file (UnicodeDecodeError, csv.Error, TypeError, ValueError from a NUL)."""
    from medssl.data.row_transforms import join_labels

    labels, rows = _labels_case(tmp_path, text)
    if error is not None:
        with pytest.raises(DataError) as caught:
            join_labels(rows, labels, tmp_path / "archive", SALT)
        assert caught.value.path == str(labels) and caught.value.reason.startswith(error), caught.value
        return
    _, warnings = join_labels(rows, labels, tmp_path / "archive", SALT)
    assert warnings and all(w.startswith(f"{labels}:2:") for w in warnings), warnings
    assert warning in warnings[0] and "\x00" not in "".join(warnings)


def test_labels_warnings_name_the_line_in_the_file(tmp_path: Path) -> None:
    """The line a record ends on, as the CSV reader counts it: right after blank lines and quoted newlines."""
    from medssl.data.row_transforms import join_labels

    labels, rows = _labels_case(tmp_path, b"path,split\n\narchive/png/img.png,bogus\n")
    _, warnings = join_labels(rows, labels, tmp_path / "archive", SALT)
    assert warnings == [f"{labels}:3: split 'bogus' is not train/val/test; ignored"]
    text = b'path,label,split\narchive/png/img.png,"two\nlines",val\narchive/dx/img.dcm,cat,bogus\n'
    labels, rows = _labels_case(tmp_path, text)
    _, warnings = join_labels(rows, labels, tmp_path / "archive", SALT)
    assert warnings == [f"{labels}:4: split 'bogus' is not train/val/test; ignored"]


def test_a_file_listed_twice_in_the_labels_is_a_warning_naming_both_lines(tmp_path: Path) -> None:
    """A path on two lines was overwritten silently (the last line won): it still wins, with a warning."""
    from medssl.data.row_transforms import join_labels

    text = b"path,split,label\narchive/png/img.png,train,cat\narchive/dx/img.dcm,val,\n./archive/png/img.png,test,dog\n"
    labels, rows = _labels_case(tmp_path, text)
    joined, warnings = join_labels(rows, labels, tmp_path / "archive", SALT)
    assert warnings == [f"{labels}:4: the same file as line 2; the values of line 4 are used"]
    png = next(r for r in joined if r.path == "png/img.png")
    assert (png.split, png.label) == ("test", "dog")


# --- segmentation masks (the manifest's ``mask`` column: a label map on the image's grid) ----------------------------

_MASK_SEEDS: dict[str, tuple[dict[str, bytes], list[Any]]] = {}


def _mask_seeds() -> dict[str, tuple[dict[str, bytes], list[Any]]]:
    """Images with label maps: files (relative to the manifest's root) and manifest rows.

    ``generated``: one MR volume (8x8x6, 2 mm slices) with three label maps of it (.nii uint8, .nii float32,
    .nii.gz int16) and a PNG image with a PNG label map; ``hippocampus``: a real MSD case (T1 crop and its label
    map, as shipped .nii.gz and decompressed .nii) when ../shared/data is there.
    """
    if _MASK_SEEDS:
        return _MASK_SEEDS
    from medssl.data.manifest import ManifestRow

    rng = np.random.default_rng(0)
    labels = np.zeros((6, 8, 8), dtype=np.uint8)  # [z, y, x]
    labels[2:4, 2:5, 3:6], labels[4, 5:7, 1:3] = 1, 2
    labels_2d = np.zeros((12, 10), dtype=np.uint8)
    labels_2d[3:6, 2:7] = 1
    with tempfile.TemporaryDirectory(dir=FAST_TMP) as tmp:
        root = Path(tmp)
        write_nifti(root / "vol.nii.gz", rng.normal(100, 10, (6, 8, 8)).astype(np.float32), spacing=(1.0, 1.0, 2.0))
        masks = {"m8.nii": labels, "m32.nii": labels.astype(np.float32), "mgz.nii.gz": labels.astype(np.int16)}
        for name, mask in masks.items():
            write_nifti(root / "labels" / name, mask, spacing=(1.0, 1.0, 2.0))
        write_png(root / "img.png", rng.integers(0, 255, (12, 10)).astype(np.uint8))
        write_png(root / "labels" / "m.png", labels_2d)
        files = {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    rows = [
        ManifestRow(
            id=f"v{i}",
            path="vol.nii.gz",
            format="nifti",
            dims=3,
            modality="MR",
            subject=f"s{i}",
            split="train",
            mask=f"labels/{name}",
        )
        for i, name in enumerate(masks)
    ]
    rows.append(ManifestRow(id="i0", path="img.png", format="image", dims=2, subject="s9", mask="labels/m.png"))
    _MASK_SEEDS["generated"] = (files, rows)
    hippocampus = SHARED / "msd-hippocampus"
    if (hippocampus / "labels" / "hippocampus_003.nii.gz").is_file():
        import gzip

        label = (hippocampus / "labels" / "hippocampus_003.nii.gz").read_bytes()
        files = {
            "images/h003.nii.gz": (hippocampus / "images" / "hippocampus_003.nii.gz").read_bytes(),
            "labels/h003.nii.gz": label,
            "labels/h003.nii": gzip.decompress(label),
        }
        rows = [
            ManifestRow(
                id=f"h{i}",
                path="images/h003.nii.gz",
                format="nifti",
                dims=3,
                modality="MR",
                subject="h003",
                split="train",
                mask=f"labels/h003.{suffix}",
            )
            for i, suffix in enumerate(("nii.gz", "nii"))
        ]
        _MASK_SEEDS["hippocampus"] = (files, rows)
    return _MASK_SEEDS


def test_mask_seeds_load_clean(tmp_path: Path) -> None:
    """The seeds' cases all load: a mutation is what makes a mask bad."""
    for seed in _mask_seeds():
        outcomes: list[str] = []
        _mask_pipeline(tmp_path / seed, seed, "", b"", outcomes)
        rows = len(_mask_seeds()[seed][1])
        assert outcomes == [f"{rows} of {rows} cases loaded"] * 2, outcomes


def _mask_pipeline(work: Path, seed: str, target: str, data: bytes, outcomes: list[str]) -> None:
    from medssl.data.labelled import load_cases
    from medssl.data.manifest import write_manifest

    files, rows = _mask_seeds()[seed]
    rows = [r for r in rows if r.mask == target or not target]  # the mutated mask's case (all for the seed check)
    for rel, content in files.items():
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).write_bytes(data if rel == target else content)
    write_manifest(work / "labelled.csv", rows, work)
    report = validate_manifest(work / "labelled.csv")
    assert all(report.errors), report.errors
    manifest = read_manifest(work / "labelled.csv")
    for config in (NATIVE, RESAMPLED):
        cases, errors = load_cases(manifest, config, workers=1, progress=False)
        reasons = {e.path: e.reason for e in errors}
        assert all(reasons.values()) and len(reasons) == len(errors), errors
        assert set(reasons) <= {target} - {""}, f"a file that was not mutated failed: {errors}"  # named by its mask
        loaded = {c.id for c in cases}
        assert all(r.id in loaded or r.mask in reasons for r in rows), (loaded, reasons)
        for case in cases:
            assert case.mask.dtype == np.int64 and case.mask.shape == case.image.shape[1:]
            assert case.mask.min() >= 0 and np.isfinite(case.image).all()
        outcomes.extend(f"mask: {reason}" for reason in reasons.values())
        outcomes.append(f"{len(cases)} of {len(rows)} cases loaded")


@pytest.mark.parametrize(
    "seed",
    [
        "generated",
        pytest.param(
            "hippocampus",
            marks=pytest.mark.skipif(
                not (SHARED / "msd-hippocampus").is_dir(), reason=f"real data not available: {SHARED}/msd-hippocampus"
            ),
        ),
    ],
)
@FUZZ
@given(mutation=MUTATIONS, pick=_fraction)
@example(mutation=("header", 0.7, b"\x00" * 8), pick=0.25)  # found: a zero affine axis raised OrientationError
@example(mutation=("flip", [0.9], 0x7F), pick=0.25)  # found: a float label of 3e38 became class -2**63
def test_mutated_masks_are_loaded_or_named(seed: str, mutation: tuple[str, Any, Any], pick: float) -> None:
    files, rows = _mask_seeds()[seed]
    masks = sorted({r.mask for r in rows})
    target = masks[min(int(pick * len(masks)), len(masks) - 1)]
    data = mutate(files[target], mutation)
    with tempfile.TemporaryDirectory(dir=FAST_TMP) as tmp:
        outcomes: list[str] = []
        _with_watchdog(lambda: _mask_pipeline(Path(tmp), seed, target, data, outcomes))
    for outcome in outcomes:
        event(outcome)


@pytest.mark.parametrize(
    ("name", "labels", "reason"),
    [
        ("shape", np.zeros((5, 8, 8), np.uint8), "mask shape (8, 8, 5) differs from its image's (8, 8, 6)"),
        ("fraction", np.full((6, 8, 8), 0.5, np.float32), "mask values must be non-negative integers"),
        ("negative", np.full((6, 8, 8), -1, np.int16), "mask values must be non-negative integers"),
        ("nan", np.full((6, 8, 8), np.nan, np.float32), "voxel(s) are NaN or infinite"),
        ("huge", np.full((6, 8, 8), 3e38, np.float32), "mask values must be class indices up to 2147483647"),
        ("4d", np.zeros((2, 6, 8, 8), np.uint8), "4D NIfTI"),
        ("truncated", None, "truncated or corrupt NIfTI data"),
        ("flat", None, "NIfTI affine has a zero or non-finite axis"),
        ("empty", None, "every dimension must be positive"),
    ],
)
def test_bad_masks_are_named_with_a_reason(tmp_path: Path, name: str, labels: np.ndarray | None, reason: str) -> None:
    """Each kind of bad label map, made on purpose: the case is skipped and the mask named, never a traceback."""
    import nibabel as nib

    from medssl.data.labelled import load_cases
    from medssl.data.manifest import ManifestRow, write_manifest

    files, _ = _mask_seeds()["generated"]
    for rel in ("vol.nii.gz", "labels/m8.nii"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(files[rel])
    mask = tmp_path / "labels" / f"{name}.nii"
    if labels is not None:
        nib.Nifti1Image(labels.T, np.diag([1.0, 1.0, 2.0, 1.0])).to_filename(mask)
    else:
        data = bytearray(files["labels/m8.nii"])
        if name == "truncated":
            data = data[:-100]
        elif name == "flat":
            data[280:296] = bytes(16)  # srow_x: no x axis
        else:
            data[46:48] = (0).to_bytes(2, "little")  # dim[2] = 0
        mask.write_bytes(bytes(data))
    rows = [
        ManifestRow(id=i, path="vol.nii.gz", format="nifti", dims=3, modality="MR", mask=f"labels/{m}")
        for i, m in (("good", "m8.nii"), ("bad", mask.name))
    ]
    write_manifest(tmp_path / "m.csv", rows, tmp_path)
    cases, errors = load_cases(read_manifest(tmp_path / "m.csv"), NATIVE, workers=1, progress=False)
    assert [c.id for c in cases] == ["good"]
    assert [e.path for e in errors] == [f"labels/{mask.name}"] and reason in errors[0].reason, errors


# --- the path map (``<manifest>.paths.csv``: the archive root and key -> relative path) ------------------------------

MAP_MUTATIONS = st.one_of(
    MANIFEST_MUTATIONS,  # cells (keys and paths: escaping, absolute, empty, NUL, ...), columns, rows, bytes
    st.tuples(st.just("drop_line"), _fraction, st.none()),  # the magic line, the root line, the header, an entry
    st.tuples(st.just("duplicate_line"), _fraction, st.none()),  # a duplicate key, a second root line
    st.tuples(st.just("root"), st.none(), _BAD_VALUES),
    st.tuples(st.just("duplicate_row"), _fraction, _BAD_VALUES),  # a key mapped twice
)


_SCANNED: dict[str, bytes] = {}


def _scanned_seed() -> dict[str, bytes]:
    """:func:`_manifest_seed` once: every file it wrote, relative path -> bytes (the manifest names its map, and the
    map its root, relative to their own folder: they can be written anywhere)."""
    if not _SCANNED:
        with tempfile.TemporaryDirectory(dir=FAST_TMP) as tmp:
            _manifest_seed(Path(tmp))
            _SCANNED.update(
                {p.relative_to(tmp).as_posix(): p.read_bytes() for p in Path(tmp).rglob("*") if p.is_file()}
            )
    return _SCANNED


def mutate_map(lines: list[str], mutation: tuple[str, Any, Any]) -> bytes:
    kind, where, what = mutation
    if kind in ("drop_line", "duplicate_line"):
        i = min(int(where * len(lines)), len(lines) - 1)
        lines = [*lines[: i + 1], lines[i], *lines[i + 1 :]] if kind == "duplicate_line" else lines[:i] + lines[i + 1 :]
        return "".join(lines).encode()
    if kind == "root":
        return "".join(f"# root: {what}\n" if ln.startswith("# root:") else ln for ln in lines).encode(
            "utf-8", "replace"
        )
    if kind == "duplicate_row":
        comments = [ln for ln in lines if ln.startswith("#")]
        return "".join(comments).encode() + mutate_rows([ln for ln in lines if not ln.startswith("#")], mutation)
    return mutate_manifest(lines, mutation)


def _map_pipeline(work: Path, data: bytes, private: list[str], outcomes: list[str]) -> None:
    map_file, manifest = work / "m.paths.csv", work / "m.csv"
    map_file.write_bytes(data)
    error: str | None = None
    try:
        path_map = read_path_map(map_file)
    except ManifestError as exc:
        error = str(exc)
        assert error.startswith(str(map_file)), f"the message does not name the map: {error}"
        outcomes.append(f"map: {error.removeprefix(str(map_file)).split(' (')[0].lstrip(':0123456789 ')}")
    else:
        assert all(p and root_escape(p) is None and "\x00" not in p for p in path_map.paths.values())
        text = io.StringIO(data.decode(), newline="")  # lines as the reader splits them
        records = list(csv.DictReader(ln for ln in text if not ln.startswith("#")))
        keys = [r["key"] for r in records]
        assert all(keys) and len(set(keys)) == len(keys), "a key that is empty or mapped twice was read"
        outcomes.append("map: read")
    try:
        report = validate_manifest(manifest)
    except ManifestError as exc:
        assert error is not None and str(exc) == error, (error, exc)
    else:
        assert error is None and all(report.errors), report.errors
    code, out, err = _cli(["manifest", "validate", str(manifest)])
    assert code in (0, 1, 2) and "Traceback" not in err, (code, err)
    printed = (out + err).replace(str(work), "")
    assert not [p for p in private if p in printed], f"validate quotes an entry of the map: {printed}"
    if error is not None:
        assert code == 2 and str(map_file) in err, (code, err)
        return
    try:
        _check_cache(work / "cache", manifest, outcomes)
    except DataError as exc:  # the map's root is not a folder (a file, a name too long, ...)
        outcomes.append(f"cache: DataError ({exc.reason})")


@FUZZ
@given(mutation=MAP_MUTATIONS)
@example(mutation=("bytes", (0.5, 0.0), b"\xff"))  # found: not UTF-8 raised UnicodeDecodeError (not naming the map)
@example(mutation=("duplicate_line", 0.99, None))  # found: a key mapped twice was read silently, the last one won
@example(mutation=("cell", (0.0, 0.0), ""))  # found: an empty key was read silently
@example(mutation=("root", None, "\x00"))  # found: a NUL in the root raised ValueError in validate
@example(mutation=("cell", (0.0, 0.99), "x" * 140_000))  # found: csv.Error (field limit) escaped as a traceback
def test_mutated_path_map_is_read_or_named(mutation: tuple[str, Any, Any]) -> None:
    seed = _scanned_seed()
    lines = seed["m.paths.csv"].decode().splitlines(keepends=True)
    private = [row[1] for row in csv.reader(lines[3:])]  # the relative paths: never in a message
    data = mutate_map(lines, mutation)
    with tempfile.TemporaryDirectory(dir=FAST_TMP) as tmp:
        work = Path(tmp)
        for rel, content in seed.items():
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            (work / rel).write_bytes(content)
        outcomes: list[str] = []
        _with_watchdog(lambda: _map_pipeline(work, data, private, outcomes))
    for outcome in outcomes:
        event(outcome)


_MAP_HEAD = b"# medssl-paths v1\n# root: .\nkey,path\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (_MAP_HEAD + b"p1,a.png\n\xff\n", r"m\.paths\.csv: not a UTF-8 text file"),
        (_MAP_HEAD + b"p1,a.png\np1,b.png\n", r"m\.paths\.csv:5: the key on this line is also on line 4"),
        (_MAP_HEAD + b",a.png\n", r"m\.paths\.csv:4: empty key"),
        (_MAP_HEAD + b"p1\n", r"m\.paths\.csv:4: the row has fewer fields than the header"),
        (_MAP_HEAD + b"\n# note\np1,../a.png\n", r"m\.paths\.csv:6: paths must be relative to the root"),
        (_MAP_HEAD + b"p1,/etc/a.png\n", r"m\.paths\.csv:4: paths must be relative to the root"),
        (_MAP_HEAD + b"p1,a\x00.png\n", r"m\.paths\.csv:4: paths must be relative to the root"),
        (_MAP_HEAD + b'p1,"' + b"x" * 140_000 + b'"\n', r"m\.paths\.csv:4: unreadable CSV \(field larger"),
        (b"# medssl-paths v1\n# root: .\nkey\np1\n", r"m\.paths\.csv: a path map needs the columns key,path"),
        (b"# medssl-paths v1\nkey,path\np1,a.png\n", r"m\.paths\.csv: no '# root:' line"),
        (b"# medssl-paths v1\n# root: a\x00\nkey,path\n", r"m\.paths\.csv: the '# root:' line holds a NUL"),
        (b"key,path\np1,a.png\n", r"m\.paths\.csv: not a medssl path map"),
        (b"# medssl-paths v1\n# root: .\npath,key\na.png,p1\n", None),  # columns in another order: fine
    ],
)
def test_bad_path_map_is_a_manifest_error_naming_it(tmp_path: Path, text: bytes, message: str | None) -> None:
    map_file = tmp_path / "m.paths.csv"
    map_file.write_bytes(text)
    if message is None:
        assert dict(read_path_map(map_file).paths) == {"p1": "a.png"}
        return
    with pytest.raises(ManifestError, match=message) as caught:
        read_path_map(map_file)
    assert "a.png" not in str(caught.value)  # never quotes an entry


# --- file and folder names: control characters, quotes, CSV separators, non-ASCII -------------------------------------

# Linux allows every character in a name but "/" and NUL; these are the ones a CSV writer or a terminal trips on
# ("a\rb.png" once cut its path-map entry in two, commit 4fae8e0).
_TRICKY = "\r\n\t\x0b\x0c\x1b\x7f\x85\u2028\u202e\"',;= é"
_NAME = st.text(
    st.sampled_from(list(_TRICKY)) | st.characters(blacklist_categories=("Cs",), blacklist_characters="/\x00"),
    min_size=1,
    max_size=10,
).filter(lambda name: not name.startswith(".") and len(name.encode()) < 200)  # a leading dot: hidden, skipped
_IMAGE_PATHS = st.lists(
    st.tuples(st.lists(_NAME, max_size=2), _NAME).map(lambda t: "/".join([f"{f}_d" for f in t[0]] + [f"{t[1]}.png"])),
    min_size=1,
    max_size=4,
    unique=True,
)


def _names_pipeline(work: Path, images: list[str], bad: str) -> None:
    root = work / "archive"
    rng = np.random.default_rng(0)
    for rel in images:
        write_png(root / rel, rng.integers(0, 255, (12, 12), dtype=np.uint8))
    (root / bad).parent.mkdir(parents=True, exist_ok=True)
    (root / bad).write_bytes(b"not a PNG")
    labels = {rel: f"L{i}" for i, rel in enumerate(images)}
    buffer = io.StringIO()  # RFC 4180 lines ending "\r\n", as spreadsheets write them (a bare "\r" is quoted)
    csv.writer(buffer).writerows([("path", "label"), *((f"archive/{p}", v) for p, v in labels.items())])
    (work / "labels.csv").write_text(buffer.getvalue(), encoding="utf-8", newline="")
    out = work / "m.csv"
    argv = ["manifest", "scan", str(root), "--out", str(out), "--labels", str(work / "labels.csv"), "--salt", SALT]
    code, stdout, err = _cli([*argv, "--workers", "1", "--no-progress"])
    assert code == 0, (code, err)
    for name in [*images, bad]:  # the console names files by count and reason, never by (possibly escaping) name
        assert name not in stdout + err
    path_map = read_path_map(work / "m.paths.csv").paths
    assert sorted(path_map.values()) == sorted([*images, bad]), "a file's path-map entry is not its name"
    with open(work / "m.errors.csv", newline="", encoding="utf-8") as handle:
        assert [path_map[r["path"]] for r in csv.DictReader(handle)] == [bad]
    manifest = read_manifest(out)
    assert {path_map[r.path]: r.label for r in manifest.rows} == labels
    code, _, err = _cli(["manifest", "validate", str(out)])
    assert code == 0, (code, err)
    report = build_cache(manifest, work / "cache", PreprocessConfig(), workers=1, progress=False)
    assert not report.errors
    assert set(open_cache(manifest, work / "cache", PreprocessConfig())) == {r.id for r in manifest.rows}


@FUZZ
@given(images=_IMAGE_PATHS, bad=_NAME.map(lambda name: f"{name}.png"))
@example(images=["a\rb.png", 'q"_d/x,\n.png'], bad="\x1b[2J.png")
@example(images=["0.png"], bad="\\.png")  # found: a Linux file named "\\.png" was refused as absolute; the scan stopped
def test_file_and_folder_names_with_control_characters_round_trip(images: list[str], bad: str) -> None:
    """Every file is in the path map under its exact name, its label joins, the bad file is reported by key, the
    manifest validates and caches: whatever the characters of its name and of its folders' names."""
    if bad in images:
        bad = "0" + bad
    with tempfile.TemporaryDirectory(dir=FAST_TMP) as tmp:
        _with_watchdog(lambda: _names_pipeline(Path(tmp), images, bad))
