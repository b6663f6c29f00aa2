"""The restorable window everywhere a person looks (issue 19): ``list`` and ``status`` show each
source's window with its gaps, in their text and their ``--json``, from one piece of code;
``status --max-age`` and ``failover --max-age`` judge what a restore would reach (the window's
end when a change chain continues the archive), and ``failover --full-only`` judges the archive.

Real servers throughout: an etcd of its own for the gap (a compaction is cluster-wide), the
shared etcd otherwise, real ``burrow backup``, ``burrow capture`` and ``burrow failover`` runs, and
what a failover wrote compared key by key with etcd's own API."""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from captureutil import (  # capture_key: the key fixture
    HANG_GUARD,
    Capture,
    backup,
    capture_key,  # noqa: F401
    cli,
    covered,
    segments,
    wait_for,
)
from kvutil import Etcd, unique

from burrow.segments import iso_to_us, show_time
from burrow.testing.servers import start_etcd


def _relative(snapshot: dict[bytes, bytes], prefix: bytes) -> dict[bytes, bytes]:
    return {k[len(prefix):]: v for k, v in snapshot.items()}


def _now_us() -> int:
    return int(datetime.now(UTC).timestamp() * 1_000_000)


def _chain(etcd: Any, store: Path, key: Path, changes: int = 12) -> tuple[str, str, str, Etcd, Capture]:
    """A source with a full archive and a running capture that has sealed ``changes`` changes."""
    e = Etcd(etcd.url)
    prefix = "/" + unique("win")
    p = prefix.encode()
    e.put_many({p + b"/seed%02d" % i: b"s" for i in range(5)})
    url = f"etcd://{etcd.host}:{etcd.port}{prefix}"
    name = unique("win")
    backup(url, store, name, key)
    cap = Capture(url, store, name, key, seal="1s")
    for i in range(changes):
        e.put(p + b"/c%03d" % i, b"v%d" % i)
    rev = e.revision()
    wait_for("the changes sealed", lambda: covered(store, name, rev), cap.proc)
    wait_for("the chain's window to have length", lambda: _window_has_length(store, name, 0), cap.proc)
    return url, prefix, name, e, cap


def _window_has_length(store: Path, name: str, after_us: int) -> bool:
    """A live segment starting at or after ``after_us`` whose window has length: the capture heard
    from etcd after it caught up (a segment ends when the feed was last heard from, not when it
    was sealed, so the segment that catches up may span no time at all)."""
    return any(not m.get("gap") and not m.get("catching_up")
               and iso_to_us(m["last_time"]) > iso_to_us(m["first_time"]) >= after_us
               for m in segments(store, name))


def _status(store: Path, name: str, key: Path, *extra: str) -> Any:
    return cli("status", str(store), "--source", name, "--no-verify", "--key-file", str(key), *extra)


@pytest.mark.timeout(1800)  # a hang guard: many CLI runs, each a flow, on a busy machine
def test_list_and_status_show_the_window_and_its_gap_in_text_and_json(tmp_path, store, key) -> None:
    """etcd compacted past the chain's end while capture is stopped: the next capture records
    the gap and chains on from a new full archive; ``list`` and ``status`` show one window with
    that gap, the same in their text and their JSON."""
    etcd = start_etcd(tmp_path / "etcd")
    try:
        url, prefix, name, e, cap = _chain(etcd, store, key)
        cap.kill()
        in_gap = _now_us()
        for i in range(10):
            e.put(prefix.encode() + b"/lost%02d" % i, b"x")
        e._post("/v3/kv/compaction", {"revision": str(e.revision()), "physical": True})
        cap = Capture(url, store, name, key, seal="1s")
        wait_for("a gap segment", lambda: any(m.get("gap") for m in segments(store, name)), cap.proc)
        e.put(prefix.encode() + b"/after", b"a")
        after = e.revision()
        wait_for("the new chain", lambda: covered(store, name, after), cap.proc)
        gap_at = max(iso_to_us(m["last_time"]) for m in segments(store, name) if m.get("gap"))
        wait_for("the new chain's window past the gap", lambda: _window_has_length(store, name, gap_at), cap.proc)
        cap.kill()

        r = _status(store, name, key, "--json")
        assert r.returncode == 0, r.stderr[-2000:]
        window = json.loads(r.stdout)["sources"][0]["restorable"]
        assert set(window) == {"from", "to", "gaps"} and window["gaps"], window
        assert all(t.endswith("Z") for t in [window["from"], window["to"], *sum(window["gaps"], [])]), window
        gap = next(g for g in window["gaps"] if iso_to_us(g[0]) <= in_gap <= iso_to_us(g[1]))
        assert iso_to_us(window["from"]) < iso_to_us(gap[0]) < iso_to_us(gap[1]) < iso_to_us(window["to"])
        # the same window in status's text: its ends and the gap, as a person reads them
        r = _status(store, name, key)
        assert r.returncode == 0, r.stderr[-2000:]
        shown = ", ".join(f"{show_time(iso_to_us(a))} to {show_time(iso_to_us(b))}" for a, b in window["gaps"][:5])
        described = (f"the restorable window is {show_time(iso_to_us(window['from']))} to "
                     f"{show_time(iso_to_us(window['to']))}, with gaps {shown}")
        assert f"{show_time(iso_to_us(gap[0]))} to {show_time(iso_to_us(gap[1]))}" in described
        (line,) = [ln for ln in r.stdout.splitlines() if ln.startswith(name + ":")]
        assert described in line, line

        # list: every row of the source carries the window in --json; the text names it once
        r = cli("list", str(store), "--source", name, "--json", "--key-file", str(key))
        assert r.returncode == 0, r.stderr[-2000:]
        rows = json.loads(r.stdout)
        assert len(rows) == 2 and all(row["restorable"] == window for row in rows), rows  # two full archives
        r = cli("list", str(store), "--source", name, "--key-file", str(key))
        assert r.returncode == 0, r.stderr[-2000:]
        assert f"{name}: {described}" in r.stdout.splitlines(), r.stdout
        # another source's rows carry no window (it has no chain)
        other = unique("plain")
        backup(f"etcd://{etcd.host}:{etcd.port}{prefix}", store, other, key)
        rows = json.loads(cli("list", str(store), "--json", "--key-file", str(key)).stdout)
        assert {row["source"] for row in rows if "restorable" in row} == {name}
    finally:
        etcd.stop()


