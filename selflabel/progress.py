"""One progress channel for the library: rich progress bars, silent when disabled or not a TTY-less CI log."""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Callable, Iterator

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


@contextlib.contextmanager
def progress_bar(description: str, total: int, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """Yield `advance(n)`; draws a rich bar on stderr when enabled and stderr is a terminal."""
    show = enabled and sys.stderr.isatty() and not os.environ.get("SELFLABEL_NO_PROGRESS")
    if not show:
        yield lambda n=1: None
        return
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TimeRemainingColumn(), transient=False) as prog:
        task = prog.add_task(description, total=total)
        yield lambda n=1: prog.advance(task, n)
