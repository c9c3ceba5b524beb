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


SHIPPED_CONFIG_MODULE = "medssl.configs"


def config_dir() -> Path:
    """The shipped config folder inside the installed package (``medssl/configs``: ``pretrain.yaml`` and its groups,
    ``finetune/``, ``evaluate/``); the same files whether medssl runs from a checkout or from a wheel."""
    from medssl import configs

    return Path(configs.__file__).resolve().parent


def user_config_dir(directory: str | Path | None = None) -> Path | None:
    """A user's own config folder, added to the shipped configs: ``directory`` (``--config-dir``), else
    ``$MEDSSL_CONFIG_DIR``, else none.

    Raises:
        FileNotFoundError: the folder does not exist (naming where it came from).
    """
    source = "--config-dir"
    if directory is None:
        directory, source = os.environ.get("MEDSSL_CONFIG_DIR") or None, "MEDSSL_CONFIG_DIR"
    if directory is None:
        return None
    folder = Path(directory).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{source}: {folder}: no such folder")
    return folder.resolve()


def config_file(relative: str, directory: str | Path | None = None) -> Path:
    """``relative`` (e.g. ``finetune/segmentation.yaml``) from the user's folder when it has one, else shipped."""
    user = user_config_dir(directory)
    if user is not None and (user / relative).is_file():
        return user / relative
    return config_dir() / relative
