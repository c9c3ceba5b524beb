"""Preprocessing: intensity normalisation by modality, resampling, foreground, settings checks."""

from __future__ import annotations

import numpy as np
import pytest

from medssl.data.errors import DataError
from medssl.data.preprocess import PreprocessConfig, foreground_fractions, normalise_intensity, preprocess
from medssl.data.readers import LoadedImage


def volume(array: np.ndarray, spacing=(1.0, 1.0, 1.0), modality="MR") -> LoadedImage:
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [10.0, -20.0, 30.0]
    return LoadedImage(array=array.astype(np.float32), spacing=spacing, affine=affine, modality=modality)


def test_ct_windows_map_hu_to_unit_range_one_channel_per_window():
    hu = np.array([[-1000.0, -160.0, 40.0, 240.0, 3000.0]], dtype=np.float32)
    config = PreprocessConfig(ct_windows=[[40, 400], [-600, 1500]])
    out = normalise_intensity(hu, "CT", config)
    assert out.shape == (2, 1, 5)
    # plain reference: (hu - (level - width/2)) / width, clipped
    for channel, (level, width) in enumerate(config.ct_windows):
        expected = np.clip((hu - (level - width / 2)) / width, 0, 1)
        np.testing.assert_allclose(out[channel], expected, atol=1e-6)
    np.testing.assert_allclose(out[0, 0], [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)


def test_mr_percentiles_use_nonzero_voxels_and_keep_background_at_zero():
    rng = np.random.default_rng(0)
    array = np.zeros((20, 20, 20), dtype=np.float32)
    array[5:15, 5:15, 5:15] = rng.uniform(100, 200, size=(10, 10, 10))
    out = normalise_intensity(array, "MR", PreprocessConfig(percentiles=[1.0, 99.0]))
    tissue = array[array > 0]
    low, high = np.percentile(tissue, [1.0, 99.0])
    np.testing.assert_allclose(out[0], np.clip((array - low) / (high - low), 0, 1), atol=1e-5)
    assert out[0][array == 0].max() == 0.0
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_xray_percentiles_over_all_pixels():
    array = np.linspace(0, 1000, 10_000, dtype=np.float32).reshape(100, 100)
    out = normalise_intensity(array, "DX", PreprocessConfig(percentiles=[0.0, 100.0]))
    np.testing.assert_allclose(out[0], array / 1000.0, atol=1e-6)


def test_constant_image_is_a_clear_error_naming_the_file():
    with pytest.raises(DataError, match=r"blank\.png: .*constant intensity"):
        preprocess(LoadedImage(np.ones((8, 8), np.float32), (1.0, 1.0), None, "OT"), PreprocessConfig(), "blank.png")


def test_resampling_changes_shape_spacing_and_affine_and_none_keeps_an_axis():
    array = np.random.default_rng(1).uniform(1, 2, size=(10, 12, 8)).astype(np.float32)
    config = PreprocessConfig(spacing=[1.0, 1.0, None])
    out = preprocess(volume(array, spacing=(2.0, 2.0, 3.0)), config)
    assert out.array.shape == (1, 20, 24, 8)
    assert out.spacing == (1.0, 1.0, 3.0)
    np.testing.assert_allclose(np.diag(out.affine)[:3], [1.0, 1.0, 3.0])
    np.testing.assert_allclose(out.affine[:3, 3], [10.0, -20.0, 30.0])


def test_downsampling_smooths_and_keeps_the_mean():
    rng = np.random.default_rng(2)
    array = rng.uniform(0, 1, size=(32, 32, 32)).astype(np.float32)
    # a CT window [level 0.5, width 1] is the identity on [0, 1], so the output is the resampled input
    config = PreprocessConfig(spacing=[2.0, 2.0, 2.0], ct_windows=[[0.5, 1]])
    out = preprocess(volume(array, modality="CT"), config)
    assert out.array.shape == (1, 16, 16, 16)
    assert abs(out.array.mean() - array.mean()) < 0.02
    # the new grid falls on every other input voxel: without anti-aliasing the noise would keep
    # its full spread (ratio ~1); the Gaussian pre-filter (sigma = (factor - 1) / 2 voxels) halves it
    assert out.array.std() < 0.7 * array.std()


def test_2d_images_are_downscaled_to_max_side_not_upscaled():
    image = LoadedImage(np.random.default_rng(3).uniform(0, 1, (300, 150)).astype(np.float32), (0.5, 0.5), None, "DX")
    out = preprocess(image, PreprocessConfig(max_side_2d=100))
    assert out.array.shape == (1, 100, 50)
    np.testing.assert_allclose(out.spacing, (1.5, 1.5))
    small = preprocess(LoadedImage(image.array[:50, :40], (1.0, 1.0), None, "DX"), PreprocessConfig(max_side_2d=100))
    assert small.array.shape == (1, 50, 40)


def test_foreground_fractions_per_axis():
    array = np.zeros((1, 4, 5, 6), dtype=np.float32)
    array[0, 1, :, :] = 1.0  # one full sagittal slice
    fractions = foreground_fractions(array, threshold=0.5)
    assert fractions[0] == [0.0, 1.0, 0.0, 0.0]
    assert fractions[1] == [0.25] * 5
    assert fractions[2] == [0.25] * 6


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("spacing=[1,1]", "spacing"),
        ("storage_dtype=int32", "storage_dtype"),
        ("percentiles=[90,10]", "percentiles"),
        ("ct_windows=[[40,0]]", "ct_windows"),
        ("foreground_threshold=2", "foreground_threshold"),
        ("no_such_key=1", "no_such_key"),
        ("max_side_2d=abc", "max_side_2d"),
    ],
)
def test_bad_settings_name_the_key(override, key):
    with pytest.raises(ValueError, match=key):
        PreprocessConfig.from_overrides([override])


def test_overrides_parse_values():
    config = PreprocessConfig.from_overrides(["spacing=[1.5,1.5,null]", "storage_dtype=uint8"])
    assert config.spacing == [1.5, 1.5, None]
    assert config.storage_dtype == "uint8"


def test_upsampling_repeats_the_border_instead_of_zero_past_the_last_voxel():
    """2 mm -> 1 mm: the last output slice lies half an input voxel past the last centre; it takes the border's
    value (for CT at 40/400 a 0 there would read as soft tissue), and the kept centres keep their values."""
    from medssl.data.preprocess import _resample

    array = np.full((4, 4, 6), 1000.0, dtype=np.float32)  # bright everywhere
    array[..., ::2] = 900.0
    out = _resample(array, (1.0, 1.0, 2.0), (1.0, 1.0, 1.0))
    assert out.shape == (4, 4, 12)
    assert np.allclose(out[..., -1], array[..., -1]) and out.min() >= 900.0 - 1e-3
    assert np.allclose(out[..., ::2], array)  # the original slice centres are sampled exactly
