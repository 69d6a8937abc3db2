"""Progress bars for long loops, shown only when a run lasts more than a few seconds."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

__all__ = ["progress_bar"]

#: Seconds a loop must run before its progress bar appears.
PROGRESS_DELAY_S = 3.0


def progress_bar(items: Iterable[T], *, enabled: bool = True, desc: str = "") -> Iterator[T]:
    """Iterate over ``items``, with a tqdm bar after :data:`PROGRESS_DELAY_S` seconds.

    ``enabled=False`` turns it off (as does a missing tqdm).
    """
    if not enabled:
        yield from items
        return
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        yield from items
        return
    if not hasattr(items, "__len__"):
        items = list(items)
    # an object with a length is iterated lazily (a chunk schedule sizes its pieces
    # as the loop runs); its length is the bar's total
    if len(items) <= 1:  # type: ignore[arg-type]
        yield from items
        return
    yield from tqdm(items, total=len(items), desc=desc, delay=PROGRESS_DELAY_S, leave=False)  # type: ignore[arg-type]
