"""One progress channel for the library: rich progress bars on stderr, drawn only on a terminal.

`progress_enabled(False)` (what `-q` sets for a whole run) silences every bar inside it, those of
code that takes no flag of its own (the trainers) included. `advance(n, **fields)` moves a bar and
may set its description or the `info` text after it (an epoch's loss and label changes).
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

_enabled = True


@contextlib.contextmanager
def progress_enabled(on: bool) -> Iterator[None]:
    """Show (or, with on=False, silence) every progress bar drawn inside this block."""
    global _enabled
    old, _enabled = _enabled, bool(on) and _enabled
    try:
        yield
    finally:
        _enabled = old


def _console() -> Console:
    return Console(stderr=True)


def progress_shown() -> bool:
    """Whether bars are drawn here: not silenced, not SELFLABEL_NO_PROGRESS, stderr a terminal."""
    return _enabled and not os.environ.get("SELFLABEL_NO_PROGRESS") and _console().is_terminal


@contextlib.contextmanager
def progress_bar(description: str, total: int, enabled: bool = True) -> Iterator[Callable[..., None]]:
    """Yield `advance(n=1, **fields)`; draws a rich bar on stderr when enabled and shown (see progress_shown)."""
    if not (enabled and progress_shown()):
        yield lambda n=1, **fields: None
        return
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                  console=_console(), transient=False) as prog:
        task = prog.add_task(description, total=total, info="")

        def advance(n: int = 1, **fields: Any) -> None:
            prog.update(task, advance=n, **fields)

        yield advance
