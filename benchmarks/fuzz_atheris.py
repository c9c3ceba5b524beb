"""Coverage-guided fuzzing of the data layer with atheris (libFuzzer for Python), beside the hypothesis tests.

``tests/test_fuzz_inputs.py`` mutates seed files at random (derandomized, a fixed budget per run); this script lets
libFuzzer grow a corpus from the same kinds of seeds, guided by the branches each input reaches in ``medssl`` (and
pydicom, nibabel), for as long as you let it run. It is not part of the test suite and atheris is not a dependency
of the project (``tests/test_fuzz_atheris.py`` runs it briefly when atheris is installed).

Usage, from the repository root::

    pip install atheris                                        # a wheel for CPython 3.11 on Linux x86_64
    python benchmarks/fuzz_atheris.py --target dicom -max_total_time=120
    python benchmarks/fuzz_atheris.py --target all -max_total_time=30   # every target in turn, one process each

Targets (each input is one file, written where the seeds say, then)::

    dicom     the scan (header, series grouping, multi-frame geometry) and the cache build's read + preprocess
    nifti     the same for a NIfTI volume (.nii)
    image     the same for a PNG image
    mask      a label map of a NIfTI volume through the fine-tuning loader (load_case), native and resampled
    labels    a labels CSV joined onto scanned rows (``manifest scan --labels``)
    pathmap   a path map read, then the manifest that names it validated
    manifest  a manifest read and validated

``DataError`` and ``ManifestError`` (a file named with a reason) are the expected answers; any other exception is a
crash, and an input that runs past ``-timeout`` (10 s unless given) a hang. libFuzzer stops at the first and writes
the input to ``<workdir>/<target>-crash-<sha1>`` (to reproduce, give that file instead of the options:
``python benchmarks/fuzz_atheris.py --target image <workdir>/image-crash-...``). Inputs that reach new code are added
to ``<workdir>/corpus-<target>`` (seeded on the first run; keep it between runs); ``<workdir>/scratch-<target>`` holds
the files of the input being run. ``<workdir>`` defaults to ``$TMPDIR/medssl-atheris``. Every other
argument goes to libFuzzer (``-max_total_time``, ``-runs``, ``-jobs``, ``-help=1``, ...).
"""

from __future__ import annotations

import argparse
import gzip
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SALT = "atheris"
TARGETS = ("dicom", "nifti", "image", "mask", "labels", "pathmap", "manifest")

# --- seeds -----------------------------------------------------------------------------------------------------------


def _pydicom_file(name: str) -> bytes | None:
    from pydicom.data import get_testdata_file

    try:
        found = get_testdata_file(name, download=False)
    except Exception:  # no data source installed
        return None
    return Path(found).read_bytes() if isinstance(found, str) else None


def seeds(target: str) -> list[bytes]:
    """Valid inputs of ``target``: generated with the test factories, plus real files where installed."""
    sys.path.insert(0, str(ROOT / "tests"))
    import numpy as np
    from factories import random_volume, write_dicom_2d, write_nifti, write_png

    rng = np.random.default_rng(0)
    out: list[bytes] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if target == "dicom":
            out.append(write_dicom_2d(folder / "dx.dcm", rng.integers(0, 4000, (16, 12)), modality="DX").read_bytes())
            for name in (
                "CT_small.dcm",
                "MR_small.dcm",
                "rtdose.dcm",
                "emri_small.dcm",
            ):  # real; the last two multi-frame
                out += [data] if (data := _pydicom_file(name)) is not None else []
        elif target in ("nifti", "mask"):
            volume = random_volume((4, 8, 8)) if target == "nifti" else (rng.random((6, 8, 8)) * 3).astype(np.uint8)
            out.append(write_nifti(folder / "v.nii", volume, spacing=(1.0, 1.0, 2.0)).read_bytes())
            label = SHARED / "msd-hippocampus" / "labels" / "hippocampus_003.nii.gz"
            if target == "nifti" and label.is_file():
                out.append(gzip.decompress(label.read_bytes()))
        elif target == "image":
            out.append(write_png(folder / "i.png", rng.integers(0, 255, (16, 16)).astype(np.uint8)).read_bytes())
        elif target == "labels":
            out.append(
                b"path,split,group,label,subject,modality,mask\na.png,train,g,cat,p1,DX,m.png\nb.png,val,,dog,,,\n"
            )
            real = SHARED / "mednist-subset" / "labels.csv"
            if real.is_file():
                out.append(b"".join(real.read_bytes().splitlines(keepends=True)[:4]))
        elif target == "pathmap":
            out.append(b"# medssl-paths v1\n# root: archive\nkey,path\npa,a.png\npb,sub/b.png\n")
        elif target == "manifest":
            header = ",".join(_columns())
            out.append(
                f"# medssl-manifest v1\n# root: archive\n{header}\n"
                "i1,a.png,,image,2,OT,s1,16x16,1x1,train,,cat,\ni2,v.nii,,nifti,3,MR,s2,8x8x4,1x1x2,val,,,\n".encode()
            )
    return out


