"""What prune's re-authentication costs beside the prune itself (a benchmark, not a test).

    .venv/bin/python bench/bench_prune.py [--archives 1000] [--sources 10] [--keep-last 24] [--rounds 2]

Starts moto's S3 server and a Prefect server, writes N small encrypted archives bound to their
names (hourly, spread over ``--sources`` sources) and prunes identical copies of that store,
keeping ``--keep-last`` per source, two ways, alternating, ``--rounds`` times each:

* **the prune flow** as ``burrow prune`` runs it (flows/prune.py: catalog, plan, a task per
  delete, markers, the stray-upload sweep), once as shipped and once with the re-reads replaced
  by a pass-through (only here, to measure them);
* **store calls only**: catalog, plan and the deletes without Prefect, with and without the
  re-reads (tasks/retention.py ``reauthenticate``/``iter_reauthenticated``, 8 at a time ahead
  of the deletes): the worst case for the re-reads, on a server that answers one request at a
  time.

Target (issue 16): the re-reads cost under 10% of a prune of 1,000 archives.
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
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()

    import statistics

    import boto3
    from botocore.config import Config

    from burrow.archive import ArchiveWriter
    from burrow.crypto import StreamEncryptor
    from burrow.keys import WriteKeys, keygen, read_key_file
    from burrow.records import Record
    from burrow.testing.servers import start_moto, start_prefect

    work = Path(tempfile.mkdtemp(prefix="burrow-bench-prune-"))
    server = start_moto(work / "moto")
    orch = start_prefect(work / "prefect")
    try:
        os.environ.update({"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_DEFAULT_REGION": "us-east-1",
                           "PREFECT_API_URL": orch.url + "/api", "PREFECT_LOGGING_LEVEL": "WARNING"})
        client = boto3.client("s3", endpoint_url=server.url, config=Config(
            request_checksum_calculation="when_required", response_checksum_validation="when_required",
            s3={"addressing_style": "path"}, max_pool_connections=16))
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        client.create_bucket(Bucket=bucket)
        key_file = work / "bench.key"
        keygen(key_file, x25519=False)
        enc = WriteKeys("symmetric", [read_key_file(key_file)[0]], "bench")
        base = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=args.archives + 1)
        names = []
        for i in range(args.archives):
            src = f"src{i % args.sources}"
            t = base + timedelta(hours=i)
            names.append((i, src, t, f"{src}/{src}-{t:%Y%m%dT%H%M%SZ}-{i:06x}.burrow"))

        def put(item: tuple) -> None:
            i, src, t, name = item
            buf = io.BytesIO()
            w = ArchiveWriter(buf, service="zookeeper", encryptor=StreamEncryptor(enc))
            for k in range(20):
                w.add(Record(f"/bench/k{k}".encode(), b"v" * 100))
            w.finish({"service": "zookeeper", "source": src, "source_url": "zk://bench", "root": "/",
                      "created": (t + timedelta(seconds=30)).strftime("%Y-%m-%dT%H:%M:%S.%fZ"), "object_name": name})
            client.put_object(Bucket=bucket, Key=f"template/{name}", Body=buf.getvalue())

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(put, names))

        def fresh_copy() -> str:
            prefix = "c" + uuid.uuid4().hex[:8]

            def cp(item: tuple) -> None:
                client.copy_object(Bucket=bucket, Key=f"{prefix}/{item[3]}",
                                   CopySource={"Bucket": bucket, "Key": f"template/{item[3]}"})

            with ThreadPoolExecutor(16) as pool:
                list(pool.map(cp, names))
            return prefix

        results: dict[str, list[float]] = {"flow": [], "flow-no-reread": [], "calls": [], "calls-no-reread": []}
        counts: dict[str, tuple[int, int]] = {}
        for _ in range(args.rounds):
            for reauth in (True, False):
                kind = "flow" if reauth else "flow-no-reread"
                secs, deleted, kept = prune_flow(fresh_copy(), bucket, server.url, key_file, args.keep_last, reauth)
                results[kind].append(secs)
                counts[kind] = (deleted, kept)
            for reauth in (True, False):
                kind = "calls" if reauth else "calls-no-reread"
                secs, deleted, kept = prune_calls(fresh_copy(), bucket, server.url, key_file, args.keep_last, reauth)
                results[kind].append(secs)
                counts[kind] = (deleted, kept)
        load = os.getloadavg()
        print(f"{args.archives} archives, {args.sources} sources, keep-last {args.keep_last}, {args.rounds} rounds; "
              f"{os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
        med = {k: statistics.median(v) for k, v in results.items()}
        for k, v in results.items():
            print(f"  {k:16} median {med[k]:7.2f} s  runs {', '.join(f'{x:.2f}' for x in v)}  "
                  f"(deleted {counts[k][0]}, kept by re-authentication {counts[k][1]})")
        for a, b in (("flow", "flow-no-reread"), ("calls", "calls-no-reread")):
            print(f"  re-reads in {a}: {100 * (med[a] - med[b]) / med[b]:+.1f}% (target: under 10%)")
        return 0
    finally:
        orch.stop()
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


def prune_flow(prefix: str, bucket: str, endpoint: str, key_file: Path, keep_last: int,
               reauth: bool) -> tuple[float, int, int]:
    """The prune flow as ``burrow prune`` runs it; without ``reauth`` the re-reads are a pass-through."""
    import flows.prune as fp
    from tasks.catalog import describe_archives
    from tasks.retention import iter_reauthenticated, reauthenticate_task

    url = f"s3://{bucket}/{prefix}?endpoint={endpoint}&addressing=path&checksum=when_required"
    from blocks.keys import archive_keys
    from blocks.resolve import store_from_ref

    describe_archives(store_from_ref(url), archive_keys([str(key_file)], None, None, None, None))  # the index
    if not reauth:
        fp.iter_reauthenticated = lambda st, items, keys: ((row, why, None) for row, why in items)
        fp.reauthenticate_task = lambda st, rows, keys: {}
    try:
        t0 = time.perf_counter()
        summary = fp.prune(store=url, keep_last=keep_last, key_files=[str(key_file)])
        secs = time.perf_counter() - t0
    finally:
        fp.iter_reauthenticated, fp.reauthenticate_task = iter_reauthenticated, reauthenticate_task
    return secs, summary["deleted"], len(summary.get("not_reauthenticated") or {})


def prune_calls(prefix: str, bucket: str, endpoint: str, key_file: Path, keep_last: int,
                reauth: bool) -> tuple[float, int, int]:
    """Catalog, plan and deletes through the store alone (no Prefect): the re-reads' worst case."""
    from blocks.keys import archive_keys
    from blocks.retention import RetentionPolicy
    from blocks.s3 import S3Store
    from tasks.catalog import describe_archives
    from tasks.retention import block_sources, iter_reauthenticated, plan_retention, reauthenticate

    keys = archive_keys([str(key_file)], None, None, None, None)
    st = S3Store(bucket=bucket, prefix=prefix, endpoint_url=endpoint, addressing_style="path")
    describe_archives(st, keys)  # the first listing writes the index, as any earlier one would have
    t0 = time.perf_counter()
    rows = describe_archives(st, keys)
    decision = plan_retention(rows, RetentionPolicy(keep_last=keep_last), keyed=True)
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
    return time.perf_counter() - t0, deleted, kept


if __name__ == "__main__":
    raise SystemExit(main())
