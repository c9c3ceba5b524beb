"""Argument checks shared by the modules' constructors: one line per group of arguments, one message shape."""

from __future__ import annotations


def at_least(minimum: int, **values: int | float) -> None:
    """Raise ``ValueError("<name> must be >= <minimum>, got <value>")`` for the first argument below ``minimum`` (or
    NaN).

    Example: ``at_least(1, size=size, dim=dim)``.
    """
    for name, value in values.items():
        if not value >= minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value}")
