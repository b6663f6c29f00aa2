"""A change feed that goes quiet (its connection lost: ZooKeeper reconnecting, Consul retrying)
must not stretch the restorable window over a time it never saw: no idle heartbeat segment is
sealed while nothing is heard, and a segment's end is the last time the feed was heard from, not
the moment it was sealed. The source is a real etcd prefix with a real full backup; only the
feed is scripted, so the silence is exact."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from captureutil import capture_key, segments, to_us, wait_for  # noqa: F401 - capture_key: the key fixture
from conftest import run_burrow
from kvutil import Etcd, unique

from blocks.source import ChangeBatch


class ScriptedFeed:
    """Progress reports at the chain's position while ``talking`` is set; silence otherwise."""

    def __init__(self, position: int) -> None:
        self.position = position
        self.talking = threading.Event()
        self.talking.set()
        self.closed = threading.Event()
        self.silent = threading.Event()
        self.heard: list[int] = []  # when each report was handed on (µs, the capture's clock)

    def request_progress(self) -> None:
        return None

    def close(self) -> None:
        self.closed.set()
        self.talking.set()

    def __iter__(self) -> Any:
        from burrow.segments import now_us

        while not self.closed.is_set():
            if not self.talking.is_set():
                self.silent.set()  # nothing in flight: the last report was handed on before this
                self.talking.wait()
                self.silent.clear()
                continue
            self.heard.append(now_us())
            yield ChangeBatch([], self.position, progress=True)
            self.closed.wait(0.05)


class _Session:
    def __init__(self, real: Any, feed: Any) -> None:
        self.real, self.feed = real, feed

    def watch(self, after: int) -> Any:
        self.feed.position = after
        return self.feed

    def close(self) -> None:
        self.real.close()


class _Source:
    """The real etcd source, but its change feed is the script."""

    def __init__(self, real: Any, feed: Any) -> None:
        self.real, self.feed = real, feed
        self.service = real.service

    def describe(self) -> str:
        return self.real.describe()

    def connect(self) -> _Session:
        return _Session(self.real.connect(), self.feed)



