"""Typed configs from YAML mappings and ``key=value`` overrides, and where the shipped config files live."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


def structured_config(
    schema: type[T],
    values: Any = None,
    overrides: list[str] | None = None,
    *,
    prefix: str = "",
    section_of: Callable[[BaseException], str] | None = None,
) -> T:
    """``schema`` (a dataclass) filled from a mapping, then from ``key=value`` overrides (OmegaConf's merge).

    Errors are ``ValueError`` naming the key: ``<prefix><key>: <reason>`` for an unknown key or a wrong type; a
    dataclass ``__post_init__`` check keeps its own message, preceded by ``section_of(error)`` when that names the
    section whose check raised.
    """

    def named(error: BaseException) -> str:
        section = section_of(error) if section_of is not None else ""
        return f"{section + ': ' if section else ''}{error}"

    try:
        merged = OmegaConf.merge(
            OmegaConf.structured(schema), values or {}, OmegaConf.from_dotlist(list(overrides or []))
        )
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        if isinstance(exc.__cause__, ValueError):  # a __post_init__ check, wrapped by OmegaConf
            raise ValueError(named(exc.__cause__)) from None
        key = getattr(exc, "full_key", None) or "?"
        raise ValueError(f"{prefix}{key}: {str(exc).splitlines()[0]}") from None
    except ValueError as exc:
        raise ValueError(named(exc)) from None


def config_dir() -> Path:
    """The folder with ``pretrain.yaml``: ``$MEDSSL_CONFIG_DIR``, else ``configs/`` of the source checkout."""
    env = os.environ.get("MEDSSL_CONFIG_DIR")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2] / "configs")
    for candidate in candidates:
        if (candidate / "pretrain.yaml").is_file():
            return candidate
    raise FileNotFoundError(
        f"no pretrain.yaml in {', '.join(map(str, candidates))}; set MEDSSL_CONFIG_DIR to the repository's configs/"
    )
