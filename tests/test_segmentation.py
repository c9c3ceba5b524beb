"""`medssl finetune task=segmentation`: the U-Net on the pretrained encoder, Dice, and end-to-end runs (2d and 3d)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from labelled_data import hippocampus_manifest, write_segmentation_data
from mlflow import MlflowClient

from medssl.cli import main
from medssl.downstream.common import load_backbone
from medssl.downstream.segmentation import (
    PretrainedUNet,
    SegmentationConfig,
    build_segmentation_model,
    dice_per_class,
    run_segmentation,
)
from medssl.export.backbones import ExportedBackbone
from medssl.export.bundle import write_bundle
from medssl.models.encoders import create_encoder
from medssl.runtime.configs import structured_config

SMALL = ["model.encoder=resnet10", "decoder_channels=[32,32,16,16,8]", "data.workers=1", "log_every=0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Generated cases (classes 1 and 2): volumes and 2D images for 2d, volumes only for 3d; and a 2D bundle."""
    folder = tmp_path_factory.mktemp("segmentation")
    mixed = write_segmentation_data(folder / "mixed", volumes=6, images=6)
    volumes = write_segmentation_data(folder / "volumes", volumes=4, images=0)
    torch.manual_seed(7)
    encoder = create_encoder("resnet10")
    weights = {
        k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v
        for k, v in encoder.backbone.state_dict().items()
    }  # not what a fresh random initialisation would give
    exported = ExportedBackbone(dict(encoder.backbone_config, norm="batch"), weights, 512, {}, None, "tiny")
    bundle = write_bundle(exported, folder / "bundle")
    return folder, mixed, volumes, bundle


def overrides(folder: Path, manifest: Path, mode: str, *extra: str) -> list[str]:
    roi = ["roi_size=32"] if mode == "2d" else ["roi_size=16", "roi_depth=8" if mode == "3d" else "roi_depth=4"]
    return [
        "task=segmentation",
        f"mode={mode}",
        f"data.manifest={manifest}",
        "data.preprocess.percentiles=[0,100]",
        "num_classes=3",
        "batch_size=2",
        "overlap=0",
        f"tracking_uri=sqlite:///{folder / 'mlruns' / 'mlflow.db'}",
        *SMALL,
        *roi,
        *extra,
    ]


def config(folder: Path, manifest: Path, mode: str, *extra: str) -> SegmentationConfig:
    return structured_config(SegmentationConfig, None, overrides(folder, manifest, mode, *extra)[1:])


@pytest.mark.parametrize(("dims", "shape"), [(2, (2, 1, 33, 47)), (3, (1, 1, 11, 21, 19))])
def test_unet_output_has_the_input_size_and_gradients_reach_the_encoder(dims, shape):
    loaded = load_backbone("none", "resnet10", spatial_dims=dims)
    model = PretrainedUNet(loaded.network, loaded.stage_channels, 3, dims, 1, decoder_channels=(16, 16, 8, 8, 8))
    x = torch.rand(shape)
    logits = model(x)
    assert logits.shape == (shape[0], 3, *shape[2:])
    logits.square().mean().backward()
    for name in ("conv1.weight", "layer1.0.conv1.weight", "layer4.0.conv2.weight"):
        grad = model.encoder.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_dice_per_class_matches_a_numpy_reference():
    rng = np.random.default_rng(0)
    labels = [rng.integers(0, 3, size=(4, 9, 7)), rng.integers(0, 3, size=(12, 10))]
    predictions = [np.where(rng.random(y.shape) < 0.7, y, rng.integers(0, 3, size=y.shape)) for y in labels]
    mean, per_case = dice_per_class(predictions, labels, num_classes=3)
    expected = np.array(
        [
            [2 * np.sum((p == k) & (y == k)) / (np.sum(p == k) + np.sum(y == k)) for k in (1, 2)]
            for p, y in zip(predictions, labels, strict=True)
        ]
    )
    np.testing.assert_allclose(per_case, expected, rtol=1e-5)
    np.testing.assert_allclose(mean, expected.mean(axis=0), rtol=1e-5)
    perfect, _ = dice_per_class(labels, labels, num_classes=3)
    np.testing.assert_allclose(perfect, [1.0, 1.0])


@pytest.mark.parametrize("mode", ["2d", "2.5d", "3d"])
def test_cli_runs_end_to_end_and_logs_dice(data, capsys, mode):
    folder, mixed, volumes, _ = data
    manifest = mixed if mode == "2d" else volumes
    code = main(["finetune", *overrides(folder, manifest, mode, "steps=2", "class_names=[ball,small]")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    dims = "3D" if mode == "3d" else "2D"
    if mode == "2.5d":
        assert "slice transformer: random init (the source carries none)" in captured.out
    assert f"random initialisation (resnet10, {dims})" in captured.out
    train, test = (8, 4) if mode == "2d" else (3, 1)
    assert f"segmentation {mode}, {train} training cases (1), {test} test, 2 steps: Dice mean" in captured.out
    assert "(ball " in captured.out and ", small " in captured.out
    client = MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("medssl-finetune").experiment_id])
    run = next(r for r in runs if r.info.run_name == f"segmentation-{mode}")
    assert {"dice/ball", "dice/small", "dice_mean"} <= set(run.data.metrics)
    assert run.data.params["mode"] == mode
    results = json.loads(Path(client.download_artifacts(run.info.run_id, "results.json", str(folder))).read_text())
    assert len(results["cases"]) == test and set(results["cases"][0]["dice"]) == {"ball", "small"}


