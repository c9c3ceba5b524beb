"""`medssl finetune task=detection`: boxes (from masks or a JSON file), RetinaNet on the pretrained ResNet, COCO mAP."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from labelled_data import hippocampus_manifest, write_segmentation_data
from mlflow import MlflowClient
from training import tiny_overrides, write_training_data

from medssl.cli import main
from medssl.downstream.common import load_backbone
from medssl.downstream.detection import (
    CaseBoxes,
    DetectionConfig,
    backbone_of,
    boxes_from_mask,
    build_detector,
    detection_metrics,
    validate_boxes,
)
from medssl.export.bundle import export_bundle
from medssl.train.config import compose_pretrain_config
from medssl.train.trainer import Trainer

FAST = ["model.encoder=resnet10", "fpn_channels=16", "batch_size=1", "steps=3", "lr=1e-3", "data.workers=1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Generated 2D images and 3D volumes with two objects each (+ label maps), and a tiny pretrained bundle."""
    folder = tmp_path_factory.mktemp("detection")
    images = write_segmentation_data(folder / "images", volumes=0, images=4, shape=16)
    volumes = write_segmentation_data(folder / "volumes", volumes=4, images=0, shape=16)
    pre = folder / "pre"
    manifest = write_training_data(pre, volumes=1, images=4)
    config = compose_pretrain_config(tiny_overrides(manifest, pre, "trainer.max_steps=1", "run.name=pre"))
    result = Trainer(config, project_dir=pre).fit()
    bundle = export_bundle(str(result.output_dir), folder / "bundle", log_to_mlflow=False)
    return folder, images, volumes, bundle


def finetune(folder: Path, manifest: Path, dims: int, *extra: str) -> int:
    return main(
        [
            "finetune",
            "task=detection",
            f"spatial_dims={dims}",
            f"data.manifest={manifest}",
            "data.preprocess.percentiles=[0,100]",
            f"tracking_uri=sqlite:///{folder / 'pre' / 'mlruns' / 'mlflow.db'}",  # the pretraining run's store
            *FAST,
            *extra,
        ]
    )


def reference_box(region: np.ndarray) -> list[float]:
    """Corner box (exclusive max) of the True voxels of one region, written plainly."""
    where = np.nonzero(region)
    return [float(w.min()) for w in where] + [float(w.max() + 1) for w in where]


@pytest.mark.parametrize("dims", [2, 3])
def test_boxes_from_masks_are_one_per_component_of_each_class(dims):
    shape = (12,) * dims
    mask = np.zeros(shape, dtype=np.int64)
    first, second, third = (np.zeros(shape, dtype=bool) for _ in range(3))
    first[(slice(1, 4),) * dims] = True
    second[(slice(6, 11), slice(7, 9), *(slice(2, 5),) * (dims - 2))] = True
    third[(slice(1, 3), slice(8, 12), *(slice(9, 10),) * (dims - 2))] = True
    mask[first | second] = 1  # two components of class 1
    mask[third] = 2
    found = boxes_from_mask(mask)
    expected = sorted([(reference_box(first), 0), (reference_box(second), 0), (reference_box(third), 1)])
    assert sorted(zip(found.boxes.tolist(), found.labels.tolist(), strict=True)) == expected
    assert found.boxes.shape == (3, 2 * dims) and found.boxes.dtype == np.float32
    empty = boxes_from_mask(np.zeros(shape, dtype=np.int64))
    assert empty.boxes.shape == (0, 2 * dims) and empty.labels.shape == (0,)


def test_diagonal_neighbours_are_one_component():
    mask = np.zeros((6, 6), dtype=np.int64)
    mask[1, 1] = mask[2, 2] = 1
    assert boxes_from_mask(mask).boxes.tolist() == [[1.0, 1.0, 3.0, 3.0]]


def test_box_validation_names_the_row():
    ok = CaseBoxes(np.array([[0, 0, 4, 4]], np.float32), np.array([0]))
    validate_boxes("r1", ok, (4, 4))
    for bad in ([[0, 0, 5, 4]], [[2, 0, 2, 4]], [[-1, 0, 2, 4]]):
        with pytest.raises(ValueError, match="row r1: box"):
            validate_boxes("r1", CaseBoxes(np.array(bad, np.float32), np.array([0])), (4, 4))


def test_a_bad_boxes_file_is_an_error_naming_the_row(data, capsys, tmp_path):
    folder, images, _, _ = data
    boxes = {}
    for row_id in ("i00", "i01", "i02", "i03"):
        boxes[row_id] = {"boxes": [[1, 1, 5, 5]], "labels": [0]}
    boxes["i01"] = {"boxes": [[1, 1, 5, 40]], "labels": [0]}  # images are 32 x 32
    path = tmp_path / "boxes.json"
    path.write_text(json.dumps(boxes), encoding="utf-8")
    assert finetune(folder, images, 2, f"data.boxes={path}", "mlflow=false") == 2
    assert "row i01: box [1.0, 1.0, 5.0, 40.0] is not inside the image [32, 32]" in capsys.readouterr().err
    boxes["i01"] = {"boxes": [[1, 1, 5, 5]], "labels": [0]}
    boxes["nobody"] = {"boxes": [], "labels": []}
    path.write_text(json.dumps(boxes), encoding="utf-8")
    assert finetune(folder, images, 2, f"data.boxes={path}", "mlflow=false") == 2
    assert "row id 'nobody' is not in the manifest" in capsys.readouterr().err


