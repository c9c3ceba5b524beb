"""``medssl pretrain`` as a Hydra application.

The command line (:func:`medssl.cli.cmd_pretrain`) and the Python API (:func:`medssl.pretrain`) run pretraining
through Hydra's own application machinery (:class:`hydra._internal.hydra.Hydra`, what ``@hydra.main`` runs): the
shipped configs (``pkg://medssl.configs``) as the primary config path, a user's ``--config-dir`` /
``$MEDSSL_CONFIG_DIR`` added the way Hydra's ``--config-dir`` adds it (:func:`medssl.train.config.
shipped_configs_with`). So ``medssl pretrain`` has what any Hydra application has:

* ``-m`` / ``--multirun``: a sweep (``medssl pretrain -m seed=0,1,2 method=simclr,joint``) through the configured
  sweeper and launcher (``hydra/launcher=submitit_slurm`` with the hydra-submitit-launcher plugin installed);
* ``hydra.run.dir`` / ``hydra.sweep.dir`` / ``hydra.sweep.subdir`` and ``.hydra/`` (``config.yaml``,
  ``overrides.yaml``, ``hydra.yaml``) saved in each job's folder;
* ``--cfg job|hydra|all`` (``--resolve``, ``--package``), ``--info``, ``--hydra-help`` and tab completion
  (``-sc install=bash``).

**Where things go.** A job's Hydra folder *is* its run folder (:func:`in_job_folder`): by default
``hydra.run.dir`` is ``<run.output_dir>/<run name>`` (``run.name``, or ``<method>-<YYYYmmdd-HHMMSS>``), the folder
medssl has always written checkpoints and the backbone to, so ``.hydra/`` sits beside ``checkpoints/``. A sweep
writes ``<run.output_dir>/<run.name or multirun-<time>>/multirun.yaml`` and one run folder per job in it, named
``<run name>-<job number>`` (the run's name in MLflow too). A ``hydra.run.dir`` given on the command line moves the
run there (its last folder name becomes the run's name).

Overrides are checked before anything runs (every job of a sweep): an unknown key, option or bad value is a
``ValueError`` naming it (``medssl pretrain`` exits with code 2). Under ``torchrun`` every process runs the same
command: rank 0 runs the Hydra job (and writes ``.hydra/``), the other ranks compose the same config and join its
DDP run; a sweep (``-m``) is refused there.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from medssl.runtime.configs import user_config_dir
from medssl.runtime.hydra_app import config_error, hydra_with_configs, register_resolvers

if TYPE_CHECKING:
    import argparse

    from hydra._internal.hydra import Hydra
    from omegaconf import DictConfig

    from medssl.train.config import PretrainConfig
    from medssl.train.trainer import TrainResult

TASK_NAME = "pretrain"  # hydra.job.name
MULTIRUN_UNDER_TORCHRUN = (
    "-m/--multirun is not supported under torchrun: every process would start the whole sweep. Run the sweep "
    "outside torchrun (medssl pretrain -m ...: one job after another; on SLURM hydra/launcher=submitit_slurm, one "
    "process per job), or start one torchrun per job"
)
SHELLS = ("bash", "zsh")


def under_torchrun() -> bool:
    """This process was started by ``torchrun`` (its ``RANK`` and ``WORLD_SIZE`` are set)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _rank() -> int:
    return int(os.environ.get("RANK", "0") or 0) if under_torchrun() else 0


class SweepStopped(RuntimeError):
    """A job of a sweep was not started because an earlier one stopped on a signal (SIGTERM/SIGINT)."""


# ---------------------------------------------------------------- Hydra with the shipped configs
def _typed_hydra(user: Path | None) -> contextlib.AbstractContextManager[Hydra]:
    """:func:`hydra_with_configs` with the typed schema (imports torch: the config dataclasses name the models)."""
    from medssl.train.config import shipped_configs_with

    return shipped_configs_with(user, TASK_NAME)


