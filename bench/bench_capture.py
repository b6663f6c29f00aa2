"""Point-in-time capture (issue 19): RPO under load, capture cost, restore to a point, peak RSS
(a benchmark, not a test).

    .venv/bin/python bench/bench_capture.py [--seconds 40] [--pairs 3] [--stages 10000,100000,1000000]

Starts one etcd, ZooKeeper and Consul source, a second etcd as the restore target and a Prefect
server (every ``burrow`` command here is the real CLI as a subprocess, its flow on that server),
then, in one run:

* rpo: for each service, a steady open-loop writer updates a bounded key set (etcd 10,000 keys at
  1,000 changes/s; ZooKeeper and Consul 1,000 keys at 200/s; 100-byte values) for ``--seconds``,
  ``--pairs`` times without and with ``burrow capture SOURCE --to STORE --for ...`` running
  (default ``--seal-every`` 10 s), in ABBA pairs, after one full backup. Measured:
  - the lag of each change: its write acknowledged (the writer's wall clock) to the moment the
    sealed segment that holds it appeared in the store (the store's directory polled every
    0.1 s; each segment's manifest names its last position: etcd revision, ZooKeeper mzxid,
    Consul ModifyIndex, which the writer gets back from each write);
  - the capture's CPU seconds over the steady writes (/proc, from the first write to the moment
    the last write was sealed) and in all (os.wait4 of the reaped process, start-up included);
    stored bytes per 1,000 changes (the sealed segments' sizes over their counts);
  - the writer's per-request latency (send to answer), its p99 with and without capture. The
    runs come in pairs, next to each other in time, ABBA (which comes first alternates): the
    rise is the median of the pairs' p99 ratios with a 90% interval (the pairs resampled), since
    the machine's pace drifts over minutes and moves a 30 s run's p99 several times over. Also
    the p99 and p99.9 of all writes of each kind of run pooled (a block bootstrap, 5 s blocks).
    The writer is a process of its own (its GC off during a run): a pause of the bench's
    process is not the source's latency.
* pitr (etcd): a 100,000-key full archive, then one chain grown by batched writes (txns of 128
  puts and deletes, 16 in flight, over the same 100,000 keys: about 80% updates, 10% deletes,
  10% re-creates) to each of ``--stages`` changes; at each stage the capture is stopped (SIGINT,
  it seals what it saw) and ``burrow restore STORE --source S --at latest`` runs into an empty
  prefix of the target etcd, compared key by key with the source. At the 100,000 stage the
  restore of the full archive alone is timed too, interleaved. Peak RSS (VmHWM, sampled) of every
  restore and capture process (CPU from os.wait4).

* watch (``--phases watch``): etcd's delivery of a watch's backlog of 50,000 changes with and
  without ``prev_kv`` (the capture asks for it and never reads it), alternating, 3 rounds.

``--capture-cpus 1`` runs the captures on CPU 1 only and the bench (its writers), the sources
and the Prefect server on the other CPUs: the capture on a host of its own, as on a worker, so what
is left of the source's latency rise is the source's cost of serving the capture (its watch, the
store's disk). Both kinds of run poll the store (the lag's clock) from the bench's process, not the
writer's. ``--source-cpus 0-1`` starts the rpo phase's source servers on those CPUs instead: a
source with two cores (a Go server's GOMAXPROCS is 2 then), which serves a capture's read on one
while it answers writes on the other, as any production server has more than one; the capture's
CPU is shared with it then.

``--capture-no-prev-kv`` starts every capture with its etcd watch asking for no ``prev_kv`` (a
patch inside the capture's process; the segments are the same).

The machine may be shared: ``uptime`` is printed before and after each phase, and the load
average beside each run.
"""

from __future__ import annotations

import argparse
import base64
import bisect
import contextlib
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from childproc import cli_env  # noqa: E402  (bench/ is the script's directory)

from burrow import proc  # noqa: E402  (the checkout's own, from REPO)

BURROW = str(REPO / ".venv" / "bin" / "burrow")
#: Hang guard of one wait on progress (a busy machine is slow, never this slow).
HANG_GUARD = 1800.0
RPO_TARGET_S = 15.0
LATENCY_RISE_TARGET = 0.10
RESTORE_RATIO_TARGET = 2.0
VALUE = (b"0123456789abcdef" * 4)[:50]


def value(n: int) -> bytes:
    """A 100-byte value unique to change ``n``, half of it incompressible (a hash's hex digits)."""
    return b"%09d-" % n + hashlib.blake2b(b"%d" % n, digest_size=20).hexdigest().encode() + VALUE


def uptime(label: str) -> str:
    line = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"[uptime {label}] {line}", flush=True)
    return line


def load() -> float:
    return os.getloadavg()[0]


def cpu_of(pid: int) -> float:
    """CPU seconds (user + system) a live process has used so far (/proc/PID/stat)."""
    return proc.cpu_seconds(pid) or 0.0