def test_coco_map_is_one_for_perfect_and_zero_for_disjoint_predictions():
    targets = [
        CaseBoxes(np.array([[2, 2, 2, 8, 8, 8], [10, 10, 10, 14, 14, 14]], np.float32), np.array([0, 1])),
        CaseBoxes(np.array([[0, 0, 0, 4, 6, 8]], np.float32), np.array([0])),
    ]
    perfect = detection_metrics(targets, targets, ["a", "b"], iou_thresholds=[0.1, 0.5])
    assert perfect["map_iou_0.10"] == pytest.approx(1.0) and perfect["map_iou_0.50"] == pytest.approx(1.0)
    assert perfect["mar_iou_0.50"] == pytest.approx(1.0) and perfect["map"] == pytest.approx(1.0)
    shifted = [CaseBoxes(t.boxes + 20, t.labels) for t in targets]
    disjoint = detection_metrics(shifted, targets, ["a", "b"], iou_thresholds=[0.1, 0.5])
    assert disjoint["map_iou_0.10"] == 0 and disjoint["map_iou_0.50"] == 0 and disjoint["mar_iou_0.10"] == 0


@pytest.mark.parametrize("dims", [2, 3])
def test_the_detector_backbone_holds_the_pretrained_weights_without_max_pool(data, dims):
    _, _, _, bundle = data
    loaded = load_backbone(str(bundle), "resnet10", spatial_dims=dims)
    reference = {
        k: v.clone() for k, v in load_backbone(str(bundle), "resnet10", spatial_dims=dims).network.state_dict().items()
    }
    if dims == 2:  # the bundle's own tensors
        weights = torch.load(bundle / "models" / "model.pt", weights_only=True)
        assert set(weights) == set(reference)
        assert all(torch.equal(weights[k], reference[k]) for k in weights)
    assert loaded.network.no_max_pool
    detector = build_detector(DetectionConfig(spatial_dims=dims, fpn_channels=16), loaded, num_classes=2)
    backbone = backbone_of(detector)
    state = backbone.state_dict()
    assert set(state) == set(reference)
    assert all(torch.equal(state[k], reference[k]) for k in reference)
    assert isinstance(backbone.maxpool, torch.nn.Identity)
    assert all(p.requires_grad for p in backbone.parameters())
    # every backbone tensor is used: each parameter gets a gradient from the pyramid
    x = torch.rand(1, 1, *((32, 32) if dims == 2 else (16, 16, 16)))
    sum(f.sum() for f in detector.network.feature_extractor(x).values()).backward()
    assert all(p.grad is not None for p in backbone.parameters())
    # no max pool: the finest level has the stem's stride (2 in-plane; 1 in depth for the inflated encoder)
    finest = next(iter(detector.network.feature_extractor(x).values()))
    assert list(finest.shape[2:]) == ([16, 16] if dims == 2 else [16, 8, 8])


