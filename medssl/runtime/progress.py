"""Progress that a terminal and a log file can both read.

:func:`progress` returns a tqdm bar when its stream is a terminal and otherwise a :class:`LineProgress`: the same
small API (``update``, ``set_postfix``, ``set_postfix_str``, ``write``, ``close``, a settable ``total``, ``refresh``,
iteration, context manager) that prints one complete, flushed line at most every ``MEDSSL_PROGRESS_SECONDS`` seconds
(default 30) and one at the end, e.g.::

    preprocess: 1200/5000 items (24%), elapsed 00:35, 34.3 items/s, eta 01:51

instead of tqdm's carriage-return updates, which a log file (``docker run`` without ``-t``, SLURM) shows as one
endless line.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from numbers import Number
from types import TracebackType
from typing import IO, Any, Generic, TypeVar

from tqdm import tqdm

T = TypeVar("T")

SECONDS_VARIABLE = "MEDSSL_PROGRESS_SECONDS"
DEFAULT_SECONDS = 30.0


def progress_seconds() -> float:
    """Seconds between two progress lines of a log file: ``$MEDSSL_PROGRESS_SECONDS``, default 30."""
    text = os.environ.get(SECONDS_VARIABLE, "").strip()
    if not text:
        return DEFAULT_SECONDS
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:  # also NaN
        raise ValueError(f"{SECONDS_VARIABLE} must be a number of seconds >= 0, got {text!r}")
    return seconds


def _is_terminal(stream: IO[str]) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except (OSError, ValueError):  # a closed or detached stream
        return False


class LineProgress(Generic[T]):
    """tqdm's small API as complete lines: one at most every ``interval`` seconds (when the count moves) and one at
    :meth:`close` (unless the last line already says the same)."""

    def __init__(
        self,
        iterable: Iterable[T] | None = None,
        *,
        total: float | None = None,
        desc: str = "",
        unit: str = "item",
        initial: float = 0,
        file: IO[str] | None = None,
        interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if total is None and iterable is not None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except TypeError:
                total = None
        self.iterable = iterable
        self.total = total
        self.desc = desc
        self.unit = unit
        self.initial = initial
        self.n = initial
        self.postfix = ""
        self.file = file
        self.interval = progress_seconds() if interval is None else interval
        self.clock = clock
        self.start = self.last_print = clock()
        self._printed: tuple[float, str] | None = None
        self._closed = False

    # ------------------------------------------------------------------ tqdm's API
    def __iter__(self) -> Iterator[T]:
        if self.iterable is None:
            raise TypeError("LineProgress: nothing to iterate (created without an iterable)")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> LineProgress[T]:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        """Count ``n`` more; a line if the last one is ``interval`` seconds old."""
        self.n += n
        self.refresh()

    def set_postfix(self, ordered_dict: Mapping[str, Any] | None = None, refresh: bool = True, **kwargs: Any) -> None:
        """``key=value`` pairs after the counts, formatted as tqdm formats them (numbers by ``format_num``)."""
        values = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(
            f"{key}={tqdm.format_num(value) if isinstance(value, Number) else str(value).strip()}"
            for key, value in values.items()
        )
        if refresh:
            self.refresh()

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        """Free text after the counts."""
        self.postfix = str(s).strip()
        if refresh:
            self.refresh()

    def refresh(self) -> None:
        """A line now if one is due (the last is ``interval`` seconds old and the count or postfix moved)."""
        if not self._closed and self.clock() - self.last_print >= self.interval:
            self._print()

    def close(self) -> None:
        """The final line (unless the last line already says it, or there was nothing to do: ``total=0``); later
        calls do nothing."""
        if self._closed:
            return
        nothing = self.total == 0 and self.n == self.initial
        if self._printed != (self.n, self.postfix) and not nothing:
            self._print(force=True)
        self._closed = True

    @staticmethod
    def write(s: str, file: IO[str] | None = None, end: str = "\n") -> None:
        """A message, as ``tqdm.write`` prints it (standard output unless ``file``), flushed."""
        stream = file if file is not None else sys.stdout
        stream.write(s + end)
        stream.flush()

    # ------------------------------------------------------------------ the line
    def line(self) -> str:
        """The current line: counts, percentage, elapsed time, rate, time left and postfix (tqdm's formatting)."""
        elapsed = self.clock() - self.start
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
        units = _plural(self.unit)
        if not rate:
            speed = f"? {units}/s"
        elif rate >= 1:
            speed = f"{tqdm.format_sizeof(rate)} {units}/s"
        else:
            speed = f"{tqdm.format_sizeof(1 / rate)} s/{self.unit}"
        shape = "{desc}: " if self.desc else ""
        if self.total:
            shape += "{n_fmt}/{total_fmt} {unit} ({percentage:.0f}%), elapsed {elapsed}, {speed}, eta {remaining}"
        else:
            shape += "{n_fmt} {unit}, elapsed {elapsed}, {speed}"
        return tqdm.format_meter(
            _plain(self.n),
            _plain(self.total) if self.total else None,
            elapsed,
            prefix=self.desc,
            unit=units,
            rate=rate or None,
            postfix=self.postfix or None,
            initial=self.initial,
            bar_format=shape + "{postfix}",
            speed=speed,
        )

    def _print(self, force: bool = False) -> None:
        if not force and self._printed == (self.n, self.postfix):
            return
        stream = self.file if self.file is not None else sys.stderr
        stream.write(self.line() + "\n")
        stream.flush()
        self.last_print = self.clock()
        self._printed = (self.n, self.postfix)


def _plural(unit: str) -> str:
    """``file`` -> ``files`` for counts (``1200/5000 files``); other units as they are."""
    return unit + "s" if unit.isalpha() and unit not in ("it", "B") and not unit.endswith("s") else unit


def _plain(value: float) -> float:
    """Whole counts as integers (``12``, not ``12.0``)."""
    return int(value) if float(value).is_integer() else value


Progress = tqdm | LineProgress
"""What :func:`progress` returns."""


def progress(
    iterable: Iterable[T] | None = None,
    *,
    total: float | None = None,
    desc: str,
    unit: str = "item",
    enabled: bool = True,
    initial: float = 0,
    file: IO[str] | None = None,
    interval: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    **tqdm_options: Any,
) -> tqdm | LineProgress[T]:
    """A progress report of ``iterable`` (or of ``update`` calls up to ``total``).

    Args:
        desc, unit: what runs and what it counts (``scan``, ``file``).
        enabled: ``False`` (``--no-progress``, ``progress=false``): a disabled tqdm; iteration and ``write`` still
            work, nothing else prints.
        initial: the count a resumed run starts from (the rate counts from there).
        file: the stream, default standard error. A terminal gets a tqdm bar (``tqdm_options`` go to it, e.g.
            ``leave=False``); anything else a :class:`LineProgress`.
        interval, clock: the seconds between two lines (default ``$MEDSSL_PROGRESS_SECONDS``, else 30) and the
            clock that measures them (tests inject one).
    """
    if not enabled:
        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, file=file, disable=True)
    stream = file if file is not None else sys.stderr
    if _is_terminal(stream):
        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, file=stream, **tqdm_options)
    return LineProgress(
        iterable, total=total, desc=desc, unit=unit, initial=initial, file=file, interval=interval, clock=clock
    )
