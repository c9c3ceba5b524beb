"""The shipped data config is valid and typed; wrong keys and values are named."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from medssl.data.config import DataConfig, data_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_default_yaml_matches_the_dataclass_defaults():
    from_yaml = data_config(OmegaConf.load(CONFIGS / "data" / "default.yaml"))
    assert from_yaml == DataConfig()


def test_overrides_reach_nested_settings():
    config = data_config(
        overrides=["stacks.n_slices=32", "preprocess.spacing=[1,1,2]", "slices.planes=[axial,coronal]"]
    )
    assert config.stacks.n_slices == 32
    assert config.preprocess.spacing == [1.0, 1.0, 2.0]
    assert config.slices.planes == ["axial", "coronal"]


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("stacks.n_slice=3", "data.stacks.n_slice"),
        ("views.global_size=big", "data.views.global_size"),
        ("stacks.plane=oblique", "stacks.plane"),
        ("preprocess.storage_dtype=int8", "preprocess.storage_dtype"),
    ],
)
def test_bad_values_name_the_key(override, named):
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        data_config(overrides=[override])
