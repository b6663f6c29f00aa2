"""Small performance helpers for the hot loops of extract, plan and replay."""

from __future__ import annotations

import functools
import gc
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")

#: Allocations between young collections while a stage streams records.
GC_THRESHOLD = 50_000


def gc_paused(fn: Callable[P, R]) -> Callable[P, R]:
    """Run ``fn`` with Python's cyclic garbage collector mostly out of the way.

    Streaming hundreds of thousands of records allocates millions of small containers, and
    every full collection walks all live ones: a large share of the CPU for nothing, since
    records hold no reference cycles (reference counting frees them). So everything alive
    when the stage starts is frozen (never scanned again during the stage) and young
    collections run every ``GC_THRESHOLD`` allocations instead of every 700. The collector
    stays on, so cyclic garbage that client libraries make per request (responses,
    exceptions) is still freed as the stage goes: memory stays bounded however many records
    flow through.
    """

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        threshold = gc.get_threshold()
        gc.freeze()
        gc.set_threshold(max(threshold[0], GC_THRESHOLD), threshold[1], threshold[2])
        try:
            return fn(*args, **kwargs)
        finally:
            gc.set_threshold(*threshold)
            gc.unfreeze()

    return wrapper