def pct(xs: list[float], p: float) -> float:
    """The p-th percentile (nearest rank) of ``xs``."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(round(p / 100 * len(s) + 0.5)) - 1))]


def join(xs: Any, fmt: str = ".2f") -> str:
    return ", ".join(format(x, fmt) for x in xs)


# --------------------------------------------------------------------------- the store, watched


class SegmentWatch:
    """Polls ``store/<source>/changes`` every 0.1 s; records when each sealed segment appeared
    (wall clock) with its manifest's positions and catching-up mark, its size, and the positions
    its records hold (decrypted with the capture's key)."""

    def __init__(self, store: Path, source: str, key: Path) -> None:
        from burrow.crypto import ArchiveKeys
        from burrow.keys import Keyring, read_key_file

        self.keys = ArchiveKeys(Keyring(keys=read_key_file(key)))
        self.dir = store / source / "changes"
        self.seen: dict[str, dict[str, Any]] = {}
        self.stop = threading.Event()
        self.polled = threading.Event()  # the first poll (every segment already there) is done
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stop.is_set():
            self.poll()
            self.polled.set()
            self.stop.wait(0.1)

    def poll(self) -> None:
        from burrow.archive import ArchiveReader

        if not self.dir.is_dir():
            return
        for p in sorted(self.dir.glob("*.burrow")):  # the store publishes by link: a listed name is whole
            if p.name in self.seen:
                continue
            t = time.time()
            with open(p, "rb") as f:
                m = ArchiveReader(f).manifest  # (header and footer only: cheap)
            self.seen[p.name] = {"t": t, "path": p, "first": int(m["first_position"]),
                                 "last": int(m["last_position"]), "catching_up": bool(m.get("catching_up")),
                                 "resync": bool(m.get("resync")), "gap": bool(m.get("gap")),
                                 "size": p.stat().st_size}

    def content(self) -> list[dict[str, Any]]:
        """Every segment seen, with the positions its records hold (not only what its manifest
        says): decrypted here, once each, and only when asked (after the writes, so that it
        never takes the writer's CPU)."""
        from burrow.archive import ArchiveReader

        out = []
        for s in list(self.seen.values()):
            if "max_pos" not in s:
                with open(s["path"], "rb") as f:
                    pos = [int(r.meta["pos"]) for r in ArchiveReader(f).records(self.keys)
                           if r.meta.get("op") in ("put", "del")]
                s["changes"], s["max_pos"] = len(pos), max(pos, default=0)
                s["outside"] = 0 if s["resync"] else sum(1 for x in pos if not s["first"] <= x <= s["last"])
            out.append(s)
        return out

    def sealed_by(self) -> tuple[list[int], list[float]]:
        """For :meth:`lag`: the running maximum of the positions the segments hold, in the order
        they appeared, and when each appeared."""
        order = sorted(self.content(), key=lambda s: s["t"])
        reach, times, top = [], [], 0
        for s in order:
            top = max(top, s["max_pos"])
            reach.append(top)
            times.append(s["t"])
        return reach, times

    def covered(self, position: int) -> bool:
        """A sealed segment holds a change at ``position`` or later (by its records: etcd 3.4.23
        can name a position in a progress notification before it has sent the events up to it)."""
        return any(s["max_pos"] >= position and not s["catching_up"] for s in self.content())

    def live_after(self, t: float) -> bool:
        """A segment sealed after the capture caught up appeared after ``t``."""
        return any(not s["catching_up"] and s["t"] > t for s in list(self.seen.values()))

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.poll()


def wait_for(what: str, check: Callable[[], Any], proc: subprocess.Popen | None = None) -> Any:
    deadline = time.monotonic() + HANG_GUARD
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"the capture exited ({proc.returncode}) while waiting for {what}")
        time.sleep(0.1)
    raise SystemExit(f"no progress in {HANG_GUARD:.0f} s: {what}")


# --------------------------------------------------------------------------- the CLI


def vm_hwm_mib(pid: int) -> float:
    """The peak RSS of a live process so far (/proc/PID/status VmHWM), in MiB; 0 once it is gone."""
    return proc.peak_rss_kib(pid) / 1024


class PeakRss:
    """Samples a child's VmHWM every 0.1 s until it exits. Not os.wait4's ru_maxrss: on Linux a
    child's ru_maxrss starts from its parent's peak at fork/exec, and this bench's own RSS (the
    writers' records) is larger than the commands it measures."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak = pid, 0.0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, vm_hwm_mib(self.pid))
            self.done.wait(0.1)

    def stop(self) -> float:
        self.peak = max(self.peak, vm_hwm_mib(self.pid))
        self.done.set()
        self.thread.join()
        return self.peak


#: How captures are started: the CLI, or (``--capture-no-prev-kv``) the CLI with its etcd watch
#: asking for no previous values (the capture never reads them; etcd reads one per event for them).
CAPTURE_CMD = [BURROW]
NO_PREV_KV = [sys.executable, "-c", "import aetcd.rpc as r; w = r.WatchCreateRequest; "
              "r.WatchCreateRequest = lambda **k: w(**{**k, 'prev_kv': False}); "
              "import sys; sys.argv[0] = 'burrow'; from cli import run; sys.exit(run())"]

#: Captures still running: killed if the bench fails part way.
LIVE: list[Capture] = []


class Capture:
    """``burrow capture URL --to STORE`` as a subprocess (default --seal-every), stopped with SIGINT."""

    def __init__(self, url: str, store: Path, name: str, key: Path, env: dict[str, str], log: Path) -> None:
        self.log = open(log, "ab")
        self.proc = subprocess.Popen([*CAPTURE_CMD, "capture", url, "--to", str(store), "--name", name, "--key-file",
                                      str(key), "--for", "3h"], env=env, stdout=self.log, stderr=self.log,
                                     cwd=str(REPO))
        self.started = time.time()
        self.rss = PeakRss(self.proc.pid)
        LIVE.append(self)

    def stop(self) -> dict[str, float]:
        """SIGINT (the capture seals what it saw); the reaped process's CPU and peak RSS."""
        self.rss.peak = max(self.rss.peak, vm_hwm_mib(self.proc.pid))
        self.proc.send_signal(signal.SIGINT)
        _, status, usage = os.wait4(self.proc.pid, 0)
        peak = self.rss.stop()
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        self.log.close()
        LIVE.remove(self)
        return {"cpu": usage.ru_utime + usage.ru_stime, "rss_mib": peak, "code": self.proc.returncode}


