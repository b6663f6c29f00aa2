"""What a flow run leaves in Prefect, read back through the Prefect API: a readable run name, a
markdown artifact made for people (one line of outcome, a table of steps, facts with units, no
Python repr), table artifacts for conflicts, the machine-readable ``burrow run facts`` table and
a progress artifact. Never a stored value. And an expected refusal under a deployment: one ERROR
line, no traceback, the run Failed with its message."""

from __future__ import annotations

import getpass
import json
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from types import SimpleNamespace

import pytest
from conftest import REPO
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from test_orchestrator import all_events, wait_for
from zkutil import kazoo, unique_root

from blocks.zookeeper import ZooKeeperCluster
from burrow import naming, report
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


def fact(md: str, key: str) -> str:
    """A value of the markdown's facts table."""
    m = re.search(rf"^\| {re.escape(key)} \| (.*) \|$", md, re.M)
    assert m, (key, md)
    return m.group(1)


def facts_of(arts: list) -> dict:
    (table,) = [a for a in arts if a.type == "table" and a.description == report.FACTS_DESCRIPTION]
    assert table.key is None  # unkeyed: one per run, never a "latest" that hides the others
    return report.facts_from_table(table.data)


def no_repr(arts: list) -> None:
    for a in arts:
        text = a.data if isinstance(a.data, str) else json.dumps(a.data)
        if a.type == "markdown":
            assert "{'" not in text and "['" not in text and "': " not in text, text


def me() -> str:
    return f"{getpass.getuser()}@{socket.gethostname()}"


def test_backup_and_restore_leave_artifacts_made_for_people(zk_a, zk_b, store):
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
    top = unique_root()
    with kazoo(zk_b.url) as c:
        c.create(top + root, b"top", makepath=True)
        c.create(top + root + "/same", b"same")
        c.create(top + root + "/differs", TARGET_VALUE)
    rstate = restore(archive=summary["url"], into=f"zk://{zk_b.url}{top}", return_state=True)
    rsummary = rstate.result()
    assert rsummary["created"] == 1 and rsummary["identical"] == 2 and rsummary["conflicts"] == 1

    name, arts = run_and_artifacts(bstate)
    assert re.fullmatch(r"backup-zk-dc-art-\d{8}T\d{6}Z", name), name
    no_repr(arts)
    (md_art,) = [a for a in arts if a.type == "markdown"]
    assert md_art.key == "backup-dc-art"  # the source's name, not a URL's slug
    md = md_art.data
    first = md.splitlines()[0]
    assert re.fullmatch(r"# backup of dc-art: done, 4 keys, \d+(\.\d)? (B|KiB) stored \(\d+\.\d\dx\), \d+\.\d+ s", first), first
    assert md_art.description == first[2:]
    assert "| step | outcome | seconds |" in md and re.search(r"^\| extract \| ok \| \d+\.\d\d \|$", md, re.M)
    assert fact(md, "service") == "zookeeper" and fact(md, "keys") == "4" and fact(md, "skipped_ephemeral") == "1"
    assert fact(md, "trigger") == f"cli, by {me()}"
    assert fact(md, "content_sha256").startswith("`") and summary["content_sha256"] in md  # whole, below the table
    assert VALUE.decode() not in md
    facts = facts_of(arts)
    assert facts["kind"] == "backup" and facts["outcome"] == "completed"
    assert facts["trigger"] == {"kind": "cli", "by": me()}
    assert facts["keys"] == 4 and facts["stored_bytes"] == summary["stored_bytes"] and facts["url"] == summary["url"]
    assert set(facts["steps_s"]) >= {"store", "extract", "compress", "upload", "verify"}
    assert facts["raw_bytes"] == summary["raw_bytes"] and facts["service_info"] == summary["service_info"]

    name, arts = run_and_artifacts(rstate)
    no_repr(arts)
    target = f"zk://{zk_b.url}{top}"
    assert rsummary["target"] == target
    key = report.artifact_key("restore", "dc-art", "to", naming.slug(target))
    (md_art,) = [a for a in arts if a.type == "markdown"]
    assert md_art.key == key, md_art.key
    md = md_art.data
    assert md.splitlines()[0].startswith(f"# restore of dc-art into {target}: done, 1 key created, 1 conflict left, ")
    assert fact(md, "archive_keys") == "4" and fact(md, "created") == "1" and fact(md, "conflicts") == "1"
    (conflicts,) = [a for a in arts if a.key == f"{key}-conflicts"]
    assert conflicts.type == "table"
    rows = json.loads(conflicts.data) if isinstance(conflicts.data, str) else conflicts.data
    assert rows == [{"path": f"{root}/differs", "kind": "exists with another value (kept)"}]
    assert VALUE.decode() not in md and TARGET_VALUE.decode() not in md and TARGET_VALUE.decode() not in str(rows)
    facts = facts_of(arts)
    assert facts["kind"] == "restore" and facts["conflicts"] == 1 and facts["created"] == 1
    assert "conflict_paths" not in facts  # paths stay in the conflicts table and the logs