def _backed_up(etcd: Any, store: Path, key: Path, label: str) -> tuple[str, str]:
    """A new etcd prefix with one key and its full backup: ``(url, source name)``."""
    prefix = f"/{unique(label)}/"
    Etcd(etcd.url).put((prefix + "a").encode(), b"1")
    url, name = f"etcd://{etcd.host}:{etcd.port}{prefix}", unique(label)
    r = run_burrow("backup", url, "--to", str(store), "--name", name, "--key-file", str(key), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return url, name


def _capture_thread(source: Any, store: Path, name: str, key: Path, label: str) -> tuple[Any, Any, dict, list]:
    """``capture_changes`` of ``source`` on a thread (seal every 0.1 s) until ``stop`` is set:
    ``(thread, stop, its summary, what it raised)``."""
    import tasks.capture as tc
    from blocks.keys import backup_write_keys
    from blocks.resolve import store_from_ref
    from burrow.keys import KeyRefs

    stop, result, failed = threading.Event(), {}, []
    work = store.parent / f"work-{label}"
    work.mkdir()

    def run() -> None:
        try:
            result.update(tc.capture_changes(source, store_from_ref(str(store)), name, backup_write_keys(
                True, KeyRefs(key_files=[str(key)])), work, seal_every=0.1, stop=stop))
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            failed.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, stop, result, failed


def test_a_quiet_feed_extends_the_window_over_nothing(etcd_a, store: Path, key: Path, monkeypatch) -> None:
    import tasks.capture as tc
    from blocks.resolve import source_from_ref

    url, name = _backed_up(etcd_a, store, key, "quiet")
    monkeypatch.setattr(tc, "IDLE_SEAL", 0.3)  # a heartbeat segment every 0.3 s of an idle, healthy feed
    feed = ScriptedFeed(0)
    t, stop, _, failed = _capture_thread(_Source(source_from_ref(url), feed), store, name, key, "quiet")
    try:
        live = lambda: [m for m in segments(store, name) if not m.get("catching_up")]  # noqa: E731
        wait_for("heartbeat segments of a healthy idle feed", lambda: failed or len(live()) >= 3)
        feed.talking.clear()  # the connection is lost: nothing more is heard
        wait_for("the feed to fall silent", lambda: failed or feed.silent.is_set())

        def idle_periods(n: int) -> list[dict[str, Any]]:
            # the capture ticks every 0.1 s and an idle heartbeat is due every 0.3 s: let n of
            # those periods pass (a negative check needs a stretch of time; nothing waits on work)
            pause = threading.Event()
            for _ in range(n):
                pause.wait(0.3)
            return segments(store, name)

        first = idle_periods(5)  # (the last report, taken by the capture, may still be sealed here)
        silent_from = max(to_us(m["last_time"]) for m in first)
        second = idle_periods(10)
        assert len(second) == len(first), (
            f"{len(second) - len(first)} heartbeat segments were sealed while the feed was silent")
        assert max(to_us(m["last_time"]) for m in second) == silent_from, (
            "the window was stretched past the last time the feed was heard from")
        feed.talking.set()  # heard again: the heartbeat resumes
        wait_for("a heartbeat after the feed is heard again",
                 lambda: failed or any(to_us(m["last_time"]) > silent_from for m in segments(store, name)))
    finally:
        stop.set()
        t.join(timeout=300)
    assert not failed, failed


class LateFeed:
    """A progress report past a change the feed has not delivered yet (etcd 3.4.23 sends a
    requested progress notification ahead of queued events: etcd-io/etcd#15220), then that change
    once a segment has sealed the progress."""

    def __init__(self, sealed: Any) -> None:
        self.sealed = sealed  # () -> whether a live segment reached the progress report
        self.closed = threading.Event()
        self.position = 0  # the chain's position the capture starts after (set by _Session.watch)

    def request_progress(self) -> None:
        return None

    def close(self) -> None:
        self.closed.set()

    def __iter__(self) -> Any:
        after = self.position
        yield ChangeBatch([], after + 100, progress=True)
        while not self.sealed() and not self.closed.is_set():
            self.closed.wait(0.05)
        yield ChangeBatch([("put", b"/late", b"v", after + 50, {})], after + 50)
        while not self.closed.is_set():
            self.closed.wait(0.05)
            yield ChangeBatch([], after + 100, progress=True)


def test_a_late_change_below_a_sealed_position_is_in_every_point_after_it(etcd_a, store: Path, key: Path, monkeypatch,
                                                               caplog) -> None:
    from blocks.resolve import source_from_ref

    url, name = _backed_up(etcd_a, store, key, "late")
    feed = LateFeed(lambda: any(m["last_position"] >= feed.position + 100 for m in segments(store, name)))
    t, stop, result, failed = _capture_thread(_Source(source_from_ref(url), feed), store, name, key, "late")
    try:
        wait_for("the late change sealed", lambda: failed or any(
            m["keys"] and m["last_position"] >= feed.position + 100 and m["first_position"] > feed.position + 50
            for m in segments(store, name) if m["first_position"] > feed.position + 1))
    finally:
        stop.set()
        t.join(timeout=300)
    assert not failed, failed
    assert result["late_changes"] == 1, result
    assert any("arrived at positions a sealed segment already covered" in rec.getMessage() for rec in caplog.records)
    assert not any("/late" in rec.getMessage() for rec in caplog.records)  # positions only, never a key

    # The late change was made before the progress report that covered it: every point at or
    # after its position holds it, though the segment that placed the point does not.
    after = feed.position
    sealed = segments(store, name)
    holder = next(m for m in sealed if m.get("late_from") is not None)
    assert holder["late_from"] == after + 50 and holder["first_position"] > after + 50, holder
    covering = next(m for m in sealed if m["first_position"] <= after + 60 <= m["last_position"])
    assert covering["keys"] == 0, covering  # the segment that placed the point holds no change
    src = Etcd(etcd_a.url)
    points = {"--at-revision before it": ("--at-revision", str(after + 49)),
              "--at-revision": ("--at-revision", str(after + 60)),
              "--at the covering segment's end": ("--at", covering["last_time"])}
    for label, point in points.items():
        prefix = f"/{unique('late-into')}/"
        r = run_burrow("restore", str(store), "--source", name, *point, "--into",
                       f"etcd://{etcd_a.host}:{etcd_a.port}{prefix}", "--key-file", str(key), timeout=300)
        assert r.returncode == 0, (label, r.stderr[-3000:])
        got = {k[len(prefix):]: v for k, v in src.snapshot(prefix.encode()).items()}
        want = {b"a": b"1"} if label.endswith("before it") else {b"a": b"1", b"late": b"v"}
        assert {k.decode(): v for k, v in got.items()} == {k.decode(): v for k, v in want.items()}, label