def burrow(args: list[str], env: dict[str, str]) -> dict[str, Any]:
    """A ``burrow`` command as a subprocess: its JSON summary (``--json``), wall time, CPU seconds
    (os.wait4 of the reaped process) and peak RSS (VmHWM sampled, :class:`PeakRss`)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.monotonic()
        proc = subprocess.Popen([BURROW, *args, "--json"], env=env, stdout=out, stderr=err, cwd=str(REPO))
        rss = PeakRss(proc.pid)
        _, status, usage = os.wait4(proc.pid, 0)
        peak = rss.stop()
        wall = time.monotonic() - t0
        code = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if code != 0:
            raise SystemExit(f"burrow {args[0]} failed ({code}): {err.read().decode(errors='replace')[-3000:]}")
        summary = json.loads(out.read())
    return {"summary": summary, "wall": wall, "cpu": usage.ru_utime + usage.ru_stime,
            "rss_mib": peak, "load": load()}


# --------------------------------------------------------------------------- writers (open loop)


class Writer:
    """Issues change n at t0 + n / rate (open loop: a slow answer never delays the next request);
    each acknowledged write is recorded as (wall time of the answer, latency s, position)."""

    service = ""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.acks: list[tuple[float, float, int]] = []
        self.errors = 0
        self.error = ""
        self.n = 0

    def submit(self, n: int) -> None:
        raise NotImplementedError

    def failed(self, exc: Exception) -> None:
        self.errors += 1
        if not self.error:
            details = getattr(exc, "details", None)
            self.error = f"{type(exc).__name__}: {details() if callable(details) else exc}"[:300]

    def run(self, seconds: float) -> None:
        self.acks = []
        self.errors = 0
        issued = 0
        t0 = time.monotonic()
        while True:
            elapsed = time.monotonic() - t0
            if elapsed >= seconds:
                break
            due = int(elapsed * self.rate) + 1
            while issued < due:
                self.submit(self.n)
                self.n += 1
                issued += 1
            time.sleep(max(0.0, min(0.005, (issued / self.rate) - (time.monotonic() - t0))))
        wait_for(f"{self.service} writes answered", lambda: len(self.acks) + self.errors >= issued)
        if self.errors:  # reported beside the run (etcd refuses writes when its apply falls behind)
            print(f"  {self.errors} of {issued} {self.service} writes refused, the first: {self.error}", flush=True)
        self.issued = issued

    def close(self) -> None:
        pass


class EtcdWriter(Writer):
    service = "etcd"

    def __init__(self, endpoint: str, prefix: bytes, keys: int, rate: float) -> None:
        import grpc
        from aetcd import rpc

        super().__init__(rate)
        self.rpc, self.prefix, self.keys = rpc, prefix, keys
        self.channel = grpc.insecure_channel(endpoint)
        self.kv = rpc.KVStub(self.channel)

    def key(self, i: int) -> bytes:
        return self.prefix + b"/k%06d" % i

    def seed(self) -> None:
        futures = []
        for s in range(0, self.keys, 128):
            ops = [self.rpc.RequestOp(request_put=self.rpc.PutRequest(key=self.key(i), value=value(i)))
                   for i in range(s, min(self.keys, s + 128))]
            futures.append(self.kv.Txn.future(self.rpc.TxnRequest(success=ops)))
        for f in futures:
            f.result()

    def submit(self, n: int) -> None:
        t = time.perf_counter()
        f = self.kv.Put.future(self.rpc.PutRequest(key=self.key(n % self.keys), value=value(n)))

        def done(f: Any) -> None:
            try:
                rev = f.result().header.revision
            except Exception as exc:  # noqa: BLE001 - counted, the run fails
                self.failed(exc)
                return
            self.acks.append((time.time(), time.perf_counter() - t, rev))

        f.add_done_callback(done)

    def close(self) -> None:
        self.channel.close()


class ZkWriter(Writer):
    service = "zookeeper"

    def __init__(self, hosts: str, root: str, keys: int, rate: float) -> None:
        from kazoo.client import KazooClient

        super().__init__(rate)
        self.root, self.keys = root, keys
        self.zk = KazooClient(hosts=hosts, timeout=30)
        self.zk.start(timeout=60)

    def key(self, i: int) -> str:
        return f"{self.root}/k{i:05d}"

    def seed(self) -> None:
        self.zk.ensure_path(self.root)
        for s in range(0, self.keys, 500):
            t = self.zk.transaction()
            for i in range(s, min(self.keys, s + 500)):
                t.create(self.key(i), value(i))
            t.commit()

    def submit(self, n: int) -> None:
        t = time.perf_counter()
        a = self.zk.set_async(self.key(n % self.keys), value(n))

        def done(a: Any) -> None:
            try:
                zxid = a.get_nowait().mzxid
            except Exception as exc:  # noqa: BLE001 - counted, the run fails
                self.failed(exc)
                return
            self.acks.append((time.time(), time.perf_counter() - t, zxid))

        a.rawlink(done)

    def close(self) -> None:
        self.zk.stop()
        self.zk.close()


class ConsulWriter(Writer):
    """One /v1/txn set per change (its answer carries the key's ModifyIndex), 8 in flight."""

    service = "consul"

    def __init__(self, url: str, prefix: str, keys: int, rate: float) -> None:
        import httpx

        super().__init__(rate)
        self.prefix, self.keys = prefix, keys
        self.client = httpx.Client(base_url=url, timeout=60, trust_env=False)
        self.pool = ThreadPoolExecutor(8)

    def key(self, i: int) -> str:
        return f"{self.prefix}/k{i:05d}"

    def seed(self) -> None:
        for s in range(0, self.keys, 64):
            ops = [{"KV": {"Verb": "set", "Key": self.key(i), "Value": base64.b64encode(value(i)).decode()}}
                   for i in range(s, min(self.keys, s + 64))]
            self.client.put("/v1/txn", json=ops).raise_for_status()

    def submit(self, n: int) -> None:
        self.pool.submit(self._put, n)

    def _put(self, n: int) -> None:
        op = [{"KV": {"Verb": "set", "Key": self.key(n % self.keys), "Value": base64.b64encode(value(n)).decode()}}]
        try:
            t = time.perf_counter()
            r = self.client.put("/v1/txn", json=op)
            lat = time.perf_counter() - t
            r.raise_for_status()
            index = r.json()["Results"][0]["KV"]["ModifyIndex"]
        except Exception as exc:  # noqa: BLE001 - counted, the run fails
            self.failed(exc)
            return
        self.acks.append((time.time(), lat, index))

    def close(self) -> None:
        self.pool.shutdown()
        self.client.close()


class WriterProcess:
    """A :class:`Writer` in a process of its own (spawned): only the writes and their timing
    run there, with Python's cyclic GC off during a run, so that the latency it records is the
    source's answer, not a pause of this bench's process (its store polling, the records it
    keeps, the collector walking them)."""

    def __init__(self, service: str, *args: Any) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self.service = service
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_writer_child, args=(child, service, args), daemon=True)
        self.proc.start()
        child.close()
        self._answer("start")
        self.acks: list[tuple[float, float, int]] = []
        self.errors = 0
        self.server_pid = 0  # the source server's process, whose CPU each run counts

    def _call(self, *cmd: Any) -> Any:
        self.conn.send(cmd)
        return self._answer(cmd[0])

    def _answer(self, what: str) -> Any:
        if not self.conn.poll(HANG_GUARD):
            raise SystemExit(f"the {self.service} writer did not answer {what} in {HANG_GUARD:.0f} s")
        try:
            kind, got = self.conn.recv()
        except EOFError:
            raise SystemExit(f"the {self.service} writer exited ({self.proc.exitcode})") from None
        if kind == "error":
            raise SystemExit(f"the {self.service} writer failed: {got}")
        return got

    def seed(self) -> None:
        self._call("seed")

    def run(self, seconds: float) -> None:
        self.acks, self.errors = self._call("run", seconds)

    def close(self) -> None:
        if self.proc.is_alive():
            self._call("close")
        self.proc.join()


