"""Who holds a lock on this host (burrow/proc.py ``identity_gone``, used by flows/common.py
``source_lock``): a holder is judged gone only when that is certain, since a wrong "gone" would let
two runs hold one cluster's lock at once."""

from __future__ import annotations

import subprocess
import sys

from burrow.proc import identity_gone, process_identity


def test_a_live_process_is_not_gone() -> None:
    assert not identity_gone(process_identity())


def test_a_process_that_ended_is_gone() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    ident = process_identity(child.pid)
    assert not identity_gone(ident)
    child.communicate(b"")
    assert identity_gone(ident)


def test_a_reused_pid_is_another_process() -> None:
    ident = process_identity()
    assert identity_gone({**ident, "start": ident["start"] - 1})


def test_another_boot_or_container_is_never_judged() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    ident = process_identity(child.pid)
    assert identity_gone(ident)
    assert not identity_gone({**ident, "boot": "another-boot"})
    assert not identity_gone({**ident, "pidns": "pid:[1]"})  # its number means another process there
    assert not identity_gone({k: v for k, v in ident.items() if k != "pidns"})  # a record without one
    assert not identity_gone({**ident, "pid": "12"})
