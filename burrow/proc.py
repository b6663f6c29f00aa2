"""Reading /proc (Linux): each process's stat line, parsed once, for the worker's process tree
(cli/worker.py), the test harness's progress of a starting server (burrow/testing/servers.py),
and who holds a lock on this host (flows/common.py ``source_lock``: a holder gone for certain
frees its lock at once)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from burrow.errors import UsageError


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


def boot_id() -> str:
    """This boot of this machine (``/proc/sys/kernel/random/boot_id``; empty when unknown): a
    process identity is only comparable within one boot of one host."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def pid_namespace() -> str:
    """This process's PID namespace (``/proc/self/ns/pid``; empty when unknown): two containers
    on one host share its boot but not their process numbers."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def process_identity(pid: int | None = None) -> dict[str, Any]:
    """Who a process is, beyond its number (which the system reuses): the boot, the PID
    namespace its number belongs to, the pid and the process's start time in clock ticks since
    boot (``/proc/PID/stat``'s 22nd field). ``pid``: a process of this one's namespace."""
    pid = os.getpid() if pid is None else pid
    fields = stat_fields(pid)
    return {"boot": boot_id(), "pidns": pid_namespace(), "pid": pid, "start": int(fields[19]) if fields else None}


def identity_gone(ident: dict[str, Any]) -> bool:
    """Whether the process ``ident`` (:func:`process_identity`) has certainly ended: same boot
    of this host, same PID namespace, and no process with its pid, or one that started at another
    time. A record from another host, boot or container is never judged gone (nothing here can
    tell)."""
    boot, ns = boot_id(), pid_namespace()
    if not boot or not ns or ident.get("boot") != boot or ident.get("pidns") != ns:
        return False
    if not isinstance(ident.get("pid"), int):
        return False
    fields = stat_fields(ident["pid"])
    return fields is None or int(fields[19]) != ident.get("start")


def cpu_seconds(pid: int, *, reaped_children: bool = False) -> float | None:
    """User + system CPU seconds process ``pid`` has used so far (with ``reaped_children``, its
    waited-for children's too), or None when it is gone."""
    fields = stat_fields(pid)
    if fields is None:
        return None
    ticks = int(fields[11]) + int(fields[12])
    if reaped_children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / os.sysconf("SC_CLK_TCK")


def peak_rss_kib(pid: int) -> int:
    """The peak resident set of process ``pid`` so far (``/proc/PID/status`` VmHWM), in KiB; 0
    when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def check_niceness(nice: int, name: str = "nice") -> int:
    """``nice`` when it is a niceness this process can take (0 to 19), else a UsageError naming
    the option or parameter ``name``: the one check of ``burrow capture --nice`` (before any flow
    starts) and of the capture flow's ``nice`` parameter."""
    if isinstance(nice, bool) or not isinstance(nice, int) or not 0 <= nice <= 19:
        raise UsageError(f"{name} takes a niceness from 0 to 19")
    return nice


def lower_priority(nice: int) -> int:
    """Lower this process's CPU priority to niceness ``nice`` (never raise it: an unprivileged
    process cannot, and a process already nicer stays so); return the niceness it now has.
    ``nice`` outside 0..19: :func:`check_niceness`'s UsageError."""
    check_niceness(nice)
    current = os.nice(0)
    if nice > current:
        current = os.nice(nice - current)
    return current
