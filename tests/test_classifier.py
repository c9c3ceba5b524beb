"""Full fine-tuning for classification (``protocol=finetune``): augmentation, training, the CLI and evaluate."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from labelled_data import kermany_manifest
from torch.utils.data import Dataset

from medssl.cli import main
from medssl.downstream.classifier import FinetuneSchedule, augment_batch, finetune_classifier, precise_batchnorm
from medssl.models.encoders import create_encoder


class SpotImages(Dataset):
    """32 px noise images with a bright square on the left (class "left") or the right ("right")."""

    def __init__(self, n: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.images, self.labels = [], []
        for i in range(n):
            image = rng.normal(0.3, 0.05, (1, 32, 32)).astype(np.float32)
            row, col = rng.integers(8, 20), rng.integers(3, 9)
            side = "left" if i % 2 == 0 else "right"
            col = col if side == "left" else 31 - col - 6
            image[0, row : row + 6, col : col + 6] = 0.9
            self.images.append(torch.from_numpy(image))
            self.labels.append(side)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index], "label": self.labels[index]}


def test_augmentation_without_crop_rotation_or_flip_is_the_identity():
    images = torch.rand(3, 1, 16, 20)
    out = augment_batch(images, torch.Generator().manual_seed(0), crop_scale=None, rotation_degrees=0.0)
    torch.testing.assert_close(out, images, atol=1e-5, rtol=0)


def test_flip_only_augmentation_gives_the_image_or_its_mirror():
    images = torch.rand(8, 1, 12, 12)
    out = augment_batch(images, torch.Generator().manual_seed(1), None, 0.0, horizontal_flip=True)
    flipped = 0
    for original, augmented in zip(images, out, strict=True):
        if torch.allclose(augmented, original.flip(-1), atol=1e-5):
            flipped += 1
        else:
            torch.testing.assert_close(augmented, original, atol=1e-5, rtol=0)
    assert 0 < flipped < 8


def test_crops_are_seeded_and_change_the_image():
    images = torch.rand(4, 1, 16, 16)
    a = augment_batch(images, torch.Generator().manual_seed(3))
    b = augment_batch(images, torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, images)


def test_fine_tuning_learns_a_task_that_a_frozen_random_encoder_only_guesses():
    train, test = SpotImages(48, 0), SpotImages(24, 1)
    schedule = FinetuneSchedule(steps=40, batch_size=16, lr=3e-3, encoder_lr_scale=1.0, crop_scale=[0.9, 1.0],
                                rotation_degrees=0.0)  # fmt: skip
    encoder = create_encoder("resnet10").backbone
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    result = finetune_classifier(encoder, train, test, schedule, seed=0)
    assert result.class_names == ["left", "right"]
    assert result.metrics["auroc"] >= 0.95 and result.metrics["accuracy"] >= 0.9, result.metrics
    changed = [
        k for k, v in encoder.state_dict().items() if v.dtype.is_floating_point and not torch.equal(v, before[k])
    ]
    assert changed, "the encoder was not trained"
    frozen = finetune_classifier(create_encoder("resnet10").backbone, train, test,
                                 FinetuneSchedule(steps=1, batch_size=16, encoder_lr_scale=0.0), seed=0)  # fmt: skip
    assert frozen.metrics["auroc"] < result.metrics["auroc"] - 0.1, (frozen.metrics, result.metrics)


def test_precise_batchnorm_sets_the_exact_statistics_of_the_data():
    conv = torch.nn.Conv2d(1, 4, 3)
    model = torch.nn.Sequential(conv, torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1))
    model.eval()
    images = torch.rand(10, 1, 8, 8)
    assert precise_batchnorm(model, images, batch_size=5, device=torch.device("cpu")) == 1
    with torch.no_grad():
        batches = [conv(chunk).transpose(0, 1).reshape(4, -1) for chunk in images.split(5)]
    norm = model[1]
    torch.testing.assert_close(norm.running_mean, torch.stack([b.mean(dim=1) for b in batches]).mean(dim=0))
    torch.testing.assert_close(norm.running_var, torch.stack([b.var(dim=1) for b in batches]).mean(dim=0))
    assert norm.momentum == 0.1 and not norm.training


def test_training_indices_select_the_label_fraction_and_bad_labels_are_named():
    train, test = SpotImages(8, 0), SpotImages(4, 1)
    schedule = FinetuneSchedule(steps=2, batch_size=4)
    with pytest.raises(ValueError, match="at least 2 classes"):
        finetune_classifier(create_encoder("resnet10").backbone, train, test, schedule, train_indices=np.array([0, 2]))
    test.labels[0] = "middle"
    with pytest.raises(ValueError, match=r"\['middle'\]"):
        finetune_classifier(create_encoder("resnet10").backbone, train, test, schedule)


@pytest.mark.parametrize(
    ("values", "message"),
    [({"steps": 0}, "finetune.steps"), ({"crop_scale": [0.5, 2.0]}, "finetune.crop_scale"), ({"lr": 0}, "finetune.lr")],
)
def test_bad_schedules_name_the_key(values, message):
    with pytest.raises(ValueError, match=message):
        FinetuneSchedule(**values)


@pytest.mark.parametrize("protocol", ["linear", "finetune"])
def test_real_chest_xrays_fine_tune_end_to_end(tmp_path, capsys, protocol):
    """`medssl finetune` on 40 real Kermany radiographs (NORMAL vs PNEUMONIA), patient-disjoint splits."""
    manifest = kermany_manifest(tmp_path, per_class=20)
    code = main(
        [
            "finetune",
            f"protocol={protocol}",
            f"data.manifest={manifest}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "data.cache_workers=1",
            "data.size=64",
            "model.encoder=resnet10",
            "finetune.steps=5",
            "finetune.batch_size=8",
            f"tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    line = re.search(r"training labels \(1\), (\d+) test: AUROC ([0-9.]+)", out)
    assert line is not None and int(line.group(1)) >= 8, out
    assert 0.0 <= float(line.group(2)) <= 1.0
