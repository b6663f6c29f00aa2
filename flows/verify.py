"""The verify flow: re-read a stored archive and check manifest, checksums and counts."""

from __future__ import annotations

import time
from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from burrow import naming, report
from burrow.errors import BurrowError
from burrow.resolve import archive_from_ref
from burrow.staging import staging_dir
from tasks.verify import verify as verify_task


def _run_name() -> str:
    ref = str(flow_run.parameters.get("archive", "archive"))
    return f"verify-{naming.slug(ref.rsplit('/', 1)[-1].removesuffix('.burrow'))}"


@flow(name="verify", flow_run_name=_run_name, persist_result=False)
def verify(archive: str) -> dict[str, Any]:
    """Download ``archive`` and check it end to end. Returns the manifest summary."""
    started = time.monotonic()
    summary: dict[str, Any] = {"status": "failed", "archive": archive}
    try:
        store, name = archive_from_ref(archive)
        with staging_dir() as work:
            m = verify_task(store, name, str(work))
        summary.update(
            status="ok",
            url=store.url(name),
            service=m["service"],
            source=m.get("source"),
            keys=m["keys"],
            raw_bytes=m["raw_bytes"],
            content_sha256=m["content_sha256"],
            created=m["created"],
            encrypted=m.get("encrypted", False),
        )
        return summary
    except BurrowError as exc:
        summary["error"] = str(exc)
        raise
    finally:
        summary["duration_s"] = round(time.monotonic() - started, 3)
        report.publish(f"verify-{summary.get('source') or 'archive'}", f"Burrow verify: {summary['status']}", summary)