def test_a_pretrained_bundle_loads_completely_in_2d_and_inflated_in_3d(data, capsys):
    folder, mixed, _, bundle = data
    weights = torch.load(bundle / "models" / "model.pt", weights_only=True)
    model, loaded = build_segmentation_model(config(folder, mixed, "2d", f"model.pretrained={bundle}"))
    assert loaded.message.startswith(f"matched {len(weights)}/{len(weights)} pretrained tensors")
    state = model.encoder.state_dict()
    assert set(state) == set(weights)
    for name, tensor in weights.items():
        assert torch.equal(state[name], tensor), name
    model_3d, loaded_3d = build_segmentation_model(config(folder, mixed, "3d", f"model.pretrained={bundle}"))
    assert "inflated to 3D (I3D)" in loaded_3d.message
    state_3d = model_3d.encoder.state_dict()
    for name in ("conv1.weight", "layer1.0.conv1.weight", "layer3.0.conv2.weight"):
        assert state_3d[name].ndim == 5
        torch.testing.assert_close(state_3d[name].sum(dim=2), weights[name])  # I3D: repeated along depth / depth
    code = main(["finetune", *overrides(folder, mixed, "2d", f"model.pretrained={bundle}", "steps=1", "mlflow=false")])
    assert code == 0
    assert f"matched {len(weights)}/{len(weights)} pretrained tensors" in capsys.readouterr().out


def test_training_learns_to_segment_the_generated_objects(data):
    """A check that can fail: 40 steps on the generated discs/balls lift the mean Dice well above an untrained net's.

    Measured (seed 0-2, 30-60 steps): untrained mean Dice 0.09-0.10 (class 1: 0.11-0.15); trained 0.19-0.31, the
    classes being learnt one after the other (the better class 0.38-0.62)."""
    folder, mixed, _, _ = data
    learn = ["batch_size=4", "lr=1e-2", "encoder_lr_scale=1", "mlflow=false"]
    untrained = run_segmentation(config(folder, mixed, "2d", "steps=0", *learn))
    trained = run_segmentation(config(folder, mixed, "2d", "steps=40", *learn))
    assert untrained["dice_mean"] < 0.15
    assert trained["dice_mean"] > untrained["dice_mean"] + 0.08
    assert max(trained["dice/class1"], trained["dice/class2"]) > 0.35


@pytest.mark.parametrize("mode", ["2d", "3d"])
def test_real_hippocampus_subset_runs_end_to_end(tmp_path, capsys, mode):
    manifest = hippocampus_manifest(tmp_path, train=8, test=4)
    extra = ["roi_size=32"] + (["roi_depth=16"] if mode == "3d" else [])
    result = run_segmentation(
        structured_config(
            SegmentationConfig,
            None,
            [
                f"mode={mode}",
                f"data.manifest={manifest}",
                "num_classes=3",
                "class_names=[anterior,posterior]",
                "batch_size=2",
                "steps=3",
                "overlap=0",
                "mlflow=false",
                *SMALL,
                *extra,
            ],
        )
    )
    out = capsys.readouterr().out
    assert f"segmentation {mode}, 8 training cases (1), 4 test, 3 steps: Dice mean" in out
    assert "(anterior " in out and ", posterior " in out
    for key in ("dice/anterior", "dice/posterior", "dice_mean"):
        assert math.isfinite(result[key]) and 0 <= result[key] <= 1, key


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("mode=4d", "mode must be one of ('2d', '2.5d', '3d'), got '4d'"),
        ("roi_size=8", "roi_size must be at least 16"),
        ("roi_depth=1", "roi_depth must be at least 2 in mode 2d"),
        ("slice_transformer=frozen", "slice_transformer must be one of ('auto', 'pretrained', 'random')"),
        ("num_classes=1", "num_classes must be >= 2"),
        ("class_names=[a]", "class_names must name the 2 foreground classes"),
        ("overlap=1", "overlap must be in [0, 1)"),
        ("decoder_channels=[8,8]", "decoder_channels must be 5"),
        ("segmentation_roi=3", "segmentation_roi"),
        ("num_classes=2", "num_classes=2, but case"),
    ],
)
def test_bad_settings_name_the_key(data, capsys, override, message):
    folder, mixed, _, _ = data
    assert main(["finetune", *overrides(folder, mixed, "2d", "steps=0", "mlflow=false", override)]) == 2
    assert message in capsys.readouterr().err


def test_mode_3d_refuses_2d_images(data, capsys):
    folder, mixed, _, _ = data
    assert main(["finetune", *overrides(folder, mixed, "3d", "steps=0", "mlflow=false")]) == 2
    assert "mode=3d needs volumes" in capsys.readouterr().err