def _columns() -> tuple[str, ...]:
    from medssl.data.manifest import COLUMNS

    return COLUMNS


# --- targets ---------------------------------------------------------------------------------------------------------


class Harness:
    """A scratch folder with the fixed files a target needs; :meth:`run` feeds one input through the target."""

    def __init__(self, target: str, folder: Path) -> None:
        import shutil

        import numpy as np

        sys.path.insert(0, str(ROOT / "tests"))
        from factories import write_nifti, write_png

        from medssl.data.manifest import ManifestRow, write_manifest
        from medssl.data.pathmap import write_path_map

        self.target = target
        self.folder = folder  # emptied first: libFuzzer ends the process without running clean-ups
        shutil.rmtree(folder, ignore_errors=True)
        archive = self.folder / "archive"
        archive.mkdir(parents=True)
        write_png(archive / "a.png", np.arange(256, dtype=np.uint8).reshape(16, 16))
        write_png(archive / "sub" / "b.png", np.arange(256, dtype=np.uint8).reshape(16, 16).T)
        volume = np.random.default_rng(0).normal(100, 10, (6, 8, 8)).astype(np.float32)
        write_nifti(archive / "v.nii", volume, spacing=(1.0, 1.0, 2.0))
        rows = [
            ManifestRow(id="a", path="pa", format="image", dims=2, subject="s1"),
            ManifestRow(id="b", path="pb", format="image", dims=2, subject="s2"),
        ]
        write_manifest(self.folder / "m.csv", rows, None, path_map=self.folder / "m.paths.csv")
        write_path_map(self.folder / "m.paths.csv", archive, {"pa": "a.png", "pb": "sub/b.png"})
        self.rows = [ManifestRow(id="a", path="a.png", format="image", dims=2)]
        self.mask_row = ManifestRow(id="v", path="v.nii", format="nifti", dims=3, modality="MR", mask="m.nii")
        self.run: Callable[[bytes], None] = getattr(self, f"_{target}")

    def _file(self, name: str, data: bytes) -> Path:
        folder = self.folder / "input"
        if folder.exists():
            for stale in folder.iterdir():
                stale.unlink()
        folder.mkdir(exist_ok=True)
        (folder / name).write_bytes(data)
        return folder

    def _scan_and_read(self, name: str, data: bytes) -> None:
        from medssl.data.errors import DataError
        from medssl.data.preprocess import PreprocessConfig, preprocess
        from medssl.data.readers import read_row
        from medssl.data.scan import ScanOptions, scan_folder

        folder = self._file(name, data)
        result = scan_folder(folder, ScanOptions(salt=SALT, workers=1, progress=False))
        assert all(reason for _, reason in result.errors), result.errors
        for row in result.rows:  # what the cache build does with a row, without writing the entry
            try:
                preprocess(read_row(row, folder / row.path), PreprocessConfig(), source=row.path)
            except DataError as exc:
                assert exc.reason

    def _dicom(self, data: bytes) -> None:
        self._scan_and_read("x.dcm", data)

    def _nifti(self, data: bytes) -> None:
        self._scan_and_read("x.nii", data)

    def _image(self, data: bytes) -> None:
        self._scan_and_read("x.png", data)

    def _mask(self, data: bytes) -> None:
        import numpy as np

        from medssl.data.errors import DataError
        from medssl.data.labelled import load_case
        from medssl.data.preprocess import PreprocessConfig

        (self.folder / "archive" / "m.nii").write_bytes(data)
        for config in (PreprocessConfig(spacing=None), PreprocessConfig(spacing=[2.0, 2.0, 2.0])):
            try:
                case = load_case(self.mask_row, self.folder / "archive", config)
            except DataError as exc:
                assert exc.path == "m.nii" and exc.reason, exc  # the image is fine: the mask is named
            else:
                assert case.mask.dtype == np.int64 and case.mask.min() >= 0
                assert case.mask.shape == case.image.shape[1:]

    def _labels(self, data: bytes) -> None:
        from medssl.data.errors import DataError
        from medssl.data.row_transforms import join_labels

        labels = self.folder / "archive" / "labels.csv"
        labels.write_bytes(data)
        try:
            _, found = join_labels(self.rows, labels, self.folder / "archive", SALT)
        except DataError as exc:
            assert exc.path == str(labels) and exc.reason
        else:
            assert all(w.startswith(f"{labels}:") for w in found), found

    def _pathmap(self, data: bytes) -> None:
        from medssl.data.errors import ManifestError
        from medssl.data.manifest import validate_manifest
        from medssl.data.pathmap import read_path_map

        map_file = self.folder / "m.paths.csv"
        map_file.write_bytes(data)
        try:
            read_path_map(map_file)
        except ManifestError as exc:
            assert str(exc).startswith(str(map_file)), exc
            return
        report = validate_manifest(self.folder / "m.csv")
        assert all(report.errors) and "sub/b.png" not in "\n".join(report.errors + report.warnings)

    def _manifest(self, data: bytes) -> None:
        from medssl.data.errors import DataError, ManifestError
        from medssl.data.manifest import read_manifest, validate_manifest

        manifest = self.folder / "fuzzed.csv"
        manifest.write_bytes(data)
        try:
            report = validate_manifest(manifest)
            assert all(report.errors) and all(report.warnings)
            read_manifest(manifest)
        except (ManifestError, DataError) as exc:
            assert str(exc)