# ---------------------------------------------------------------- checking overrides before anything runs
def sweep_jobs(overrides: Sequence[str]) -> list[list[str]] | None:
    """The override lists of the jobs a basic sweep of ``overrides`` runs (``seed=0,1 method=simclr,joint``: 4
    jobs), or ``None`` when they are not the basic sweeper's (``interval(...)`` of an optimising sweeper)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
        (batch,) = BasicSweeper.split_arguments(parsed, None)
    except HydraException as exc:
        if "does not support sweep type" in str(exc):
            return None
        raise config_error(exc) from None
    return [list(job) for job in batch]


def check_overrides(
    overrides: Sequence[str],
    config_name: str = "pretrain",
    config_dir: str | Path | None = None,
    multirun: bool = False,
) -> list[PretrainConfig]:
    """The typed configs of the run (or of every job of the sweep ``overrides`` describe), composed before any
    work starts, so that a misspelt key in the last job of a sweep stops the sweep before its first job trains.

    Raises:
        ValueError: naming the key, option or value (and the job's overrides in a sweep).
    """
    from medssl.train.config import compose_pretrain_config

    jobs = sweep_jobs(overrides) if multirun else [list(overrides)]
    configs = []
    for job in jobs or []:
        try:
            configs.append(compose_pretrain_config(job, config_name=config_name, directory=config_dir))
        except ValueError as exc:
            raise ValueError(f"{exc} (job: {' '.join(job)})" if multirun else str(exc)) from None
    return configs


# ---------------------------------------------------------------- a job
def in_job_folder(
    config: PretrainConfig, job_dir: Path, multirun: bool, project_dir: Path | None = None
) -> PretrainConfig:
    """``config`` with the run folder (``<run.output_dir>/<run.name>``) set to Hydra's job folder ``job_dir``, where
    ``.hydra/`` is: by default the same folder (``hydra.run.dir`` is ``${run.output_dir}/<run name>``); a
    ``hydra.run.dir`` or sweep folder of the user's moves the run there. Unchanged when a run without a name
    resumes a checkpoint given by path (``trainer.resume=<path>``): the trainer keeps the checkpoint's name."""
    run = config.run
    if not multirun and run.name is None and config.trainer.resume not in (None, "auto"):
        return config
    job_dir = Path(job_dir).resolve()
    given = Path(run.output_dir)
    base = (given if given.is_absolute() else (project_dir or Path.cwd()) / given).resolve()
    output_dir = run.output_dir if base == job_dir.parent else str(job_dir.parent)
    if not multirun and run.name is not None and run.name != job_dir.name and _rank() == 0:
        print(f"{job_dir.name}: run.name={run.name} but hydra.run.dir={job_dir}: the run is named after its folder",
              flush=True)  # fmt: skip
    return replace(config, run=replace(run, name=job_dir.name, output_dir=output_dir))


@dataclass
class PretrainJobs:
    """Hydra's task function: one pretraining run per call (per job of a sweep), in its job's folder."""

    multirun: bool = False
    results: list[TrainResult] = field(default_factory=list)
    started: bool = False  # a job began (Hydra made its folder); errors before that are the folder's

    def __call__(self, cfg: DictConfig) -> TrainResult:
        from hydra.core.hydra_config import HydraConfig

        from medssl.train.config import pretrain_config
        from medssl.train.trainer import Trainer

        self.started = True
        stopped = [r for r in self.results if r.status != "finished"]
        if stopped:
            raise SweepStopped(f"not started: job {stopped[0].run_name} of this sweep stopped on a signal")
        job_dir = Path(HydraConfig.get().runtime.output_dir)
        config = in_job_folder(pretrain_config(cfg), job_dir, self.multirun)
        result = Trainer(config).fit()
        self.results.append(result)
        return result


def _run_in_place(hydra: Hydra, config_name: str, overrides: list[str], task: PretrainJobs) -> None:
    """A torchrun process other than rank 0: the job's config as rank 0 composes it (``${hydra:...}`` resolves), no
    job folder created and no ``.hydra/`` written (rank 0 does that; the trainer takes rank 0's run name)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf, open_dict, read_write

    cfg = hydra.compose_config(config_name, overrides, run_mode=RunMode.RUN, with_log_configuration=False)
    with read_write(cfg.hydra.runtime), open_dict(cfg.hydra.runtime):
        cfg.hydra.runtime.output_dir = os.path.abspath(str(OmegaConf.select(cfg, "hydra.run.dir")))
    previous = HydraConfig.instance().cfg
    HydraConfig.instance().set_config(cfg)
    try:
        job = copy.deepcopy(cfg)
        with read_write(job), open_dict(job):
            del job["hydra"]
        task(job)
    finally:
        HydraConfig.instance().cfg = previous


def run_pretrain(
    overrides: Sequence[str] = (),
    *,
    config_name: str = "pretrain",
    config_dir: str | Path | None = None,
    multirun: bool = False,
    configure_logging: bool = True,
) -> list[TrainResult]:
    """Pretrain as ``medssl pretrain [-m] overrides...`` does: check the overrides, then run the Hydra job (or the
    sweep's jobs) in its folder. ``configure_logging``: apply ``hydra/job_logging`` and ``hydra/hydra_logging`` (the
    command line; off for the Python API, which leaves the caller's logging alone).

    Returns:
        one result per job that ran, in order (a sweep stops starting jobs after one stopped on a signal).

    Raises:
        ValueError: a bad override (naming it), or ``-m`` under torchrun.
    """
    from hydra.errors import HydraException
    from hydra.types import RunMode

    from medssl.runtime.preflight import PreflightError

    overrides = list(overrides)
    if multirun and under_torchrun():
        raise ValueError(MULTIRUN_UNDER_TORCHRUN)
    user = user_config_dir(config_dir)
    with _typed_hydra(user) as hydra:
        if not multirun and hydra.get_mode(config_name, overrides) == RunMode.MULTIRUN:  # hydra.mode in a config
            multirun = True
    if multirun and under_torchrun():
        raise ValueError(MULTIRUN_UNDER_TORCHRUN)
    check_overrides(overrides, config_name, user, multirun)
    task = PretrainJobs(multirun=multirun)
    with _typed_hydra(user) as hydra:
        try:
            if _rank() != 0:
                _run_in_place(hydra, config_name, overrides, task)
            elif multirun:
                hydra.multirun(config_name, task, [*overrides, "hydra.mode=MULTIRUN"], configure_logging)
            else:
                hydra.run(config_name, task, overrides, configure_logging)
        except SweepStopped as exc:
            print(f"medssl pretrain: the sweep stopped: {exc}", flush=True)
        except HydraException as exc:
            raise config_error(exc) from None
        except OSError as exc:
            if task.started:
                raise
            # Hydra makes the job folder (the run folder) before the job starts: one that cannot be made is the
            # preflight's error, not a traceback
            raise PreflightError(
                f"run.output_dir: {exc.filename or ''} cannot be written ({exc.strerror or exc}); nothing was trained: "
                "make it writable or point run.output_dir elsewhere"
            ) from None
    return task.results


# ---------------------------------------------------------------- Hydra's other commands
@contextlib.contextmanager
def _root_logging_kept() -> Iterator[None]:
    """Hydra's ``--info`` prints through a root logger it sets up for itself: without the caller's handlers (each line
    once), which are back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    root.handlers[:] = []
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def show_config(
    overrides: Sequence[str],
    cfg_type: str = "job",
    *,
    package: str | None = None,
    resolve: bool = False,
    config_name: str = "pretrain",
    config_dir: str | Path | None = None,
) -> None:
    """``--cfg job|hydra|all``: print Hydra's composed config (unresolved unless ``resolve``) without training."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    user = user_config_dir(config_dir)
    if cfg_type in ("job", "all"):
        check_overrides(overrides, config_name, user)
    try:
        with _typed_hydra(user) as hydra:
            hydra.show_cfg(config_name, list(overrides), cfg_type, package, resolve=resolve)
    except (HydraException, OmegaConfBaseException) as exc:
        raise config_error(exc) from None


def show_info(
    topic: str, overrides: Sequence[str], *, config_name: str = "pretrain", config_dir: str | Path | None = None
) -> None:
    """``--info [all|config|defaults|defaults-tree|plugins|searchpath]``: Hydra's account of the composition."""
    from hydra.errors import HydraException

    try:
        with _typed_hydra(user_config_dir(config_dir)) as hydra, _root_logging_kept():
            hydra.show_info(topic, config_name, list(overrides))
    except HydraException as exc:
        raise config_error(exc) from None


def hydra_help(
    parser: argparse.ArgumentParser,
    overrides: Sequence[str],
    *,
    config_name: str = "pretrain",
    config_dir: str | Path | None = None,
) -> None:
    """``--hydra-help``: Hydra's own help (its flags and the ``hydra/`` groups: launchers, sweepers, logging)."""
    from argparse import Namespace

    with hydra_with_configs(user_config_dir(config_dir), TASK_NAME) as hydra:
        hydra.hydra_help(config_name, parser, Namespace(overrides=list(overrides)))


# ---------------------------------------------------------------- tab completion
_BASH = r"""_medssl_completion()
{
    local words=($COMP_LINE)
    if [ "${words[1]}" != "pretrain" ]; then
        return  # other commands: file names (-o default)
    fi
    local choices
    choices=$(COMP_POINT=$COMP_POINT COMP_LINE=$COMP_LINE ${words[0]} pretrain -sc query=bash 2> /dev/null)
    local word=${words[$COMP_CWORD]}
    COMPREPLY=($(compgen -o nospace -o default -W "$choices" -- "$word"))
}
COMP_WORDBREAKS=${COMP_WORDBREAKS//=}
COMP_WORDBREAKS=$COMP_WORDBREAKS complete -o nospace -o default -F _medssl_completion COMMAND
"""

# flags of `medssl pretrain` that take a value (the completion reads the user's line past them)
_VALUED = {"--config-dir", "-cd", "--config-name", "-cn", "--cfg", "-c", "--package", "-p"}


def completion_script(shell: str, command: str = "medssl") -> str:
    """The script ``eval "$(medssl pretrain -sc install=bash)"`` installs: Hydra's bash completion, asking
    ``medssl pretrain -sc query=bash`` for the words of ``medssl pretrain ...`` lines (zsh: through bashcompinit)."""
    if shell not in SHELLS:
        raise ValueError(f"-sc install={shell}: medssl completes {' and '.join(SHELLS)} command lines")
    script = _BASH.replace("COMMAND", command)
    return ("autoload -Uz bashcompinit && bashcompinit\n" + script) if shell == "zsh" else script


def _completion_line(line: str) -> tuple[str, str | None, str | None]:
    """A ``medssl pretrain ...`` command line as Hydra's completion reads an application's line (``medssl
    [-m] overrides... word``), with the ``--config-dir`` and ``--config-name`` it gives."""
    words = line.split()
    rest = words[2:] if len(words) > 1 and words[1] == "pretrain" else words[1:]
    kept: list[str] = []
    config_dir = config_name = None
    i = 0
    while i < len(rest):
        word = rest[i]
        if word in _VALUED and i + 1 < len(rest) and (i + 1 < len(rest) - 1 or line.endswith(" ")):
            if word in ("--config-dir", "-cd"):
                config_dir = rest[i + 1]
            elif word in ("--config-name", "-cn"):
                config_name = rest[i + 1]
            i += 2
            continue
        if word in ("-m", "--multirun") or not word.startswith("-"):
            kept.append(word)
        i += 1
    text = " ".join([words[0] if words else "medssl", *kept])
    return text + (" " if line.endswith(" ") else ""), config_dir, config_name


def shell_completion(
    overrides: Sequence[str], *, config_name: str = "pretrain", config_dir: str | Path | None = None
) -> None:
    """``-sc install=bash`` (or ``zsh``) prints the completion script, ``-sc uninstall=bash`` undoes it, ``-sc
    query=bash`` answers the script (the words of ``$COMP_LINE``: groups, options and keys of the composed config)."""
    from hydra.errors import HydraException

    arguments = dict(o.split("=", 1) for o in overrides if "=" in o)
    commands = [c for c in ("install", "uninstall", "query") if c in arguments]
    if len(commands) != 1:
        raise ValueError("-sc/--shell-completion: give one of install=bash, uninstall=bash or query=bash (or zsh)")
    (command,) = commands
    shell = arguments[command]
    if command == "install":
        print(completion_script(shell), end="")
        return
    if shell not in SHELLS:
        raise ValueError(f"-sc {command}={shell}: medssl completes {' and '.join(SHELLS)} command lines")
    if command == "uninstall":
        print("complete -r medssl 2> /dev/null; unset -f _medssl_completion")
        return
    line, line_dir, line_name = _completion_line(os.environ.get("COMP_LINE", ""))
    previous = os.environ.get("COMP_LINE")
    os.environ["COMP_LINE"] = line
    try:
        with hydra_with_configs(user_config_dir(line_dir or config_dir), TASK_NAME) as hydra:
            hydra.shell_completion(line_name or config_name, ["query=bash"])
    except (HydraException, FileNotFoundError):
        print()  # no suggestions rather than an error in the user's shell
    finally:
        if previous is None:
            os.environ.pop("COMP_LINE", None)
        else:
            os.environ["COMP_LINE"] = previous


def exit_code(results: Sequence[TrainResult]) -> int:
    """0 when every job finished; 128 + SIGTERM when one stopped on a signal after its checkpoint (schedulers
    requeue)."""
    return 0 if all(r.status == "finished" for r in results) else 143


register_resolvers()  # also where a launcher (submitit) unpickles PretrainJobs and resolves the job's folders
