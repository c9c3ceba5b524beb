"""The optional atheris harness (benchmarks/fuzz_atheris.py) runs: a few hundred coverage-guided inputs of one target.

atheris is not a dependency of the project; the test skips where it is not installed (``pip install atheris``).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

try:
    import atheris  # noqa: F401
except ImportError as exc:  # not installed, or its libFuzzer does not load here
    pytest.skip(
        f"atheris is not importable ({exc}); optional: `pip install atheris` to run benchmarks/fuzz_atheris.py",
        allow_module_level=True,
    )
HARNESS = Path(__file__).resolve().parents[1] / "benchmarks" / "fuzz_atheris.py"


def test_atheris_harness_runs_a_target(tmp_path: Path) -> None:
    target = ["--target", "pathmap", "--workdir", str(tmp_path), "--instrument", "medssl"]
    command = [sys.executable, str(HARNESS), *target]
    done = subprocess.run([*command, "-runs=300", "-seed=1"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Done 300 runs" in done.stderr
    assert not list(tmp_path.glob("pathmap-crash-*")) and any((tmp_path / "corpus-pathmap").iterdir())
