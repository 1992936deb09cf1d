"""Progress bars for every long loop (layers, batches, windows), drawn on stderr.

stdout stays clean for ``--json`` output; bars are transient and vanish when the loop ends.
"""
from __future__ import annotations


def progress_bar(total: int, description: str, enabled: bool = True):
    """``(bar, task)``: use ``with bar:`` and ``bar.advance(task)``; silent when not ``enabled``."""
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TimeRemainingColumn(),
                   console=Console(stderr=True), transient=True, disable=not enabled)
    task = bar.add_task(description, total=total)
    return bar, task
