"""Tiny timing helpers shared by the benchmarks.

``time_call(fn)`` returns the median wall time of ``fn()`` in seconds;
``print_table(rows)`` prints ours against every peer, with peer/ours ratios
(a ratio above 1 means ours is faster).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO

import torch

__all__ = ["busy_warning", "print_table", "sync", "time_call"]


def busy_warning(threshold: float = 0.5) -> str | None:
    """A warning string if the 1-minute load average exceeds ``threshold`` (else None).

    Other processes on a small (e.g. 2-core) machine make CPU timings swing by
    10x; benchmarks print this before their tables.
    """
    try:
        load = os.getloadavg()[0]
    except OSError:  # not available on this platform
        return None
    if load > threshold:
        return f"warning: 1-min load average is {load:.2f}; timings will be noisy"
    return None


def sync() -> None:
    """Wait for queued accelerator work (CUDA only; a no-op on CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def time_call(fn: Callable[[], Any], repeats: int = 10, warmup: int = 2) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _cell(value: Any, base: float | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):  # a skip reason
        return "skipped"
    text = f"{value * 1e3:.3g} ms"
    if base:
        text += f" ({value / base:.2f}x)"
    return text


def print_table(
    rows: Sequence[Mapping[str, Any]],
    ours: str = "ours",
    key: str = "case",
    file: TextIO | None = None,
) -> None:
    """Print one line per row: ``row[key]``, then every implementation's time.

    Each row maps ``key`` to a label and implementation names to seconds, ``None``
    (not run) or a string (the reason it was skipped).  The ``ours`` column is the
    baseline; every other timing is followed by ``(peer / ours)``.  Skip reasons
    are listed under the table.

    >>> print_table([{"case": "mlp", "ours": 0.002, "pyhessian": 0.004,
    ...               "backpack": "not installed"}])
    case  ours  pyhessian     backpack
    mlp   2 ms  4 ms (2.00x)  skipped
      backpack skipped on mlp: not installed
    """
    out = file or sys.stdout
    cols: list[str] = []
    for row in rows:
        cols += [c for c in row if c != key and c not in cols]
    if ours in cols:
        cols.remove(ours)
        cols.insert(0, ours)
    table = [[key, *cols]]
    notes = []
    for row in rows:
        base = row.get(ours)
        base = base if isinstance(base, (int, float)) and not isinstance(base, bool) else None
        line = [str(row.get(key, ""))]
        for c in cols:
            v = row.get(c)
            line.append(_cell(v, None if c == ours else base))
            if isinstance(v, str):
                notes.append(f"  {c} skipped on {row.get(key, '')}: {v}")
        table.append(line)
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip(), file=out)
    for n in notes:
        print(n, file=out)
