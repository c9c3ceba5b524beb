"""Frozen-feature probes: metrics against plain references, linear and kNN probes, subsets, features end to end."""

from __future__ import annotations

from itertools import product
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from labelled_data import kermany_manifest
from PIL import Image

from medssl.data.cache import build_cache
from medssl.data.datasets import CachedItem, cached_items
from medssl.data.geometry import slice_to_display
from medssl.data.manifest import ManifestRow, read_manifest, write_manifest
from medssl.data.preprocess import PreprocessConfig
from medssl.data.scan import ScanOptions, scan_folder
from medssl.downstream.probes import (
    LabelledImageDataset,
    check_disjoint_subjects,
    classification_metrics,
    extract_features,
    knn_probe,
    label_fraction_subset,
    linear_probe,
)
from medssl.models.encoders import create_encoder


def pairwise_auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """AUROC by its ranking definition: P(score of a positive > score of a negative), ties count 1/2."""
    pos, neg = scores[positive], scores[~positive]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_binary_metrics_match_plain_references():
    p1 = np.array([0.9, 0.8, 0.4, 0.4, 0.3, 0.6, 0.2, 0.7])
    labels = np.array([1, 1, 1, 0, 0, 0, 0, 1])
    probabilities = np.stack([1 - p1, p1], axis=1)
    metrics = classification_metrics(probabilities, labels, ["a", "b"])
    # predictions (p1 > 0.5): 1 1 0 0 0 1 0 1 -> class b 3/4 right, class a 3/4 right
    assert metrics["accuracy"] == pytest.approx(6 / 8)
    assert metrics["recall"] == {"a": pytest.approx(0.75), "b": pytest.approx(0.75)}
    assert metrics["balanced_accuracy"] == pytest.approx(0.75)
    assert metrics["auroc"] == pytest.approx(pairwise_auroc(p1, labels == 1))
    assert metrics["auroc"] == pytest.approx(14.5 / 16)  # one tie (0.4, 0.4), one inversion (0.6 > 0.4)
    assert metrics["n"] == 8


def test_imbalanced_balanced_accuracy_and_multiclass_auroc():
    rng = np.random.default_rng(0)
    labels = np.array([0] * 6 + [1] * 3 + [2] * 2)
    probabilities = rng.dirichlet(np.ones(3), size=len(labels))
    metrics = classification_metrics(probabilities, labels, ["x", "y", "z"])
    predictions = probabilities.argmax(1)
    recalls = [np.mean(predictions[labels == c] == c) for c in range(3)]
    assert metrics["balanced_accuracy"] == pytest.approx(sum(recalls) / 3)
    assert metrics["accuracy"] == pytest.approx(np.mean(predictions == labels))
    macro = np.mean([pairwise_auroc(probabilities[:, c], labels == c) for c in range(3)])
    assert metrics["auroc"] == pytest.approx(macro)


def test_metrics_name_a_class_missing_from_the_labels():
    with pytest.raises(ValueError, match=r"\['z'\] have no sample"):
        classification_metrics(np.full((3, 3), 1 / 3), np.array([0, 1, 1]), ["x", "y", "z"])
    with pytest.raises(ValueError, match=r"probabilities must be \[N, K\]"):
        classification_metrics(np.full((3, 2), 0.5), np.array([0, 1, 1]), ["x", "y", "z"])


