"""Hydra as medssl's commands initialise it: the shipped configs (``pkg://medssl.configs``) with a user's folder
where Hydra's ``--config-dir`` puts it, the ``medssl.run_name`` resolver the shipped settings use, and composition
errors as one line naming the key.

Below the config schema (:mod:`medssl.train.config` composes with it) and the command (:mod:`medssl.train.app`
runs jobs with it); imports nothing of medssl but :mod:`medssl.runtime.configs`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medssl.runtime.configs import SHIPPED_CONFIG_MODULE

if TYPE_CHECKING:
    from hydra._internal.hydra import Hydra

RUN_NAME_RESOLVER = "medssl.run_name"


def job_run_name(name: str | None, method: str) -> str:
    """The ``medssl.run_name`` resolver of the shipped Hydra settings (``${medssl.run_name:${run.name},${method.name}}``
    in ``hydra.run.dir``): ``run.name`` when given, else the trainer's default ``<method>-<YYYYmmdd-HHMMSS>``."""
    return str(name) if name is not None else f"{method}-{datetime.now():%Y%m%d-%H%M%S}"


def register_resolvers() -> None:
    """The OmegaConf resolvers the shipped configs use (cached: one config resolves one timestamp)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver(RUN_NAME_RESOLVER):
        OmegaConf.register_new_resolver(RUN_NAME_RESOLVER, job_run_name, use_cache=True)


@contextlib.contextmanager
def hydra_with_configs(user: Path | None, task_name: str, schema: Any = None) -> Iterator[Hydra]:
    """Hydra initialised as ``@hydra.main(config_path="pkg://medssl.configs")`` initialises it, with ``user`` where
    Hydra's own ``--config-dir`` puts it (after the primary path, before the structured schema: the user's folder
    adds group options and top-level configs; a name in both is the shipped file); the same search path
    ``hydra._internal.utils.run_hydra`` builds. ``schema`` is stored as ``pretrain_schema``, the first entry of
    ``pretrain.yaml``'s defaults (:class:`medssl.train.config.PretrainConfig`; ``None``: an empty node, for the tab
    completion, which must not wait for torch to import). Yields the Hydra object (``run``, ``multirun``,
    ``show_cfg``...); the global Hydra state is restored afterwards."""
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    ConfigStore.instance().store(name="pretrain_schema", node=schema if schema is not None else {})
    register_resolvers()
    backup = get_gh_backup()
    search_path = create_config_search_path(f"pkg://{SHIPPED_CONFIG_MODULE}")
    if user is not None:
        search_path.prepend(provider="command-line", path=f"file://{user}", anchor=SearchPathQuery(provider="schema"))
    GlobalHydra.instance().clear()
    try:
        yield Hydra.create_main_hydra2(task_name=task_name, config_search_path=search_path)
    finally:
        restore_gh_from_backup(backup)


def config_error(exc: Exception) -> ValueError:
    """A Hydra or OmegaConf composition error as one line naming the key or option (what ``medssl pretrain`` prints
    before exiting with code 2), without Hydra's search-path dump."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(exc, HydraException):
        text = str(exc).split("Config search path:")[0]
        if exc.__cause__ is not None:  # e.g. the OmegaConf type error behind "Error merging override ..."
            text += f": {str(exc.__cause__).splitlines()[0]}"
        return ValueError(" ".join(line.strip() for line in text.splitlines() if line.strip()))
    if isinstance(exc, OmegaConfBaseException):
        key = getattr(exc, "full_key", None) or "?"
        return ValueError(f"{key}: {str(exc).splitlines()[0]}")
    return ValueError(str(exc))
