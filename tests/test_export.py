"""`medssl export`: the pretrained encoder as a MONAI bundle that MONAI's own tools load, with strict keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from monai.bundle import ConfigParser, load, verify_net_in_out
from training import tiny_overrides, write_training_data

from medssl.cli import main
from medssl.export.bundle import export_bundle
from medssl.train.config import compose_pretrain_config
from medssl.train.trainer import Trainer


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    manifest = write_training_data(folder, volumes=2, images=4)
    config = compose_pretrain_config(tiny_overrides(manifest, folder, "trainer.max_steps=2", "run.name=exported"))
    return folder, Trainer(config, project_dir=folder).fit()


def trained_encoder(folder: Path, result) -> torch.nn.Module:  # the encoder as the run left it
    from medssl.models.encoders import monai_resnet

    meta = json.loads((result.output_dir / "backbone.json").read_text(encoding="utf-8"))
    net = monai_resnet(meta["kwargs"])
    net.load_state_dict(torch.load(result.backbone, weights_only=True), strict=True)
    return net.eval()


def parsed_network(bundle: Path) -> torch.nn.Module:
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True), strict=True)
    return net.eval()


@pytest.mark.parametrize("source", ["run_dir", "checkpoint", "run_id"])
def test_bundle_loads_strictly_into_a_monai_resnet_with_the_trained_weights(trained, tmp_path, source):
    folder, result = trained
    value = {
        "run_dir": str(result.output_dir),
        "checkpoint": str(result.checkpoint),
        "run_id": result.run_id,
    }[source]
    tracking = f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}"
    bundle = export_bundle(value, tmp_path / "bundle", tracking_uri=tracking, log_to_mlflow=False)
    net = parsed_network(bundle)
    assert type(net).__module__ == "monai.networks.nets.resnet"
    images = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(images), trained_encoder(folder, result)(images))

    meta = json.loads((bundle / "configs" / "metadata.json").read_text(encoding="utf-8"))
    medssl = meta["medssl"]
    assert medssl["run_id"] == result.run_id and medssl["method"] == "joint" and medssl["crop_size"] == 32
    assert medssl["intensity"]["CT"]["hu_windows_level_width"] == [[40, 400]]
    assert medssl["encoder_key_prefix"] == {"bundle": "", "training_checkpoint": "model.encoder.backbone."}
    assert meta["schema"].endswith("/meta_schema_20240725.json") and (bundle / "models" / "model.ts").is_file()
    # the joint run's slice transformer travels with the encoder (2.5D segmentation runs it); an MLflow run id gives
    # the logged encoder only
    transformer_file = bundle / "models" / "slice_transformer.pt"
    if source == "run_id":
        assert medssl["slice_transformer"] is None and not transformer_file.exists()
    else:
        state = torch.load(result.checkpoint, weights_only=True)["objective"]
        expected = {k[len("model.transformer.") :]: v for k, v in state.items() if k.startswith("model.transformer.")}
        written = torch.load(transformer_file, weights_only=True)
        assert expected and set(written) == set(expected)
        assert all(torch.equal(written[k], v) for k, v in expected.items())
        assert medssl["slice_transformer"]["kwargs"]["dim"] == 32  # tiny_overrides' model.transformer_dim
    # MONAI's own checks: the network's input/output against network_data_format, and bundle loading
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(bundle / "configs" / "metadata.json"),
        config_file=str(bundle / "configs" / "inference.json"),
        device="cpu",
    )
    loaded = load(name=bundle.name, bundle_dir=str(bundle.parent), workflow_type="inference", device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(images), net(images))


def test_export_command_logs_the_bundle_to_the_run(trained, tmp_path, monkeypatch, capsys):
    folder, result = trained
    monkeypatch.chdir(folder)  # the default MLflow store is the project's
    assert main(["export", str(result.output_dir), "--out", str(tmp_path / "b")]) == 0
    assert "MONAI bundle:" in capsys.readouterr().out
    client = MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}")
    names = {a.path for a in client.list_artifacts(result.run_id, "bundle")}
    assert "bundle/configs" in names and "bundle/models" in names


def test_group_norm_encoder_exports_through_medssl_builder(tmp_path):
    manifest = write_training_data(tmp_path, volumes=2, images=2)
    config = compose_pretrain_config(
        tiny_overrides(manifest, tmp_path, "model.norm=group", "trainer.max_steps=1", "run.name=g", "logging=none")
    )
    result = Trainer(config, project_dir=tmp_path).fit()
    bundle = export_bundle(str(result.output_dir), tmp_path / "bundle")
    network_def = json.loads((bundle / "configs" / "inference.json").read_text(encoding="utf-8"))["network_def"]
    assert network_def["_target_"] == "medssl.models.encoders.monai_resnet"
    net = parsed_network(bundle)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())


def test_bad_source_is_a_clear_error(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nothing"), "--out", str(tmp_path / "b")]) == 2
    assert "not a run folder, a checkpoint file or an MLflow run id" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_inference_config_loads_the_weights_strictly_itself(trained, tmp_path):
    folder, result = trained
    bundle = export_bundle(str(result.output_dir), tmp_path / "bundle", log_to_mlflow=False)
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    parser["device"] = "$torch.device('cpu')"
    assert str(parser.get_parsed_content("load_weights")) == "<All keys matched successfully>"
    images = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        net = parser.get_parsed_content("network").eval()
        torch.testing.assert_close(net(images), trained_encoder(folder, result)(images))


def test_inflated_3d_bundle_round_trip(trained, tmp_path, capsys):
    from medssl.export.inflate import inflate_resnet

    _, result = trained
    assert main(["export", str(result.output_dir), "--out", str(tmp_path / "b3"), "--spatial-dims", "3",
                 "--no-mlflow"]) == 0  # fmt: skip
    bundle = tmp_path / "b3"
    net = parsed_network(bundle)  # strict load of the inflated weights into a plain MONAI 3D ResNet
    assert net.conv1.weight.dim() == 5 and type(net).__module__ == "monai.networks.nets.resnet"
    meta = json.loads((bundle / "configs" / "metadata.json").read_text(encoding="utf-8"))
    assert meta["medssl"]["spatial_dims"] == 3 and meta["medssl"]["inflation"]["stem_kernel"][0] == 3
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == [32, 32, 32]
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(bundle / "configs" / "metadata.json"),
        config_file=str(bundle / "configs" / "inference.json"),
        device="cpu",
    )
    config_2d = json.loads((result.output_dir / "backbone.json").read_text(encoding="utf-8"))["kwargs"]
    expected, _ = inflate_resnet(torch.load(result.backbone, weights_only=True), config_2d)
    volume = torch.rand(1, 1, 12, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(volume), expected.eval()(volume))


def test_only_a_joint_run_with_a_volume_term_carries_a_slice_transformer():
    from medssl.export.backbones import trained_slice_transformer

    def run(name: str, **weights: float) -> dict:
        return {"method": {"name": name, "objective": {"weights": {"intra": 1.0, **weights}}}}

    assert trained_slice_transformer(run("joint", inter=1.0, mask=0.0))
    assert trained_slice_transformer(run("joint", inter=0.0, mask=1.0))
    assert not trained_slice_transformer(run("joint", inter=0.0, mask=0.0))
    assert not trained_slice_transformer(run("simclr", inter=1.0, mask=1.0))
    assert not trained_slice_transformer({})
