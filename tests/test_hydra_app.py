"""`medssl pretrain` as a Hydra application (sweeps, job folders, --cfg, --info, tab completion, torchrun) and the
Python API at the package's top (`medssl.pretrain`, `medssl.export`, `medssl.finetune`, `medssl.embed`)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pytest
import yaml
from training import tiny_overrides, write_training_data

import medssl
from medssl.cli import main
from medssl.train.app import in_job_folder

FAST = ["logging=none", "method=simclr", "trainer.checkpoint_every=0"]


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A tiny dataset and the overrides of a fast run, from a project folder that is the working directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MEDSSL_CONFIG_DIR", raising=False)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    manifest = write_training_data(tmp_path, volumes=2, images=4)
    return tmp_path, tiny_overrides(manifest, tmp_path, *FAST)


def _overrides(folder: Path) -> list[str]:
    return yaml.safe_load((folder / ".hydra" / "overrides.yaml").read_text(encoding="utf-8"))


def test_multirun_runs_one_job_per_value_each_in_its_run_folder_with_its_hydra_files(project, capsys):
    folder, overrides = project
    assert main(["pretrain", "-m", "seed=0,1", *overrides, "trainer.max_steps=2", "run.name=sweep"]) == 0
    out = capsys.readouterr().out
    sweep = folder / "outputs" / "sweep"
    assert (sweep / "multirun.yaml").is_file()
    for job, seed in (("sweep-0", 0), ("sweep-1", 1)):
        run = sweep / job
        assert f"seed={seed}" in _overrides(run), _overrides(run)
        assert (run / ".hydra" / "config.yaml").is_file() and (run / ".hydra" / "hydra.yaml").is_file()
        assert yaml.safe_load((run / ".hydra" / "config.yaml").read_text(encoding="utf-8"))["seed"] == seed
        assert (run / "backbone.pt").is_file(), out  # the job's Hydra folder is its run folder
        assert "finished at step 2 (loss" in out and f"run {job};" in out
    assert sorted(p.name for p in (folder / "outputs").iterdir()) == ["sweep"]


def test_cfg_job_prints_the_composed_config_without_training(project, capsys):
    folder, _ = project
    assert main(["pretrain", "--cfg", "job", "method=simclr", "trainer.max_steps=7"]) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["method"]["name"] == "simclr" and config["trainer"]["max_steps"] == 7
    assert "hydra" not in config
    assert not (folder / "outputs").exists()
    assert main(["pretrain", "--cfg", "hydra", "seed=3"]) == 0  # Hydra's own settings: the job folder layout
    hydra = yaml.safe_load(capsys.readouterr().out)["hydra"]
    assert hydra["run"]["dir"] == "${run.output_dir}/${medssl.run_name:${run.name},${method.name}}"
    assert hydra["job"]["chdir"] is False
    assert main(["pretrain", "--info", "defaults", "method=barlow"]) == 0
    assert "method/barlow" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [
        ["pretrain", "trainer.max_step=3"],
        ["pretrain", "-m", "seed=0,1", "trainer.max_step=3"],
        ["pretrain", "--cfg", "job", "trainer.max_step=3"],
    ],
    ids=["run", "multirun", "cfg"],
)
def test_an_unknown_key_is_a_clear_error_with_exit_code_2_before_any_work(project, capsys, argv):
    folder, _ = project
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "trainer.max_step" in err and "Traceback" not in err
    assert not (folder / "outputs").exists()  # no job folder: nothing ran


def test_a_bad_value_in_one_job_of_a_sweep_stops_the_sweep_before_it_starts(project, capsys):
    assert main(["pretrain", "-m", "trainer.optimizer.lr=0.1,-1", "logging=none"]) == 2
    err = capsys.readouterr().err
    assert "trainer.optimizer: lr must be > 0" in err and "trainer.optimizer.lr=-1" in err
    assert not (project[0] / "outputs").exists()


def test_flags_that_do_not_go_together(project, capsys):
    assert main(["pretrain", "-m", "--cfg", "job", "seed=0,1"]) == 2
    assert "do not go together" in capsys.readouterr().err


def test_multirun_is_refused_under_torchrun(project, capsys, monkeypatch):
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    assert main(["pretrain", "-m", "seed=0,1", "logging=none"]) == 2
    assert "-m/--multirun is not supported under torchrun" in capsys.readouterr().err
    assert not (project[0] / "outputs").exists()


class _FakeTrainer:
    """Records the config each job would train with (no training)."""

    configs: ClassVar[list] = []
    status = "finished"

    def __init__(self, config):
        self.config = config
        _FakeTrainer.configs.append(config)

    def fit(self):
        from medssl.train.trainer import TrainResult

        run = self.config.run
        return TrainResult(_FakeTrainer.status, 1, run.name or "?", Path(run.output_dir) / (run.name or "?"))


@pytest.fixture
def fake_trainer(monkeypatch):
    import medssl.train.trainer

    _FakeTrainer.configs, _FakeTrainer.status = [], "finished"
    monkeypatch.setattr(medssl.train.trainer, "Trainer", _FakeTrainer)
    return _FakeTrainer


def test_torchrun_ranks_other_than_0_write_no_job_folder_and_take_the_run_folder(project, monkeypatch, fake_trainer):
    folder, _ = project
    for name, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(name, value)
    assert main(["pretrain", "logging=none", "run.name=ddp"]) == 0
    (config,) = fake_trainer.configs
    assert (config.run.name, config.run.output_dir) == ("ddp", "outputs")
    assert not (folder / "outputs").exists()  # rank 0 writes the job folder and .hydra/


def test_a_sweep_starts_no_more_jobs_after_one_stopped_on_a_signal(project, capsys, fake_trainer):
    fake_trainer.status = "interrupted"
    assert main(["pretrain", "-m", "seed=0,1,2", "logging=none", "run.name=s"]) == 143  # requeue
    assert [c.seed for c in fake_trainer.configs] == [0]
    assert "the sweep stopped: not started: job s-0 of this sweep stopped on a signal" in capsys.readouterr().out


def test_the_run_folder_is_the_job_folder_unless_a_checkpoint_names_it(tmp_path):
    from medssl.train.config import compose_pretrain_config

    config = compose_pretrain_config(["run.output_dir=outputs"])
    moved = in_job_folder(config, tmp_path / "elsewhere" / "mine", multirun=False, project_dir=tmp_path)
    assert (moved.run.name, moved.run.output_dir) == ("mine", str(tmp_path / "elsewhere"))
    same = in_job_folder(config, tmp_path / "outputs" / "joint-1", multirun=False, project_dir=tmp_path)
    assert (same.run.name, same.run.output_dir) == ("joint-1", "outputs")  # the default layout: as given
    resuming = compose_pretrain_config(["trainer.resume=old/checkpoints/step_00000010.pt"])
    assert in_job_folder(resuming, tmp_path / "outputs" / "joint-1", multirun=False).run.name is None


def test_tab_completion_answers_for_medssl_pretrain_lines(project, capsys, monkeypatch):
    assert main(["pretrain", "-sc", "install=bash"]) == 0
    script = capsys.readouterr().out
    assert "complete -o nospace -o default -F _medssl_completion medssl" in script
    assert "pretrain -sc query=bash" in script
    monkeypatch.setenv("COMP_LINE", "medssl pretrain -m seed=0,1 method=s")
    assert main(["pretrain", "-sc", "query=bash"]) == 0
    words = capsys.readouterr().out.split()
    assert {"method=simclr", "method=sepclr", "method=staged", "method=swav2d"} <= set(words), words
    monkeypatch.setenv("COMP_LINE", "medssl pretrain trainer.optimizer.l")
    assert main(["pretrain", "-sc", "query=bash"]) == 0
    assert "trainer.optimizer.lr=" in capsys.readouterr().out.split()


def test_hydra_run_dir_is_where_the_run_goes(project, capsys):
    folder, overrides = project
    target = folder / "elsewhere" / "custom"
    assert main(["pretrain", *overrides, "trainer.max_steps=1", f"hydra.run.dir={target}"]) == 0
    assert "trainer.max_steps=1" in _overrides(target)
    assert (target / "backbone.pt").is_file() and (target / "checkpoints").is_dir()
    assert "run custom;" in capsys.readouterr().out
    assert not (folder / "outputs").exists()


def test_python_api_pretrain_export_resume_by_name_and_embed(project, capsys):
    folder, overrides = project
    result = medssl.pretrain(overrides, run={"name": "api"}, trainer={"max_steps": 2})
    assert (result.status, result.step, result.run_name) == ("finished", 2, "api")
    assert result.output_dir == folder / "outputs" / "api"
    assert "trainer.max_steps=2" in _overrides(result.output_dir)

    bundle = medssl.export(result, folder / "bundle", log_to_mlflow=False)
    assert bundle == folder / "bundle"
    for name in ("configs/metadata.json", "configs/inference.json", "models/model.pt"):
        assert (bundle / name).is_file(), name

    again = medssl.pretrain(overrides=[*overrides, "run.name=api", "trainer.max_steps=3"], config_dir=None)
    assert (again.status, again.step, again.output_dir) == ("finished", 3, result.output_dir)
    assert "api: resuming from" in capsys.readouterr().out

    if importlib.util.find_spec("medssl.downstream.embed") is None:
        pytest.skip("medssl.downstream.embed (medssl.embed's implementation) is not in this checkout")
    table = medssl.embed(bundle, folder / "manifest.csv", cache_dir=folder / "cache", size=32, progress=False)
    assert len(table.ids) >= 6 and table.dim == 512  # 4 images, 2 volumes (and their slices); ResNet-10 features


def test_python_api_passes_settings_as_overrides(monkeypatch):
    seen: dict = {}

    def fake_embed(*args, **kwargs):
        seen["embed"] = (args, kwargs)
        return "table"

    embed_module = pytest.importorskip("medssl.downstream.embed", reason="medssl.embed wraps medssl.downstream.embed")
    monkeypatch.setattr(embed_module, "embed", fake_embed)
    assert medssl.embed("bundles/x", "m.csv", "e.pt", slices=False) == "table"
    assert seen["embed"] == (("bundles/x", "m.csv", "e.pt"), {"slices": False})
    assert medssl.as_overrides({"method": "simclr", "trainer": {"max_steps": 2}, "data": {"splits": ["train"]}}) == [
        "method=simclr",
        "trainer.max_steps=2",
        "data.splits=[train]",
    ]
    assert medssl.as_overrides({"run": {"name": None}, "x": "a b", "y": "true"}) == [
        "run.name=null",
        "x='a b'",
        "y='true'",
    ]


def test_finetune_api_runs_the_task_of_the_overrides(monkeypatch):
    import medssl.downstream.finetune as finetune

    ran = []
    monkeypatch.setattr(finetune, "run_finetune", lambda config: ran.append(config) or {"accuracy": 1.0})
    assert medssl.finetune(["task=segmentation"], mode="3d", data={"label_fraction": 0.5}) == {"accuracy": 1.0}
    (config,) = ran
    assert (config.task, config.mode, config.data.label_fraction) == ("segmentation", "3d", 0.5)


def test_import_medssl_imports_no_heavy_module():
    code = (
        "import sys, medssl\n"
        "heavy = [m for m in ('torch', 'monai', 'mlflow', 'hydra', 'numpy') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert callable(medssl.export) and callable(medssl.pretrain)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, encoding="utf-8", timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_medssl_export_is_the_sub_package_and_the_function():
    import medssl.export.bundle  # importing a sub-module sets medssl.export to the package: still callable

    assert callable(medssl.export) and medssl.export.bundle.export_bundle is not None
    from medssl import export

    assert export is medssl.export and "source" in export.__call__.__doc__