def _writer_child(conn: Any, service: str, args: tuple[Any, ...]) -> None:
    import gc

    try:
        w = {"etcd": EtcdWriter, "zookeeper": ZkWriter, "consul": ConsulWriter}[service](*args)
        conn.send(("ok", None))
        while True:
            cmd = conn.recv()
            if cmd[0] == "seed":
                w.seed()
                conn.send(("ok", None))
            elif cmd[0] == "run":
                gc.collect()
                gc.disable()
                try:
                    w.run(cmd[1])
                finally:
                    gc.enable()
                conn.send(("ok", (w.acks, w.errors)))
            else:
                w.close()
                conn.send(("ok", None))
                return
    except Exception as exc:  # noqa: BLE001 - reported to the bench, which stops
        conn.send(("error", f"{type(exc).__name__}: {exc}"[:500]))


# --------------------------------------------------------------------------- phase: RPO and cost


def rpo_run(w: WriterProcess, url: str, store: Path, name: str, key: Path, env: dict[str, str], seconds: float,
            with_capture: bool, log: Path) -> dict[str, Any]:
    """One steady-write run of ``seconds``, with or without a capture following the source."""
    row: dict[str, Any] = {"with": with_capture, "load_start": load()}
    cap = None
    # the store is watched in both runs: its polling thread shares this process (the writer's)
    watch = SegmentWatch(store, name, key)
    if not watch.polled.wait(HANG_GUARD):
        raise SystemExit(f"no first poll of {store} in {HANG_GUARD:.0f} s")
    if with_capture:
        cap = Capture(url, store, name, key, env, log)
        # the capture is following once a segment sealed after it caught up appears
        wait_for("the capture to catch up", lambda: watch.live_after(cap.started), cap.proc)
    cpu0 = cpu_of(cap.proc.pid) if cap else 0.0
    server0 = cpu_of(w.server_pid)
    t0 = time.time()
    w.run(seconds)
    row["server_cpu"] = cpu_of(w.server_pid) - server0
    row["rate"] = len(w.acks) / seconds
    row["refused"] = w.errors
    lats = [a[1] for a in w.acks] or [float("nan")]
    row["p50_ms"], row["p99_ms"] = pct(lats, 50) * 1e3, pct(lats, 99) * 1e3
    row["writes"] = [(a[0] - t0, a[1] * 1e3) for a in w.acks]  # (s into the run, latency ms): pooled below
    if cap is None:
        watch.close()
    else:
        last = max((a[2] for a in w.acks), default=0)
        wait_for(f"a sealed segment up to position {last}", lambda: watch.covered(last), cap.proc)
        row["cpu_steady"] = cpu_of(cap.proc.pid) - cpu0
        row["steady_s"] = time.time() - t0
        row.update(cap.stop())
        watch.close()
        reach, times = watch.sealed_by()
        lags = []
        for t_ack, _lat, pos in w.acks:  # sealed when the first segment reaching its position appeared
            lags.append(times[bisect.bisect_left(reach, pos)] - t_ack)
        segs = watch.content()
        row["lags"] = lags
        live = [s for s in segs if s["t"] >= t0 and not s["catching_up"] and not s["resync"] and s["changes"]]
        row["seg_bytes"] = sum(s["size"] for s in live)
        row["seg_changes"] = sum(s["changes"] for s in live)
        row["segments"] = len(live)
        row["outside"] = sum(x["outside"] for x in segs if x["t"] >= cap.started)
        row["changes"] = len(w.acks)
    row["load_end"] = load()
    return row


