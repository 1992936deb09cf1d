"""Progress of every long loop (layers, batches, windows) on stderr; stdout stays clean for --json.

Two modes, chosen when :func:`progress_bar` is called:

- stderr is a terminal: rich's transient bars, which vanish when the loop ends.
- stderr is not a terminal (a pipe, nohup, CI, a log file): plain lines (a :class:`LineProgress`),
  at most one batch per bar every ``interval`` seconds (each task changed since the last one), one
  when a task reaches its total (not for a task reused with ``reset``, sub-loop after sub-loop),
  and one per changed task when the ``with`` block ends, e.g. ``[22:41:07] train loss 3.8123
  lr 2.00e-04: 12/100 (12%), 0.31 it/s, elapsed 0:00:38, ETA 0:04:41``.

Settings (module-wide, :func:`configure`; :func:`reset_config` restores the defaults):

- ``quiet``: no progress and no :func:`note` on stderr (:func:`warn` still prints).
- ``log_file``: appended to (line-buffered); it gets every progress line, note and warning,
  timestamped, in both modes (on a terminal the bars stay on stderr and the lines go to the file).
  It still gets progress when ``quiet``; a bar made with ``enabled=False`` is silent everywhere.
- ``interval``: seconds between lines of a bar (default 30, or ``$SLIMTUNE_PROGRESS_INTERVAL``).
- ``lines``: True/False forces line mode on/off; None decides by ``sys.stderr.isatty()``.
"""
from __future__ import annotations

import os
import sys
import time
from datetime import timedelta

DEFAULT_INTERVAL = 30.0
_clock = time.monotonic  # the tests replace it with a fake clock
_config: dict = {}


def configure(quiet: bool | None = None, log_file: str | os.PathLike | None = None,
              interval: float | None = None, lines: bool | None = None) -> None:
    """Change the settings given (None leaves one as it is; ``log_file=""`` closes the log)."""
    if interval is not None and interval < 0:
        raise ValueError(f"interval must be >= 0 seconds, not {interval}")
    _config.update((k, v) for k, v in (("quiet", quiet), ("interval", interval), ("lines", lines))
                   if v is not None)
    if log_file is not None:
        _close_log()
        if os.fspath(log_file):
            _config["log"] = open(log_file, "a", buffering=1, encoding="utf-8")


def reset_config() -> None:
    """Back to the defaults: not quiet, no log file, interval from the environment, auto mode."""
    _close_log()
    _config.clear()


def _close_log() -> None:
    if _config.get("log") is not None:
        _config.pop("log").close()


def _interval() -> float:
    if "interval" in _config:
        return _config["interval"]
    try:
        return max(0.0, float(os.environ.get("SLIMTUNE_PROGRESS_INTERVAL") or DEFAULT_INTERVAL))
    except ValueError:
        return DEFAULT_INTERVAL


def _lines_mode() -> bool:
    if _config.get("lines") is not None:
        return _config["lines"]
    try:
        return not sys.stderr.isatty()
    except (AttributeError, ValueError, OSError):  # no stderr, or a closed one
        return True


def _write(text: str, to_stderr: bool = True, to_log: bool = True, stamp: bool = False) -> None:
    """``text`` as one line on the current ``sys.stderr`` and/or the log file (timestamped)."""
    if to_stderr and sys.stderr is not None:
        try:
            sys.stderr.write((time.strftime("[%H:%M:%S] ") if stamp else "") + text + "\n")
            sys.stderr.flush()
        except (OSError, ValueError):  # a closed pipe must not stop a long run
            pass
    log = _config.get("log")
    if to_log and log is not None:
        log.write(time.strftime("[%Y-%m-%d %H:%M:%S] ") + text + "\n")


def note(message: str) -> None:
    """One plain line on stderr unless quiet; always in the log file."""
    _write(str(message), to_stderr=not _config.get("quiet", False))


def warn(message: str) -> None:
    """``warning: message`` on stderr, even when quiet, and in the log file."""
    _write(f"warning: {message}")


def log(message: str) -> None:
    """``message`` in the log file only (the CLI prints its error lines itself)."""
    _write(str(message), to_stderr=False)


def _hms(seconds: float) -> str:
    return str(timedelta(seconds=int(seconds)))


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.1f}"


