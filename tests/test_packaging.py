"""An installed medssl runs from its own files: the configs ship in the wheel (``pkg://medssl.configs``), and a
user's ``--config-dir`` adds to them the way Hydra's own ``--config-dir`` does."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from training import tiny_overrides, write_training_data

from medssl.downstream.finetune import compose_finetune_config
from medssl.runtime.configs import config_dir
from medssl.train.config import compose_pretrain_config

REPO = Path(__file__).resolve().parents[1]


def _user_folder(tmp_path: Path) -> Path:
    user = tmp_path / "myconfigs"
    (user / "method").mkdir(parents=True)
    shipped = (config_dir() / "method" / "simclr.yaml").read_text(encoding="utf-8")
    (user / "method" / "mine.yaml").write_text(shipped.replace("temperature: 0.1", "temperature: 0.7"), "utf-8")
    (user / "method" / "simclr.yaml").write_text(shipped.replace("temperature: 0.1", "temperature: 0.9"), "utf-8")
    top = "defaults:\n  - pretrain\n  - override method: mine\n  - _self_\nseed: 7\n"
    (user / "myexp.yaml").write_text(top, encoding="utf-8")
    (user / "finetune").mkdir()
    (user / "finetune" / "segmentation.yaml").write_text("task: segmentation\nseed: 11\n", encoding="utf-8")
    return user


def test_a_user_folder_adds_options_and_top_level_configs_to_the_shipped_ones(tmp_path, monkeypatch):
    monkeypatch.delenv("MEDSSL_CONFIG_DIR", raising=False)
    user = _user_folder(tmp_path)
    with pytest.raises(ValueError, match="method/mine"):
        compose_pretrain_config(["method=mine"])
    assert compose_pretrain_config(["method=mine"], directory=user).method.simclr.temperature == 0.7
    # a name in both is the shipped file, as with Hydra's own --config-dir (the user's folder adds, never hides)
    assert compose_pretrain_config(["method=simclr"], directory=user).method.simclr.temperature == 0.1
    # the shipped groups stay available beside the user's options, and a user's top-level config composes them
    assert compose_pretrain_config(["method=joint"], directory=user).method.name == "joint"
    mine = compose_pretrain_config(config_name="myexp", directory=user)
    assert (mine.seed, mine.method.simclr.temperature) == (7, 0.7)
    # $MEDSSL_CONFIG_DIR is the same folder for every command
    monkeypatch.setenv("MEDSSL_CONFIG_DIR", str(user))
    assert compose_pretrain_config(config_name="myexp").seed == 7
    assert compose_finetune_config(["task=segmentation"]).seed == 11
    assert compose_finetune_config(["task=detection"]).task == "detection"  # shipped, the user has none
    monkeypatch.setenv("MEDSSL_CONFIG_DIR", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="MEDSSL_CONFIG_DIR"):
        compose_pretrain_config()


def test_the_wheel_holds_the_configs_and_runs_outside_the_checkout(tmp_path):
    """Build the wheel, install it into a fresh virtual environment (its dependencies: this environment's
    site-packages, added by a .pth file, so nothing is downloaded), and pretrain two steps from a folder outside the
    repository with no MEDSSL_CONFIG_DIR."""
    wheels = tmp_path / "wheels"
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels)]
    subprocess.run([*build, str(REPO)], check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("medssl-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "medssl" / "configs").rglob("*.yaml"))
    assert shipped and set(shipped) <= set(names), set(shipped) - set(names)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.check_output([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                        encoding="utf-8", errors="replace").strip())  # fmt: skip
    (site / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n", encoding="utf-8")
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)]
    subprocess.run(install, check=True, capture_output=True, timeout=300)

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("MEDSSL_CONFIG_DIR", "PYTHONPATH")}
    env["OMP_NUM_THREADS"] = "1"
    where = subprocess.run([python, "-c", "import medssl; print(medssl.__file__)"], cwd=work, env=env,
                           capture_output=True, encoding="utf-8", errors="replace", check=True)  # fmt: skip
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout
    medssl = venv / "bin" / "medssl"
    printed = subprocess.run([medssl, "pretrain", "--print-config", "method=simclr"], cwd=work, env=env,
                             capture_output=True, encoding="utf-8", errors="replace", timeout=300)  # fmt: skip
    assert printed.returncode == 0, printed.stderr[-2000:]
    assert "name: simclr" in printed.stdout

    manifest = write_training_data(work, volumes=2, images=4)
    overrides = tiny_overrides(manifest, work, "method=simclr", "trainer.max_steps=2", "logging=none")
    done = subprocess.run([medssl, "pretrain", *overrides, "run.name=installed"], cwd=work, env=env,
                          capture_output=True, encoding="utf-8", errors="replace", timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert (work / "outputs" / "installed" / "checkpoints" / "step_00000002.pt").is_file()
    # the Hydra job folder is the run folder: .hydra/ beside the checkpoints, nothing else in the working directory
    assert "run.name=installed" in (work / "outputs" / "installed" / ".hydra" / "overrides.yaml").read_text("utf-8")
    assert sorted(p.name for p in (work / "outputs").iterdir()) == ["installed"]


def test_the_package_version_is_the_projects():
    """``medssl --version``, the runs' ``medssl.version`` tag (source trees) and the MLflow model's requirements read
    ``medssl.version``; the wheel's metadata reads ``pyproject.toml``: one number."""
    import tomllib

    import medssl
    from medssl.version import __version__

    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert __version__ == project["version"] == medssl.__version__