def blobs(n: int, seed: int, dim: int = 16, shift: float = 5.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.array(["neg", "pos"] * (n // 2))
    x = rng.normal(size=(n, dim)).astype(np.float32)
    x[y == "pos", 0] += shift
    x[:, 1] *= 100  # scale differences are removed by the standardisation
    return x, y


def test_linear_probe_separates_blobs_and_is_deterministic():
    train_x, train_y = blobs(200, seed=0)
    test_x, test_y = blobs(200, seed=1)
    result = linear_probe(train_x, train_y, test_x, test_y, seed=3)
    assert result.class_names == ["neg", "pos"]
    assert result.metrics["accuracy"] > 0.95
    assert result.probabilities.shape == (200, 2)
    np.testing.assert_allclose(result.probabilities.sum(1), 1.0)
    assert result.weight_decay in result.validation_losses
    again = linear_probe(train_x, train_y, test_x, test_y, seed=3)
    np.testing.assert_array_equal(result.probabilities, again.probabilities)
    assert again.weight_decay == result.weight_decay
    fixed = linear_probe(train_x, train_y, test_x, test_y, weight_decay=0.1)
    assert fixed.weight_decay == 0.1 and not fixed.validation_losses
    with pytest.raises(ValueError, match=r"test labels \['other'\]"):
        linear_probe(train_x, train_y, test_x, np.array(["other"] * 200))


def test_knn_probe_known_answer():
    train_x = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [0.2, 1.0]], dtype=np.float32)
    train_y = np.array(["a", "a", "b", "b", "b"])
    test_x = np.array([[2.0, 0.1], [0.1, 3.0]], dtype=np.float32)  # scale is ignored (cosine)
    test_y = np.array(["a", "b"])
    result = knn_probe(train_x, train_y, test_x, test_y, k=2, temperature=0.1)
    np.testing.assert_array_equal(result.predictions, [0, 1])
    assert result.metrics["accuracy"] == 1.0
    np.testing.assert_allclose(result.probabilities[0], [1.0, 0.0])  # both neighbours are "a"
    # k larger than the training set: every sample votes with weight exp(cos / T)
    result = knn_probe(train_x, train_y, test_x[:1].repeat(2, 0), np.array(["a", "b"]), k=50, temperature=0.5)
    unit = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    query = test_x[0] / np.linalg.norm(test_x[0])
    weights = np.exp(unit @ query / 0.5)
    expected = np.array([weights[:2].sum(), weights[2:].sum()]) / weights.sum()
    np.testing.assert_allclose(result.probabilities[0], expected, rtol=1e-6)


def test_label_fraction_subset_is_stratified_nested_and_deterministic():
    labels = np.array(["a"] * 50 + ["b"] * 20 + ["c"] * 3)
    subset = label_fraction_subset(labels, 0.1, seed=0)
    counts = {c: int((labels[subset] == c).sum()) for c in "abc"}
    assert counts == {"a": 5, "b": 2, "c": 1}
    np.testing.assert_array_equal(subset, label_fraction_subset(labels, 0.1, seed=0))
    assert not np.array_equal(subset, label_fraction_subset(labels, 0.1, seed=1))
    quarter = label_fraction_subset(labels, 0.25, seed=0)
    assert set(subset) <= set(quarter)
    np.testing.assert_array_equal(label_fraction_subset(labels, 1.0, seed=0), np.arange(len(labels)))
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
        label_fraction_subset(labels, 0.0, seed=0)


def test_check_disjoint_subjects():
    def row(i: int, subject: str) -> ManifestRow:
        return ManifestRow(id=str(i), path=f"{i}.png", format="png", dims=2, subject=subject)

    check_disjoint_subjects([row(0, "s1"), row(1, "s2")], [row(2, "s3"), row(3, "")])
    with pytest.raises(ValueError, match=r"^2 subject\(s\) appear in both"):
        check_disjoint_subjects([row(0, "s1"), row(1, "s2")], [row(2, "s2"), row(3, "s1"), row(4, "s4")])


def build_brightness_set(tmp_path: Path) -> list[CachedItem]:
    """12 PNGs, dark ("dark") or bright ("bright") noise, plus one labelled NIfTI volume and an unlabelled PNG."""
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        # a fixed black/white corner keeps the percentile range [0, 255], so brightness survives normalisation
        image = rng.integers(20, 100, size=(40, 36)) + (120 if i % 2 else 0)
        image[:2, :2] = (0, 255) if i % 2 else (255, 0)
        Image.fromarray(image.astype(np.uint8)).save(data / f"img{i:02d}.png")
    Image.fromarray(rng.integers(0, 255, size=(8, 8), dtype=np.uint8)).save(data / "unlabelled.png")
    volume = np.zeros((10, 12, 6), np.float32)
    volume[2:5, 3:9, :] = 1.0
    nib.save(nib.Nifti1Image(volume, np.eye(4)), str(data / "vol.nii.gz"))
    rows = scan_folder(data, ScanOptions(salt="t", progress=False, modality="MR")).rows

    def label(row: ManifestRow) -> str:
        if "img" in row.path:
            return "bright" if int(row.path[-6:-4]) % 2 else "dark"
        return "" if "unlabelled" in row.path else "volume"

    rows = [type(r)(**{**r.__dict__, "label": label(r)}) for r in rows]
    write_manifest(tmp_path / "m.csv", rows, data)
    manifest = read_manifest(tmp_path / "m.csv")
    config = PreprocessConfig(percentiles=[0, 100])
    build_cache(manifest, tmp_path / "cache", config, workers=1, progress=False)
    return cached_items(manifest, tmp_path / "cache", config)


def test_dataset_and_features_end_to_end(tmp_path):
    items = build_brightness_set(tmp_path)
    dataset = LabelledImageDataset(items, size=32)
    assert dataset.skipped_unlabelled == 1
    assert len(dataset) == 13
    volume_index = dataset.labels.index("volume")
    sample = dataset[volume_index]
    assert sample["image"].shape == (1, 32, 32) and sample["image"].dtype == torch.float32
    entry = dataset.items[volume_index].entry
    middle = slice_to_display(np.asarray(entry.array()[0, :, :, 3], dtype=np.float32)) * entry.scale
    np.testing.assert_allclose(dataset.plane(volume_index), middle)
    assert dataset.plane(volume_index).shape == (12, 10)  # [Y, X] in display orientation

    torch.manual_seed(0)
    encoder = create_encoder("resnet10")
    encoder.train()
    encoder.backbone.layer1.eval()  # a mixed mode must come back as it was
    features, labels = extract_features(encoder, dataset, batch_size=5)
    assert encoder.training and not encoder.backbone.layer1.training and encoder.backbone.layer2.training
    assert features.shape == (13, 512) and features.dtype == np.float32
    assert labels.tolist() == dataset.labels
    again, _ = extract_features(encoder, dataset, batch_size=13)
    np.testing.assert_allclose(features, again, rtol=1e-4, atol=1e-5)

    keep = labels != "volume"
    x, y = features[keep], labels[keep]
    train = np.arange(len(y)) < 8
    result = linear_probe(x[train], y[train], x[~train], y[~train])
    assert result.metrics["accuracy"] == 1.0


def test_kermany_random_features_linear_probe(tmp_path):
    manifest = read_manifest(kermany_manifest(tmp_path, per_class=50))
    config = PreprocessConfig(percentiles=[0.5, 99.5])
    build_cache(manifest, tmp_path / "cache", config, workers=1, progress=False)
    splits = {
        s: LabelledImageDataset(cached_items(manifest, tmp_path / "cache", config, [s]), 64) for s in ("train", "test")
    }
    check_disjoint_subjects(splits["train"].rows, splits["test"].rows)
    torch.manual_seed(0)
    encoder = create_encoder("resnet10")
    (train_x, train_y), (test_x, test_y) = (extract_features(encoder, splits[s]) for s in ("train", "test"))
    result = linear_probe(train_x, train_y, test_x, test_y)
    print(f"kermany n_train={len(train_y)} n_test={len(test_y)} metrics={result.metrics} wd={result.weight_decay}")
    assert result.metrics["auroc"] > 0.6
    knn = knn_probe(train_x, train_y, test_x, test_y)
    print(f"kermany kNN metrics={knn.metrics}")
    assert knn.probabilities.shape == (len(test_y), 2)