def test_a_restore_into_a_saved_block_is_keyed_by_its_name_and_a_refusal_says_so(zk_a, zk_b, store, monkeypatch):
    """Block names key the artifact and name the event's target; a run that fails opens its
    artifact with the one-line error."""
    root = unique_root()
    with kazoo(zk_a.url) as c:
        c.create(root + "/k", b"v", makepath=True)
    done = backup(source=f"zk://{zk_a.url}", store=str(store), root=root, name="dc-blk", encryption=False)
    block = f"art-dr-{uuid.uuid4().hex[:8]}"
    top = unique_root()
    with kazoo(zk_b.url) as c:
        c.ensure_path(top)
    ZooKeeperCluster(hosts=[zk_b.url], chroot=top).save(block, overwrite=True)
    state = restore(archive=done["url"], into=block, return_state=True)
    assert state.result()["target_block"] == block
    _, arts = run_and_artifacts(state)
    (md,) = [a for a in arts if a.type == "markdown"]
    assert md.key == f"restore-dc-blk-to-{block}"
    assert re.match(rf"# restore of dc-blk into {block}: done, \d+ keys? created, 0 conflicts left, ", md.data), md.data

    # no key configured and encryption on: refused before anything is touched
    for k in [k for k in os.environ if k.startswith("BURROW_")]:
        monkeypatch.delenv(k)
    state = backup(source=f"zk://{zk_a.url}", store=str(store), root=root, name="dc-refused", return_state=True)
    assert state.is_failed()
    _, arts = run_and_artifacts(state)
    no_repr(arts)
    (md,) = [a for a in arts if a.type == "markdown"]
    first = md.data.splitlines()[0]
    assert first.startswith("# backup of dc-refused: failed: ") and len(first) > 40, first
    facts = facts_of(arts)
    assert facts["outcome"] == "failed" and facts["status"] == "failed" and facts["error"][:30] in first


def test_a_long_run_shows_a_progress_artifact(zk_a, store, monkeypatch):
    """A backup updates a Prefect progress artifact as its stages go (every interval: 0 here, so
    that the quick test run makes one), and leaves it at 100."""
    monkeypatch.setenv("BURROW_PROGRESS_ARTIFACT_INTERVAL", "0")
    root = unique_root()
    with kazoo(zk_a.url) as c:
        for i in range(30):
            c.create(f"{root}/k{i}", b"v", makepath=True)
    state = backup(source=f"zk://{zk_a.url}", store=str(store), root=root, name="dc-prog", encryption=False,
                   return_state=True)
    _, arts = run_and_artifacts(state)
    (prog,) = [a for a in arts if a.type == "progress"]
    assert float(prog.data) == 100.0 and prog.description == "backup of dc-prog: done"


def test_a_flow_run_sends_its_heartbeat_through_burrows_prompt_heartbeat(zk_a, store, monkeypatch):
    """The flow-run heartbeat (how a server tells a crashed run from a running one) still
    reaches the API from Burrow's replacement, which stops without a second's wait."""
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
    beats = wait_for("the run's heartbeat event", lambda: all_events(flt), timeout=120)  # stored in batches
    assert beats[0].resource.id == f"prefect.flow-run.{run_id}"


