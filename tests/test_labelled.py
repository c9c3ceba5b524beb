"""Images with label maps: manifest `mask` column, `manifest scan --masks`, the labelled-case loader, and the
shared fine-tuning helpers (subject fractions, disjoint splits, strict backbone loading)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from factories import write_nifti, write_png
from labelled_data import HIPPOCAMPUS, write_segmentation_data

from medssl.cli import main
from medssl.data.errors import DataError, ManifestError
from medssl.data.geometry import slice_to_display
from medssl.data.labelled import load_case, load_cases, resample_labels
from medssl.data.manifest import ManifestRow, read_manifest, validate_manifest, write_manifest
from medssl.data.preprocess import PreprocessConfig
from medssl.downstream.common import check_disjoint, fraction_of_cases, load_backbone, resnet_stages

NATIVE = PreprocessConfig(spacing=None, max_side_2d=None)


def test_cases_pair_image_and_mask_on_one_grid(tmp_path):
    manifest = write_segmentation_data(tmp_path, volumes=2, images=2, test_every=2)
    cases, errors = load_cases(read_manifest(manifest), NATIVE)
    assert not errors and [c.id for c in cases] == ["v00", "v01", "i00", "i01"]
    for case in cases:
        assert case.image.shape[1:] == case.mask.shape and case.mask.dtype == np.int64
        assert set(np.unique(case.mask)) == {0, 1, 2}
        # the brighter object is class 2: the mask follows the image voxel for voxel
        assert case.image[0][case.mask == 2].mean() > case.image[0][case.mask == 0].mean() + 0.3
    volume = cases[0]
    image, mask = volume.display()
    assert image.shape == (1, 24, 24, 24) and np.array_equal(mask[5], slice_to_display(volume.mask[:, :, 5]))
    train, _ = load_cases(read_manifest(manifest), NATIVE, splits=["train"])
    assert [c.split for c in train] == ["train", "train"]


def test_resampling_keeps_labels_integer_and_on_the_image_grid(tmp_path):
    manifest = write_segmentation_data(tmp_path, volumes=1)
    row = read_manifest(manifest).rows[0]
    case = load_case(row, read_manifest(manifest).root, PreprocessConfig(spacing=[2.0, 2.0, 2.0]))
    assert case.image.shape[1:] == case.mask.shape == (12, 12, 12)
    assert case.zoom == (0.5, 0.5, 0.5) and case.spacing == (2.0, 2.0, 2.0)
    assert set(np.unique(case.mask)) <= {0, 1, 2}
    labels = np.zeros((4, 4), dtype=np.int64)
    labels[:2, :2] = 3
    np.testing.assert_array_equal(resample_labels(labels, (1.0, 1.0), (2, 2)), [[3, 0], [0, 0]])


def test_bad_cases_are_named_and_skipped(tmp_path):
    manifest = write_segmentation_data(tmp_path, volumes=4)
    data = tmp_path / "data"
    write_nifti(data / "labels" / "vol01.nii.gz", np.zeros((20, 24, 24), dtype=np.uint8))  # another shape
    write_nifti(data / "labels" / "vol02.nii.gz", np.full((24, 24, 24), 0.5, dtype=np.float32))  # not integers
    (data / "labels" / "vol03.nii.gz").unlink()
    cases, errors = load_cases(read_manifest(manifest), NATIVE)
    assert [c.id for c in cases] == ["v00"]
    messages = sorted(str(e) for e in errors)
    assert "vol01.nii.gz: mask shape (24, 24, 20) differs from its image's (24, 24, 24)" in messages[0]
    assert "vol02.nii.gz: mask values must be non-negative integers" in messages[1]
    assert "vol03.nii.gz: mask file not found" in messages[2]
    report = validate_manifest(manifest)
    assert any("mask file not found" in e and "vol03" in e for e in report.errors)


def test_rows_without_masks_are_a_clear_error(tmp_path):
    write_png(tmp_path / "a.png", np.zeros((8, 8), dtype=np.uint8))
    rows = [ManifestRow(id="a", path="a.png", format="image", dims=2, split="train")]
    write_manifest(tmp_path / "m.csv", rows, tmp_path)
    with pytest.raises(ManifestError, match="no rows with a 'mask'"):
        load_cases(read_manifest(tmp_path / "m.csv"), NATIVE)
    with pytest.raises(DataError, match="row has no mask"):
        load_case(rows[0], tmp_path, NATIVE)


def test_old_manifests_without_the_mask_column_still_validate(tmp_path):
    write_png(tmp_path / "a.png", np.zeros((8, 8), dtype=np.uint8))
    header = "id,path,series,format,dims,modality,subject,shape,spacing,split,group,label"
    (tmp_path / "old.csv").write_text(f"# medssl-manifest v1\n# root: .\n{header}\na,a.png,,image,2,OT,s,8x8,1x1,,,\n")
    assert validate_manifest(tmp_path / "old.csv").ok
    assert read_manifest(tmp_path / "old.csv").rows[0].mask == ""


def test_scan_with_masks_pairs_by_name_and_does_not_scan_the_masks(tmp_path, capsys):
    manifest = write_segmentation_data(tmp_path / "gen", volumes=3)
    data = tmp_path / "gen" / "data"
    (data / "labels" / "vol02.nii.gz").unlink()
    out = tmp_path / "scanned.csv"
    assert main(["manifest", "scan", str(data), "--out", str(out), "--masks", "labels", "--salt", "s",
                 "--no-progress"]) == 0  # fmt: skip
    scanned = read_manifest(out)
    assert scanned.path_map is not None
    paths = {**scanned.path_map.paths, "": ""}  # the rows name images and masks by key
    assert {paths[r.path]: paths[r.mask] for r in scanned.rows} == {
        "vol00.nii.gz": "labels/vol00.nii.gz",
        "vol01.nii.gz": "labels/vol01.nii.gz",
        "vol02.nii.gz": "",
    }
    assert "1 of 3 images have no mask in labels" in capsys.readouterr().err
    assert manifest.is_file()


def test_a_labels_csv_can_give_masks(tmp_path):
    write_segmentation_data(tmp_path, volumes=1)
    data = tmp_path / "data"
    (tmp_path / "labels.csv").write_text("path,mask,split\ndata/vol00.nii.gz,data/labels/vol00.nii.gz,train\n")
    out = tmp_path / "scanned.csv"
    args = ["manifest", "scan", str(data), "--out", str(out), "--salt", "s", "--no-progress", "--exclude", "labels/*"]
    assert main([*args, "--labels", str(tmp_path / "labels.csv")]) == 0
    manifest = read_manifest(out)
    (row,) = manifest.rows
    assert manifest.resolve_mask(row) == data / "labels" / "vol00.nii.gz" and row.split == "train"


@pytest.mark.skipif(not HIPPOCAMPUS.is_dir(), reason=f"real data not available: {HIPPOCAMPUS}")
def test_real_hippocampus_folder_scans_into_image_mask_pairs(tmp_path):
    out = tmp_path / "hippocampus.csv"
    assert main(["manifest", "scan", str(HIPPOCAMPUS), "--out", str(out), "--masks", "labels", "--modality", "MR",
                 "--salt", "s", "--no-progress"]) == 0  # fmt: skip
    manifest = read_manifest(out)
    assert len(manifest.rows) == 200
    labels = (HIPPOCAMPUS / "labels").resolve()
    assert all(manifest.resolve_mask(r).resolve() == labels / manifest.resolve(r).name for r in manifest.rows)
    cases, errors = load_cases(replace(manifest, rows=manifest.rows[:3]), NATIVE)
    assert not errors and all(set(np.unique(c.mask)) == {0, 1, 2} for c in cases)


def test_fractions_of_cases_are_by_subject_nested_and_at_least_one():
    subjects = ["a", "a", "b", "c", "d", "e", "f", "g", "h", "i", "j"]
    small, large = fraction_of_cases(subjects, 0.2, seed=1), fraction_of_cases(subjects, 0.5, seed=1)
    assert set(small) <= set(large)
    assert len({subjects[i] for i in small}) == 2 and len({subjects[i] for i in large}) == 5
    if "a" in {subjects[i] for i in large}:
        assert {0, 1} <= set(large)  # both cases of subject a
    assert len(fraction_of_cases(subjects, 0.01, seed=0)) >= 1
    assert fraction_of_cases(subjects, 1.0, seed=3) == list(range(len(subjects)))
    with pytest.raises(ValueError, match="label_fraction"):
        fraction_of_cases(subjects, 0, seed=0)


def test_shared_subjects_are_refused():
    check_disjoint(["a", "b", ""], ["c", ""])
    with pytest.raises(ValueError, match="1 subject"):
        check_disjoint(["a", "b"], ["b", "c"])


def test_backbone_loading_gives_stage_features_in_2d_and_3d():
    for dims in (2, 3):
        backbone = load_backbone("none", "resnet10", spatial_dims=dims)
        features = resnet_stages(backbone.network.eval(), torch.zeros(1, 1, *([32] * dims)))
        assert [f.shape[1] for f in features] == backbone.stage_channels
        assert backbone.spatial_dims == dims and "random initialisation" in backbone.message
    with pytest.raises(ValueError, match="spatial_dims"):
        load_backbone("none", spatial_dims=4)
    with pytest.raises(ValueError, match="not a bundle folder"):
        load_backbone(str(Path(__file__).parent))


def max_pool_bundle(folder: Path) -> Path:
    """A bundle whose small 2D ResNet keeps MONAI's max-pool stem (medssl's encoders drop it)."""
    import json

    from monai.networks.nets import ResNet

    from medssl.runtime.checkpoints import save_checkpoint

    kwargs = {"block": "basic", "layers": [1, 1, 1, 1], "block_inplanes": [4, 8, 8, 8], "spatial_dims": 2,
              "n_input_channels": 1, "no_max_pool": False, "feed_forward": False}  # fmt: skip
    (folder / "configs").mkdir(parents=True)
    network_def = {"_target_": "monai.networks.nets.ResNet", **kwargs}
    (folder / "configs" / "inference.json").write_text(json.dumps({"network_def": network_def}), encoding="utf-8")
    (folder / "configs" / "metadata.json").write_text(json.dumps({"medssl": {"run_id": "r"}}), encoding="utf-8")
    (folder / "models").mkdir()
    torch.manual_seed(123)
    save_checkpoint(folder / "models" / "model.pt", ResNet(**kwargs).state_dict())
    return folder


def test_random_init_copies_a_bundles_architecture_not_its_weights(tmp_path):
    """``encoder=<bundle>``: the random baseline of a backbone pretrained with a max-pool stem is that network, freshly
    drawn from the caller's seed (reading the bundle consumes none of it), in 2D and inflated to 3D."""
    from medssl.models.encoders import monai_resnet

    bundle = max_pool_bundle(tmp_path / "bundle")
    pretrained = load_backbone(str(bundle))
    torch.manual_seed(0)
    random = load_backbone("none", str(bundle))
    torch.manual_seed(0)
    expected = monai_resnet(random.kwargs).state_dict()
    assert random.kwargs == pretrained.kwargs and not random.network.no_max_pool
    assert "random initialisation (the architecture of" in random.message
    weights = random.network.state_dict()
    assert all(torch.equal(weights[k], expected[k]) for k in expected)  # the seed's draw, nothing consumed before
    conv = "conv1.weight"
    assert not torch.equal(weights[conv], pretrained.network.state_dict()[conv])  # not the bundle's weights
    named = load_backbone("none", "resnet10")  # a registered name: medssl's stem without max pool, as before
    assert named.network.no_max_pool and named.message == "random initialisation (resnet10, 2D)"
    volume = load_backbone("none", str(bundle), spatial_dims=3, depth_kernel=3)
    assert volume.spatial_dims == 3 and not volume.network.no_max_pool
    features = resnet_stages(volume.network.eval(), torch.zeros(1, 1, 32, 32, 32))
    assert [f.shape[1] for f in features] == volume.stage_channels
    with pytest.raises(ValueError, match="encoder='resnet19': not a registered encoder"):
        load_backbone("none", "resnet19")