class _Task:
    def __init__(self, description: str, total: float | None, completed: float):
        self.description, self.total, self.completed = description, total, completed
        self.base, self.start = completed, _clock()  # rate counts progress after base, since start
        self.dirty = self.reused = False

    def line(self, now: float) -> str:
        elapsed = max(0.0, now - self.start)
        rate = (self.completed - self.base) / elapsed if elapsed > 0 else 0.0
        count = _num(self.completed)
        if self.total is not None:
            pct = 100 if self.total <= 0 else int(100 * self.completed / self.total)
            count += f"/{_num(self.total)} ({pct}%)"
        speed = f"{rate:.0f}" if rate >= 100 else f"{rate:.3g}"
        text = f"{self.description}: {count}, {speed} it/s, elapsed {_hms(elapsed)}"
        if self.total is not None:
            left = self.total - self.completed
            text += ", ETA " + ("0:00:00" if left <= 0 else _hms(left / rate) if rate > 0 else "?")
        return text


class LineProgress:
    """The subset of ``rich.progress.Progress`` the library uses, as plain log lines.

    ``rich``: a rich bar to drive as well (a terminal with a log file: bars there, lines here);
    both number their tasks 0, 1, ... so the ids agree.
    """

    def __init__(self, to_stderr: bool = True, to_log: bool = True, rich=None):
        self._stderr, self._log, self._rich = to_stderr, to_log, rich
        self.interval, self._last, self._tasks = _interval(), _clock(), []

    def _also(self, method: str, *args, **kwargs):
        if self._rich is not None:
            return getattr(self._rich, method)(*args, **kwargs)

    def __enter__(self) -> LineProgress:
        self._also("__enter__")
        return self

    def __exit__(self, *exc) -> None:
        self._also("__exit__", *exc)
        self._emit([t for t in self._tasks if t.dirty], _clock())

    def add_task(self, description: str, total: float | None = 100.0, completed: float = 0,
                 **fields) -> int:
        self._also("add_task", description, total=total, completed=completed, **fields)
        self._tasks.append(_Task(description, total, completed))
        return len(self._tasks) - 1

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def update(self, task_id: int, *, total: float | None = None, completed: float | None = None,
               advance: float | None = None, description: str | None = None, **fields) -> None:
        self._also("update", task_id, total=total, completed=completed, advance=advance,
                   description=description, **fields)
        t = self._tasks[task_id]
        before = t.completed
        t.total = t.total if total is None else total
        t.description = t.description if description is None else description
        if completed is not None:
            if t.completed == t.base:  # nothing done yet: a starting point (a resume), not speed
                t.base = completed
            t.completed = completed
        t.completed += advance or 0
        t.dirty, now = True, _clock()
        if now - self._last >= self.interval:
            self._last = now
            self._emit([x for x in self._tasks if x.dirty], now)
        elif t.total is not None and before < t.total <= t.completed and not t.reused:
            self._emit([t], now)

    def reset(self, task_id: int, *, total: float | None = None, completed: float = 0,
              description: str | None = None, **fields) -> None:
        self._also("reset", task_id, total=total, completed=completed, description=description,
                   **fields)
        t = self._tasks[task_id]
        t.total = t.total if total is None else total
        t.description = t.description if description is None else description
        t.completed = t.base = completed
        t.start, t.reused, t.dirty = _clock(), True, True

    def _emit(self, tasks: list[_Task], now: float) -> None:
        for t in tasks:
            if self._stderr or self._log:
                _write(t.line(now), to_stderr=self._stderr, to_log=self._log, stamp=True)
            t.dirty = False


def _rich_bar():
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(),
                    console=Console(stderr=True), transient=True)


def progress_bar(total: int, description: str, enabled: bool = True):
    """``(bar, task)``: use ``with bar:`` and ``bar.advance(task)``; silent when not ``enabled``.

    A rich bar when stderr is a terminal (and no log file), else a :class:`LineProgress`.
    """
    on_stderr = enabled and not _config.get("quiet", False)
    to_log = enabled and "log" in _config
    if on_stderr and not _lines_mode():
        bar = _rich_bar()
        if to_log:
            bar = LineProgress(to_stderr=False, to_log=True, rich=bar)
    else:
        bar = LineProgress(to_stderr=on_stderr, to_log=to_log)
    return bar, bar.add_task(description, total=total)
