"""The shipped data config is valid and typed; wrong keys and values are named."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from medssl.data.config import DataConfig, data_config

CONFIGS = Path(__file__).resolve().parents[1] / "medssl" / "configs"


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


def test_sepclr_config_ships_the_from_scratch_weights():
    # neurospin-projects/2024_rlouiset_sep_clr, celeba_accessories/sep_clr_k-jem.py (ResNet-18 from scratch):
    # salient_term_beta = salient_reg_beta = 1000, jem_lambda = 10, tau = 0.5 (losses.py)
    from medssl.objectives.joint import SepCLRWeights
    from medssl.train.config import compose_pretrain_config

    expected = SepCLRWeights(beta_salient=1000.0, beta_infoless=1000.0, lambda_jem=10.0, tau=0.5)
    assert compose_pretrain_config(["method=sepclr"]).method.objective.sepclr == expected
    assert SepCLRWeights() == expected


def test_the_clustering_presets_ship_koleo_and_simclr_does_not_need_it():
    """KoLeo 0.1 on the 2D embeddings is the shipped default of the joint family (BENCHMARKS.md, issue 14: the
    lever that stopped 2D SwAV's cone on MedNIST and Kermany); the objective's own default stays 0 (plain SwAV)."""
    from medssl.objectives.joint import JointObjectiveConfig
    from medssl.train.config import compose_pretrain_config

    for method in ("joint", "swav2d", "dcv2_2d", "staged"):
        assert compose_pretrain_config([f"method={method}"]).method.objective.koleo_weight == 0.1, method
    assert JointObjectiveConfig().koleo_weight == 0.0
