"""One progress bar for every long job: rich, on stderr (results go to stdout), off with one flag.

    with progress_bar(batches, enabled, "scoring") as it:     # iterate, the bar follows
        for b in it: ...

    with Bars(enabled) as bars:                                # several tasks, advanced by hand
        t = bars.add_task("encoding", total=n_bytes)
        bars.advance(t, len(chunk))
"""

from __future__ import annotations

from collections.abc import Iterable


def _columns(counts: bool = True):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    cols = [TextColumn("{task.description}"), BarColumn()]
    if counts:
        cols.append(MofNCompleteColumn())
    return cols + [TimeElapsedColumn(), TimeRemainingColumn()]


class Bars:
    """A rich ``Progress`` on stderr when ``enabled``, else a stand-in with the same methods that does
    nothing (so callers never branch)."""

    def __init__(self, enabled: bool = True, transient: bool = True, counts: bool = True, console=None,
                 columns: tuple | None = None):
        """``columns``: rich progress columns to show instead of the default (description, bar, n/total,
        elapsed, remaining; ``counts=False`` drops n/total)."""
        self.enabled, self.progress = enabled, None
        if enabled:
            from rich.console import Console
            from rich.progress import Progress

            self.progress = Progress(*(columns or _columns(counts)), console=console or Console(stderr=True),
                                     transient=transient)

    def __enter__(self):
        if self.progress is not None:
            self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)
        return False

    def add_task(self, description: str, total: float | None = None, **fields) -> int:
        return self.progress.add_task(description, total=total, **fields) if self.progress is not None else 0

    def advance(self, task: int, amount: float = 1) -> None:
        if self.progress is not None:
            self.progress.advance(task, amount)

    def update(self, task: int, **kwargs) -> None:
        if self.progress is not None:
            self.progress.update(task, **kwargs)


class progress_bar:
    """``with progress_bar(items, enabled, "what") as it: for x in it: ...`` — iterate with a bar."""

    def __init__(self, items: Iterable, enabled: bool, what: str, total: int | None = None):
        self.items, self.what = items, what
        self.total = total if total is not None else (len(items) if hasattr(items, "__len__") else None)
        self.bars = Bars(enabled)

    def __enter__(self):
        if not self.bars.enabled:
            return iter(self.items)
        self.bars.__enter__()
        return self.bars.progress.track(self.items, total=self.total, description=self.what)

    def __exit__(self, *exc):
        return self.bars.__exit__(*exc)
