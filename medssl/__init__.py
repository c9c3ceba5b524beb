"""medssl: self-supervised pretraining of 2D/3D medical imaging backbones."""

__version__ = "0.1.0"
