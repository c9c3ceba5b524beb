"""Run one benchmark phase in a fresh process (spawned), so that its memory peak and its imports are its own."""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable
from typing import Any


def _target(queue: mp.Queue, function: Callable[..., Any], kwargs: dict[str, Any]) -> None:
    try:
        queue.put(function(**kwargs))
    except BaseException as exc:  # report it instead of leaving the parent waiting
        queue.put({"error": f"{type(exc).__name__}: {exc}"})
        raise


def run_isolated(function: Callable[..., Any], **kwargs: Any) -> Any:
    """``function(**kwargs)`` in a spawned process; ``function`` must be a module-level function."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_target, args=(queue, function, kwargs))
    process.start()
    while True:
        try:
            result = queue.get(timeout=5)
            break
        except Exception:  # queue.Empty: is the phase still alive?
            if not process.is_alive():
                raise RuntimeError(f"benchmark phase {function.__name__} died (exit code {process.exitcode})") from None
    process.join()
    if isinstance(result, dict) and "error" in result:
        raise RuntimeError(f"benchmark phase {function.__name__}: {result['error']}")
    return result
