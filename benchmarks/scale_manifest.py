"""Scale benchmark: a generated archive of N files scanned, validated, cached and streamed; seconds and peak RSS vs N.

Usage (from the repository root)::

    .venv/bin/python benchmarks/scale_manifest.py --rows 1000,10000,100000 --update BENCHMARKS.md

For every N the archive is N hard links (``os.link``: no disk) to a handful of small real files (PNG images and
NIfTI volumes written here with numpy, PIL and nibabel), in nested ``site/patient/study`` folders like a real
archive. Phases, each in a fresh (spawned) process so that its peak RSS is its own (the process's ``VmHWM``, or its
children's ``ru_maxrss`` if larger; the process's own ``ru_maxrss`` would start at its parent's peak):

* ``scan``: :func:`medssl.data.scan.scan_archive` (what ``medssl manifest scan`` runs): the keyed manifest, its
  errors CSV and the private path map, the rows streamed from the walk through the external sort into key order;
* ``validate``: :func:`medssl.data.manifest.validate_manifest` with file checks (``medssl manifest validate``);
* ``cache``: :func:`medssl.data.cache.build_cache` over the N rows, read as ``medssl manifest preprocess`` reads them
  (``read_manifest(..., hold_rows=False)``: passed over from the file, not held). The cache is content-keyed and file
  digests are memoised by inode, so the hard links are hashed once and N-5 rows reuse the 5 built entries: this
  measures the per-row work (resolve, stat, index) that scales with N, not preprocessing;
* ``stream``: what the trainer's 2D stream does (:func:`medssl.train.pipeline.prepare_data` without the build):
  read the manifest, open the cache index (``cached_items``), build the :class:`MultiCropSliceDataset` index and an
  epoch of shuffled global batches, then load a fixed number of samples through a ``DataLoader`` (0 workers).

``start MiB`` is the phase process's RSS after its imports, before any work, so ``peak - start`` is what the phase
itself holds; "growth per 10k rows" is the slope of the peak between the smallest and the largest N.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from _isolated import run_isolated
from _report import update_section

PHASES = ("scan", "validate", "cache", "stream")
SUBJECT_PATTERN = r"patient\d+"
FILES_PER_STUDY = 10
STUDIES_PER_PATIENT = 2
PATIENTS_PER_SITE = 500


def _status_mib(field: str) -> float:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in MiB; 0 where there is no ``/proc``."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(f"{field}:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return 0.0


def _rss_mib() -> float:
    """Current resident set size of this process in MiB."""
    return _status_mib("VmRSS")


def _peak_mib() -> float:
    """Peak RSS in MiB of this process or of any of its children, whichever is larger.

    The process's own peak is ``VmHWM`` where Linux has it: ``ru_maxrss`` of a spawned process starts at its
    parent's peak (the kernel carries it over ``exec``), which would put a floor under small phases.
    """
    own = _status_mib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return round(max(own, children), 1)


def make_sources(folder: Path) -> list[Path]:
    """Five small real files: three 64x64 PNGs and two 32x32x12 NIfTI volumes with a bright sphere."""
    import nibabel as nib
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    sources = []
    for i in range(3):
        pixels = (rng.random((64, 64)) * 80 + 40 * i).astype(np.uint8)
        path = folder / f"source{i}.png"
        Image.fromarray(pixels).save(path)
        sources.append(path)
    grid = np.stack(np.meshgrid(*(np.linspace(-1, 1, n) for n in (32, 32, 12)), indexing="ij"))
    for i in range(2):
        volume = (np.sqrt((grid**2).sum(0)) < 0.8 - 0.1 * i) * 500.0 + rng.random((32, 32, 12)) * 20
        path = folder / f"source{i}.nii.gz"
        nib.save(nib.Nifti1Image(volume.astype(np.float32), np.diag([1.0, 1.0, 2.0, 1.0])), path)
        sources.append(path)
    return sources


def make_archive(root: Path, sources: Sequence[Path], rows: int) -> float:
    """``rows`` hard links to ``sources`` (round robin) under ``root/siteS/patientP/studyT/``; returns seconds."""
    start = time.perf_counter()
    per_patient = FILES_PER_STUDY * STUDIES_PER_PATIENT
    made: set[Path] = set()
    for i in range(rows):
        patient, within = divmod(i, per_patient)
        study, index = divmod(within, FILES_PER_STUDY)
        folder = root / f"site{patient // PATIENTS_PER_SITE:02d}" / f"patient{patient:06d}" / f"study{study}"
        if folder not in made:
            folder.mkdir(parents=True, exist_ok=True)
            made.add(folder)
        source = sources[i % len(sources)]
        suffix = ".nii.gz" if source.name.endswith(".nii.gz") else source.suffix
        os.link(source, folder / f"image{index:02d}{suffix}")
    return time.perf_counter() - start


def phase_scan(folder: str, manifest: str, workers: int) -> dict[str, Any]:
    """``medssl manifest scan``: scan the archive, write the keyed manifest, errors CSV and path map."""
    import re

    from medssl.data.scan import ScanOptions, scan_archive

    start_mib = _rss_mib()
    start = time.perf_counter()
    options = ScanOptions(
        salt="benchmark", subject_pattern=re.compile(SUBJECT_PATTERN), modality="MR", workers=workers, progress=False
    )
    report = scan_archive(Path(folder), options, Path(manifest))
    seconds = time.perf_counter() - start
    return {
        "rows": report.rows["rows"],
        "errors": sum(report.errors.values()),
        "seconds": seconds,
        "start_mib": start_mib,
        "peak_mib": _peak_mib(),
    }


def phase_validate(manifest: str) -> dict[str, Any]:
    """``medssl manifest validate``: columns, values, files through the path map, duplicates, split leakage."""
    from medssl.data.manifest import validate_manifest

    start_mib = _rss_mib()
    start = time.perf_counter()
    report = validate_manifest(Path(manifest), check_files=True)
    seconds = time.perf_counter() - start
    return {
        "rows": int(report.summary.get("rows", 0) or 0) if isinstance(report.summary, dict) else 0,
        "errors": len(report.errors),
        "warnings": len(report.warnings),
        "seconds": seconds,
        "start_mib": start_mib,
        "peak_mib": _peak_mib(),
    }


def phase_cache(manifest: str, cache: str) -> dict[str, Any]:
    """``build_cache`` over the manifest's rows (hard links: 5 entries built, the other rows reuse them)."""
    from medssl.data.cache import build_cache
    from medssl.data.manifest import read_manifest
    from medssl.data.preprocess import PreprocessConfig

    start_mib = _rss_mib()
    start = time.perf_counter()
    manifest_rows = read_manifest(manifest, hold_rows=False)  # as `medssl manifest preprocess` reads it
    report = build_cache(manifest_rows, Path(cache), PreprocessConfig(), workers=1, progress=False)
    seconds = time.perf_counter() - start
    return {
        "rows": len(manifest_rows.rows),
        "built": report.built,
        "reused": report.reused,
        "errors": len(report.errors),
        "seconds": seconds,
        "start_mib": start_mib,
        "peak_mib": _peak_mib(),
    }


