"""Progress reporting for long steps: a bar on a terminal, nothing elsewhere.

Tasks call ``progress.stage(...)``; the CLI installs a terminal reporter when stderr is a TTY.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

_reporter: Any = None


def install_terminal_reporter() -> None:
    """Show rich progress bars on stderr for the rest of this process."""
    global _reporter
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    _reporter = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    )


@contextmanager
def stage(description: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
    """Report progress of one step; yields ``advance(n)``."""
    if _reporter is None:
        yield lambda n: None
        return
    with _reporter:
        tid = _reporter.add_task(description, total=total)
        try:
            yield lambda n: _reporter.advance(tid, n)
        finally:
            _reporter.remove_task(tid)
