"""MLflow tracking for the trainer (rank 0 only).

The default store is a SQLite database inside the project folder, ``<project>/mlruns/mlflow.db``,
with the artifacts (figures, the resolved config) in ``<project>/mlruns/artifacts``. MLflow 3.x
made SQLite its default backend, and 3.17 refuses the plain-folder store (``file:./mlruns``, "in
maintenance mode") unless ``MLFLOW_ALLOW_FILE_STORE=true``; a SQLite file needs no server and ``mlflow ui
--backend-store-uri sqlite:///...`` reads it (see ``ui_command``). ``MLFLOW_TRACKING_URI`` in the
environment (a tracking server, say) overrides the default.

Every call goes through an explicit ``mlflow.MlflowClient`` and a run id; the fluent
``mlflow.start_run`` global state is never touched, so several trackers (and tests) do not
interfere. A ``Tracker`` built with ``enabled=False`` (the non-zero ranks) does nothing at all:
it opens no store and writes no file.

Privacy: only configuration values, metric names and values, modality/label strings and hashes
are meant to go through here; ``manifest_fingerprint`` logs the manifest's hash, never its rows.
MLflow's usage telemetry is switched off (``MLFLOW_DISABLE_TELEMETRY=true`` unless set otherwise)
so that nothing leaves the machine.

Models (``Tracker.log_pytorch_model``, ``Tracker.register_model``) go through ``mlflow.pytorch.log_model``
and the model registry, which read MLflow's global tracking URI; :func:`use_tracking_uri` sets it to the
tracker's store for those calls only and restores it afterwards. :func:`provenance_tags` says which code
made a run (medssl, torch and MONAI versions; the git commit of a medssl checkout).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import math
import os
import posixpath
import re
import shlex
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import (
    MAX_ENTITY_KEY_LENGTH,
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)

from medssl.runtime.files import file_sha256

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from mlflow.models.model import ModelInfo
    from torch import nn

__all__ = [
    "TRUNCATION_MARKER",
    "Tracker",
    "default_tracking_uri",
    "flatten_config",
    "manifest_fingerprint",
    "provenance_tags",
    "sanitize_name",
    "ui_command",
    "use_tracking_uri",
]

logger = logging.getLogger(__name__)

TRUNCATION_MARKER = "...[truncated]"
STORE_FOLDER = "mlruns"
DATABASE_NAME = "mlflow.db"
ARTIFACT_FOLDER = "artifacts"
_STATUSES = ("FINISHED", "FAILED", "KILLED")
# MLflow's allowed characters for metric/param/tag keys, less the colon (refused on Windows).
_BAD_NAME_CHARS = re.compile(r"[^/\w.\- ]")
# Loggers that print INFO lines on SQLite initialisation (schema creation, alembic migrations).
_NOISY_LOGGERS = ("mlflow.store.db.utils", "mlflow.store.sqlalchemy_store", "alembic", "alembic.runtime.migration")


def _quiet_mlflow() -> None:
    """Silence MLflow's INFO chatter on store initialisation and switch its usage telemetry off."""
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    try:
        from mlflow.telemetry import get_telemetry_client, set_telemetry_client
        from mlflow.telemetry.utils import is_telemetry_disabled

        if get_telemetry_client() is not None and is_telemetry_disabled():
            set_telemetry_client()  # re-reads the environment: drops the client created at import
    except Exception:  # pragma: no cover - telemetry internals differ between MLflow versions
        logger.debug("could not reset MLflow telemetry", exc_info=True)