def test_the_2_5d_model_starts_as_the_slice_wise_unet_and_then_sees_the_other_slices():
    """Zero-initialised context: at step 0 each slice's logits are the 2D U-Net's; once the context layer has
    weights, a change in one slice moves the logits of another (and never in the plain 2D U-Net)."""
    from medssl.downstream.slice_context import SliceContextUNet, slice_transformer_for

    torch.manual_seed(0)
    loaded = load_backbone("none", "resnet10", spatial_dims=2)
    unet = PretrainedUNet(loaded.network, loaded.stage_channels, 3, 2, 1, decoder_channels=(16, 16, 8, 8, 8)).eval()
    transformer, message = slice_transformer_for("random", "none", int(loaded.stage_channels[-1]))
    assert message == "slice transformer: random init (asked for)"
    model = SliceContextUNet(unet, transformer, slice_spacing=2.0).eval()
    x = torch.rand(2, 1, 5, 32, 32)  # [B, C, N, H, W]
    with torch.no_grad():
        logits = model(x)
        slice_wise = torch.stack([unet(x[:, :, n]) for n in range(5)], dim=2)
    assert logits.shape == (2, 3, 5, 32, 32)
    torch.testing.assert_close(logits, slice_wise)
    torch.nn.init.normal_(model.context.weight, std=0.5)
    changed = x.clone()
    changed[:, :, 4] = torch.rand(2, 1, 32, 32)  # only the last slice differs
    with torch.no_grad():
        before, after = model(x), model(changed)
        plain_before, plain_after = unet(x[:, :, 0]), unet(changed[:, :, 0])
    assert (before[:, :, 0] - after[:, :, 0]).abs().max() > 1e-4  # slice 0 saw slice 4 through the transformer
    torch.testing.assert_close(plain_before, plain_after)
    groups = _optimizer_groups(model)
    assert groups["encoder"] == {id(p) for p in model.encoder.parameters()}
    assert {id(p) for p in model.transformer.parameters()} <= groups["rest"]
    assert not groups["encoder"] & groups["rest"]


def _optimizer_groups(model: torch.nn.Module) -> dict[str, set[int]]:
    from medssl.downstream.segmentation import _optimizer

    optimizer = _optimizer(model, SegmentationConfig(encoder_lr_scale=0.5))
    rest, encoder = ({id(p) for p in group["params"]} for group in optimizer.param_groups)
    return {"rest": rest, "encoder": encoder}


def test_a_bundle_s_slice_transformer_loads_in_2_5d_and_is_required_when_asked(data, tmp_path):
    """A bundle that carries a slice transformer (a joint run's) gives 2.5d its exact weights; a bundle without one
    gives a random one under ``auto`` and a clear error under ``pretrained``."""
    from medssl.downstream.slice_context import SliceContextUNet
    from medssl.export.backbones import ExportedSliceTransformer
    from medssl.models.encoders import create_encoder
    from medssl.models.slice_transformer import SliceTransformer

    folder, _, volumes, plain_bundle = data
    torch.manual_seed(3)
    encoder = create_encoder("resnet10")
    kwargs = {"in_dim": 512, "dim": 32, "depth": 1, "heads": 4, "reference_stride": 2, "max_offset": 1.0,
              "attention": "deformable"}  # fmt: skip
    trained = SliceTransformer(**kwargs).state_dict()
    exported = ExportedBackbone(dict(encoder.backbone_config, norm="batch"), encoder.backbone.state_dict(), 512, {},
                                None, "joint", slice_transformer=ExportedSliceTransformer(kwargs, trained))  # fmt: skip
    bundle = write_bundle(exported, tmp_path / "joint-bundle")
    assert (bundle / "models" / "slice_transformer.pt").is_file()
    meta = json.loads((bundle / "configs" / "metadata.json").read_text(encoding="utf-8"))["medssl"]
    assert meta["slice_transformer"]["kwargs"] == kwargs
    model, loaded = build_segmentation_model(
        config(folder, volumes, "2.5d", f"model.pretrained={bundle}", "slice_transformer=pretrained")
    )
    assert isinstance(model, SliceContextUNet)
    assert f"slice transformer: pretrained, {len(trained)} tensors from {bundle}" in loaded.message
    for name, tensor in trained.items():
        assert torch.equal(model.transformer.state_dict()[name], tensor), name
    _, random_loaded = build_segmentation_model(config(folder, volumes, "2.5d", f"model.pretrained={plain_bundle}"))
    assert "slice transformer: random init (the source carries none)" in random_loaded.message
    assert not json.loads((plain_bundle / "configs" / "metadata.json").read_text())["medssl"]["slice_transformer"]
    with pytest.raises(ValueError, match=r"slice_transformer=pretrained, but model\.pretrained=.* carries none"):
        build_segmentation_model(
            config(folder, volumes, "2.5d", f"model.pretrained={plain_bundle}", "slice_transformer=pretrained")
        )
