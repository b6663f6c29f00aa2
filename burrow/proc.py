"""Reading /proc (Linux): each process's stat line, parsed once, for the worker's process tree
(cli/worker.py) and the test harness's progress of a starting server (burrow/testing/servers.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator


def stat_fields(pid: int | str) -> list[bytes] | None:
    """The fields of ``/proc/PID/stat`` from the third on (``state``, ``ppid``, ``pgrp``, ...,
    ``utime`` at index 11, ``stime`` at 12), or None when the process is gone. The second field,
    the command name, may hold spaces and parentheses: the last ``)`` ends it."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return None
    return stat[stat.rindex(b")") + 2:].split()


def all_stat_fields() -> Iterator[tuple[int, list[bytes]]]:
    """``(pid, stat_fields(pid))`` of every live process."""
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := stat_fields(entry)) is not None:
            yield int(entry), fields
