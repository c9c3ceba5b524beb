"""Pretraining methods by ``method.name``. A new method is one module with a :class:`Method` subclass and one line
here (README, "Adding a method"); ``tests/test_methods.py`` trains every entry for a few steps."""

from __future__ import annotations

from medssl.train.methods.barlow import BarlowTwins
from medssl.train.methods.base import Method
from medssl.train.methods.joint import JointFamily
from medssl.train.methods.simclr import SimCLR

METHODS: dict[str, type[Method]] = {
    "joint": JointFamily,
    "swav2d": JointFamily,
    "dcv2_2d": JointFamily,
    "staged": JointFamily,
    "sepclr": JointFamily,
    "simclr": SimCLR,
    "barlow": BarlowTwins,
}


def method_named(name: str) -> Method:
    """The registered method ``name``; a ValueError listing the names otherwise."""
    if name not in METHODS:
        raise ValueError(f"method.name: {name!r} is not a registered method; choose from {sorted(METHODS)}")
    return METHODS[name](name)
