"""Fuzzing (issue 18): mutated DICOM, NIfTI, PNG/JPEG files and manifest CSVs through scan, validate and cache build.

Every case runs under a watchdog (no hang); the properties are: no uncaught exception, every bad file named in the
errors with a reason, the CLI answers with an exit code (never a traceback), and the cache holds no partial entry.
Hypothesis runs derandomized so CI is deterministic.
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

hypothesis = pytest.importorskip("hypothesis")
from factories import random_volume, write_dicom_2d, write_dicom_series, write_jpeg, write_nifti, write_png  # noqa: E402
from hypothesis import HealthCheck, event, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from medssl.cli import main  # noqa: E402
from medssl.data.cache import build_cache  # noqa: E402
from medssl.data.errors import DataError, ManifestError  # noqa: E402
from medssl.data.manifest import read_manifest, validate_manifest  # noqa: E402
from medssl.data.pathmap import read_path_map  # noqa: E402
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
    with tempfile.TemporaryDirectory() as tmp:
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
    index = __import__("json").loads(report.index_path.read_text())["entries"]
    for row in manifest.rows:
        assert row.id in index or row.path in named, f"row {row.id} neither cached nor reported"
    leftovers = [p.name for p in report.directory.rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers, f"temporary files left in the cache: {leftovers}"
    npy = {p.stem for p in report.directory.glob("*.npy")}
    meta = {p.stem for p in report.directory.glob("*.json") if p.name != "settings.json"}
    assert npy == meta, f"partial cache entries: {sorted(npy ^ meta)}"
    for key in index.values():
        assert key in meta, f"index names entry {key} that is not in the cache"


def _pipeline(work: Path, fmt: str, target: str, data: bytes, outcomes: list[str]) -> None:
    root = work / "archive"
    for rel, seed in _seeds()[fmt].items():
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
    with tempfile.TemporaryDirectory() as tmp:
        outcomes: list[str] = []
        _with_watchdog(lambda: _pipeline(Path(tmp), fmt, target, data, outcomes))
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
    with tempfile.TemporaryDirectory() as tmp:
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
