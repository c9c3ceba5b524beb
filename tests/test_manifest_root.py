"""A manifest row cannot name a file outside the manifest's root: absolute paths and ``..`` are refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medssl.data.cache import build_cache
from medssl.data.manifest import (
    ManifestRow,
    RootEscapeError,
    read_manifest,
    resolve_under_root,
    validate_manifest,
    write_manifest,
)
from medssl.data.preprocess import PreprocessConfig


@pytest.mark.parametrize(
    ("relative", "reason"),
    [
        ("../secret.png", "'..' component"),
        ("a/../../secret.png", "'..' component"),
        ("..", "'..' component"),
        ("/etc/passwd", "absolute path"),
    ],
)
def test_paths_that_could_leave_the_root_are_refused(tmp_path, relative, reason):
    with pytest.raises(RootEscapeError, match=reason) as caught:
        resolve_under_root(tmp_path, relative, tmp_path / "m.csv")
    assert str(caught.value).startswith(f"{relative}: refused") and str(tmp_path / "m.csv") in str(caught.value)


WINDOWS_ONLY_ESCAPES = [
    ("a\\..\\..\\secret.png", "a path with a '..' component"),
    ("C:\\Windows\\x.png", "an absolute path"),
    ("C:x.png", "an absolute path"),
    ("\\\\server\\share\\x.png", "an absolute path"),
    ("\\x.png", "an absolute path"),
]


@pytest.mark.parametrize(("relative", "reason"), WINDOWS_ONLY_ESCAPES)
def test_backslashes_and_drives_leave_the_root_on_windows_only(tmp_path, relative, reason):
    """Windows reads a backslash as a separator and ``C:`` as a drive; POSIX reads both as characters of one name (a
    Linux archive may hold a file called ``\\x.png``), which stays under the root. Each machine checks by its own
    rules."""
    from medssl.data.pathmap import WINDOWS_PATHS, root_escape

    assert root_escape(relative, windows=True) == reason
    assert root_escape(relative, windows=False) is None
    if WINDOWS_PATHS:
        with pytest.raises(RootEscapeError, match=reason):
            resolve_under_root(tmp_path, relative, tmp_path / "m.csv")
    else:
        inside = resolve_under_root(tmp_path, relative, tmp_path / "m.csv")
        assert inside == tmp_path / relative and inside.parent == tmp_path


@pytest.mark.parametrize("relative", ["a.png", "sub/dir/b.nii.gz", "a..b/c..png", "./a.png"])
def test_paths_under_the_root_resolve(tmp_path, relative):
    assert resolve_under_root(tmp_path, relative) == tmp_path / relative


@pytest.fixture
def escaping_manifest(tmp_path: Path) -> tuple[Path, Path]:
    """``data/inside.png`` and ``outside.png`` beside ``data``; a manifest rooted at ``data`` that names both, the
    second as ``../outside.png`` and by its absolute path."""
    data = tmp_path / "data"
    data.mkdir()
    image = np.tile(np.arange(32, dtype=np.uint8) * 8, (32, 1))
    for path in (data / "inside.png", tmp_path / "outside.png"):
        Image.fromarray(image).save(path)
    rows = [
        ManifestRow(id=f"r{i}", path=name, format="image", dims=2, subject=f"s{i}", shape=(32, 32), spacing=(1.0, 1.0))
        for i, name in enumerate(["inside.png", "../outside.png", str(tmp_path / "outside.png")])
    ]
    manifest = tmp_path / "m.csv"
    write_manifest(manifest, rows, data)
    return manifest, tmp_path


def test_validate_reports_each_row_that_leaves_the_root(escaping_manifest):
    manifest, folder = escaping_manifest
    report = validate_manifest(manifest)
    assert not report.ok
    refused = [e for e in report.errors if "refused" in e]
    assert len(refused) == 2
    assert refused[0].startswith("line 3 (../outside.png)") and "'..' component" in refused[0]
    assert refused[1].startswith(f"line 4 ({folder / 'outside.png'})") and "absolute path" in refused[1]
    assert all(str(manifest) in e for e in refused)


def test_files_outside_the_root_are_never_read(escaping_manifest):
    manifest, folder = escaping_manifest
    read = read_manifest(manifest)
    assert read.resolve(read.rows[0]) == folder / "data" / "inside.png"
    with pytest.raises(RootEscapeError, match=r"\.\./outside\.png: refused"):
        read.resolve(read.rows[1])
    report = build_cache(read, folder / "cache", PreprocessConfig(), workers=1, progress=False)
    assert report.built == 1  # only the row inside the root
    assert len(report.errors) == 2 and all("refused" in reason for _, reason in report.errors)
