"""Figures for the run's artifacts and the embedding snapshot they are drawn from."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

from medssl.data.cache import build_cache
from medssl.data.datasets import MultiCropSliceDataset, SliceConfig, cached_items
from medssl.data.manifest import read_manifest, write_manifest
from medssl.data.preprocess import PreprocessConfig
from medssl.data.scan import ScanOptions, scan_folder
from medssl.data.views import MultiCropConfig
from medssl.models.joint import JointModel, JointModelConfig
from medssl.train.pictures import (
    MAX_CATEGORIES,
    Snapshot,
    balanced_indices,
    curves_figure,
    embedding_projection_figure,
    embedding_snapshot,
    pca_2d,
    prototype_gallery_figure,
    prototype_usage_figure,
    snapshot_figures,
)


def pixels(fig: Figure) -> np.ndarray:
    """The rendered RGBA image (at a low resolution, for speed)."""
    fig.set_dpi(40)
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba()).copy()  # type: ignore[attr-defined]


def legend_texts(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_curves_figure_groups_losses_health_and_lr():
    steps = range(0, 50, 10)
    history = {
        "loss/total": [(s, 3.0 / (s + 1)) for s in steps],
        "loss/intra": [(s, 2.0 / (s + 1)) for s in steps],
        "loss/inter": [(0, 1.0), (10, float("nan")), (20, 0.5)],
        "health/intra_effective_prototypes": [(s, 10.0 + s) for s in steps],
        "health/inter_effective_prototypes": [(s, 5.0) for s in steps],
        "health/intra_alignment": [(s, 0.5) for s in steps],
        "health/intra_uniformity": [(s, -2.0) for s in steps],
        "health/intra_std_mean": [(s, 0.08) for s in steps],
        "health/salient_norm_target": [(s, 1.0) for s in steps],
        "lr": [(s, 1e-3) for s in steps],
        "throughput": [(0, 100.0)],  # not drawn
        "health/empty": [],
    }
    fig = curves_figure(history)
    assert isinstance(fig, Figure)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == [
        "loss",
        "effective prototypes",
        "alignment / uniformity",
        "embedding std",
        "health",
        "learning rate",
    ]
    loss_ax = fig.axes[0]
    assert loss_ax.get_yscale() == "log"
    assert sorted(legend_texts(loss_ax)) == ["inter", "intra", "total"]
    inter = next(line for line in loss_ax.get_lines() if line.get_label() == "inter")
    assert list(inter.get_xdata()) == [0, 20], "non-finite points are left out"
    assert fig.axes[2].get_yscale() == "linear"
    np.testing.assert_array_equal(pixels(fig), pixels(curves_figure(history)))


def test_curves_figure_edge_cases():
    empty = curves_figure({})
    assert len(empty.axes) == 1 and empty.axes[0].texts[0].get_text() == "no metrics yet"
    assert len(curves_figure({"loss/total": [(0, float("nan"))]}).axes) == 1
    negative = curves_figure({"loss/total": [(0, 1.0), (1, -0.5)], "lr": [(0, 0.1)]})
    assert [ax.get_title() for ax in negative.axes] == ["loss", "learning rate"]
    assert negative.axes[0].get_yscale() == "linear"


def test_pca_2d_is_deterministic_and_handles_degenerate_inputs():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 5)) * np.array([5.0, 1.0, 0.1, 0.1, 0.1])
    coords, ratio = pca_2d(x)
    assert coords.shape == (40, 2)
    assert ratio[0] > 0.9 and ratio[1] > 0.02 and ratio.sum() <= 1.0
    np.testing.assert_allclose(coords.mean(axis=0), 0.0, atol=1e-9)
    np.testing.assert_array_equal(coords, pca_2d(x.copy())[0])
    two, two_ratio = pca_2d(np.array([[0.0, 0.0], [3.0, 4.0]]))
    np.testing.assert_allclose(np.abs(two[:, 0]), [2.5, 2.5])
    np.testing.assert_array_equal(two[:, 1], 0.0)
    np.testing.assert_allclose(two_ratio, [1.0, 0.0])
    line, _ = pca_2d(np.arange(4.0)[:, None])  # D == 1
    np.testing.assert_allclose(line[:, 0], [-1.5, -0.5, 0.5, 1.5])
    same, same_ratio = pca_2d(np.ones((3, 4)))
    np.testing.assert_array_equal(same, 0.0)
    np.testing.assert_array_equal(same_ratio, 0.0)


def test_embedding_projection_one_panel_per_colouring_and_at_most_twenty_categories():
    rng = np.random.default_rng(1)
    n = 90
    embeddings = rng.normal(size=(n, 16)).astype(np.float32)
    modality = ["CT", "MR", "CR"] * (n // 3)
    label = [f"site{i % 30}" for i in range(n)]  # 30 categories -> 19 named + "other"
    label[0] = ""
    fig = embedding_projection_figure(embeddings, {"modality": modality, "label": label}, "step 10")
    assert len(fig.axes) == 2
    assert fig.get_suptitle() == "step 10"
    assert legend_texts(fig.axes[0]) == ["CR (30)", "CT (30)", "MR (30)"]
    texts = legend_texts(fig.axes[1])
    assert len(texts) == MAX_CATEGORIES and texts[-1].startswith("other (")
    assert sum(int(t.rsplit("(", 1)[1].rstrip(")")) for t in texts) == n
    assert "unlabelled (1)" in texts or texts[-1] != "other (0)"
    again = embedding_projection_figure(embeddings, {"modality": modality, "label": label}, "step 10")
    np.testing.assert_array_equal(pixels(fig), pixels(again))
    with pytest.raises(ValueError, match=r"colour_by\['label'\] has 3 values for 90"):
        embedding_projection_figure(embeddings, {"label": ["a", "b", "c"]}, "x")


def test_embedding_projection_of_two_points_and_a_single_category():
    fig = embedding_projection_figure(np.array([[0.0], [1.0]]), {"modality": ["MR", "MR"]}, "tiny")
    assert len(fig.axes) == 1
    assert legend_texts(fig.axes[0]) == ["MR (2)"]
    pixels(fig)  # draws
    assert len(embedding_projection_figure(np.zeros((2, 3)), {}, "no colouring").axes) == 1


def test_prototype_gallery_rows_are_the_most_used_prototypes():
    rng = np.random.default_rng(2)
    images = rng.uniform(size=(12, 10, 8)).astype(np.float32)
    assignments = np.array([5, 5, 5, 5, 5, 2, 2, 2, 7, 7, 7, 1])  # counts: 5->5, 2->3, 7->3, 1->1
    fig = prototype_gallery_figure(images, assignments, n_prototypes=3, per_prototype=4)
    labels = [ax.get_title(loc="left") for ax in fig.axes]
    assert labels == ["prototype 5 (n=5)", "prototype 2 (n=3)", "prototype 7 (n=3)"]
    strip = fig.axes[0].get_images()[0].get_array()
    assert strip.shape[0] == 10 and strip.shape[1] == 4 * 8 + 3 * 1
    np.testing.assert_allclose(strip[:, :8], images[0])  # the first of prototype 5's images
    few = prototype_gallery_figure(images, assignments, n_prototypes=8, per_prototype=8)
    assert len(few.axes) == 4, "fewer prototypes used than requested: one row per used prototype"
    row = few.axes[3].get_images()[0].get_array()
    assert np.ma.getmaskarray(row)[:, 8:].all(), "unused slots stay blank"
    np.testing.assert_array_equal(pixels(few), pixels(prototype_gallery_figure(images, assignments)))
    empty = prototype_gallery_figure(np.zeros((0, 4, 4)), np.zeros(0, dtype=np.int64))
    assert len(empty.axes) == 1
    with pytest.raises(ValueError, match=r"3 assignments for 12 images"):
        prototype_gallery_figure(images, np.array([0, 1, 2]))


def test_prototype_usage_figure():
    fig = prototype_usage_figure(np.array([0, 0, 0, 3, 3, 9]), 16)
    assert len(fig.axes) == 1
    assert fig.axes[0].get_title().startswith("3 of 16 prototypes used")
    with pytest.raises(ValueError, match=r"out of range for 8 prototypes"):
        prototype_usage_figure(np.array([0, 8]), 8)


def tiny_dataset(tmp_path: Path) -> MultiCropSliceDataset:
    """Two PNG images (label ``lesion``, modality CR) and one NIfTI volume (no label, MR), cached."""
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    volume = np.zeros((20, 16, 6), np.float32)
    volume[:, :, 1:5] = rng.uniform(50, 100, size=(20, 16, 4))
    nib.save(nib.Nifti1Image(volume, np.eye(4)), str(data / "vol.nii.gz"))
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, size=(40, 24), dtype=np.uint8)).save(data / f"img{i}.png")
    rows = scan_folder(data, ScanOptions(salt="t", progress=False, modality="MR")).rows
    rows = [
        type(r)(**{**r.__dict__, "label": "lesion", "modality": "CR"}) if r.dims == 2 else r
        for r in rows  # images
    ]
    write_manifest(tmp_path / "m.csv", rows, data)
    manifest = read_manifest(tmp_path / "m.csv")
    config = PreprocessConfig(percentiles=[0, 100], foreground_threshold=0.05)
    build_cache(manifest, tmp_path / "cache", config, workers=1, progress=False)
    items = cached_items(manifest, tmp_path / "cache", config)
    return MultiCropSliceDataset(
        items, views=MultiCropConfig(global_size=24, local_size=12, n_local=1), slices=SliceConfig(min_foreground=0.5)
    )


def tiny_model() -> JointModel:
    torch.manual_seed(0)
    config = JointModelConfig(
        encoder="resnet10",
        projector_hidden=32,
        projector_dim=16,
        intra_prototypes=[8],
        transformer_dim=32,
        transformer_heads=4,
        inter_prototypes=[4],
    )
    return JointModel(config)


def test_embedding_snapshot_shapes_determinism_and_train_mode(tmp_path):
    dataset = tiny_dataset(tmp_path)
    assert len(dataset) == 2 + 4
    model = tiny_model()
    model.train()
    model.transformer.eval()  # a submodule in its own mode stays so
    snapshot = embedding_snapshot(model, dataset, n_samples=4, size=20, device="cpu")
    assert model.training and model.encoder.training and not model.transformer.training
    assert isinstance(snapshot, Snapshot)
    assert snapshot.features.shape == (4, model.encoder.out_dim) and snapshot.features.dtype == np.float32
    assert snapshot.assignments.shape == (4,) and snapshot.assignments.dtype == np.int64
    assert snapshot.assignments.min() >= 0 and snapshot.assignments.max() < 8
    assert snapshot.n_prototypes == 8
    assert snapshot.images.shape == (4, 20, 20) and snapshot.images.dtype == np.float32
    assert snapshot.images.min() >= 0.0 and snapshot.images.max() <= 1.0 and snapshot.images.max() > 0.0
    assert len(snapshot.modality) == len(snapshot.label) == len(snapshot.dims) == 4
    rows = [dataset.items[int(dataset.item_index[i])].row for i in (0, 1, 3, 4)]  # floor(j * 6 / 4)
    assert snapshot.dims == [r.dims for r in rows]
    expected_labels = {2: ("CR", "lesion"), 3: ("MR", "unlabelled")}
    assert list(zip(snapshot.modality, snapshot.label, strict=True)) == [expected_labels[d] for d in snapshot.dims]

    # the un-augmented image fitted into 20 x 20: a 40 x 24 PNG keeps its aspect (zero columns at the sides)
    image_index = snapshot.dims.index(2)
    assert np.all(snapshot.images[image_index][:, :3] == 0.0) and snapshot.images[image_index][:, 5:15].max() > 0

    again = embedding_snapshot(model, dataset, n_samples=4, size=20, device="cpu")
    np.testing.assert_array_equal(snapshot.features, again.features)
    np.testing.assert_array_equal(snapshot.assignments, again.assignments)
    np.testing.assert_array_equal(snapshot.images, again.images)
    with torch.no_grad():
        model.eval()
        x = torch.from_numpy(snapshot.images[:, None])
        torch.testing.assert_close(model.encode([x])[0].numpy(), snapshot.features)

    everything = embedding_snapshot(model, dataset, n_samples=100, size=16, device="cpu", batch_size=4)
    assert everything.features.shape[0] == len(dataset) and set(everything.dims) == {2, 3}
    figures = snapshot_figures(everything, "snapshot")
    assert sorted(figures) == ["embeddings.png", "prototype_gallery.png", "prototype_usage.png"]
    assert len(figures["embeddings.png"].axes) == 3
    with pytest.raises(ValueError, match=r"n_samples, size and batch_size must be >= 1"):
        embedding_snapshot(model, dataset, n_samples=0, size=16, device="cpu")


def test_balanced_indices_cover_every_item_before_repeating_one():
    item_index = np.array([0] * 100 + [1] + [2] + [3] * 10)
    chosen = balanced_indices(item_index, 6)
    assert len(chosen) == len(set(chosen.tolist())) == 6
    assert {100, 101} <= set(chosen.tolist())  # the two single-sample items (e.g. X-rays) are in
    counts = np.bincount(item_index[chosen], minlength=4)
    assert counts.tolist() == [2, 1, 1, 2]
    assert set(chosen[item_index[chosen] == 0].tolist()) == {25, 75}  # spread over the volume's slices
    assert len(balanced_indices(item_index, 1000)) == len(item_index)
