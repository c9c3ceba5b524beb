"""Progress reports: a tqdm bar on a terminal, complete lines at a fixed rate in a log file."""

from __future__ import annotations

import io

import pytest
from tqdm import tqdm

from medssl.runtime.progress import SECONDS_VARIABLE, LineProgress, progress, progress_seconds
from tests.test_cache import make_archive


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def lines_of(text: str) -> list[str]:
    assert "\r" not in text, "a log file gets no carriage return"
    assert text.endswith("\n"), "every line is complete"
    return text.splitlines()


def test_a_log_file_gets_a_line_every_interval_and_a_final_line():
    stream, clock = io.StringIO(), Clock()
    bar = progress(range(100), desc="scan", unit="file", file=stream, interval=30, clock=clock)
    assert isinstance(bar, LineProgress)
    for i in bar:
        clock.now += 1  # one file a second
        if i == 49:
            bar.set_postfix(loss=0.123456, refresh=False)
    assert lines_of(stream.getvalue()) == [
        "scan: 30/100 files (30%), elapsed 00:30, 1.00 files/s, eta 01:10",
        "scan: 60/100 files (60%), elapsed 01:00, 1.00 files/s, eta 00:40, loss=0.123",
        "scan: 90/100 files (90%), elapsed 01:30, 1.00 files/s, eta 00:10, loss=0.123",
        "scan: 100/100 files (100%), elapsed 01:40, 1.00 files/s, eta 00:00, loss=0.123",
    ]


def test_nothing_between_intervals_and_no_repeated_final_line():
    stream, clock = io.StringIO(), Clock()
    with progress(total=4, desc="preprocess", unit="item", file=stream, interval=30, clock=clock) as bar:
        for _ in range(3):
            clock.now += 5
            bar.update()
        assert stream.getvalue() == "", "no line before the interval has passed"
        clock.now += 25
        bar.update()
        assert lines_of(stream.getvalue()) == ["preprocess: 4/4 items (100%), elapsed 00:40, 10.0 s/item, eta 00:00"]
    assert len(lines_of(stream.getvalue())) == 1, "close does not repeat the line that already says it all"
    bar.close()
    assert len(lines_of(stream.getvalue())) == 1


def test_the_trainer_api_total_refresh_resume_and_write(capsys):
    stream, clock = io.StringIO(), Clock()
    bar = progress(total=1000, initial=400, desc="run", unit="step", file=stream, interval=60, clock=clock)
    clock.now += 50
    bar.update(100)
    bar.total = 2000  # calibrated length
    bar.refresh()
    assert stream.getvalue() == "", "refresh prints only when a line is due"
    bar.write("run: a warning")
    clock.now += 50
    bar.set_postfix(loss="1.2345", samples_s="12.5")
    bar.close()
    assert lines_of(stream.getvalue()) == [
        "run: 500/2000 steps (25%), elapsed 01:40, 1.00 steps/s, eta 25:00, loss=1.2345, samples_s=12.5"
    ], "the rate counts from the resumed step"
    assert capsys.readouterr().out == "run: a warning\n", "write prints like tqdm.write (standard output)"


def test_without_a_total_and_with_nothing_to_do():
    stream, clock = io.StringIO(), Clock()
    bar = progress(iter("abc"), desc="walk", unit="file", file=stream, clock=clock)
    clock.now += 2
    assert list(bar) == ["a", "b", "c"]
    assert lines_of(stream.getvalue()) == ["walk: 3 files, elapsed 00:02, 1.50 files/s"]
    empty = io.StringIO()
    progress(total=0, desc="preprocess", file=empty, clock=clock).close()
    assert empty.getvalue() == "", "no line for a stage with nothing to do"


def test_the_interval_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(SECONDS_VARIABLE, raising=False)
    assert progress_seconds() == 30
    monkeypatch.setenv(SECONDS_VARIABLE, "5")
    assert progress_seconds() == 5
    assert progress(total=1, desc="x", file=io.StringIO()).interval == 5
    monkeypatch.setenv(SECONDS_VARIABLE, "soon")
    with pytest.raises(ValueError, match=f"{SECONDS_VARIABLE} must be a number of seconds >= 0, got 'soon'"):
        progress_seconds()


def test_a_terminal_gets_tqdm_and_disabled_progress_prints_nothing():
    terminal = Terminal()
    bar = progress(range(3), desc="scan", unit="file", file=terminal)
    assert isinstance(bar, tqdm)
    assert list(bar) == [0, 1, 2]
    assert "3/3" in terminal.getvalue()
    quiet = io.StringIO()
    off = progress(range(3), desc="scan", file=quiet, enabled=False)
    assert isinstance(off, tqdm) and off.disable
    assert list(off) == [0, 1, 2]
    off.update()
    off.set_postfix(loss=1.0)
    off.close()
    assert quiet.getvalue() == ""


def test_scan_and_cache_build_write_lines_to_a_log(tmp_path, capsys, monkeypatch):
    from medssl.data.cache import build_cache
    from medssl.data.manifest import read_manifest, write_manifest
    from medssl.data.preprocess import PreprocessConfig
    from medssl.data.scan import ScanOptions, scan_folder

    monkeypatch.setenv(SECONDS_VARIABLE, "0")  # a line at every update
    root = make_archive(tmp_path / "data")
    result = scan_folder(root, ScanOptions(salt="test", workers=1))
    write_manifest(tmp_path / "m.csv", result.rows, root)
    build_cache(read_manifest(tmp_path / "m.csv"), tmp_path / "cache", PreprocessConfig(), workers=1)
    lines = lines_of(capsys.readouterr().err)
    # the scan counts without a total (one walk of the tree), the cache build knows its items
    scanned = [line for line in lines if line.startswith("scan: ")]
    assert [line.split(",")[0] for line in scanned] == [f"scan: {k} files" for k in range(1, 6)]
    assert "elapsed" in scanned[-1] and "%" not in scanned[-1] and "eta" not in scanned[-1]
    for stage, unit in (("hash", "items"), ("preprocess", "items")):
        shown = [line for line in lines if line.startswith(f"{stage}: ")]
        assert [line.split(" (")[0] for line in shown] == [f"{stage}: {k}/5 {unit}" for k in range(1, 6)]
        assert "(100%)" in shown[-1] and "elapsed" in shown[-1] and "eta 00:00" in shown[-1]
    # --no-progress
    build_cache(read_manifest(tmp_path / "m.csv"), tmp_path / "cache2", PreprocessConfig(), workers=1, progress=False)
    scan_folder(root, ScanOptions(salt="test", workers=1, progress=False))
    assert capsys.readouterr().err == ""
