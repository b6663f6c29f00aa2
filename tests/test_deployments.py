"""What deployments/ ships, checked without a server: the deployments' parameters name blocks
and never secrets or addresses, schemas are enforced, every deployment that reads archives
carries the key block that opens them, the schedules are what the issue asks for, and the
automations parse as Prefect automations with the triggers they promise.

Applying all of it to a real server (and re-applying it) and running it with real workers is
tests/test_orchestrator.py's job: one full setup serves both."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
SPEC = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
BY_NAME = {d["name"]: d for d in SPEC["deployments"]}
#: Flows that read archives, so their deployments need the identities to open them.
READERS = ("flows/verify.py", "flows/restore.py", "flows/failover.py", "flows/prune.py", "flows/rehearse.py")


def test_every_deployment_names_blocks_and_enforces_its_schema():
    for name, d in BY_NAME.items():
        assert d.get("enforce_parameter_schema") is True, name
        assert d["work_pool"]["name"] == "burrow", name
        assert (REPO / d["entrypoint"].split(":")[0]).is_file(), d["entrypoint"]
        text = repr(d.get("parameters", {})).lower()
        for word in ("password", "token", "secret", "://", "identity", "passphrase"):
            assert word not in text, (name, word)
        if d["entrypoint"].split(":")[0] in READERS:
            assert d["parameters"].get("key_block") == "burrow-restore-keys", name


def test_the_schedules_and_on_demand_deployments_the_issue_asks_for():
    backups = {n: d for n, d in BY_NAME.items() if d["entrypoint"] == "flows/backup.py:backup"}
    assert len(backups) >= 4
    for name, d in backups.items():  # a scheduled backup per cluster, to the public keys only
        assert d["schedules"] and d["schedules"][0]["active"], name
        assert d["parameters"]["key_block"] == "burrow-backup-keys"
        assert d["parameters"]["name"] == d["parameters"]["source"]  # one name: manifests, events, lock
    crons = [d["schedules"][0]["cron"] for d in backups.values()]
    assert len(set(crons)) == len(crons)  # offset from each other
    daily = [n for n, d in BY_NAME.items() if d["entrypoint"].startswith(("flows/rehearse.py", "flows/prune.py"))]
    assert any(n.startswith("rehearse-") for n in daily) and "prune" in daily
    for name in daily:
        minute, hour, *rest = BY_NAME[name]["schedules"][0]["cron"].split()
        assert rest == ["*", "*", "*"] and hour.isdigit() and minute.isdigit(), name
    assert {"store", "keep_daily", "keep_weekly", "keep_monthly"} <= set(BY_NAME["prune"]["parameters"])
    fo = BY_NAME["failover"]
    assert "schedules" not in fo
    assert fo["concurrency_limit"] == {"limit": 1, "collision_strategy": "CANCEL_NEW"}
    assert "schedules" not in BY_NAME["verify"] and "schedules" not in BY_NAME["restore"]
    assert BY_NAME["restore"]["parameters"] == {"dry_run": True, "key_block": "burrow-restore-keys"}
    assert BY_NAME["backup-fleet"]["entrypoint"] == "flows/fleet.py:backup_fleet"
    # every cluster a backup names gets its per-cluster limit from setup.py
    sys.path.insert(0, str(REPO / "deployments"))
    from setup import clusters_of

    assert set(d["parameters"]["name"] for d in backups.values()) <= set(clusters_of(SPEC, []))
    assert "extra" in clusters_of(SPEC, ["extra"])


def test_the_automations_parse_and_watch_what_they_promise():
    sys.path.insert(0, str(REPO / "deployments"))
    from setup import automations_of

    autos = {a.name: a for a in automations_of(REPO / "deployments" / "automations.yaml",
                                               "00000000-0000-0000-0000-000000000001")}
    failed = autos["burrow-run-failed"].trigger
    assert {"burrow.backup.failed", "burrow.failover.failed"} <= set(failed.expect)
    assert failed.posture.value == "Reactive"
    assert set(autos["burrow-rehearsal-failed"].trigger.expect) == {"burrow.rehearsal.failed"}
    missing = autos["burrow-backup-missing"].trigger
    assert missing.posture.value == "Proactive" and set(missing.for_each) == {"prefect.resource.id"}
    assert missing.within.total_seconds() == 26 * 3600 and set(missing.expect) == {"burrow.backup.completed"}
    assert missing.match.get("prefect.resource.id") == ["burrow.source.*"]
    for a in autos.values():
        assert [str(x.block_document_id) for x in a.actions] == ["00000000-0000-0000-0000-000000000001"]


def test_setup_refuses_an_unknown_deployment_name():
    proc = subprocess.run(
        [sys.executable, "deployments/setup.py", "--only", "no-such-deployment"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert "no deployment named no-such-deployment" in proc.stderr