def instrument(packages: list[str]) -> None:
    """Import the fuzzed modules with atheris' coverage instrumentation of ``packages`` (before anything else imports
    them)."""
    import atheris

    with atheris.instrument_imports(include=packages):
        import medssl.data.labelled
        import medssl.data.manifest
        import medssl.data.pathmap
        import medssl.data.scan  # noqa: F401


def fuzz(harness: Harness, libfuzzer_args: list[str]) -> None:
    import atheris

    def one_input(data: bytes) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about every odd value it reads
            harness.run(data)

    atheris.Setup([sys.argv[0], *libfuzzer_args], one_input)
    atheris.Fuzz()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", choices=[*TARGETS, "all"], required=True)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "medssl-atheris")
    parser.add_argument(
        "--instrument", default="medssl,pydicom,nibabel", help="packages whose branches guide the fuzzer (comma list)"
    )
    args, libfuzzer = parser.parse_known_args(argv)
    if args.target == "all":
        codes = []
        for target in TARGETS:
            print(f"=== {target}", flush=True)
            command = [sys.executable, __file__, "--target", target, "--workdir", str(args.workdir)]
            command += ["--instrument", args.instrument]
            codes.append(subprocess.call([*command, *libfuzzer]))
        print(
            "results: "
            + ", ".join(f"{t} {'ok' if c == 0 else f'FAILED ({c})'}" for t, c in zip(TARGETS, codes, strict=True))
        )
        return max(codes)
    instrument(args.instrument.split(","))
    corpus = args.workdir / f"corpus-{args.target}"
    if not corpus.is_dir() or not any(corpus.iterdir()):
        corpus.mkdir(parents=True, exist_ok=True)
        for i, seed in enumerate(seeds(args.target)):
            (corpus / f"seed{i}").write_bytes(seed)
    options = [a for a in libfuzzer if a.startswith("-")]
    defaults = {"-timeout": "10", "-rss_limit_mb": "4096", "-artifact_prefix": f"{args.workdir}/{args.target}-"}
    options += [f"{k}={v}" for k, v in defaults.items() if not any(a.startswith(f"{k}=") for a in options)]
    inputs = [a for a in libfuzzer if not a.startswith("-")] or [str(corpus)]
    fuzz(Harness(args.target, args.workdir / f"scratch-{args.target}"), [*options, *inputs])
    return 0


if __name__ == "__main__":
    sys.exit(main())