def _tick(e: Etcd, key: bytes, stop: threading.Event) -> None:
    n = 0
    while not stop.wait(0.3):
        e.put(key, b"%d" % n)
        n += 1


def _wait_until_old(store: Path, name: str, seconds: float) -> None:
    """Wait until the source's (only) full archive is ``seconds`` old, by its signed time (read
    once: it does not change, only the clock moves)."""
    rows = json.loads(cli("list", str(store), "--source", name, "--json").stdout)
    _sleep_until_past(min(iso_to_us(r["created"]) for r in rows), seconds)


def _sleep_until_past(t_us: int, seconds: float) -> None:
    """Sleep until more than ``seconds`` have passed since ``t_us`` (a time that no longer moves)."""
    while (age := (_now_us() - t_us) / 1e6) <= seconds:
        time.sleep(seconds - age + 0.05)


@pytest.mark.timeout(1800)  # a hang guard: many CLI runs, each a flow, on a busy machine
def test_max_age_judges_what_a_restore_reaches(etcd_a, store, key) -> None:
    """An old full archive and a capture that keeps sealing: ``status --max-age`` and
    ``failover --max-age`` (``--at latest``) pass on the window's end, which is seconds old;
    ``failover --full-only`` judges the archive and is refused, writing nothing. Once the
    capture is stopped and its end is older than the limit, status reports it stale."""
    url, prefix, name, e, cap = _chain(etcd_a, store, key)
    # revisions keep moving outside the prefix, so the capture keeps sealing (an idle source's
    # window moves once a minute only), and the prefix's own state stays still
    stop = threading.Event()
    ticker = threading.Thread(target=_tick, args=(Etcd(etcd_a.url), b"/" + unique("tick").encode(), stop), daemon=True)
    ticker.start()
    try:
        _wait_until_old(store, name, 45)
        # judged on the archive this would be stale; judged on the window's end, it is not
        r = _status(store, name, key, "--json", "--max-age", "30s")
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        entry = json.loads(r.stdout)["sources"][0]
        assert entry["newest_age_s"] >= 45 and entry["restorable_age_s"] < 30 and entry["source"] not in json.loads(
            r.stdout)["stale"], entry

        host = f"etcd://{etcd_a.host}:{etcd_a.port}"
        full_target, latest_target = "/" + unique("full"), "/" + unique("latest")
        r = cli("failover", name, "--from", str(store), "--into", host + full_target, "--primary", "etcd://127.0.0.1:1",
                "--key-file", str(key), "--full-only", "--max-age", "30s")
        assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-3000:]
        assert "RPO gate" in r.stderr and "--max-age" in r.stderr, r.stderr[-2000:]
        assert e.snapshot(full_target.encode() + b"/") == {}, "a refused failover wrote keys"

        r = cli("failover", name, "--from", str(store), "--into", host + latest_target, "--primary",
                "etcd://127.0.0.1:1", "--key-file", str(key), "--at", "latest", "--max-age", "30s", "--no-resume")
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        assert "preflight changes: --at latest" in r.stdout, r.stdout[-2000:]
        rpo = float(next(w for w in r.stdout.split() if w.startswith("rpo_s=")).split("=")[1])
        assert rpo < 30, r.stdout[-2000:]
        got = _relative(e.snapshot(latest_target.encode() + b"/"), latest_target.encode())
        assert got == _relative(e.snapshot(prefix.encode() + b"/"), prefix.encode()) and len(got) == 17
    finally:
        stop.set()
        ticker.join(timeout=HANG_GUARD)
        cap.kill()

    # the capture stopped: once its end is older than the limit, status says so (exit 5). The end
    # no longer moves (read once); only the clock does
    r = _status(store, name, key, "--json")
    _sleep_until_past(iso_to_us(json.loads(r.stdout)["sources"][0]["restorable"]["to"]), 3)
    r = _status(store, name, key, "--max-age", "3s")
    assert r.returncode == 5, r.stdout[-2000:] + r.stderr[-2000:]
    assert name in r.stderr, r.stderr[-2000:]