def test_facts_round_trip_and_values_for_people():
    summary = {
        "status": "ok", "source": "dc-us", "rto_s": 18.2, "stored_bytes": 1258291,
        "approval": {"approved": True, "approver": "A. Name", "comment": "checked"},
        "trigger": {"kind": "schedule", "by": "backup/backup-dc-us", "deployment": "backup/backup-dc-us"},
        "steps_s": {"plan": 0.4, "replay": 1.25}, "skipped": ["file:///s/a.burrow: corrupt"],
        "kept_because": {"file:///s/dc-us/a.burrow": ["keep-last 1"]}, "empty": {}, "none": None,
    }
    rows = report.facts_table("failover", "completed", summary)
    assert {"field": "approval.approver", "value": '"A. Name"'} in rows
    assert {"field": "steps_s.plan", "value": "0.4"} in rows and {"field": "kind", "value": '"failover"'} in rows
    assert all(set(r) == {"field", "value"} and isinstance(r["value"], str) for r in rows)
    back = report.facts_from_table(rows)
    assert back == {**summary, "kind": "failover", "outcome": "completed"}
    assert report.facts_from_table(json.dumps(rows)) == back  # as the API gives a table artifact's data
    assert report.value_text("steps_s", summary["steps_s"]) == "plan 0.40 s, replay 1.2 s"
    assert report.value_text("stored_bytes", 1258291) == "1.2 MiB" and report.value_text("rpo_s", 720) == "12 m"
    assert report.value_text("approval", summary["approval"]) == "approved yes, approver A. Name, comment checked"
    md = report.to_markdown("x", summary)
    assert "{'" not in md and "['" not in md and "`file:///s/a.burrow: corrupt`" not in md.splitlines()[0]


def test_run_trigger_names_the_deployment_the_schedule_or_the_automation(monkeypatch):
    import prefect.context
    import prefect.runtime.deployment

    from flows.common import run_trigger

    def run(**kw):
        base = dict(deployment_id=uuid.uuid4(), created_by=None, auto_scheduled=False)
        ctx = SimpleNamespace(flow_run=SimpleNamespace(**{**base, **kw}), flow=SimpleNamespace(name="backup"))
        monkeypatch.setattr(prefect.context.FlowRunContext, "get", classmethod(lambda cls: ctx))
        return run_trigger()

    monkeypatch.setattr(prefect.runtime.deployment, "__getattr__", lambda name: "backup-dc-us" if name == "name" else None)
    assert run(auto_scheduled=True) == {"kind": "schedule", "by": "backup/backup-dc-us",
                                        "deployment": "backup/backup-dc-us"}
    auto = uuid.uuid4()
    assert run(created_by=SimpleNamespace(type="AUTOMATION", id=auto, display_value="burrow-backup-missing")) == {
        "kind": "automation", "by": "burrow-backup-missing", "deployment": "backup/backup-dc-us",
        "automation_id": str(auto)}
    assert run() == {"kind": "manual", "by": "backup/backup-dc-us", "deployment": "backup/backup-dc-us"}
    assert run(deployment_id=None) == {"kind": "cli", "by": me()}


@pytest.mark.timeout(600)
def test_an_expected_refusal_under_a_deployment_is_one_error_line_and_a_failed_run(tmp_path):
    """A deployment run of the backup flow into a store that does not exist, run as a process
    worker runs it (``python -m prefect.engine <flow run id>``, the deployment's code loaded by
    its entrypoint): the run is Failed with the refusal's message, its logs hold one ERROR line
    (that message) and no traceback, not Prefect's "Engine execution exited with unexpected
    exception"; its facts name the deployment as a manual trigger."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.objects import StateType

    missing = tmp_path / "no-such-store"
    name = f"quiet-{uuid.uuid4().hex[:8]}"
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name("backup")
        dep = client.create_deployment(
            flow_id=flow_id, name=name, entrypoint="flows/backup.py:backup",
            pull_steps=[{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}],
        )
        run = client.create_flow_run_from_deployment(
            dep, parameters={"source": "zk://127.0.0.1:1", "store": str(missing), "name": "dc-quiet",
                             "encryption": False})
    env = {**os.environ, "PREFECT__FLOW_RUN_ID": str(run.id)}
    done = subprocess.run([sys.executable, "-m", "prefect.engine", str(run.id)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    with get_client(sync_client=True) as client:
        final = client.read_flow_run(run.id)
        assert final.state.type == StateType.FAILED, (final.state, done.stderr[-3000:])
        assert str(missing) in final.state.message and "Traceback" not in final.state.message
        deadline = time.monotonic() + 120  # the logs reach the API in batches: wait for the run's last one
        while True:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
            if any("Finished in state" in lg.message for lg in logs) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
    errors = [lg.message for lg in logs if lg.level >= 40]
    assert errors == [f"backup failed: {final.state.message}"], [lg.message for lg in logs]
    text = "\n".join(lg.message for lg in logs)
    assert "Traceback" not in text and "unexpected exception" not in text, text
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    facts = facts_of(arts)
    assert facts["outcome"] == "failed" and facts["error"] == final.state.message
    assert facts["trigger"] == {"kind": "manual", "by": f"backup/{name}", "deployment": f"backup/{name}"}