def mlflow_client(folder: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{folder / 'pre' / 'mlruns' / 'mlflow.db'}")


def mlflow_runs(folder: Path):
    client = mlflow_client(folder)
    return client.search_runs([client.get_experiment_by_name("medssl-finetune").experiment_id])


def test_2d_random_init_end_to_end_logs_map(data, capsys, tmp_path):
    folder, images, _, _ = data
    assert finetune(folder, images, 2, "model.pretrained=none", "steps=4") == 0
    out = capsys.readouterr().out
    assert "boxes derived from masks" in out and "random initialisation (resnet10, 2D)" in out
    assert "detection (2D, 2 classes), 3 training cases (1), 1 test, 4 steps" in out and "mAP@0.10" in out
    run = next(r for r in mlflow_runs(folder) if r.data.params.get("spatial_dims") == "2")
    assert {"map_iou_0.10", "map_iou_0.50", "mar_iou_0.10", "map", "mar"} <= set(run.data.metrics)
    assert 0 <= run.data.metrics["map_iou_0.10"] <= 1
    assert run.data.tags["medssl.boxes"].startswith("boxes derived from masks")
    results = json.loads(
        Path(mlflow_client(folder).download_artifacts(run.info.run_id, "results.json", str(tmp_path))).read_text()
    )
    assert results["boxes"].startswith("boxes derived from masks") and len(results["losses"]) == 4
    assert list(results["cases"]) == ["i02"] and results["cases"]["i02"]["ground_truth"] == 2
    assert results["cases"]["i02"]["predictions"] >= 0 and "map_iou_0.50" in results["metrics"]


def test_3d_pretrained_bundle_end_to_end(data, capsys):
    folder, _, volumes, bundle = data
    n_tensors = len(torch.load(bundle / "models" / "model.pt", weights_only=True))
    assert finetune(folder, volumes, 3, f"model.pretrained={bundle}", "steps=2") == 0
    out = capsys.readouterr().out
    assert f"matched {n_tensors}/{n_tensors} pretrained tensors" in out and "inflated to 3D (I3D)" in out
    assert "detection (3D, 2 classes)" in out
    run = next(r for r in mlflow_runs(folder) if r.data.params.get("spatial_dims") == "3")
    assert np.isfinite(run.data.metrics["map_iou_0.50"])
    assert run.data.tags["medssl.pretrained_loaded"].startswith(f"matched {n_tensors}/{n_tensors}")


def test_3d_random_init_and_2d_pretrained_with_a_boxes_file(data, capsys):
    folder, images, volumes, bundle = data
    assert finetune(folder, volumes, 3, "model.pretrained=none", "steps=2", "mlflow=false") == 0
    assert "random initialisation (resnet10, 3D)" in capsys.readouterr().out
    boxes = {f"i{k:02d}": {"boxes": [[2, 3, 12, 14]], "labels": [0]} for k in range(4)}
    beside = images.with_name(f"{images.stem}.boxes.json")  # found beside the manifest
    beside.write_text(json.dumps(boxes), encoding="utf-8")
    try:
        assert finetune(folder, images, 2, f"model.pretrained={bundle}", "mlflow=false") == 0
    finally:
        beside.unlink()
    out = capsys.readouterr().out
    assert f"boxes from {beside}" in out and "(2D, 1 classes)" in out and "matched" in out


def test_real_hippocampus_subset_end_to_end(tmp_path, capsys):
    manifest = hippocampus_manifest(tmp_path, train=1, test=1)
    assert finetune(tmp_path, manifest, 3, "steps=1", "mlflow=false", "class_names=[anterior,posterior]") == 0
    out = capsys.readouterr().out
    assert "boxes derived from masks (connected components)" in out
    line = next(x for x in out.splitlines() if "detection (3D, 2 classes)" in x)
    values = [float(x.split()[1].rstrip(",")) for x in line.split("mAP@")[1:]]
    assert values and all(np.isfinite(v) and 0 <= v <= 1 for v in values)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("spatial_dims=4", "spatial_dims must be 2 or 3"),
        ("returned_layers=[0,2]", "returned_layers must be ResNet stages"),
        ("optimizer=lbfgs", "optimizer must be one of"),
        ("anchor_shapes=[[4.0,4.0,4.0]]", "anchor_shapes must be positive shapes"),
        ("iou_thresholds=[1.5]", "iou_thresholds must be in (0, 1]"),
        ("num_classes=0", "num_classes must be >= 1"),
        ("data.label_fraction=0", "label_fraction must be in (0, 1]"),
        ("steps=0", "steps must be >= 1"),
        ("data.boxess=x", "data.boxess"),
    ],
)
def test_bad_detection_settings_name_the_key(data, capsys, override, message):
    folder, images, _, _ = data
    assert finetune(folder, images, 2, override, "mlflow=false") == 2
    assert message in capsys.readouterr().err


def test_atss_matching_is_monai_s_and_monai_is_left_as_it_is():
    """The subclass's matching equals MONAI's ATSS matcher called directly (no box: every anchor unmatched), and
    building a detector replaces nothing in MONAI's module (torchvision's Matcher name stays MONAI's own)."""
    from monai.apps.detection.networks import retinanet_detector
    from monai.apps.detection.utils.ATSS_matcher import ATSSMatcher
    from monai.data.box_utils import box_iou

    from medssl.downstream.atss_detector import ATSSRetinaNetDetector

    before = retinanet_detector.Matcher
    built = build_detector(DetectionConfig(fpn_channels=16), load_backbone("none", "resnet10"), num_classes=2)
    assert isinstance(built, ATSSRetinaNetDetector) and isinstance(built.proposal_matcher, ATSSMatcher)
    detector = ATSSRetinaNetDetector.__new__(ATSSRetinaNetDetector)
    torch.nn.Module.__init__(detector)
    detector.target_box_key, detector.num_anchors_per_loc, detector.debug = "boxes", 1, False
    detector.proposal_matcher = ATSSMatcher(4, box_iou, center_in_gt=False)
    grid = torch.stack(torch.meshgrid(torch.arange(0.0, 16, 4), torch.arange(0.0, 16, 4), indexing="ij"), -1)
    anchors = torch.cat([grid.reshape(-1, 2), grid.reshape(-1, 2) + 6], dim=1)  # 16 anchors, 6 px wide
    boxes = torch.tensor([[1.0, 1.0, 7.0, 7.0], [8.0, 8.0, 14.0, 14.0]])
    got = detector.compute_anchor_matched_idxs([anchors, anchors], [{"boxes": boxes}, {"boxes": boxes[:0]}], [16])
    _, expected = ATSSMatcher(4, box_iou, center_in_gt=False)(boxes, anchors, [16], 1)
    assert torch.equal(got[0], expected) and (got[0] >= 0).any()
    assert torch.equal(got[1], torch.full((16,), -1, dtype=torch.int64))
    assert retinanet_detector.Matcher is before
