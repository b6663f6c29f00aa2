"""What encryption costs (a benchmark, not a test).

    .venv/bin/python bench/bench_crypto.py [--gb 1.0] [--znodes 100000] [--rounds 3] [--skip-zk]

1. Stream: compress + encrypt throughput on a ``--gb`` GB record stream (JSON lines with
   base64 values, about 4x compressible), generated on the fly from a pool of 1 MiB blocks
   so memory stays flat. A plain ArchiveWriter (zstd) and an encrypting one (zstd +
   AES-256-GCM STREAM) get the same blocks in turn, each write timed on its own (wall and
   thread CPU), so background load hits both alike. Then the encryption stage alone, and a
   read back (decrypt + decompress + every checksum) from a temporary file.
2. End to end: a local ZooKeeper (burrow.testing.servers) seeded with ``--znodes`` znodes
   (1,000 x 100, 100-byte values), backed up with the task functions: extract (walk + spool),
   compress (+ encrypt), upload to a local store, verify (re-read; full decrypt for a
   symmetric key, structure-only for X25519 recipients). Each round walks the tree once (the
   walk does not depend on encryption) and then runs the rest in every mode, in rotating
   order; medians of ``--rounds`` rounds after a warm-up round.

Target: encryption adds less than 10% to backup time.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from burrow.archive import ArchiveReader, ArchiveWriter  # noqa: E402
from burrow.crypto import ArchiveKeys, StreamEncryptor  # noqa: E402
from burrow.keys import Keyring, SymmetricKey, WriteKeys, X25519Identity  # noqa: E402

MB = 1_000_000
BLOCK = 1 << 20


class Discard(io.RawIOBase):
    """A sink that counts bytes and throws them away."""

    def __init__(self) -> None:
        self.count = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.count += len(b)
        return len(b)


def block_pool(n: int = 48, seed: int = 7) -> list[bytes]:
    """n distinct 1 MiB blocks of record-like JSON lines (paths, base64 values, ACL metadata)."""
    rng = random.Random(seed)
    pool = []
    for b in range(n):
        lines = []
        size = 0
        i = 0
        while size < BLOCK:
            value = rng.randbytes(rng.randrange(20, 60)) + b'{"enabled": true, "owner": "team-%d"}' % (i % 50)
            line = (
                b'{"k":"/service/%d/config/node-%06d","v":"%s","m":{"acl":[[31,"world","anyone"]],'
                b'"ctime":%d,"mtime":%d,"version":%d}}\n'
                % (b, i, base64.b64encode(value), 1700000000000 + i, 1700000000000 + 7 * i, i % 13)
            )
            lines.append(line)
            size += len(line)
            i += 1
        pool.append(b"".join(lines)[:BLOCK].rsplit(b"\n", 1)[0] + b"\n")
    return pool


def stream(total: int, pool: list[bytes], seed: int = 11) -> Any:
    rng = random.Random(seed)
    sent = 0
    while sent < total:
        blk = pool[rng.randrange(len(pool))]
        yield blk
        sent += len(blk)


def write_stream(total: int, pool: list[bytes], encryptor: Any, sink: Any) -> tuple[float, float, int, int]:
    """(wall seconds, CPU seconds, content bytes, body bytes) of writing one archive."""
    started, cpu = time.perf_counter(), time.process_time()
    w = ArchiveWriter(sink, service="bench", level=3, encryptor=encryptor)
    for blk in stream(total, pool):
        w.write_content(blk)
    m = w.finish({"service": "bench"})
    return time.perf_counter() - started, time.process_time() - cpu, m["content_bytes"], m["body_bytes"]


def bench_stream(gb: float, rounds: int) -> dict[str, float]:
    """Paired measurement: a plain and an encrypting writer get the same blocks in turn, and
    each write is timed on its own, so background load hits both alike."""
    total = int(gb * 1e9)
    pool = block_pool()
    key = SymmetricKey.generate()
    wk = WriteKeys("symmetric", [key], "bench")
    out: dict[str, float] = {}
    walls: dict[str, list[float]] = {"plain": [], "enc": []}
    cpus: dict[str, list[float]] = {"plain": [], "enc": []}
    for _ in range(rounds):
        writers = {
            "plain": ArchiveWriter(Discard(), service="bench", level=3),
            "enc": ArchiveWriter(Discard(), service="bench", level=3, encryptor=StreamEncryptor(wk)),
        }
        wall = dict.fromkeys(writers, 0.0)
        cpu = dict.fromkeys(writers, 0.0)
        for i, blk in enumerate(stream(total, pool)):
            for mode in (("plain", "enc") if i % 2 else ("enc", "plain")):
                t, c = time.perf_counter(), time.thread_time()
                writers[mode].write_content(blk)
                wall[mode] += time.perf_counter() - t
                cpu[mode] += time.thread_time() - c
        for mode, w in writers.items():
            t, c = time.perf_counter(), time.thread_time()
            m = w.finish({"service": "bench"})
            wall[mode] += time.perf_counter() - t
            cpu[mode] += time.thread_time() - c
            walls[mode].append(wall[mode])
            cpus[mode].append(cpu[mode])
        content, body = m["content_bytes"], m["body_bytes"]
    secs, secs_e = statistics.median(walls["plain"]), statistics.median(walls["enc"])
    cpu_p, cpu_e = statistics.median(cpus["plain"]), statistics.median(cpus["enc"])
    out["zstd_only_MBps"] = content / MB / secs
    out["ratio"] = content / body
    out["zstd_aes_gcm_MBps"] = content / MB / secs_e
    out["overhead_pct"] = 100 * (secs_e - secs) / secs
    out["cpu_overhead_pct"] = 100 * (cpu_e - cpu_p) / cpu_p
    # the encryption stage alone, on already-compressed bytes
    enc = StreamEncryptor(wk)
    sink = Discard()
    writer = enc.wrap_writer(sink)  # type: ignore[arg-type]
    chunk = os.urandom(BLOCK)
    n = max(1, int(body / BLOCK))
    started = time.perf_counter()
    for _ in range(n):
        writer.write(chunk)
    writer.close()
    out["aes_gcm_stage_MBps"] = n * BLOCK / MB / (time.perf_counter() - started)
    # read back: decrypt + decompress + every checksum
    with tempfile.TemporaryDirectory(prefix="burrow-bench-") as tmp:
        path = Path(tmp) / "stream.burrow"
        with open(path, "wb") as f:
            write_stream(total, pool, StreamEncryptor(wk), f)  # to disk this time
        with open(path, "rb") as f:
            started = time.perf_counter()
            reader = ArchiveReader(f)
            got = sum(len(c) for c in reader.iter_content(ArchiveKeys(Keyring([key]))))
            out["read_decrypt_MBps"] = got / MB / (time.perf_counter() - started)
    out["content_MB"] = content / MB
    return out


# --------------------------------------------------------------------------- ZooKeeper end to end


def seed_zk(hosts: str, n: int, fanout: int = 100, value_size: int = 100) -> None:
    from kazoo.client import KazooClient

    value = (b"0123456789abcdef" * (value_size // 16 + 1))[:value_size]
    c = KazooClient(hosts=hosts, timeout=30)
    c.start(timeout=30)
    try:
        c.create("/bench", b"bench-root")
        paths = [f"/bench/p{i:05d}" for i in range(max(1, n // fanout))]
        paths += [f"{p}/c{j:03d}" for p in paths for j in range(fanout)]
        for start in range(0, len(paths), 5000):
            pending = []
            for s in range(start, min(len(paths), start + 5000), 500):
                t = c.transaction()
                for p in paths[s : s + 500]:
                    t.create(p, value)
                pending.append(t.commit_async())
            for r in pending:
                r.get()
    finally:
        c.stop()
        c.close()


def bench_zk(znodes: int, rounds: int) -> dict[str, dict[str, float]]:
    """Each round walks the tree once (extract does not depend on encryption) and then writes,
    stores and verifies the archive in every mode from the same spool, in rotating order."""
    import logging

    from blocks.local import LocalStore
    from blocks.zookeeper import ZooKeeperCluster
    from burrow.testing.servers import start_zookeeper
    from tasks.compress import compress_spool
    from tasks.extract import extract_records
    from tasks.upload import upload_archive
    from tasks.verify import verify_stored, verify_stored_structure

    logging.getLogger("burrow").setLevel(logging.WARNING)
    tmp = Path(tempfile.mkdtemp(prefix="burrow-bench-zk-"))
    server = start_zookeeper(tmp / "zk")
    try:
        seed_zk(server.url, znodes)
        a, b = X25519Identity.generate(), X25519Identity.generate()
        keys: dict[str, Any] = {
            "none": None,
            "symmetric": WriteKeys("symmetric", [SymmetricKey.generate()], "bench"),
            "x25519 (2 recipients)": WriteKeys("x25519", [a.recipient, b.recipient], "bench"),
        }
        source = ZooKeeperCluster(hosts=[server.url])
        runs: dict[str, list[dict[str, float]]] = {m: [] for m in keys}
        modes = list(keys)
        for r in range(rounds + 1):  # round 0 warms up
            work = tmp / f"round-{r}"
            work.mkdir()
            t0 = time.perf_counter()
            ex = extract_records(source, "/bench", work)
            extract_s = time.perf_counter() - t0
            for m in modes[r % len(modes) :] + modes[: r % len(modes)]:
                wk = keys[m]
                sub = work / hashlib.sha256(m.encode()).hexdigest()[:8]
                (sub / "store").mkdir(parents=True)
                store = LocalStore(path=str(sub / "store"))
                t1 = time.perf_counter()
                enc = StreamEncryptor(wk) if wk else None
                comp = compress_spool(ex, sub / "a.burrow", source_name="bench", encryptor=enc,
                                      extra_manifest={"encryption": enc.summary()} if enc else None)
                t2 = time.perf_counter()
                upload_archive(store, Path(comp.path), "bench/a.burrow")
                t3 = time.perf_counter()
                if wk is not None and not wk.can_decrypt():
                    verify_stored_structure(store, "bench/a.burrow", sub)
                else:
                    verify_stored(store, "bench/a.burrow", sub, ArchiveKeys(wk.keyring()) if wk else None)
                t4 = time.perf_counter()
                if r:
                    runs[m].append({"extract": extract_s, "compress": t2 - t1, "upload": t3 - t2,
                                    "verify": t4 - t3, "total": extract_s + t4 - t1, "keys": ex.keys})
            shutil.rmtree(work, ignore_errors=True)
        return {m: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for m, rs in runs.items()}
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gb", type=float, default=1.0, help="size of the stream benchmark in GB (default 1)")
    p.add_argument("--znodes", type=int, default=100_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--skip-zk", action="store_true")
    args = p.parse_args(argv)
    print(
        f"# stream: {args.gb:g} GB of record-like JSON lines, zstd level 3, 64 KiB AES-256-GCM chunks, "
        f"median of {args.rounds} rounds", flush=True,
    )
    s = bench_stream(args.gb, args.rounds)
    print(f"compression ratio            {s['ratio']:.2f}x ({s['content_MB']:.0f} MB content)")
    print(f"zstd only                    {s['zstd_only_MBps']:8.1f} MB/s of content")
    print(
        f"zstd + AES-256-GCM (STREAM)  {s['zstd_aes_gcm_MBps']:8.1f} MB/s of content  "
        f"({s['overhead_pct']:+.1f}% wall time, {s['cpu_overhead_pct']:+.1f}% CPU time)"
    )
    print(f"AES-256-GCM stage alone      {s['aes_gcm_stage_MBps']:8.1f} MB/s of ciphertext")
    print(f"read: decrypt+decompress     {s['read_decrypt_MBps']:8.1f} MB/s of content (all checks)")
    if args.skip_zk:
        return 0
    print(
        f"\n# ZooKeeper backup end to end: {args.znodes} znodes, median of {args.rounds} rounds (seconds)", flush=True
    )
    z = bench_zk(args.znodes, args.rounds)
    base = z["none"]["total"]
    print(f"{'mode':24} {'extract':>8} {'compress':>9} {'upload':>7} {'verify':>7} {'total s':>8} {'vs none':>8}")
    for m, r in z.items():
        print(
            f"{m:24} {r['extract']:8.2f} {r['compress']:9.2f} {r['upload']:7.2f} {r['verify']:7.2f} "
            f"{r['total']:8.2f} {100 * (r['total'] - base) / base:+7.1f}%"
        )
    worst = max(100 * (r["total"] - base) / base for m, r in z.items() if m != "none")
    print(f"\nencryption overhead on backup time: {worst:+.1f}% (target < 10%): {'met' if worst < 10 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
