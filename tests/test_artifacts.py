"""What a flow run leaves in Prefect: a readable run name and a markdown artifact with the
counts, read back through the Prefect API. Never a stored value."""

from __future__ import annotations

import re

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from zkutil import kazoo, unique_root

from flows.backup import backup
from flows.restore import restore

VALUE = b"artifact-canary-value-7f3a"
TARGET_VALUE = b"target-canary-value-91c2"


def run_and_artifacts(state) -> tuple[str, list]:
    run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        name = client.read_flow_run(run_id).name
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
    return name, arts


def row(md: str, key: str) -> str:
    m = re.search(rf"^\| {re.escape(key)} \| (.*) \|$", md, re.M)
    assert m, (key, md)
    return m.group(1)


def test_backup_and_restore_leave_named_runs_and_markdown_artifacts(zk_a, zk_b, store):
    root = unique_root()
    with kazoo(zk_a.url) as c:
        c.create(root, b"top")
        c.create(root + "/same", b"same")
        c.create(root + "/differs", VALUE)
        c.create(root + "/new", VALUE)
        c.create(root + "/eph", b"e", ephemeral=True)
        bstate = backup(source=f"zk://{zk_a.url}", store=str(store), root=root, name="dc-art",
                        encryption=False, return_state=True)
    summary = bstate.result()
    with kazoo(zk_b.url) as c:
        c.create(root, b"top")
        c.create(root + "/same", b"same")
        c.create(root + "/differs", TARGET_VALUE)
    rstate = restore(archive=summary["url"], into=f"zk://{zk_b.url}", return_state=True)
    rsummary = rstate.result()
    assert rsummary["created"] == 1 and rsummary["identical"] == 2 and rsummary["conflicts"] == 1

    name, arts = run_and_artifacts(bstate)
    assert re.fullmatch(r"backup-zk-dc-art-\d{8}T\d{6}Z", name), name
    assert len(arts) == 1 and arts[0].type == "markdown"
    md = arts[0].data
    assert row(md, "status") == "ok" and row(md, "service") == "zookeeper" and row(md, "source") == "dc-art"
    assert row(md, "keys") == "4" and row(md, "skipped_ephemeral") == "1"
    assert int(row(md, "raw_bytes")) == summary["raw_bytes"] and int(row(md, "stored_bytes")) == summary["stored_bytes"]
    assert row(md, "ratio").endswith("x") and row(md, "content_sha256") == summary["content_sha256"]
    assert row(md, "url") == summary["url"]
    assert float(row(md, "duration_s")) > 0
    assert VALUE.decode() not in md

    name, arts = run_and_artifacts(rstate)
    assert re.fullmatch(rf"restore-zk-{re.escape(zk_b.url.replace(':', '-'))}-\d{{8}}T\d{{6}}Z", name), name
    assert len(arts) == 1 and arts[0].type == "markdown"
    md = arts[0].data
    assert row(md, "status") == "ok-with-conflicts" and row(md, "archive_keys") == "4"
    assert row(md, "created") == "1" and row(md, "identical") == "2" and row(md, "conflicts") == "1"
    assert f"- `{root}/differs`" in md  # the conflict, by path
    assert VALUE.decode() not in md and TARGET_VALUE.decode() not in md


def test_a_flow_run_sends_its_heartbeat_through_burrows_prompt_heartbeat(zk_a, store, monkeypatch):
    """The flow-run heartbeat (how a server tells a crashed run from a running one) still
    reaches the API from Burrow's replacement, which stops without a second's wait."""
    import time
    from datetime import timedelta

    from prefect import flow_engine
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventResourceFilter

    from flows.common import _prompt_heartbeats, install_prompt_heartbeats

    monkeypatch.setattr(flow_engine, "_send_heartbeats", flow_engine._send_heartbeats)  # restored after
    assert install_prompt_heartbeats()  # as the CLI does (importing the flows no longer installs it)
    assert flow_engine._send_heartbeats is _prompt_heartbeats
    root = unique_root()
    with kazoo(zk_a.url) as c:
        c.create(root + "/k", b"v", makepath=True)
    state = backup(source=f"zk://{zk_a.url}", store=str(store), root=root, name="dc-beat", encryption=False,
                   return_state=True)
    run_id = state.state_details.flow_run_id
    since = state.timestamp - timedelta(minutes=5)
    flt = EventFilter(occurred=EventOccurredFilter(since=since), event=EventNameFilter(name=["prefect.flow-run.heartbeat"]),
                      resource=EventResourceFilter(id=[f"prefect.flow-run.{run_id}"]))
    deadline = time.monotonic() + 30
    while True:
        with get_client(sync_client=True) as client:
            beats = client.read_events(filter=flt, limit=10).events
        if beats or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert beats and beats[0].resource.id == f"prefect.flow-run.{run_id}"