def pooled_rise(off: list[dict[str, Any]], on: list[dict[str, Any]], ps: tuple[float, ...], block_s: float = 5.0,
                reps: int = 400) -> list[tuple[float, float, float, float, float]]:
    """For each percentile ``p`` of ``ps``: the ``p``-th percentile latency (ms) of every write of
    the runs without capture, pooled, and of the runs with; the rise; and a 90% interval of the
    rise from a block bootstrap: each arm's writes cut into blocks of ``block_s`` seconds, blocks
    drawn with replacement (a burst of slow answers stays in its block, so the interval is not
    narrowed by pretending they are independent). Each resample is drawn and sorted once for
    every percentile."""
    import itertools
    import random

    def percentiles(blocks: list[list[float]]) -> list[float]:
        xs = sorted(itertools.chain.from_iterable(blocks))
        return [pct(xs, p) for p in ps]  # (sorting a sorted list again is linear)

    def blocks(rows: list[dict[str, Any]]) -> list[list[float]]:
        out: dict[tuple[int, int], list[float]] = {}
        for i, r in enumerate(rows):
            for t, lat in r["writes"]:
                out.setdefault((i, int(t // block_s)), []).append(lat)
        return list(out.values())

    b_off, b_on = blocks(off), blocks(on)
    rng = random.Random(19)
    rises: list[list[float]] = [[] for _ in ps]
    for _ in range(reps):
        for i, (a, b) in enumerate(zip(percentiles(rng.choices(b_on, k=len(b_on))),
                                       percentiles(rng.choices(b_off, k=len(b_off))), strict=True)):
            rises[i].append(a / b - 1)
    out = []
    for p_on, p_off, r in zip(percentiles(b_on), percentiles(b_off), rises, strict=True):
        r.sort()
        out.append((p_off, p_on, p_on / p_off - 1, r[int(0.05 * reps)], r[int(0.95 * reps) - 1]))
    return out


def paired_rise(rows: list[dict[str, Any]], reps: int = 2000) -> tuple[float, float, float]:
    """The median over the pairs of the ratio of a pair's p99 with capture to its p99 without,
    minus 1, and a 90% interval of that median (the pairs drawn with replacement). A pair's two
    runs are next to each other in time: the machine's pace, which drifts over minutes, mostly
    cancels out of their ratio."""
    import random

    by_pair: dict[int, dict[bool, float]] = {}
    for r in rows:
        by_pair.setdefault(r["pair"], {})[r["with"]] = r["p99_ms"]
    ratios = [p[True] / p[False] - 1 for p in by_pair.values() if len(p) == 2]
    rng = random.Random(19)
    meds = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(reps))
    return statistics.median(ratios), meds[int(0.05 * reps)], meds[int(0.95 * reps) - 1]


def phase_rpo(services: list[tuple[str, WriterProcess, str]], store: Path, key: Path, env: dict[str, str],
              seconds: float, pairs: int, workdir: Path) -> list[str]:
    lines = []
    for service, w, url in services:
        name = f"bench-{service}"
        uptime(f"before rpo {service}")
        w.seed()
        burrow(["backup", url, "--to", str(store), "--name", name, "--key-file", str(key)], env)
        w.run(min(5.0, seconds))  # warm-up: connections, the server's JIT
        rows = []
        for i in range(pairs):
            # ABBA: a pair's two runs are next to each other in time, and which comes first
            # alternates, so that a drift of the machine's pace favours neither kind of run
            for with_capture in (False, True) if i % 2 == 0 else (True, False):
                r = rpo_run(w, url, store, name, key, env, seconds, with_capture, workdir / f"capture-{service}.log")
                r["pair"] = i
                rows.append(r)
                extra = (f", lag median {statistics.median(r['lags']):.2f}s p99 {pct(r['lags'], 99):.2f}s, "
                         f"capture CPU {r['cpu_steady']:.2f}s steady / {r['cpu']:.2f}s total, RSS {r['rss_mib']:.0f} MiB, "
                         f"{r['segments']} segments, {r['outside']} changes outside their segment's manifest range"
                         if with_capture else "")
                print(f"{service} run {i + 1} {'with' if with_capture else 'without'} capture: {r['rate']:.0f} "
                      f"changes/s, write p50 {r['p50_ms']:.2f} ms p99 {r['p99_ms']:.2f} ms, server CPU "
                      f"{r['server_cpu']:.2f}s, {r['refused']} refused{extra} "
                      f"(load {r['load_start']:.1f}-{r['load_end']:.1f})", flush=True)
        uptime(f"after rpo {service}")
        on = [r for r in rows if r["with"]]
        off = [r for r in rows if not r["with"]]
        lags = [x for r in on for x in r["lags"]]
        p99_on = statistics.median(r["p99_ms"] for r in on)
        p99_off = statistics.median(r["p99_ms"] for r in off)
        ((pool_off, pool_on, pool_rise, pool_lo, pool_hi),
         (p999_off, p999_on, rise999, lo999, hi999)) = pooled_rise(off, on, (99, 99.9))
        rise, lo, hi = paired_rise(rows)
        verdict = ("ok" if hi <= LATENCY_RISE_TARGET else "MISSED" if lo > LATENCY_RISE_TARGET
                   else "ok at the estimate, not beyond doubt" if rise <= LATENCY_RISE_TARGET
                   else "MISSED at the estimate, not beyond doubt")
        changes = sum(r["changes"] for r in on)
        cpu_k = sum(r["cpu_steady"] for r in on) / changes * 1000
        bytes_k = sum(r["seg_bytes"] for r in on) / max(1, sum(r["seg_changes"] for r in on)) * 1000
        lines.append(
            f"{service}: {statistics.median(r['rate'] for r in on):.0f} changes/s; RPO lag median "
            f"{statistics.median(lags):.2f} s, p99 {pct(lags, 99):.2f} s, max {max(lags):.2f} s over {len(lags)} "
            f"changes (target p99 <= {RPO_TARGET_S:.0f} s: {'ok' if pct(lags, 99) <= RPO_TARGET_S else 'MISSED'}); "
            f"capture CPU {cpu_k:.3f} s per 1,000 changes (steady; whole process incl. start-up "
            f"{statistics.median(r['cpu'] for r in on):.1f} s a run of {seconds:.0f} s), peak RSS "
            f"{max(r['rss_mib'] for r in on):.0f} MiB; stored {bytes_k / 1024:.1f} KiB per 1,000 changes "
            f"({sum(r['segments'] for r in on)} segments; {sum(r['outside'] for r in on)} changes held by a segment whose "
            f"manifest range excludes them); write p99 rise, the median of {pairs} pairs' ratios: {rise * 100:+.1f}% "
            f"(90% interval {lo * 100:+.1f}% to {hi * 100:+.1f}%; target <= +{LATENCY_RISE_TARGET * 100:.0f}%: "
            f"{verdict}); p99 of all writes pooled: without capture {pool_off:.2f} ms, with {pool_on:.2f} ms: "
            f"{pool_rise * 100:+.1f}% ({pool_lo * 100:+.1f}% to {pool_hi * 100:+.1f}%); p99.9 pooled {p999_off:.2f} ms without, "
            f"{p999_on:.2f} ms with: {rise999 * 100:+.1f}% ({lo999 * 100:+.1f}% to {hi999 * 100:+.1f}%); each run's "
            f"p99 without {join(r['p99_ms'] for r in off)} ms (median {p99_off:.2f}), with "
            f"{join(r['p99_ms'] for r in on)} ms (median {p99_on:.2f}); "
            f"p50 without {statistics.median(r['p50_ms'] for r in off):.2f} ms, with "
            f"{statistics.median(r['p50_ms'] for r in on):.2f} ms; writes refused without "
            f"{sum(r['refused'] for r in off)}, with {sum(r['refused'] for r in on)}; the {service} server's CPU a run without "
            f"{statistics.median(r['server_cpu'] for r in off):.2f} s, with {statistics.median(r['server_cpu'] for r in on):.2f} s; load {min(r['load_start'] for r in rows):.1f}-"
            f"{max(r['load_end'] for r in rows):.1f}")
        print(lines[-1], flush=True)
    return lines


# --------------------------------------------------------------------------- phase: restore to a point, RSS


def etcd_changes(kv: Any, rpc: Any, prefix: bytes, keys: int, start: int, stop: int) -> float:
    """Changes start..stop-1 over ``keys`` keys, txns of 128 (distinct keys), 16 in flight: change
    i touches key i % keys; a delete where (i // keys + i) % 10 == 9, else a put (so each pass
    deletes a tenth of the keys and re-creates the tenth deleted by the pass before). Seconds."""
    t0 = time.monotonic()
    pending = []
    i = start
    while i < stop:
        end = min(stop, i + 128, (i // keys + 1) * keys)  # a txn never holds one key twice
        ops = []
        for j in range(i, end):
            k = prefix + b"/k%06d" % (j % keys)
            if (j // keys + j) % 10 == 9:
                ops.append(rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=k)))
            else:
                ops.append(rpc.RequestOp(request_put=rpc.PutRequest(key=k, value=value(j))))
        pending.append(kv.Txn.future(rpc.TxnRequest(success=ops)))
        if len(pending) >= 16:
            pending.pop(0).result()
        i = end
    for p in pending:
        p.result()
    return time.monotonic() - t0


def etcd_digest(kv: Any, rpc: Any, prefix: bytes) -> tuple[int, str, int]:
    """(keys, sha256 of the sorted relative keys and values, revision) below ``prefix``/, read in pages."""
    h = hashlib.sha256()
    n = 0
    start, end = prefix + b"/", prefix + b"0"
    rev = 0
    while True:
        r = kv.Range(rpc.RangeRequest(key=start, range_end=end, limit=20000, revision=rev))
        rev = rev or r.header.revision
        for x in r.kvs:
            rel = x.key[len(prefix):]
            h.update(len(rel).to_bytes(4, "big") + rel + len(x.value).to_bytes(4, "big") + x.value)
            n += 1
        if not r.more:
            return n, h.hexdigest(), rev
        start = r.kvs[-1].key + b"\0"


def etcd_state(kv: Any, rpc: Any, prefix: bytes) -> dict[bytes, bytes]:
    """Every key below ``prefix``/ (relative) and its value (to say how a restore differs)."""
    r = kv.Range(rpc.RangeRequest(key=prefix + b"/", range_end=prefix + b"0"))
    return {x.key[len(prefix):]: x.value for x in r.kvs}


def phase_pitr(src: str, dst: str, store: Path, key: Path, env: dict[str, str], keys: int, stages: list[int],
               full_runs: int, workdir: Path) -> list[str]:
    import grpc
    from aetcd import rpc

    opts = [("grpc.max_receive_message_length", 256 << 20)]
    ca, cb = grpc.insecure_channel(src, options=opts), grpc.insecure_channel(dst, options=opts)
    kva, kvb = rpc.KVStub(ca), rpc.KVStub(cb)
    prefix = b"/pitr"
    name = "bench-pitr"
    url = f"etcd://{src}/pitr"
    uptime("before pitr")
    t = time.monotonic()
    futures = []
    for s in range(0, keys, 128):
        ops = [rpc.RequestOp(request_put=rpc.PutRequest(key=prefix + b"/k%06d" % i, value=value(i)))
               for i in range(s, min(keys, s + 128))]
        futures.append(kva.Txn.future(rpc.TxnRequest(success=ops)))
        if len(futures) >= 16:
            futures.pop(0).result()
    for f in futures:
        f.result()
    print(f"pitr: seeded {keys} keys in {time.monotonic() - t:.1f}s", flush=True)
    bk = burrow(["backup", url, "--to", str(store), "--name", name, "--key-file", str(key)], env)
    archive = bk["summary"]["url"]
    print(f"pitr: full backup of {keys} keys {bk['wall']:.1f}s", flush=True)

    def restore_into(args: list[str], compare: bool = True) -> dict[str, Any]:
        target = f"r{uuid.uuid4().hex[:8]}"
        r = burrow(["restore", *args, "--into", f"etcd://{dst}/{target}", "--key-file", str(key)], env)
        want = etcd_digest(kva, rpc, prefix)
        got = etcd_digest(kvb, rpc, b"/" + target.encode())
        r["keys"] = got[0]
        r["equal_to"] = "source" if got[:2] == want[:2] else None
        if compare and r["equal_to"] is None:
            a, b = etcd_state(kva, rpc, prefix), etcd_state(kvb, rpc, b"/" + target.encode())
            print(f"  differs: source {len(a)} keys, restored {len(b)}; only in the source {len(a.keys() - b.keys())}, "
                  f"only restored {len(b.keys() - a.keys())}, other values "
                  f"{sum(1 for k in a.keys() & b.keys() if a[k] != b[k])}", flush=True)
        return r

    lines = []
    written = 0
    rows = []
    for stage in stages:
        watch = SegmentWatch(store, name, key)
        cap = Capture(url, store, name, key, env, workdir / "capture-pitr.log")
        wait_for("the capture to catch up", lambda w=watch, c=cap: w.live_after(c.started), cap.proc)
        t0 = time.monotonic()
        w = etcd_changes(kva, rpc, prefix, keys, written, stage)
        last_rev = kva.Range(rpc.RangeRequest(key=prefix + b"/", range_end=prefix + b"0", count_only=True)).header.revision
        wait_for(f"a sealed segment up to revision {last_rev}", lambda w=watch, r=last_rev: w.covered(r), cap.proc)
        behind = time.monotonic() - t0
        cpu_steady = cpu_of(cap.proc.pid)
        capst = cap.stop()
        watch.close()
        n = stage - written
        written = stage
        segs = watch.content()
        chain_changes = sum(s["changes"] for s in segs)
        print(f"pitr stage {stage}: wrote {n} changes in {w:.1f}s ({n / w:,.0f}/s); sealed up to the last "
              f"{behind:.1f}s after the first write ({n / behind:,.0f} changes/s captured); capture CPU "
              f"{capst['cpu']:.1f}s (up to the seal {cpu_steady:.1f}s), peak RSS {capst['rss_mib']:.0f} MiB; "
              f"chain {len(segs)} segments, {chain_changes} changes, "
              f"{sum(s['size'] for s in segs) / 1e6:.1f} MB (load {load():.1f})", flush=True)
        at = []
        ra = restore_into([str(store), "--source", name, "--at", "latest"])
        if ra["equal_to"] != "source":
            raise SystemExit(f"restore --at latest at stage {stage} differs from the source")
        at.append(ra)
        print(f"  restore --at latest: {ra['wall']:.1f}s wall, CLI CPU {ra['cpu']:.1f}s, peak RSS "
              f"{ra['rss_mib']:.0f} MiB, {ra['keys']} keys equal to the source (load {ra['load']:.1f})", flush=True)
        full = []
        if full_runs and stage == keys:
            for i in range(full_runs):
                rf = restore_into([archive], compare=False)
                if rf["keys"] != keys:
                    raise SystemExit(f"the full archive's restore made {rf['keys']} keys, expected {keys}")
                full.append(rf)
                print(f"  restore of the full archive alone {i + 1}: {rf['wall']:.1f}s wall, CLI CPU "
                      f"{rf['cpu']:.1f}s, peak RSS {rf['rss_mib']:.0f} MiB (load {rf['load']:.1f})", flush=True)
                if i + 1 < full_runs:
                    ra = restore_into([str(store), "--source", name, "--at", "latest"])
                    if ra["equal_to"] != "source":
                        raise SystemExit("restore --at latest differs from the source")
                    at.append(ra)
                    print(f"  restore --at latest {i + 2}: {ra['wall']:.1f}s wall, CLI CPU {ra['cpu']:.1f}s, peak "
                          f"RSS {ra['rss_mib']:.0f} MiB (load {ra['load']:.1f})", flush=True)
        rows.append({"stage": stage, "at": at, "full": full, "capture": capst, "captured_per_s": n / behind, "sealed_after_s": behind,
                     "write_per_s": n / w, "chain_bytes": sum(s["size"] for s in segs), "segments": len(segs)})
    uptime("after pitr")
    for r in rows:
        at = r["at"]
        line = (f"chain of {r['stage']:,} changes ({r['segments']} segments, {r['chain_bytes'] / 1e6:.1f} MB): "
                f"restore --at latest {statistics.median(x['wall'] for x in at):.1f} s wall (of "
                f"{join((x['wall'] for x in at), '.1f')}), CLI CPU {statistics.median(x['cpu'] for x in at):.1f} s, "
                f"peak RSS {max(x['rss_mib'] for x in at):.0f} MiB; the capture that followed "
                f"{r['stage'] - (rows[rows.index(r) - 1]['stage'] if rows.index(r) else 0):,} of them: peak RSS "
                f"{r['capture']['rss_mib']:.0f} MiB, CPU {r['capture']['cpu']:.1f} s, "
                f"the last sealed {r['sealed_after_s']:.0f} s after the first write ({r['captured_per_s']:,.0f} changes/s; "
                f"written at {r['write_per_s']:,.0f}/s)")
        if r["full"]:
            fw = statistics.median(x["wall"] for x in r["full"])
            aw = statistics.median(x["wall"] for x in at)
            ratio = aw / fw
            line += (f"; restore of the {keys:,}-key full archive alone {fw:.1f} s wall (of "
                     f"{join((x['wall'] for x in r['full']), '.1f')}), CLI CPU "
                     f"{statistics.median(x['cpu'] for x in r['full']):.1f} s, peak RSS "
                     f"{max(x['rss_mib'] for x in r['full']):.0f} MiB: --at latest / full = {ratio:.2f}x wall, "
                     f"{statistics.median(x['cpu'] for x in at) / statistics.median(x['cpu'] for x in r['full']):.2f}x "
                     f"CPU (target <= {RESTORE_RATIO_TARGET:.0f}x: {'ok' if ratio <= RESTORE_RATIO_TARGET else 'MISSED'})")
        lines.append(line)
        print(line, flush=True)
    ca.close()
    cb.close()
    return lines


# --------------------------------------------------------------------------- phase: etcd's watch, prev_kv


def watch_time(endpoint: str, prefix: bytes, start: int, last: int, prev_kv: bool) -> tuple[float, int]:
    """A bare gRPC watch over ``prefix``/ from revision ``start`` (as the capture's, with or without
    ``prev_kv``): seconds until it has delivered every event up to revision ``last``, and how many."""
    import grpc
    from aetcd import rpc

    channel = grpc.insecure_channel(endpoint, options=[("grpc.max_receive_message_length", 256 << 20)])
    req = rpc.WatchRequest(create_request=rpc.WatchCreateRequest(
        key=prefix + b"/", range_end=prefix + b"0", start_revision=start, prev_kv=prev_kv))
    requests = iter([req])
    t0 = time.monotonic()
    n = 0
    stream = rpc.WatchStub(channel).Watch(requests)
    for resp in stream:
        n += len(resp.events)
        if resp.events and resp.events[-1].kv.mod_revision >= last:
            break
    seconds = time.monotonic() - t0
    stream.cancel()
    channel.close()
    return seconds, n


def phase_watch(endpoint: str, changes: int, rounds: int) -> list[str]:
    """etcd's delivery of a watch's backlog of ``changes`` (txns of 128), with and without
    ``prev_kv`` (the capture asks for it and never reads it), alternating."""
    import grpc
    from aetcd import rpc

    channel = grpc.insecure_channel(endpoint)
    kv = rpc.KVStub(channel)
    uptime("before watch")
    keys = 100_000
    etcd_changes(kv, rpc, b"/w", keys, 0, keys)
    done = keys
    rows: dict[bool, list[float]] = {True: [], False: []}
    for i in range(rounds):
        for prev_kv in (True, False):
            start = kv.Range(rpc.RangeRequest(key=b"/w/", range_end=b"/w0", count_only=True)).header.revision + 1
            etcd_changes(kv, rpc, b"/w", keys, done, done + changes)
            done += changes
            last = kv.Range(rpc.RangeRequest(key=b"/w/", range_end=b"/w0", count_only=True)).header.revision
            secs, n = watch_time(endpoint, b"/w", start, last, prev_kv)
            rows[prev_kv].append(n / secs)
            print(f"watch {i + 1} prev_kv={prev_kv}: {n} events in {secs:.1f}s ({n / secs:,.0f}/s, load {load():.1f})",
                  flush=True)
    channel.close()
    uptime("after watch")
    line = (f"etcd watch backlog of {changes:,} changes delivered: with prev_kv {join(rows[True], ',.0f')} events/s "
            f"(median {statistics.median(rows[True]):,.0f}), without {join(rows[False], ',.0f')} "
            f"(median {statistics.median(rows[False]):,.0f})")
    print(line, flush=True)
    return [line]


# --------------------------------------------------------------------------- main


def parse_cpus(spec: str) -> set[int]:
    """A CPU list as taskset takes it: ``1``, ``0,2``, ``2-3``."""
    cpus: set[int] = set()
    for part in spec.split(","):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=40.0, help="seconds of steady writes per run (default 40)")
    ap.add_argument("--pairs", type=int, default=3, help="pairs of runs without and with capture, next to each other, ABBA (default 3)")
    ap.add_argument("--services", default="etcd,zookeeper,consul", help="rpo phase: which services")
    ap.add_argument("--phases", default="rpo,pitr", help="rpo, pitr, watch (default rpo,pitr)")
    ap.add_argument("--pitr-keys", type=int, default=100_000, help="keys of the full archive (default 100000)")
    ap.add_argument("--stages", default="10000,100000,1000000", help="chain lengths, in changes")
    ap.add_argument("--full-runs", type=int, default=2, help="restores of the full archive alone (interleaved)")
    ap.add_argument("--workdir", help="keep servers' data and the store here (default: a temp dir, removed)")
    ap.add_argument("--store", help="the local store's directory (default: WORKDIR/store); another filesystem "
                                    "(/dev/shm) keeps the capture's writes off the sources' disk, as a remote store does")
    ap.add_argument("--capture-no-prev-kv", action="store_true",
                    help="start captures with their etcd watch asking for no prev_kv (a patch in the process)")
    ap.add_argument("--capture-cpus", metavar="LIST",
                    help="run the captures and the Prefect server on these CPUs only (taskset's list, say 1) and "
                         "this bench, its writers and the source servers on the others: a capture on a host of "
                         "its own, as on a worker, leaving the source's cost of serving it (its watch, the "
                         "store's disk)")
    ap.add_argument("--source-cpus", metavar="LIST",
                    help="with --capture-cpus: the rpo phase's source servers on these CPUs (say 0-1: a source "
                         "with more than one core, as a server has, the capture's CPU shared with it) instead "
                         "of the bench's")
    args = ap.parse_args()
    capture_cpus: set[int] = set()
    rest: set[int] = set()
    if args.capture_cpus:
        capture_cpus = parse_cpus(args.capture_cpus)
        rest = os.sched_getaffinity(0) - capture_cpus
        if not capture_cpus or not rest:
            raise SystemExit("--capture-cpus must name some of this machine's CPUs, not all")
        os.sched_setaffinity(0, rest)  # the servers started below inherit it
        CAPTURE_CMD[:0] = ["taskset", "-c", ",".join(map(str, sorted(capture_cpus)))]
        print(f"captures and the Prefect server on CPUs {sorted(capture_cpus)}; the bench, its writers and the "
              f"source servers on {sorted(rest)}")
    source_cpus = parse_cpus(args.source_cpus) if args.source_cpus else None
    if source_cpus:
        print(f"the rpo phase's source servers on CPUs {sorted(source_cpus)}")

    @contextlib.contextmanager
    def source_affinity() -> Iterator[None]:
        """A source server started inside runs on ``--source-cpus`` (a Go server's GOMAXPROCS is
        the CPUs it may run on when it starts)."""
        if not source_cpus:
            yield
            return
        before = os.sched_getaffinity(0)
        os.sched_setaffinity(0, source_cpus)
        try:
            yield
        finally:
            os.sched_setaffinity(0, before)
    # A bench started in the background inherits SIGINT ignored, and so would the captures it
    # starts (exec keeps an ignored signal ignored): they must get SIGINT as from Ctrl-C. Not a
    # preexec_fn: forking a process that holds gRPC channels aborts the child now and then.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if args.capture_no_prev_kv:
        CAPTURE_CMD[-1:] = NO_PREV_KV  # after a taskset prefix, if any

    from burrow.keys import keygen
    from burrow.testing.servers import start_consul, start_etcd, start_prefect, start_zookeeper

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="burrow-bench-capture-"))
    workdir.mkdir(parents=True, exist_ok=True)
    phases = args.phases.split(",")
    services = args.services.split(",")
    servers = []
    summary: list[str] = []
    try:
        uptime("start")
        if capture_cpus:  # the orchestrator is the capture's, on another host than the source's
            os.sched_setaffinity(0, capture_cpus)
        prefect = start_prefect(workdir / "prefect")
        if capture_cpus:
            os.sched_setaffinity(0, rest)
        servers.append(prefect)
        env = cli_env(workdir, prefect.url)
        key = workdir / "capture.key"
        if not key.exists():
            keygen(key, x25519=False)
        store = Path(args.store) if args.store else workdir / "store"
        store.mkdir(parents=True, exist_ok=True)
        if "rpo" in phases:
            writers: list[tuple[str, WriterProcess, str]] = []
            if "etcd" in services:
                with source_affinity():
                    e = start_etcd(workdir / "etcd-rpo")
                servers.append(e)
                writers.append(("etcd", WriterProcess("etcd", f"{e.host}:{e.port}", b"/cap", 10_000, 1000.0),
                                f"etcd://{e.host}:{e.port}/cap"))
            if "zookeeper" in services:
                with source_affinity():
                    z = start_zookeeper(workdir / "zk-rpo")
                servers.append(z)
                writers.append(("zookeeper", WriterProcess("zookeeper", z.url, "/cap", 1000, 200.0), f"zk://{z.url}/cap"))
            if "consul" in services:
                with source_affinity():
                    c = start_consul(workdir / "consul-rpo")
                servers.append(c)
                writers.append(("consul", WriterProcess("consul", c.url, "cap", 1000, 200.0), f"consul://{c.host}:{c.port}/cap"))
            for (_, w, _), srv in zip(writers, servers[-len(writers):], strict=True):
                w.server_pid = srv.pid
            try:
                summary += phase_rpo(writers, store, key, env, args.seconds, args.pairs, workdir)
            finally:
                for _, w, _ in writers:
                    w.close()
        if "watch" in phases:
            wsrv = start_etcd(workdir / "etcd-watch")
            servers.append(wsrv)
            summary += phase_watch(f"{wsrv.host}:{wsrv.port}", 50_000, 3)
        if "pitr" in phases:
            a = start_etcd(workdir / "etcd-pitr-a")
            servers.append(a)
            b = start_etcd(workdir / "etcd-pitr-b")
            servers.append(b)
            stages = [int(s) for s in args.stages.split(",")]
            summary += phase_pitr(f"{a.host}:{a.port}", f"{b.host}:{b.port}", store, key, env, args.pitr_keys,
                                  stages, args.full_runs, workdir)
        print()
        for line in summary:
            print(line)
        uptime("end")
        print(f"({os.cpu_count()} CPUs)")
        return 0
    finally:
        for c in list(LIVE):
            c.proc.kill()
            c.proc.wait()
        for s in reversed(servers):
            s.stop()
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
