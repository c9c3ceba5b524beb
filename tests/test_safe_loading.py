"""A checkpoint, backbone or bundle carrying a malicious pickle is refused by every entry point that loads one, with
an error naming the file, exit code 2 from the command line, and the payload never runs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from medssl.cli import main
from medssl.downstream import finetune
from medssl.downstream.common import load_backbone
from medssl.downstream.spaces import load_space_encoder
from medssl.runtime.checkpoints import UnsafeCheckpointError, load_checkpoint, save_checkpoint
from medssl.train.initialise import read_init_source

REFUSAL = "not a plain weights file"


class Payload:
    """Unpickling this runs a shell command that creates ``marker`` (what an attacker's checkpoint would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch '{self.marker}'",)


def malicious(path: Path, marker: Path, **plain: object) -> Path:
    """A torch file at ``path`` that looks like a checkpoint (plain keys, a tensor) plus the payload."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": "medssl-pretrain/1", "step": 2, "weight": torch.ones(2), **plain, "x": Payload(marker)}, path)
    return path


def tiny_bundle(folder: Path, weights: Path | None = None, network_def: object = None) -> Path:
    """A bundle folder with a small 2D MONAI ResNet network_def (or ``network_def``) and ``weights`` as its
    ``models/model.pt`` (else the network's own weights)."""
    kwargs = {
        "block": "basic",
        "layers": [1, 1, 1, 1],
        "block_inplanes": [4, 8, 8, 8],
        "spatial_dims": 2,
        "n_input_channels": 1,
        "feed_forward": False,
    }
    (folder / "configs").mkdir(parents=True, exist_ok=True)
    definition = network_def if network_def is not None else {"_target_": "monai.networks.nets.ResNet", **kwargs}
    (folder / "configs" / "inference.json").write_text(json.dumps({"network_def": definition}), encoding="utf-8")
    (folder / "configs" / "metadata.json").write_text(json.dumps({"medssl": {"run_id": "r"}}), encoding="utf-8")
    (folder / "models").mkdir(exist_ok=True)
    if weights is not None:
        (folder / "models" / "model.pt").write_bytes(weights.read_bytes())
    else:
        from monai.networks.nets import ResNet

        save_checkpoint(folder / "models" / "model.pt", ResNet(**kwargs).state_dict())
    return folder


@pytest.fixture
def evil(tmp_path: Path) -> tuple[Path, Path]:
    """A malicious checkpoint and the marker its payload would create; the payload is checked to be live."""
    control_marker = tmp_path / "control-ran"
    control = malicious(tmp_path / "control.pt", control_marker)
    torch.load(control, weights_only=False)  # what an unsafe load would do
    assert control_marker.exists(), "the crafted payload must really run when unpickled unsafely"
    marker = tmp_path / "payload-ran"
    return malicious(tmp_path / "evil" / "step_00000002.pt", marker), marker


def test_load_checkpoint_refuses_a_malicious_pickle_naming_the_file(evil):
    path, marker = evil
    with pytest.raises(UnsafeCheckpointError, match=REFUSAL) as caught:
        load_checkpoint(path)
    assert str(path) in str(caught.value) and "posix.system" in str(caught.value)
    assert not marker.exists()


def test_resume_refuses_a_malicious_latest_checkpoint_with_exit_code_2(evil, tmp_path, capsys, monkeypatch):
    path, marker = evil
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "outputs" / "evil-run"
    (run_dir / "checkpoints").mkdir(parents=True)
    good = save_checkpoint(run_dir / "checkpoints" / "step_00000001.pt", {"step": 1})
    target = run_dir / "checkpoints" / "step_00000002.pt"
    target.write_bytes(path.read_bytes())
    (run_dir / "checkpoints" / "latest").write_text(target.name + "\n", encoding="utf-8")
    code = main(["pretrain", "data.manifest=absent.csv", "logging=none", "run.name=evil-run"])
    err = capsys.readouterr().err
    assert code == 2
    assert str(target) in err and REFUSAL in err  # refused, not skipped for step 1
    assert good.is_file() and not marker.exists()
    # an explicit trainer.resume=<file> too
    assert main(["pretrain", "data.manifest=absent.csv", "logging=none", f"trainer.resume={path}"]) == 2
    assert REFUSAL in capsys.readouterr().err and not marker.exists()


def test_init_from_refuses_a_malicious_file_run_folder_and_bundle(evil, tmp_path):
    path, marker = evil
    run_dir = tmp_path / "outputs" / "source"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "step_00000002.pt").write_bytes(path.read_bytes())
    (run_dir / "checkpoints" / "latest").write_text("step_00000002.pt\n", encoding="utf-8")
    bundle = tiny_bundle(tmp_path / "bundle", weights=path)
    backbone = tmp_path / "backbone.pt"
    backbone.write_bytes(path.read_bytes())
    for source, file in ((path, path), (run_dir, run_dir / "checkpoints" / "step_00000002.pt"),
                         (bundle, bundle / "models" / "model.pt"), (backbone, backbone)):  # fmt: skip
        with pytest.raises(ValueError, match=REFUSAL) as caught:
            read_init_source(source)
        assert str(file) in str(caught.value)
    assert not marker.exists()


def test_export_refuses_a_malicious_checkpoint_and_backbone_with_exit_code_2(evil, tmp_path, capsys):
    path, marker = evil
    assert main(["export", str(path), "--out", str(tmp_path / "bundle"), "--no-mlflow"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and REFUSAL in err
    run_dir = tmp_path / "run"  # a finished run's backbone.pt + backbone.json
    run_dir.mkdir()
    (run_dir / "backbone.pt").write_bytes(path.read_bytes())
    (run_dir / "backbone.json").write_text(json.dumps({"kwargs": {}, "out_dim": 8}), encoding="utf-8")
    assert main(["export", str(run_dir), "--out", str(tmp_path / "bundle"), "--no-mlflow"]) == 2
    err = capsys.readouterr().err
    assert str(run_dir / "backbone.pt") in err and REFUSAL in err
    assert not marker.exists() and not (tmp_path / "bundle").exists()


def test_finetune_backbones_refuse_a_malicious_bundle_backbone_or_checkpoint(evil, tmp_path):
    path, marker = evil
    good = load_backbone(str(tiny_bundle(tmp_path / "good")))  # the same bundle with plain weights loads
    assert good.message.startswith("matched")
    bundle = tiny_bundle(tmp_path / "bundle", weights=path)
    with pytest.raises(ValueError, match=REFUSAL) as caught:
        load_backbone(str(bundle))
    assert str(bundle / "models" / "model.pt") in str(caught.value)
    with pytest.raises(ValueError, match=REFUSAL):
        load_backbone(str(path))  # a file: exported first, which reads it
    with pytest.raises(ValueError, match=REFUSAL):
        load_space_encoder(str(path), "resnet18", "common")  # SepCLR heads from a checkpoint
    assert not marker.exists()


@pytest.mark.parametrize(
    "network_def",
    [
        "$__import__('os').system('touch {marker}')",
        {"_target_": "os.system", "command": "touch {marker}"},
        {"_target_": "monai.networks.nets.ResNet", "block": "$__import__('os').system('touch {marker}')"},
    ],
)
def test_a_bundle_config_that_runs_code_is_not_evaluated(tmp_path, network_def):
    marker = tmp_path / "config-ran"
    text = json.dumps(network_def).replace("{marker}", str(marker))
    bundle = tiny_bundle(tmp_path / "bundle", network_def=json.loads(text))
    with pytest.raises(ValueError, match=r"inference\.json"):
        load_backbone(str(bundle))
    assert not marker.exists()


def test_finetune_command_refuses_a_malicious_bundle_with_exit_code_2(evil, tmp_path, capsys, monkeypatch):
    path, marker = evil
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(finetune, "labelled_splits", lambda *args: ([], []))  # the encoder is what is under test
    bundle = tiny_bundle(tmp_path / "bundle", weights=path)
    code = main(["finetune", "task=classification", f"model.pretrained={bundle}", "mlflow=false", "progress=false"])
    captured = capsys.readouterr()
    assert code == 2, captured
    assert REFUSAL in captured.err and not marker.exists()
