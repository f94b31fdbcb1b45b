"""Progress bars (rich) for scoring, pruning steps and fine-tuning loops."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def track(
    items: Iterable[T], description: str, enabled: bool = True, total: int | None = None
) -> Iterator[T]:
    """``items``, with a progress bar on stderr while they are consumed (when ``enabled``)."""
    if not enabled or not sys.stderr.isatty():  # logs and CI: no bar redrawn line by line
        yield from items
        return
    from rich.console import Console
    from rich.progress import track as rich_track

    yield from rich_track(
        items, description=description, total=total, console=Console(stderr=True), transient=True
    )
