"""What prune's re-authentication costs beside the prune itself (a benchmark, not a test).

    .venv/bin/python bench/bench_prune.py [--archives 1000] [--sources 10] [--keep-last 24]

Starts moto's S3 server, writes N small encrypted archives bound to their names (hourly, spread
over ``--sources`` sources) and times the parts of a prune that keeps ``--keep-last`` per source:
the catalog (from the index a first listing wrote), the plan, the re-read and authentication of
every manifest it would delete and of each source's newest (tasks/retention.py
``reauthenticate``, 8 at a time), and the deletes. Target: the re-reads under 10% of the prune.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--archives", type=int, default=1000)
    p.add_argument("--sources", type=int, default=10)
    p.add_argument("--keep-last", type=int, default=24)
    args = p.parse_args()

    import boto3
    from botocore.config import Config

    from blocks.retention import RetentionPolicy
    from blocks.s3 import S3Store
    from burrow.archive import ArchiveWriter
    from burrow.crypto import ArchiveKeys, StreamEncryptor
    from burrow.keys import Keyring, SymmetricKey, WriteKeys
    from burrow.records import Record
    from burrow.testing.servers import start_moto
    from tasks.catalog import describe_archives
    from tasks.retention import block_sources, iter_reauthenticated, plan_retention, reauthenticate

    work = Path(tempfile.mkdtemp(prefix="burrow-bench-prune-"))
    server = start_moto(work / "moto")
    try:
        os.environ.update({"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_DEFAULT_REGION": "us-east-1"})
        client = boto3.client("s3", endpoint_url=server.url, config=Config(
            request_checksum_calculation="when_required", response_checksum_validation="when_required",
            s3={"addressing_style": "path"}, max_pool_connections=16))
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        client.create_bucket(Bucket=bucket)
        key = SymmetricKey.generate()
        enc = WriteKeys("symmetric", [key], "bench")
        base = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=args.archives + 1)

        def put(i: int) -> None:
            src = f"src{i % args.sources}"
            t = base + timedelta(hours=i)
            name = f"{src}/{src}-{t:%Y%m%dT%H%M%SZ}-{i:06x}.burrow"
            buf = io.BytesIO()
            w = ArchiveWriter(buf, service="zookeeper", encryptor=StreamEncryptor(enc))
            for k in range(20):
                w.add(Record(f"/bench/k{k}".encode(), b"v" * 100))
            w.finish({"service": "zookeeper", "source": src, "source_url": "zk://bench", "root": "/",
                      "created": (t + timedelta(seconds=30)).strftime("%Y-%m-%dT%H:%M:%S.%fZ"), "object_name": name})
            client.put_object(Bucket=bucket, Key=f"p/{name}", Body=buf.getvalue())

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(put, range(args.archives)))
        ring = Keyring()
        ring.add([key])
        keys = ArchiveKeys(ring)

        def prune(prefix: str, reauth: bool) -> tuple[float, float, int, int]:
            """One prune of the store under ``prefix``: (seconds, seconds in the catalog, deleted, kept)."""
            st = S3Store(bucket=bucket, prefix=prefix, endpoint_url=server.url, addressing_style="path")
            describe_archives(st, keys)  # the first listing writes the index, as any earlier one would have
            t0 = time.perf_counter()
            rows = describe_archives(st, keys)
            t1 = time.perf_counter()
            decision = plan_retention(rows, RetentionPolicy(keep_last=args.keep_last), keyed=True)
            kept = 0
            if reauth:  # as flows/prune.py does it: the newest first, then each archive as it is deleted
                kept = len(block_sources(decision, reauthenticate(st, list(decision.newest.values()), keys)))
                items = iter_reauthenticated(st, decision.delete, keys)
            else:
                items = ((row, why, None) for row, why in decision.delete)
            deleted = 0
            for row, _, problem in items:
                if problem is None:
                    st.delete(row["name"])
                    deleted += 1
                else:
                    kept += 1
            return time.perf_counter() - t0, t1 - t0, deleted, kept

        for prefix in ("p", "q"):
            for i in range(args.archives):
                src = f"src{i % args.sources}"
                t = base + timedelta(hours=i)
                name = f"{src}/{src}-{t:%Y%m%dT%H%M%SZ}-{i:06x}.burrow"
                if prefix == "q":
                    client.copy_object(Bucket=bucket, Key=f"q/{name}", CopySource={"Bucket": bucket, "Key": f"p/{name}"})
        with_reauth, cat_s, deleted, kept = prune("p", True)
        without, _, deleted2, _ = prune("q", False)
        print(f"{args.archives} archives, {args.sources} sources, keep-last {args.keep_last}: {deleted} deleted "
              f"({deleted2} without re-authentication), {kept} kept by re-authentication")
        print(f"prune without re-reading: {without:.2f} s; with every deleted archive's and each source's newest "
              f"manifest re-read and authenticated: {with_reauth:.2f} s (catalog {cat_s:.2f} s)")
        print(f"re-authentication: {100 * (with_reauth - without) / without:+.1f}% (target: under 10%)")
        load = os.getloadavg()
        print(f"{os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
        return 0
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
