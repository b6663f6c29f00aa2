"""S3 store throughput and peak memory against plain boto3 (a benchmark, not a test).

    .venv/bin/python bench/bench_s3.py [--mb 500] [--rounds 3] [--archives 1000]

Starts moto's S3 server (burrow.testing.servers.start_moto: a real HTTP endpoint on this
machine) and writes one incompressible file of ``--mb`` MB (archives are compressed and
encrypted, so they look random). Then, each phase in its own child process so that its peak
RSS is its own, alternating Burrow and boto3 round by round so machine load hits both alike:

* upload:   S3Store.put (multipart, If-None-Match: *, CRC32, parts in flight bounded)
            vs boto3 ``upload_file`` (s3transfer defaults)
* download: S3Store.get (ranged parallel GETs, then the end-to-end CRC32 check)
            vs boto3 ``download_file``

and prints medians, the ratio Burrow / boto3 (target: >= 0.9) and Burrow's memory bound
(part size x parts in flight). With ``--archives N`` it also writes N small real archives
and times the catalog (``tasks.catalog.describe_archives``: manifest summaries without
downloading whole archives), printing seconds and bytes read per archive (target: 1,000
archives in under 3 s).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from childproc import run_child  # noqa: E402  (bench/ is the script's directory)

KEY, SECRET = "bench-key", "bench-secret"


def _env(endpoint: str) -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
            "BENCH_ENDPOINT": endpoint}


def _store(bucket: str, prefix: str = ""):  # noqa: ANN202
    from blocks.s3 import S3Store

    return S3Store(bucket=bucket, prefix=prefix, endpoint_url=os.environ["BENCH_ENDPOINT"], addressing_style="path")


def _boto3():  # noqa: ANN202
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=os.environ["BENCH_ENDPOINT"], config=Config(
        request_checksum_calculation="when_required", response_checksum_validation="when_required",
        s3={"addressing_style": "path"}, max_pool_connections=16))


def phase(name: str, bucket: str, path: Path, key: str) -> dict:
    # imports and client set-up are not what is measured: build both before the clock starts
    store, client = _store(bucket), _boto3()
    store.client()
    started = time.perf_counter()
    if name == "burrow-up":
        store.put(key, path)
    elif name == "boto3-up":
        client.upload_file(str(path), bucket, key)
    elif name == "burrow-down":
        store.get(key, path)
    elif name == "boto3-down":
        client.download_file(bucket, key, str(path))
    return {"seconds": time.perf_counter() - started}


def phase_catalog(bucket: str, prefix: str) -> dict:
    from blocks.s3 import S3Store
    from tasks.catalog import describe_archives

    store = _store(bucket, prefix)
    store.client()
    read = {"bytes": 0, "requests": 0}
    real = S3Store.read_range

    def counting(self: S3Store, name: str, start: int, length: int) -> bytes:
        data = real(self, name, start, length)
        read["bytes"] += len(data)
        read["requests"] += 1
        return data

    S3Store.read_range = counting  # type: ignore[method-assign]
    started = time.perf_counter()
    rows = describe_archives(store)
    seconds = time.perf_counter() - started
    bad = [r for r in rows if r.get("error")]
    index = [n for n in store.list_sidecars("_catalog/")]
    return {"seconds": seconds, "archives": len(rows), "errors": len(bad), "index_objects": len(index), **read}


def make_archives(bucket: str, n: int, work: Path, prefix: str = "cat", index: bool = False) -> None:
    """N small real (encrypted) archives of a few keys each, uploaded with plain boto3 in parallel;
    with ``index``, each is then added to the catalog index the way a backup adds its archive."""
    from concurrent.futures import ThreadPoolExecutor

    from burrow.archive import ArchiveWriter
    from burrow.crypto import StreamEncryptor
    from burrow.keys import SymmetricKey, WriteKeys
    from burrow.records import Record, encode_record

    enc = StreamEncryptor(WriteKeys("symmetric", [SymmetricKey.generate()], "bench"))
    path = work / "small.burrow"
    with open(path, "wb") as f:
        w = ArchiveWriter(f, service="zookeeper", encryptor=enc)
        for i in range(20):
            w.write_content(encode_record(Record(key=f"/bench/k{i}".encode(), value=b"v" * 100)))
        w.finish({"service": "zookeeper", "source": "bench", "source_url": "zk://bench", "root": "/",
                  "keys": 20, "raw_bytes": 2000})
    data = path.read_bytes()
    client = _boto3()

    store = _store(bucket, prefix) if index else None

    def put(i: int) -> None:
        src = f"src{i % 10}"
        client.put_object(Bucket=bucket, Key=f"{prefix}/{src}/{src}-{i:05d}.burrow", Body=data)
        if store is not None:
            from tasks.catalog import index_new_archive

            index_new_archive(store, f"{src}/{src}-{i:05d}.burrow")

    with ThreadPoolExecutor(1 if index else 16) as pool:  # one at a time, like successive backups
        list(pool.map(put, range(n)))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--mb", type=int, default=500)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--archives", type=int, default=1000)
    p.add_argument("--phase")
    p.add_argument("--result")
    p.add_argument("--bucket")
    p.add_argument("--path")
    p.add_argument("--key")
    p.add_argument("--prefix", default="cat")
    args = p.parse_args()

    if args.phase:  # child process
        if args.phase == "catalog":
            result = phase_catalog(args.bucket, args.prefix)
        else:
            result = phase(args.phase, args.bucket, Path(args.path), args.key)
        Path(args.result).write_text(json.dumps(result))
        return 0

    from burrow.testing.servers import start_moto

    work = Path(tempfile.mkdtemp(prefix="burrow-bench-s3-"))
    server = start_moto(work / "moto")
    try:
        env = _env(server.url)
        os.environ.update(env)
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        _boto3().create_bucket(Bucket=bucket)
        src = work / "payload.bin"
        with open(src, "wb") as f:
            for _ in range(args.mb):
                f.write(os.urandom(1_000_000))
        size = src.stat().st_size
        times: dict[str, list[float]] = {k: [] for k in ("burrow-up", "boto3-up", "burrow-down", "boto3-down")}
        rss: dict[str, float] = {}
        for r in range(args.rounds):
            for tool in ("burrow", "boto3"):
                key = f"{tool}/{tool}-{r}.burrow"
                res, peak, _ = run_child(__file__, f"{tool}-up", ["--bucket", bucket, "--path", str(src), "--key", key], env)
                times[f"{tool}-up"].append(res["seconds"])
                rss[f"{tool}-up"] = max(rss.get(f"{tool}-up", 0), peak)
                out = work / f"down-{tool}.bin"
                out.unlink(missing_ok=True)
                res, peak, _ = run_child(__file__, f"{tool}-down", ["--bucket", bucket, "--path", str(out), "--key", key], env)
                times[f"{tool}-down"].append(res["seconds"])
                rss[f"{tool}-down"] = max(rss.get(f"{tool}-down", 0), peak)
                if out.stat().st_size != size:
                    raise SystemExit(f"{tool} downloaded {out.stat().st_size} of {size} bytes")
                out.unlink()
            print(f"round {r + 1}/{args.rounds} done", flush=True)

        from blocks.s3 import S3Store

        probe = S3Store(bucket=bucket, endpoint_url=server.url)
        bound = probe.part_size * probe.concurrency / 2**20
        print()
        print(f"{size / 1e6:,.0f} MB incompressible file, moto S3 at {server.url}, {args.rounds} rounds (medians)")
        print(f"{'phase':<10}{'burrow MB/s':>13}{'boto3 MB/s':>12}{'ratio':>8}{'burrow RSS':>12}{'boto3 RSS':>11}")
        for op in ("up", "down"):
            b = size / 1e6 / statistics.median(times[f"burrow-{op}"])
            o = size / 1e6 / statistics.median(times[f"boto3-{op}"])
            print(f"{'upload' if op == 'up' else 'download':<10}{b:>13.1f}{o:>12.1f}{b / o:>8.2f}"
                  f"{rss[f'burrow-{op}']:>9.0f} MiB{rss[f'boto3-{op}']:>8.0f} MiB")
        print(f"Burrow's upload buffer bound: {probe.part_size // 2**20} MiB parts x {probe.concurrency} in flight "
              f"= {bound:.0f} MiB, whatever the archive size (target ratio >= 0.9)")

        if args.archives:
            def catalog(prefix: str, what: str) -> None:
                res, peak, _ = run_child(__file__, "catalog", ["--bucket", bucket, "--prefix", prefix], env)
                print(f"catalog of {res['archives']} archives, {what}: {res['seconds']:.2f} s "
                      f"({res['errors']} unreadable), {res['bytes'] / max(1, res['archives']):,.0f} bytes and "
                      f"{res['requests'] / max(1, res['archives']):.2f} ranged reads per archive, "
                      f"{res['index_objects']} index objects after, peak RSS {peak:.0f} MiB (target: under 3 s)")

            make_archives(bucket, args.archives, work, prefix="cat")
            catalog("cat", "never indexed (uploaded by another tool): every manifest read by range")
            catalog("cat", "second listing, from the index the first one wrote")
            make_archives(bucket, args.archives, work, prefix="backups", index=True)
            catalog("backups", "written one by one the way backups write (each adds itself to the index)")
        load = os.getloadavg()
        print(f"{os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
        return 0
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