@contextmanager
def _quiet_store_warnings() -> Iterator[None]:
    """Hide SQLAlchemy deprecation warnings raised inside MLflow's store set-up (not ours to fix)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*noload.*")
        warnings.filterwarnings("ignore", module=r"mlflow\..*", category=DeprecationWarning)
        yield


def default_tracking_uri(project_dir: Path) -> str:
    """The tracking URI of a project: ``$MLFLOW_TRACKING_URI`` when set, else a SQLite store.

    The local store is ``sqlite:///<project_dir>/mlruns/mlflow.db`` (absolute path); the
    ``Tracker`` puts the artifacts of experiments it creates next to it, in
    ``<project_dir>/mlruns/artifacts``. SQLite rather than the ``file:`` folder store, which MLflow
    3.x deprecated (3.17 refuses it without ``MLFLOW_ALLOW_FILE_STORE=true``). Creates nothing.
    """
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return env
    database = Path(project_dir).expanduser().resolve() / STORE_FOLDER / DATABASE_NAME
    return "sqlite:///" + database.as_posix()


def _sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (``None`` for other schemes or in-memory)."""
    if not tracking_uri.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url

    database = make_url(tracking_uri).database
    if not database or database == ":memory:":
        return None
    return Path(database)


def local_store_folder(tracking_uri: str) -> Path | None:
    """The local folder a tracking URI writes to (the SQLite database's folder, which also holds the artifacts; a
    ``file:`` store; a plain path), or None for a tracking server and other remote stores."""
    database = _sqlite_path(tracking_uri)
    if database is not None:
        return database.expanduser().resolve().parent
    if tracking_uri.startswith("file:"):
        from urllib.parse import unquote, urlparse

        return Path(unquote(urlparse(tracking_uri).path)).expanduser()
    if "://" not in tracking_uri and not tracking_uri.startswith(("sqlite:", "databricks", "uc:")):
        return Path(tracking_uri).expanduser()
    return None


def _artifact_location(tracking_uri: str) -> str | None:
    """Where new experiments keep their artifacts: next to a local SQLite database, else the store's choice."""
    database = _sqlite_path(tracking_uri)
    if database is None:
        return None
    return (database.expanduser().resolve().parent / ARTIFACT_FOLDER).as_uri()


def ui_command(tracking_uri: str) -> str:
    """The command (or, for a tracking server, the address) that shows the runs of ``tracking_uri``.

    For a local store: ``mlflow ui --backend-store-uri 'sqlite:////abs/mlruns/mlflow.db'`` (then
    open http://127.0.0.1:5000). Artifacts are read from each experiment's own location, so no
    ``--default-artifact-root`` is needed. For ``http(s)://`` servers the runs are already served.
    """
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri} in a browser (MLflow tracking server)"
    return f"mlflow ui --backend-store-uri {shlex.quote(tracking_uri)}"


@contextmanager
def use_tracking_uri(tracking_uri: str) -> Iterator[None]:
    """MLflow's global tracking URI (and so its registry URI, unless ``MLFLOW_REGISTRY_URI`` names another) set to
    ``tracking_uri`` inside the block, restored afterwards, ``$MLFLOW_TRACKING_URI`` included.

    For the MLflow APIs that have no explicit client (``mlflow.pytorch.log_model``, ``models:/`` URIs, registering
    a logged model): they resolve their store from the global URI. Not thread-safe, like that global.
    """
    previous_env = os.environ.get("MLFLOW_TRACKING_URI")
    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)  # type: ignore[arg-type]  # None: unset, as before
        if previous_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous_env


_GIT_TIMEOUT_S = 10.0


