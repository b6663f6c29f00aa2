"""The stages of Burrow's flows, one module each, and the ``@task`` they are decorated with,
which does not import Prefect until a task actually runs.

Every module here is a plain function (what the CLI's ``list``, ``inspect``, ``status`` and
``dump`` call directly, and what tests call) plus a Prefect task wrapping it. Decorating with
``prefect.task`` at import time would import Prefect (1 to 2 s) for commands that never run a
flow. :func:`task` returns a :class:`LazyTask` instead: the real ``prefect.Task`` is made the
first time the task is called or any of its attributes (``submit``, ``map``, ``with_options``,
``name``, ...) is used, which inside a flow is when Prefect is loaded anyway. ``.fn`` is the
undecorated function, as on a Prefect task.

Every Burrow task is uncached (``cache_policy=NO_CACHE``): a backup or restore must run each
time it is asked to, and its inputs (blocks holding secrets) must never be hashed into a key.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any


class LazyTask:
    """A Prefect task made on first use (see the module docstring)."""

    def __init__(self, fn: Callable[..., Any], options: dict[str, Any]) -> None:
        self.fn = fn
        self._options = options
        self._task: Any = None
        self._lock = threading.Lock()
        functools.update_wrapper(self, fn)

    def prefect_task(self) -> Any:
        """The ``prefect.Task`` (made once; imports Prefect)."""
        if self._task is None:
            with self._lock:
                if self._task is None:
                    from prefect import task
                    from prefect.cache_policies import NO_CACHE

                    self._task = task(self.fn, cache_policy=NO_CACHE, **self._options)
        return self._task

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.prefect_task()(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_options", "_task", "_lock", "fn"):
            raise AttributeError(name)
        return getattr(self.prefect_task(), name)

    def __repr__(self) -> str:
        return f"LazyTask({self._options.get('name') or self.fn.__name__!r})"


def task(**options: Any) -> Callable[[Callable[..., Any]], LazyTask]:
    """``@task(name=..., retries=..., ...)``: ``prefect.task``'s options (``cache_policy`` is
    always NO_CACHE), applied when the task is first used."""
    if "cache_policy" in options:
        raise TypeError("Burrow's tasks are never cached: drop cache_policy")

    def decorate(fn: Callable[..., Any]) -> LazyTask:
        return LazyTask(fn, options)

    return decorate
