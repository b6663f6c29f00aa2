"""Which Python etcd v3 client should Burrow use? Reads N keys with each candidate (a
benchmark, not a test; the numbers are in docs/etcd-client.md).

    .venv/bin/python bench/bench_etcd_clients.py [--n 200000] [--etcd3gw-python PATH]

Candidates, all reading every key under /bench with 100-byte values:

* grpc (sync) + aetcd's generated stubs, paginated Range at the first page's revision,
  one page at a time, and pipelined as Burrow's EtcdSession.walk does it
* grpc.aio + aetcd's generated stubs, paginated the same way
* aetcd's high-level asyncio API: ``get_prefix`` (one Range, no limit, no revision); at
  the default 4 MiB gRPC receive limit, and with the limit raised to 1 GiB
* etcd3gw (JSON over etcd's grpc-gateway, requests), paginated with limit/revision; it is
  not a Burrow dependency, so it runs in another virtualenv given by --etcd3gw-python
  (``uv venv /tmp/gw && uv pip install --python /tmp/gw/bin/python etcd3gw``)
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

PAGE = 10_000

ETCD3GW_SCRIPT = r"""
import base64, sys, time
from etcd3gw.client import Etcd3Client
host, port, page = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
c = Etcd3Client(host=host, port=port, timeout=120)
t0 = time.monotonic()
b64 = lambda b: base64.b64encode(b).decode()
first = c.post(c.get_url("/kv/range"), json={"key": b64(b"/bench/"), "range_end": b64(b"/bench0"), "limit": page})
rev, n, kvs = int(first["header"]["revision"]), 0, first.get("kvs", [])
more = first.get("more", False)
while True:
    for kv in kvs:
        base64.b64decode(kv["key"]); base64.b64decode(kv.get("value", "")); n += 1
    if not more:
        break
    start = base64.b64decode(kvs[-1]["key"]) + b"\0"
    vals = c.get(start, metadata=True, range_end=b64(b"/bench0"), limit=page, revision=rev)
    # etcd3gw.get() hides the "more" flag: a short page means the end
    kvs = [{"key": b64(m["key"]), "value": b64(v)} for v, m in vals]
    more = len(vals) == page
print(n, time.monotonic() - t0)
"""


def read_sync_paged(endpoint: str) -> int:
    import grpc
    from aetcd import rpc

    ch = grpc.insecure_channel(endpoint, options=[("grpc.max_receive_message_length", 64 << 20)])
    kv = rpc.KVStub(ch)
    key, rev, n = b"/bench/", 0, 0
    while True:
        r = kv.Range(rpc.RangeRequest(key=key, range_end=b"/bench0", limit=PAGE, revision=rev))
        rev = rev or r.header.revision
        for x in r.kvs:
            _ = (x.key, x.value)
            n += 1
        if not r.more:
            break
        key = r.kvs[-1].key + b"\0"
    ch.close()
    return n


def read_burrow_walk(endpoint: str) -> int:
    from blocks.etcd import EtcdCluster
    from blocks.source import WalkStats

    session = EtcdCluster(endpoints=[endpoint]).connect()
    try:
        return sum(1 for _ in session.walk(b"/bench", WalkStats()))
    finally:
        session.close()


async def _read_aio_paged(endpoint: str) -> int:
    import grpc
    from aetcd import rpc

    async with grpc.aio.insecure_channel(endpoint, options=[("grpc.max_receive_message_length", 64 << 20)]) as ch:
        kv = rpc.KVStub(ch)
        key, rev, n = b"/bench/", 0, 0
        while True:
            r = await kv.Range(rpc.RangeRequest(key=key, range_end=b"/bench0", limit=PAGE, revision=rev))
            rev = rev or r.header.revision
            for x in r.kvs:
                _ = (x.key, x.value)
                n += 1
            if not r.more:
                break
            key = r.kvs[-1].key + b"\0"
    return n


async def _read_aetcd(endpoint: str, max_receive: int | None) -> int:
    import aetcd

    host, port = endpoint.rsplit(":", 1)
    options = {"grpc.max_receive_message_length": max_receive} if max_receive else None
    async with aetcd.Client(host=host, port=int(port), options=options) as client:
        result = await client.get_prefix(b"/bench/")
        return sum(1 for _ in result)


def timed(fn, *args) -> tuple[str, float]:  # noqa: ANN001
    t0 = time.monotonic()
    try:
        n = fn(*args)
    except Exception as exc:  # noqa: BLE001 - the failure is the result worth showing
        return f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:90]}", time.monotonic() - t0
    return str(n), time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--etcd3gw-python", help="a python with etcd3gw installed (another virtualenv)")
    args = ap.parse_args()

    from bench_etcd import seed

    import blocks.etcd  # noqa: F401 - imports Prefect (seconds): not part of any timing
    from burrow.testing.servers import start_etcd

    workdir = Path(tempfile.mkdtemp(prefix="burrow-bench-clients-"))
    server = start_etcd(workdir / "etcd")
    try:
        endpoint = f"{server.host}:{server.port}"
        seed(endpoint, 0, args.n, 100)
        rows = [
            ("grpc sync + aetcd stubs, paged", *timed(read_sync_paged, endpoint)),
            ("Burrow walk (grpc sync, pipelined)", *timed(read_burrow_walk, endpoint)),
            ("grpc.aio + aetcd stubs, paged", *timed(lambda e: asyncio.run(_read_aio_paged(e)), endpoint)),
            ("aetcd get_prefix, default 4 MiB", *timed(lambda e: asyncio.run(_read_aetcd(e, None)), endpoint)),
            ("aetcd get_prefix, 1 GiB limit", *timed(lambda e: asyncio.run(_read_aetcd(e, 1 << 30)), endpoint)),
        ]
        if args.etcd3gw_python:
            t0 = time.monotonic()
            out = subprocess.run(
                [args.etcd3gw_python, "-c", ETCD3GW_SCRIPT, server.host, str(server.port), str(PAGE)],
                capture_output=True, text=True,
            )
            if out.returncode == 0:
                n, secs = out.stdout.split()
                rows.append(("etcd3gw (JSON gateway), paged", n, float(secs)))
            else:
                rows.append(("etcd3gw (JSON gateway), paged", "failed: " + out.stderr.strip()[-90:],
                             time.monotonic() - t0))
        print(f"\n{args.n} keys, 100-byte values, pages of {PAGE}\n")
        print(f"{'client':<38}{'keys':>8}{'seconds':>9}{'keys/s':>10}")
        for name, n, secs in rows:
            rate = f"{int(n) / secs:,.0f}" if n.isdigit() else ""
            shown = n if n.isdigit() else ""
            print(f"{name:<38}{shown:>8}{secs:>9.2f}{rate:>10}  {'' if n.isdigit() else n}")
        return 0
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
