"""Per-iteration schedules, precomputed once (as DINO and SwAV do) so that resuming at step k is exact."""

from __future__ import annotations

import math

import numpy as np

from medssl.runtime.checks import at_least


def warmup_cosine(
    base: float, final: float, total_steps: int, warmup_steps: int = 0, start_warmup: float = 0.0
) -> np.ndarray:
    """Linear warm-up from ``start_warmup`` to ``base`` over ``warmup_steps``, then cosine to ``final``.

    Returns:
        ``[total_steps]`` float64 values; ``values[k]`` is the value at step ``k``
        (``final + (base - final) (1 + cos(pi t / T)) / 2`` after the warm-up, SwAV/DINO).
    """
    at_least(1, total_steps=total_steps)
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
    warmup = np.linspace(start_warmup, base, warmup_steps, endpoint=False) if warmup_steps else np.zeros(0)
    decay_steps = total_steps - warmup_steps
    t = np.arange(decay_steps)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(math.pi * t / max(decay_steps, 1)))
    return np.concatenate([warmup, cosine])