def phase_stream(manifest: str, cache: str, samples: int, batch_size: int) -> dict[str, Any]:
    """The trainer's 2D stream over the manifest: index the dataset, shuffle an epoch, load ``samples`` samples."""
    import torch
    from torch.utils.data import DataLoader

    from medssl.data.datasets import MultiCropSliceDataset, cached_items
    from medssl.data.manifest import read_manifest
    from medssl.data.preprocess import PreprocessConfig
    from medssl.train.loaders import shuffled_batches

    torch.set_num_threads(1)
    start_mib = _rss_mib()
    start = time.perf_counter()
    manifest_rows = read_manifest(manifest)
    items = cached_items(manifest_rows, Path(cache), PreprocessConfig())
    dataset = MultiCropSliceDataset(items, seed=0)
    batches = shuffled_batches(len(dataset), batch_size, seed=0, epoch=0)
    index_seconds = time.perf_counter() - start
    wanted = [[int(i) for i in b] for b in batches[: max(1, -(-samples // batch_size))]]
    loader = DataLoader(dataset, batch_sampler=wanted, num_workers=0, collate_fn=dataset.collate)
    start = time.perf_counter()
    count = 0
    for batch in loader:
        count += int(batch["pixels"].shape[0])
    load_seconds = time.perf_counter() - start
    return {
        "rows": len(manifest_rows.rows),
        "dataset_len": len(dataset),
        "samples": count,
        "index_seconds": index_seconds,
        "load_seconds": load_seconds,
        "seconds": index_seconds + load_seconds,
        "start_mib": start_mib,
        "peak_mib": _peak_mib(),
    }


def _interned_table_bytes(snapshot: Any) -> int:
    """Bytes of ``snapshot`` allocated by ``sys.intern`` calls: the interpreter's table of interned strings, which
    pathlib fills with every path part it parses (the path map's entries are checked with ``PureWindowsPath``). When
    the table is full of dead entries it is reallocated whole (about 4 MB after importing torch): memory the process
    held before, which ``tracemalloc`` sees as new (it never saw the old table) and would put on whichever step made
    it happen, hundreds of bytes a row at 10,000 rows."""
    import linecache

    total = 0
    for stat in snapshot.statistics("lineno"):
        frame = stat.traceback[0]
        if "sys.intern(" in linecache.getline(frame.filename, frame.lineno):
            total += stat.size
    return total


def phase_breakdown(manifest: str, cache: str) -> dict[str, Any]:
    """Python heap per manifest row (``tracemalloc``) held and at peak by each step of the stream's set-up, less the
    reallocated table of interned strings (:func:`_interned_table_bytes`)."""
    import gc
    import tracemalloc

    from medssl.data.datasets import MultiCropSliceDataset, cached_items
    from medssl.data.manifest import read_manifest, validate_manifest
    from medssl.data.preprocess import PreprocessConfig

    steps: dict[str, tuple[float, float]] = {}
    kept: list[Any] = []

    def measure(name: str, function: Callable[[], Any]) -> Any:
        gc.collect()
        tracemalloc.start()
        value = function()
        held, peak = tracemalloc.get_traced_memory()
        interned = _interned_table_bytes(tracemalloc.take_snapshot())
        tracemalloc.stop()
        steps[name] = (held - interned, peak - interned)
        kept.append(value)
        return value

    manifest_rows = measure("read_manifest", lambda: read_manifest(manifest))
    items = measure("cached_items", lambda: cached_items(manifest_rows, Path(cache), PreprocessConfig()))
    measure("MultiCropSliceDataset", lambda: MultiCropSliceDataset(items, seed=0))
    measure("validate_manifest", lambda: validate_manifest(Path(manifest), check_files=False))
    rows = len(manifest_rows.rows)
    return {
        "rows": rows,
        "volumes": sum(r.dims == 3 for r in manifest_rows.rows),
        "steps": {name: (held / rows, peak / rows) for name, (held, peak) in steps.items()},
    }


def run(
    rows: Sequence[int],
    workdir: Path,
    samples: int = 200,
    batch_size: int = 32,
    workers: int = 8,
    isolated: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """All phases for every N in ``rows``; ``isolated=False`` runs them in this process (quick tests only: the
    peaks then are this process's, not the phase's)."""

    def call(function: Callable[..., dict[str, Any]], **kwargs: Any) -> dict[str, Any]:
        return run_isolated(function, **kwargs) if isolated else function(**kwargs)

    sources = make_sources(workdir / "sources")
    results: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}",
        "samples": samples,
        "batch_size": batch_size,
        "workers": workers,
        "sizes": {},
        "load": [_load_average()],
    }
    breakdown_at = min([n for n in rows if n >= 10_000] or [max(rows)])
    for n in rows:
        root = workdir / f"archive-{n}"
        shutil.rmtree(root, ignore_errors=True)
        link_seconds = make_archive(root, sources, n)
        manifest = str(workdir / f"manifest-{n}.csv")
        cache = str(workdir / f"cache-{n}")
        shutil.rmtree(cache, ignore_errors=True)
        entry: dict[str, Any] = {"archive_seconds": link_seconds}
        entry["scan"] = call(phase_scan, folder=str(root), manifest=manifest, workers=workers)
        log(f"{n} scan {entry['scan']}")
        entry["validate"] = call(phase_validate, manifest=manifest)
        log(f"{n} validate {entry['validate']}")
        entry["cache"] = call(phase_cache, manifest=manifest, cache=cache)
        log(f"{n} cache {entry['cache']}")
        entry["stream"] = call(phase_stream, manifest=manifest, cache=cache, samples=samples, batch_size=batch_size)
        log(f"{n} stream {entry['stream']}")
        if n == breakdown_at:
            results["breakdown"] = call(phase_breakdown, manifest=manifest, cache=cache)
            log(f"{n} breakdown {results['breakdown']}")
        results["sizes"][n] = entry
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
    results["load"].append(_load_average())
    return results


def _load_average() -> float | None:
    """The machine's 1-minute load average (None where the platform has none): the seconds depend on it (a shared
    machine), the peaks do not."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def growth(results: dict[str, Any], phase: str) -> tuple[float, float, float]:
    """(peak MiB growth per 10k rows, peak at the largest N as % of the peak at the smallest, bytes per row)."""
    sizes = sorted(results["sizes"])
    small, large = sizes[0], sizes[-1]
    lo, hi = results["sizes"][small][phase]["peak_mib"], results["sizes"][large][phase]["peak_mib"]
    if large == small:
        return 0.0, 100.0, 0.0
    slope = (hi - lo) / (large - small)  # MiB per row
    return slope * 10_000, 100 * hi / lo if lo else 0.0, slope * 2**20


def markdown(results: dict[str, Any], command: str) -> str:
    """The BENCHMARKS.md section: the command, the machine, rows vs seconds and peak RSS per phase."""
    lines = [
        "## Manifest scale (`benchmarks/scale_manifest.py`)",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {results['machine']}. Archive: N hard links to 3 PNGs (64x64) and 2 NIfTI volumes (32x32x12), "
        f"{FILES_PER_STUDY} files per study, {STUDIES_PER_PATIENT} studies per patient; scan with "
        f"{results['workers']} header threads; stream = the trainer's 2D multi-crop dataset over all N rows, "
        f"{results['samples']} samples loaded in batches of {results['batch_size']} (0 workers). Each phase in a "
        "fresh process; start = RSS after imports, peak = the process's `VmHWM` (or its children's `ru_maxrss`, if "
        f"larger).{_load_note(results)}",
        "",
        "| rows | phase | seconds | rows/s | start RSS MiB | peak RSS MiB | peak - start MiB | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n in sorted(results["sizes"]):
        entry = results["sizes"][n]
        for phase in PHASES:
            r = entry[phase]
            if phase == "scan":
                notes = f"{r['rows']} rows, {r['errors']} errors"
            elif phase == "validate":
                notes = f"{r['errors']} errors, {r['warnings']} warnings"
            elif phase == "cache":
                notes = f"{r['built']} built, {r['reused']} reused"
            else:
                notes = (
                    f"{r['dataset_len']} samples indexed in {r['index_seconds']:.2f} s; {r['samples']} loaded in "
                    f"{r['load_seconds']:.2f} s"
                )
            lines.append(
                f"| {n} | {phase} | {r['seconds']:.2f} | {n / r['seconds']:.0f} | {r['start_mib']:.0f} "
                f"| {r['peak_mib']:.0f} | {r['peak_mib'] - r['start_mib']:.0f} | {notes} |"
            )
    sizes = sorted(results["sizes"])
    lines += [
        "",
        f"Peak RSS growth from {sizes[0]} to {sizes[-1]} rows:",
        "",
        "| phase | MiB per 10k rows | peak at largest / smallest N | bytes per row |",
        "|---|---|---|---|",
    ]
    for phase in PHASES:
        per_10k, ratio, per_row = growth(results, phase)
        lines.append(f"| {phase} | {per_10k:.1f} | {ratio:.0f}% | {per_row:.0f} |")
    flat = [phase for phase in PHASES if growth(results, phase)[1] <= 110]
    grows = [phase for phase in PHASES if phase not in flat]
    lines += [
        "",
        f"Verdict: flat (peak at {sizes[-1]} rows within 10% of the peak at {sizes[0]}): "
        f"{', '.join(flat) or 'none'}; grows linearly with the rows: {', '.join(grows) or 'none'}.",
    ]
    breakdown = results.get("breakdown")
    if breakdown:
        lines += [
            "",
            f"Python heap per manifest row (`tracemalloc`) at {breakdown['rows']} rows "
            f"({breakdown['volumes']} of them volumes), each step on top of the one before:",
            "",
            "| step | held bytes per row | peak bytes per row |",
            "|---|---|---|",
        ]
        for name, (held, peak) in breakdown["steps"].items():
            lines.append(f"| `{name}` | {held:.0f} | {peak:.0f} |")
    lines += ["", *_what_rows_cost(results)]
    return "\n".join(lines) + "\n"


def _load_note(results: dict[str, Any]) -> str:
    """`` Load average ...`` for the machine line, where the run recorded it."""
    load = [value for value in results.get("load", []) if value is not None]
    if len(load) != 2:
        return ""
    return (
        f" 1-minute load average {load[0]:.1f} at the start of the run and {load[1]:.1f} at its end "
        f"({results['machine'].split(', ')[1]}): the seconds depend on it, the peaks do not."
    )


BEFORE_BYTES_PER_ROW = {"scan": 2324, "validate": 1760, "cache": 1921, "stream": 3851}
"""Peak RSS growth per row from 1000 to 100000 rows before the memory work of issue 18 (commit b4e1d43)."""
BEFORE_BREAKDOWN = {
    "read_manifest": (885, 1588),
    "cached_items": (258, 345),
    "MultiCropSliceDataset": (1924, 2041),
    "validate_manifest": (55, 1588),
}
"""The heap breakdown of commit b4e1d43's code at 10000 rows, measured as :func:`phase_breakdown` measures now."""


FIRST_PASS_BYTES_PER_ROW = {"scan": 1028, "validate": 344, "cache": 859, "stream": 830}
"""Peak RSS growth per row from 1000 to 100000 rows after the first pass of that work (commit ac6e744)."""
FIRST_PASS_BREAKDOWN = {
    "read_manifest": (467, 754),
    "cached_items": (57, 230),
    "MultiCropSliceDataset": (53, 105),
    "validate_manifest": (25, 408),
}
"""The heap breakdown of commit ac6e744's code at 10000 rows (held / peak bytes a row)."""
SECOND_PASS_BYTES_PER_ROW = {"scan": 625, "validate": 267, "cache": 706, "stream": 794}
"""Peak RSS growth per row from 1000 to 100000 rows after the second pass (commit 1463700)."""
SECOND_PASS_READ = (467, 570)
"""``read_manifest``'s heap (held, peak bytes a row) at 10000 rows after the second pass (rows as objects)."""
SECOND_PASS_VALIDATE_PEAK = 264
"""``validate_manifest``'s heap peak (bytes a row) at 10000 rows after the second pass (the path map a dict)."""


THIRD_PASS_BYTES_PER_ROW = {"scan": 189, "validate": 22, "cache": 254, "stream": 233}
"""Peak RSS growth per row from 1000 to 100000 rows after the third pass (commit 6ea3da7: rows as columns)."""


def _breakdown_peak(results: dict[str, Any], step: str, held: bool = False) -> str:
    """The peak (``held``: held) bytes a row of ``step`` in this run's breakdown, or ``?`` where it has none."""
    held_peak = results.get("breakdown", {}).get("steps", {}).get(step)
    return f"{held_peak[0 if held else 1]:.0f}" if held_peak else "?"


def _what_rows_cost(results: dict[str, Any]) -> list[str]:
    """The section's closing prose: before and after, what changed, what a row still costs and why."""
    now = {phase: growth(results, phase)[2] for phase in PHASES}
    before = ", ".join(f"{BEFORE_BYTES_PER_ROW[p]} ({p})" for p in PHASES)
    first = ", ".join(f"{FIRST_PASS_BYTES_PER_ROW[p]} ({p})" for p in PHASES)
    after = ", ".join(f"{now[p]:.0f} ({p})" for p in PHASES)
    breakdown = ", ".join(f"`{name}` {held} / {peak}" for name, (held, peak) in BEFORE_BREAKDOWN.items())
    first_breakdown = ", ".join(f"`{name}` {held} / {peak}" for name, (held, peak) in FIRST_PASS_BREAKDOWN.items())
    read_peak, validate_peak = _breakdown_peak(results, "read_manifest"), _breakdown_peak(results, "validate_manifest")
    read_held = _breakdown_peak(results, "read_manifest", held=True)
    return [
        f"Before and after: the peaks grew by {before} bytes a row before the memory work of issue 18 (commit "
        f"b4e1d43, same archive and method); by {first} after its first pass (commit ac6e744); now by {after}. The "
        f"heap breakdown, measured as above at 10000 rows (held / peak bytes a row), of b4e1d43's code: {breakdown}; "
        f"of ac6e744's: {first_breakdown}. (The breakdown leaves out the interpreter's table of interned strings, "
        "which pathlib fills with every path part and which is reallocated whole, about 4 MB, when full of dead "
        "entries: memory the process had before, counted as new by `tracemalloc`.)",
        "",
        "What changed in the first pass: `read_manifest` streams the CSV (no list of lines, no list of record dicts) "
        "and the rows share their repeated values: format, modality, subject, split, group, label, shape and spacing "
        "are one object per distinct value, and a row's file key is the path map's own string. `validate_manifest` "
        "holds no row: values are checked as they are read, ids and file names are kept as 64-bit hashes (8 bytes a "
        "row each), and only when a hash repeats, or a subject has several splits, is the manifest read again to name "
        "them. Manifests and the cache index are written as streams, never as one string. `scan` walks to relative "
        "strings (no `Path` per file) and probes 4 x workers files at a time (`ThreadPoolExecutor.map` made a "
        "future per file at once). Rows with the same content share one `CacheEntry`, which knows its storage "
        "dtype and keeps no metadata the datasets read: the 2D index takes a volume's foreground slices straight "
        "into numpy arrays (13 bytes a sample), the 3D dataset 5 numbers a volume. A dataset keeps at most 256 "
        "memory maps open per process (each held a file descriptor: an epoch over 100,000 files kept them all).",
        "",
        "What changed in the second pass (commit 1463700): the path map is read line by line (`read_path_map` held "
        "every line of the file before parsing it, about 230 bytes a row); the map is written as a stream into its "
        "atomic private file, and `scan`'s `key_paths` makes the keyed rows one at a time as the manifest is written "
        "(it held a keyed copy of every row). The peaks then grew by "
        f"{', '.join(f'{SECOND_PASS_BYTES_PER_ROW[p]} ({p})' for p in PHASES)} bytes a row.",
        "",
        "What changed in the third pass (commit 6ea3da7): rows are held as columns (`RowTable`, on "
        "`medssl/data/compact.py`): ids, file keys and series digests in one UTF-8 buffer each with a 4-byte offset "
        "a row (8 past 4 GiB), the values rows repeat (format, dims, modality, subject, split, group, label, shape, "
        "spacing) as codes of 1 byte (2 past 256 distinct values, 4 past 65536); a `ManifestRow` is made when it is "
        "read and dropped after. `read_manifest`'s heap went from "
        f"{SECOND_PASS_READ[0]} held / {SECOND_PASS_READ[1]} at peak to {read_held} / {read_peak} bytes a row. The "
        "path map is no longer held by any phase: a scanned manifest and its map are both in key order, so `validate` "
        "and the cache build read the map in step with the rows (`PathCursor`: one entry at a time; a key out of "
        "order, a mask's for instance, reads the whole map into a sorted string map, about 80 bytes an entry against "
        "about 200 in a `dict`), `read_manifest` reads only its root line (the entries when a file is first "
        "located: the trainer's stream, which reads the cache, never reads them), and `scan` writes it from the keys "
        "and relative paths its rows hold, merged in key order, without a copy. The cache index is one CSV line a "
        "manifest row, read beside the rows into a 4-byte code a row (it was a JSON object of row id -> key, parsed "
        "whole), and the datasets hold the positions of their rows (8 bytes a row) and make each item when it is "
        "read. `scan` walks in path order (its rows need no sorted copy unless DICOM rows are added after the walk) "
        "and sorts the file keys as a fixed-width view of their buffer (numpy, 8 bytes a row instead of a string and "
        "a Python int each); permissions are checked without a `Path` per file. `validate` keeps 32-bit hashes of "
        "ids and files (a collision is only a suspect: the second read, with the values, clears it), finds the "
        "repeated ones by sorting them in place (`np.unique` made copies, indices and counts), keeps the distinct "
        "subjects' hashes (8 bytes a subject, not a row) and checks files by string, not `Path`; "
        f"`validate_manifest`'s heap peak: {validate_peak} bytes a row (from {SECOND_PASS_VALIDATE_PEAK}). The "
        "peaks then grew by "
        f"{', '.join(f'{THIRD_PASS_BYTES_PER_ROW[p]} ({p})' for p in PHASES)} bytes a row.",
        "",
        "What changed in the fourth pass (this code): `scan` and the cache build no longer hold the rows. `medssl "
        "manifest scan` (`scan_archive`) streams them: the walk is a generator (each folder's listing on the way down, "
        "not the files), each row goes through the masks pairing, the labels join and the split assignment as it is "
        "found (the split assignment holds the subjects that have a split, not the rows), and into "
        "`medssl/data/scan_writer.py`'s external sort: CSV lines sorted by file key in runs of 10,000, each run "
        "spilled to an unnamed temporary file beside the outputs (readable by the scanning user only, its name "
        "removed as it is created), the runs merged as the path map, the errors and the manifest are written (at "
        "most 64 open, then merged into one). `medssl manifest preprocess` reads the manifest with "
        "`hold_rows=False`: the build passes over the rows from the file (the digest, then hashing with the path "
        "map in step), spools each row's index line to an unnamed temporary file and writes the index from it once "
        "the build says which contents failed; rows that wait on a content being built are counted, not listed.",
        "",
        "What a row still costs: `scan` holds one run of CSV lines (about 250 bytes a line, 10,000 lines: the step "
        "between 1000 and 10000 rows), a read buffer per open run and the distinct subjects' hashes (8 bytes a "
        "subject); DICOM headers go through the same sort, by series, and are read back one series at a time (a "
        "series needs all of its files' headers; this archive has no DICOM file, so that is tested in "
        "`tests/test_scan_writer.py`, not measured here). The cache build holds the entries it has to "
        "write and the file-digest memo (one entry per distinct file: 5 here, one per file in a real archive). "
        "`stream` holds the rows' columns, the dataset's positions and its sample index (13 bytes a sample) and an "
        "epoch of shuffled batches (8 bytes a sample); `validate` 8 bytes a row of hashes. Between 10000 and 100000 "
        "rows the peaks of `scan` and the cache build still rise by 3-5 MB: the interpreter's table of interned "
        "strings, which pathlib (Python 3.11) fills with every part of every `Path` made per file and reallocates "
        "whole, and the allocator's slack.",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: run the phases for every ``--rows`` size, print the table, optionally update a Markdown file."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1000,10000,100000", help="comma-separated archive sizes (files = rows)")
    parser.add_argument("--samples", type=int, default=200, help="samples loaded in the stream phase")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=8, help="scan header threads (the CLI's default)")
    parser.add_argument("--workdir", help="scratch folder (default: a temporary one, removed at the end)")
    parser.add_argument("--in-process", action="store_true", help="no spawned processes (quick checks; peaks shared)")
    parser.add_argument("--update", help="write the results into this Markdown file (e.g. BENCHMARKS.md)")
    args = parser.parse_args(argv)
    rows = [int(r) for r in args.rows.split(",") if r.strip()]
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="medssl-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        results = run(rows, workdir, args.samples, args.batch_size, args.workers, isolated=not args.in_process)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    command = "python benchmarks/scale_manifest.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = markdown(results, command)
    print(text)
    if args.update:
        update_section(Path(args.update), text, tag="scale_manifest")
    return 0


if __name__ == "__main__":
    sys.exit(main())