def _git(args: Sequence[str], cwd: Path) -> str | None:
    """``git <args>``'s stdout in ``cwd``, or None when git is missing, fails or takes too long (never raises).

    ``GIT_OPTIONAL_LOCKS=0``: ``git status`` does not refresh (write) the index of the checkout it reads.
    """
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0", "GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C"}
    try:
        done = subprocess.run(
            ["git", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=_GIT_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return done.stdout if done.returncode == 0 else None


def git_state(package_dir: Path | None = None) -> dict[str, str]:
    """The git commit of the checkout medssl runs from, and whether it is dirty; ``{}`` when it is not a checkout.

    ``package_dir`` (default: the ``medssl`` package's folder) counts as a checkout only when its ``__init__.py`` is
    a file git tracks there, so a medssl installed into a virtual environment that sits inside some other
    repository does not report that repository's commit. ``git_dirty`` is ``"true"`` when tracked files differ
    from the commit (untracked files do not count), absent when git could not tell. Runs only read-only git
    commands, each at most 10 s; never raises.
    """
    if package_dir is None:
        package_dir = Path(__file__).resolve().parents[1]  # medssl/ (this file is medssl/runtime/tracking.py)
    if not package_dir.is_dir() or _git(["ls-files", "--error-unmatch", "--", "__init__.py"], package_dir) is None:
        return {}
    commit = (_git(["rev-parse", "--verify", "HEAD"], package_dir) or "").strip()
    if not re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", commit):
        return {}  # a repository without a commit yet, or git failed
    state = {"git_commit": commit}
    status = _git(["status", "--porcelain", "--untracked-files=no"], package_dir)
    if status is not None:
        state["git_dirty"] = "true" if status.strip() else "false"
    return state


def provenance_tags() -> dict[str, str]:
    """Run tags naming the code that made a run: ``medssl.version``, ``torch.version``, ``monai.version`` and, when
    medssl runs from a git checkout (:func:`git_state`), ``medssl.git_commit`` (also as MLflow's own
    ``mlflow.source.git.commit``, which the UI shows) and ``medssl.git_dirty``. Never raises."""
    import importlib.metadata

    from medssl.version import __version__

    tags: dict[str, str] = {}
    try:
        tags["medssl.version"] = importlib.metadata.version("medssl")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that is not installed
        tags["medssl.version"] = __version__
    for name in ("torch", "monai"):
        try:
            module = __import__(name)
            tags[f"{name}.version"] = str(module.__version__)
        except Exception:  # pragma: no cover - both are dependencies of medssl
            logger.debug("no version of %s", name, exc_info=True)
    state = git_state()
    if "git_commit" in state:
        tags["medssl.git_commit"] = state["git_commit"]
        tags["mlflow.source.git.commit"] = state["git_commit"]
    if "git_dirty" in state:
        tags["medssl.git_dirty"] = state["git_dirty"]
    return tags


def _truncate(value: str, limit: int) -> str:
    if len(value) <= limit:
        return value
    return value[: limit - len(TRUNCATION_MARKER)] + TRUNCATION_MARKER


def _plain(value: Any) -> Any:
    """Nested mappings/sequences/dataclasses as plain dicts and lists (for JSON/YAML)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (str, bytes)):
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    if isinstance(value, Sequence | set | frozenset):
        items = sorted(value, key=str) if isinstance(value, set | frozenset) else value
        return [_plain(v) for v in items]
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if isinstance(value, Path):
        return value.as_posix()
    if value is None or isinstance(value, bool | int | float):
        return value
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy / torch arrays and scalars
        try:
            return _plain(value.tolist())
        except (TypeError, ValueError, RuntimeError):
            pass
    return str(value)


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten a nested config into MLflow params.

    Nested mappings (and dataclasses) become dotted keys ``a.b.c``; lists and tuples stay one
    value, written as JSON (``[0.3, 1.0]``); scalars become ``str`` (``None`` -> ``"None"``).
    Values longer than MLflow's ``MAX_PARAM_VAL_LENGTH`` are cut and end with ``TRUNCATION_MARKER``.
    An empty mapping gives one key with the value ``{}``.
    """
    flat: dict[str, str] = {}

    def visit(node: Any, key: str) -> None:
        if dataclasses.is_dataclass(node) and not isinstance(node, type):
            node = {f.name: getattr(node, f.name) for f in dataclasses.fields(node)}
        if isinstance(node, Mapping):
            if not node and key:
                flat[key] = "{}"
            for k, v in node.items():
                visit(v, f"{key}.{k}" if key else str(k))
            return
        plain = _plain(node)
        text = json.dumps(plain, default=str, ensure_ascii=False) if isinstance(plain, list | dict) else str(plain)
        flat[key] = _truncate(text, MAX_PARAM_VAL_LENGTH)

    visit(config, prefix)
    return flat


def sanitize_name(name: str) -> str:
    """A metric/param/tag key MLflow accepts: other characters become ``_``, no empty or ``.``/``..``
    path segments, no leading or trailing ``/``, at most ``MAX_ENTITY_KEY_LENGTH`` characters."""
    clean = _BAD_NAME_CHARS.sub("_", str(name))
    parts = [p for p in clean.split("/") if p]
    parts = ["_" if p in (".", "..") else p for p in parts]
    clean = "/".join(parts) or "_"
    return clean[:MAX_ENTITY_KEY_LENGTH].rstrip("/") or "_"


def _check_artifact_file(artifact_file: str) -> tuple[str | None, str]:
    """Split a run-relative artifact path into ``(folder or None, file name)``; refuse escapes."""
    text = str(artifact_file).replace("\\", "/")
    norm = posixpath.normpath(text)
    if not text or text.startswith("/") or norm in (".", "..") or norm.startswith("../") or text.endswith("/"):
        raise ValueError(f"artifact_file must be a relative file path inside the run, got {artifact_file!r}")
    folder, name = posixpath.split(norm)
    return (folder or None), name


def manifest_fingerprint(path: Path) -> dict[str, str]:
    """SHA-256 of the manifest file's bytes: ``{"sha256": 64 hex digits, "sha256_short": the first 12}``.

    Only the hash: neither the rows nor the file name are returned.
    """
    full = file_sha256(path)
    return {"sha256": full, "sha256_short": full[:12]}


class Tracker:
    """One MLflow run, driven through an explicit ``MlflowClient``.

    Args:
        tracking_uri: the store (``default_tracking_uri(project_dir)``); ``None``: MLflow's own
            resolution (``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the working folder).
        experiment: experiment name; created when missing (for a local SQLite store with its
            artifacts in ``<store folder>/artifacts``), restored when deleted.
        run_name: display name of a new run.
        run_id: continue this run (a resumed training): its status goes back to RUNNING and
            its params, metrics and artifacts are kept.
        enabled: ``False`` (non-zero ranks) makes every method a no-op; ``run_id`` is then ``None``.
        tags: run tags (set on the new or resumed run).
        artifact_location: where a newly created experiment keeps artifacts (overrides the
            default next to a SQLite database; ignored when the experiment exists).

    Usable as a context manager: leaving the block finishes the run, ``FAILED`` on an exception
    (``KILLED`` on ``KeyboardInterrupt``), ``FINISHED`` otherwise.
    """

    def __init__(
        self,
        tracking_uri: str | None,
        experiment: str,
        run_name: str | None = None,
        run_id: str | None = None,
        enabled: bool = True,
        tags: dict[str, str] | None = None,
        *,
        artifact_location: str | None = None,
    ) -> None:
        self.enabled = bool(enabled)
        self.tracking_uri: str | None = None
        self.experiment_id: str | None = None
        self.resumed = False
        self._run_id: str | None = None
        self._artifact_uri: str | None = None
        self._finished = False
        self._client: MlflowClient | None = None
        if not self.enabled:
            return
        _quiet_mlflow()
        uri = tracking_uri or mlflow.get_tracking_uri()
        self.tracking_uri = uri
        database = _sqlite_path(uri)
        if database is not None:
            database.expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
        with _quiet_store_warnings():
            self._client = MlflowClient(tracking_uri=uri)
            if run_id:
                run = self._resume(run_id)
            else:
                self.experiment_id = self._experiment_id(experiment, artifact_location or _artifact_location(uri))
                run = self._client.create_run(self.experiment_id, run_name=run_name, tags=self._tag_dict(tags or {}))
        self._run_id = run.info.run_id
        self._artifact_uri = run.info.artifact_uri
        if run_id and tags:
            self.set_tags(tags)

    # -- set-up ---------------------------------------------------------------------------------

    def _experiment_id(self, name: str, artifact_location: str | None) -> str:
        client = self._require_client()
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            try:
                return client.create_experiment(name, artifact_location=artifact_location)
            except MlflowException:  # created meanwhile by another process
                experiment = client.get_experiment_by_name(name)
                if experiment is None:
                    raise
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id

    def _resume(self, run_id: str) -> Any:
        client = self._require_client()
        try:
            run = client.get_run(run_id)
        except MlflowException as error:
            raise ValueError(f"cannot resume MLflow run {run_id!r}: not found in {self.tracking_uri}") from error
        if run.info.lifecycle_stage == "deleted":
            client.restore_run(run_id)
        if run.info.status != "RUNNING":
            client.update_run(run_id, status="RUNNING")
        self.experiment_id = run.info.experiment_id
        self.resumed = True
        return run

    def _require_client(self) -> MlflowClient:
        if self._client is None:  # pragma: no cover - only reachable through misuse
            raise RuntimeError("the tracker is disabled")
        return self._client

    def _active(self) -> bool:
        """Whether a call should log: ``False`` when disabled; an error after ``finish``."""
        if not self.enabled:
            return False
        if self._finished:
            raise RuntimeError(f"MLflow run {self._run_id} is already finished")
        return True

    @staticmethod
    def _tag_dict(tags: Mapping[str, Any]) -> dict[str, str]:
        return {sanitize_name(k): _truncate(str(v), MAX_TAG_VAL_LENGTH) for k, v in tags.items()}

    # -- properties -----------------------------------------------------------------------------

    @property
    def run_id(self) -> str | None:
        """The run's id (``None`` when disabled)."""
        return self._run_id

    @property
    def artifact_uri(self) -> str | None:
        """Where the run's artifacts are (``file:///.../mlruns/artifacts/<run id>/artifacts`` for the
        default store); ``None`` when disabled."""
        return self._artifact_uri

    # -- logging --------------------------------------------------------------------------------

    def log_params(self, flat: Mapping[str, str], allow_changes: bool = False) -> None:
        """Log params (``flatten_config`` output) in batches.

        Keys are sanitised and values truncated as in ``flatten_config``. Keys the run already has
        with the same value are skipped (a resumed run re-logs its config). A different value
        raises ``ValueError`` naming the key, since MLflow params cannot change; with
        ``allow_changes`` (a resume with overrides) such keys keep their first value, a warning
        names them and the tag ``medssl.changed_params`` lists them.
        """
        if not self._active():
            return
        client = self._require_client()
        params: dict[str, str] = {}
        for key, value in flat.items():
            name = sanitize_name(key)
            if name in params:
                raise ValueError(f"param keys {key!r} and another key both map to {name!r}")
            params[name] = _truncate(str(value), MAX_PARAM_VAL_LENGTH)
        existing = client.get_run(self._run_id).data.params  # type: ignore[arg-type]
        changed = [k for k, v in params.items() if k in existing and existing[k] != v]
        if changed and not allow_changes:
            key = changed[0]
            more = f"; {len(changed) - 1} more changed: {changed[1:6]}" if len(changed) > 1 else ""
            raise ValueError(
                f"param {key!r} of MLflow run {self._run_id} is {existing[key]!r}, cannot change it to "
                f"{params[key]!r} (MLflow params are immutable; start a new run for a new config){more}"
            )
        if changed:
            logger.warning("MLflow params keep their first value, changed on resume: %s", ", ".join(changed))
            self.set_tags({"medssl.changed_params": ",".join(changed)})
        new = [Param(k, v) for k, v in params.items() if k not in existing]
        for start in range(0, len(new), MAX_PARAMS_TAGS_PER_BATCH):
            client.log_batch(self._run_id, params=new[start : start + MAX_PARAMS_TAGS_PER_BATCH])  # type: ignore[arg-type]

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log scalar metrics at ``step`` in batches.

        Values go through ``float()`` (Python numbers, 0-d tensors, numpy scalars); values that
        are not numbers (e.g. a ``"stage"`` string) and non-finite values (NaN, inf) are skipped.
        Names are sanitised with ``sanitize_name``.
        """
        if not self._active():
            return
        timestamp = int(time.time() * 1000)
        batch: dict[str, Metric] = {}
        for key, value in metrics.items():
            if isinstance(value, str | bytes):
                continue
            try:
                number = float(value)
            except (TypeError, ValueError, RuntimeError):
                logger.debug("metric %s is not a number, not logged", key)
                continue
            if not math.isfinite(number):
                logger.debug("metric %s is not finite at step %d, not logged", key, step)
                continue
            name = sanitize_name(key)
            batch[name] = Metric(name, number, timestamp, int(step))
        items = list(batch.values())
        client = self._require_client()
        for start in range(0, len(items), MAX_METRICS_PER_BATCH):
            client.log_batch(self._run_id, metrics=items[start : start + MAX_METRICS_PER_BATCH])  # type: ignore[arg-type]

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (values as ``str``, truncated to MLflow's tag length)."""
        if not self._active():
            return
        items = [RunTag(k, v) for k, v in self._tag_dict(tags).items()]
        client = self._require_client()
        for start in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            client.log_batch(self._run_id, tags=items[start : start + MAX_PARAMS_TAGS_PER_BATCH])  # type: ignore[arg-type]

    def log_text(self, text: str, artifact_file: str) -> None:
        """Log ``text`` as the file ``artifact_file`` (run-relative, e.g. ``"config/resolved.txt"``): MLflow's
        ``log_text``."""
        if not self._active():
            return
        _check_artifact_file(artifact_file)
        self._require_client().log_text(self._run_id, text, artifact_file)  # type: ignore[arg-type]

    def log_dict(self, d: Mapping[str, Any], artifact_file: str) -> None:
        """Log a mapping as YAML (``.yaml``/``.yml``) or JSON (any other suffix): MLflow's ``log_dict`` on a plain
        copy (tuples, paths, dataclasses and numpy/torch scalars become plain YAML/JSON values first)."""
        if not self._active():
            return
        _check_artifact_file(artifact_file)
        self._require_client().log_dict(self._run_id, _plain(d), artifact_file)  # type: ignore[arg-type]

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Log a local file (or a folder's contents) under ``artifact_path`` (run root when ``None``)."""
        if not self._active():
            return
        path = Path(path)
        client = self._require_client()
        if path.is_dir():
            client.log_artifacts(self._run_id, str(path), artifact_path)  # type: ignore[arg-type]
        elif path.is_file():
            client.log_artifact(self._run_id, str(path), artifact_path)  # type: ignore[arg-type]
        else:
            raise FileNotFoundError(f"no file or folder to log at {path}")

    def log_figure(self, fig: Figure, artifact_file: str, dpi: int = 100) -> None:
        """Save a matplotlib figure (format from the suffix, e.g. ``.png``) as ``artifact_file`` (MLflow's
        ``log_figure``) and close it.

        The figure is closed on every rank (also when disabled), so callers need not.
        """
        try:
            if self._active():
                _check_artifact_file(artifact_file)
                save = {"dpi": dpi, "bbox_inches": "tight"}
                self._require_client().log_figure(self._run_id, fig, artifact_file, save_kwargs=save)  # type: ignore[arg-type]
        finally:
            _close_figure(fig)

    def log_pytorch_model(
        self,
        model: nn.Module,
        name: str,
        *,
        signature: Any,
        input_example: Any,
        pip_requirements: Sequence[str],
        metadata: Mapping[str, Any] | None = None,
        serialization_format: str = "pt2",
    ) -> ModelInfo | None:
        """Log ``model`` with ``mlflow.pytorch.log_model`` as a model of this run named ``name`` (``runs:/<run
        id>/<name>``; MLflow 3 keeps it as a "logged model", ``models:/<model id>``, in the run's experiment).

        ``serialization_format="pt2"`` (``torch.export``): the model loads with ``mlflow.pytorch.load_model`` and
        torch alone, without pickle and without the classes that built it; the graph is traced on
        ``input_example``, whose dimensions marked ``-1`` in ``signature`` stay dynamic when their example size
        is above 1. ``pip_requirements`` are written as given (no requirement inference, which would load the
        model and scan its imports). Returns MLflow's ``ModelInfo`` (``model_uri``, ``model_id``); ``None`` when
        disabled.
        """
        if not self._active():
            return None
        import mlflow.pytorch

        client = self._require_client()
        if not hasattr(client, "create_logged_model"):  # pragma: no cover - MLflow 2
            raise RuntimeError(f"logging a model needs MLflow >= 3 (installed: {mlflow.__version__})")
        # Created here, in this run's experiment: without an active fluent run MLflow would put it in the default one.
        logged = client.create_logged_model(self.experiment_id, name=name, source_run_id=self._run_id)  # type: ignore[arg-type]
        with use_tracking_uri(self.tracking_uri), _quiet_store_warnings():  # type: ignore[arg-type]
            return mlflow.pytorch.log_model(
                model,
                name=name,
                model_id=logged.model_id,
                run_id=self._run_id,
                signature=signature,
                input_example=input_example,
                pip_requirements=list(pip_requirements),
                metadata=dict(metadata) if metadata is not None else None,
                serialization_format=serialization_format,
            )

    def register_model(self, model_uri: str, name: str, alias: str | None = None) -> str | None:
        """Register a model of this run (``models:/<model id>`` from :meth:`log_pytorch_model`) as a new version of
        the registered model ``name`` (created when missing) and point ``alias`` at it. Returns the version
        (``None`` when disabled). The registry is the tracking store's own (a local SQLite store has one) unless
        ``MLFLOW_REGISTRY_URI`` names another."""
        if not self._active():
            return None
        model_id = model_uri.removeprefix("models:/") if re.fullmatch(r"models:/m-[0-9a-f]+", model_uri) else None
        with use_tracking_uri(self.tracking_uri), _quiet_store_warnings():  # type: ignore[arg-type]
            client = MlflowClient(tracking_uri=self.tracking_uri)
            try:
                client.create_registered_model(name)
            except MlflowException as error:
                if error.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):  # made before, or meanwhile
                    raise
            version = client.create_model_version(
                name, source=model_uri, run_id=self._run_id, model_id=model_id, tags={"medssl.run_id": self._run_id}
            )
            if alias:
                client.set_registered_model_alias(name, alias, version.version)
        return str(version.version)

    def finish(self, status: str = "FINISHED") -> None:
        """End the run with ``status`` (``"FINISHED"``, ``"FAILED"`` or ``"KILLED"``); later calls do nothing."""
        status = status.upper()
        if status not in _STATUSES:
            raise ValueError(f"status must be one of {_STATUSES}, got {status!r}")
        if not self.enabled or self._finished:
            return
        self._require_client().set_terminated(self._run_id, status)  # type: ignore[arg-type]
        self._finished = True

    def __enter__(self) -> Tracker:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.finish("FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.finish("KILLED")
        else:
            self.finish("FAILED")

    def __repr__(self) -> str:
        if not self.enabled:
            return "Tracker(enabled=False)"
        return f"Tracker(run_id={self._run_id!r}, tracking_uri={self.tracking_uri!r})"


def _close_figure(fig: Any) -> None:
    """Release a figure: through pyplot when it manages it, else by clearing it."""
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:
        pyplot.close(fig)
    fig.clear()
