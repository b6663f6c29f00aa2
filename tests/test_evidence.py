"""The evidence report (issue 18 item 7, docs/EVIDENCE.md).

A small real history, made by real flow runs against the session's Prefect server and real
ZooKeeper servers (four backups, one failing backup, a paused schedule, a passing and a failing
rehearsal, an archive deleted outside prune, a prune, a restore and the full verify of the newest
archive), is read back by the evidence flow, and every number of its report is checked against
what the test counts itself from the runs, the store's files and the schedule. The chain of
reports in a store is then tampered with, one way at a time: a removed, an edited and a foreign
report are each found, with exit code 6."""

from __future__ import annotations

import json
import math
import shutil
import socket
import time
import uuid
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from zkutil import kazoo, snapshot, unique_root

from blocks.local import LocalStore
from burrow import evidence as ev
from burrow.archive import ArchiveReader
from burrow.crypto import ArchiveKeys
from burrow.errors import EXIT_EVIDENCE, BurrowError
from burrow.keys import keygen
from flows.backup import backup
from flows.evidence import evidence
from flows.prune import prune
from flows.rehearse import rehearse
from flows.restore import restore
from flows.verify_newest import verify_newest

REPO = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((REPO / "docs" / "evidence.schema.json").read_text())
SECRET = b"evidence-canary-value-9f3a"


def t(text: str | None) -> datetime | None:
    return ev.parse_time(text)


def flip_body_byte(path: Path) -> None:
    with open(path, "rb") as f:
        reader = ArchiveReader(f)
        at = reader.body_start + reader.body_length // 2
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def paused_backup_deployment(source: str, interval_s: float) -> tuple[str, datetime, datetime]:
    """A deployment of the backup flow for ``source`` whose one interval schedule is paused: it
    makes no run, so every slot it would have had is missed. Returns its id, its anchor date and
    the time from which its slots are due (the later of its and its schedule's creation)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentScheduleCreate
    from prefect.client.schemas.schedules import IntervalSchedule

    anchor = datetime(2026, 1, 1, tzinfo=UTC)
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name("backup")
        dep_id = client.create_deployment(
            flow_id=flow_id, name=f"backup-{source}", parameters={"source": source, "name": source, "store": "x"},
            schedules=[DeploymentScheduleCreate(schedule=IntervalSchedule(interval=timedelta(seconds=interval_s),
                                                                          anchor_date=anchor), active=False)],
        )
        dep = client.read_deployment(dep_id)
        (sched,) = client.read_deployment_schedules(dep_id)
    due_from = max(std(dep.created), std(sched.created))
    return str(dep_id), anchor, due_from


def std(when: Any) -> datetime:
    """A stdlib UTC datetime of what Prefect's client returns (pendulum's)."""
    return datetime.fromisoformat(when.isoformat()).astimezone(UTC)


def interval_slots(anchor: datetime, interval_s: float, start: datetime, end: datetime) -> list[datetime]:
    """Every ``anchor + k * interval`` in ``[start, end]``, counted here by arithmetic."""
    step = timedelta(seconds=interval_s)
    k = math.ceil((start - anchor) / step)
    out = []
    while anchor + k * step <= end:
        out.append(anchor + k * step)
        k += 1
    return [s for s in out if s >= start]


def flow_runs(flow: str, since: datetime) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterExpectedStartTime,
    )

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[flow])),
            flow_run_filter=FlowRunFilter(expected_start_time=FlowRunFilterExpectedStartTime(after_=since)),
            limit=200,
        )


@pytest.fixture(scope="module")
def history(zk_a, zk_b, tmp_path_factory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("evidence")
    store = tmp / "store"
    store.mkdir()
    since = datetime.now(UTC) - timedelta(seconds=1)
    src = f"ev-{uuid.uuid4().hex[:8]}"
    ident = tmp / "id.key"
    keyfacts = keygen(ident, x25519=True)
    pub = str(ident) + ".pub"
    root = unique_root()
    with kazoo(zk_a.url) as c:
        c.create(root + "/cfg/a", b"1", makepath=True)
        c.create(root + "/cfg/secret", SECRET)
        c.create(root + "/cfg/secret/deep", b"")
        expected = snapshot(c, root)
    controls = tmp / "controls.toml"
    text = (REPO / "burrow" / "controls.toml").read_text()
    controls.write_text(text.replace("slot_tolerance_s = 300", "slot_tolerance_s = 1")
                        .replace("default = 7200", "default = 86400"))
    interval_s = 2.0
    dep_id, anchor, due_from = paused_backup_deployment(src, interval_s)

    made = [backup(source=f"zk://{zk_a.url}", store=str(store), name=src, root=root, recipients=[pub])
            for _ in range(4)]
    with pytest.raises(BurrowError):  # a backup that fails: its store does not exist
        backup(source=f"zk://{zk_a.url}", store=str(tmp / "no-such-store"), name=src, root=root, recipients=[pub])
    files = [Path(m["url"].removeprefix("file://")) for m in made]
    names = [f.relative_to(store).as_posix() for f in files]
    created = []
    for f in files:  # each archive's signed creation time, read before some of them go
        with open(f, "rb") as fh:
            created.append(t(ArchiveReader(fh).manifest["created"]))

    top = f"/burrow-ev-{uuid.uuid4().hex[:8]}"
    passed = rehearse(store=str(store), source=src, scratch=f"zk://{zk_b.url}{top}/r1", identity_files=[str(ident)])
    flip_body_byte(files[1])  # the second archive's body is damaged: its rehearsal fails
    with pytest.raises(BurrowError):
        rehearse(store=str(store), source=src, scratch=f"zk://{zk_b.url}{top}/r2", archive=made[1]["url"],
                 identity_files=[str(ident)])
    files[0].unlink()  # the first archive goes, but not by prune
    pruned = prune(store=str(store), keep_last=1, identity_files=[str(ident)])
    restored = restore(archive=made[3]["url"], into=f"zk://{zk_b.url}{top}/restored", identity_files=[str(ident)])
    verified = verify_newest(store=str(store), sources=[src], identity_files=[str(ident)])
    # the paused schedule's slots are what the report counts as missed: a fast machine gets here
    # within a few seconds, so the report waits for the clock to pass three of them (at most a few
    # 2 s intervals more; the flows above are not what is waited on)
    while len(interval_slots(anchor, interval_s, max(since, due_from), datetime.now(UTC) - timedelta(seconds=1))) < 3:
        time.sleep(0.2)
    rep = evidence(since=ev.utc_text(since), sources=[src], store=str(store), controls=str(controls),
                   identity_files=[str(ident)])
    return dict(store=store, src=src, controls=controls, ident=ident, keyfacts=keyfacts, made=made, names=names, passed=passed,
                pruned=pruned, restored=restored, verified=verified, report=rep, since=since, dep_id=dep_id,
                anchor=anchor, due_from=due_from, interval_s=interval_s, expected=expected, root=root,
                created=created)


def source_of(h: dict[str, Any]) -> dict[str, Any]:
    (s,) = h["report"]["sources"]
    assert s["name"] == h["src"]
    return s


def test_backups_missed_slots_and_rpo_are_counted_exactly(history):
    h, rep = history, history["report"]
    s = source_of(h)
    b = s["backups"]
    runs = [r for r in flow_runs("backup", h["since"])
            if (r.parameters or {}).get("name") == h["src"] and r.deployment_id is None]
    states = [r.state_type.value for r in runs]
    assert len(runs) == 5 and states.count("COMPLETED") == 4 and states.count("FAILED") == 1
    # the paused schedule's slots, from the later of its creation and the period's start to the
    # period's end (or the report's time less the tolerance): every one missed
    end = min(t(rep["period"]["until"]), t(rep["generated_at"]) - timedelta(seconds=1))
    slots = interval_slots(h["anchor"], h["interval_s"], max(h["since"], h["due_from"]), end)
    assert len(slots) >= 3
    assert (b["scheduled"], b["runs"], b["started"], b["completed"], b["failed"], b["crashed"], b["cancelled"],
            b["other"], b["missed"]) == (len(slots), 5, 5, 4, 1, 0, 0, 0, len(slots))
    assert b["missed_slots"] == [ev.utc_text(x) for x in slots]
    assert sum(1 for r in b["rows"] if r["kind"] == "missed") == len(slots)
    failed_row = next(r for r in b["rows"] if r["state"] == "FAILED")
    assert failed_row["status"] == "fail" and "does not exist" in failed_row["reason"]
    assert failed_row["flow_run_id"] in {str(r.id) for r in runs}
    assert failed_row["ui_url"].endswith(f"/runs/flow-run/{failed_row['flow_run_id']}")
    assert failed_row["trigger"]["kind"] == "cli"
    assert failed_row["trigger"]["by"].endswith("@" + socket.gethostname())
    (dep,) = s["deployments"]
    assert dep["id"] == h["dep_id"] and dep["schedules"] == [
        {"kind": "interval", "spec": "2s", "timezone": dep["schedules"][0]["timezone"], "active": False}]

    # RPO: the largest time without a backup, from each archive's signed creation time (the runs'
    # facts keep it for the archives gone from the store). No backup of this source came before
    # the period: the wait for the first one is the lead, not a gap.
    points = h["created"]
    until = t(rep["period"]["until"])
    gaps = [(points[i + 1] - points[i]).total_seconds() for i in range(3)] + [(until - points[3]).total_seconds()]
    r = s["rpo"]
    assert r["achieved_s"] == round(max(gaps), 3)
    assert r["lead_s"] == round((points[0] - rep_since(rep)).total_seconds(), 3)
    worst = max(range(4), key=lambda i: gaps[i])
    assert r["worst_gap"] == {"from": ev.utc_text(points[worst]),
                              "to": ev.utc_text(points[worst + 1] if worst < 3 else until)}
    assert r["successful_backups"] == 4 and r["target_s"] == 86400 and r["status"] == "pass"
    assert s["checks"]["backup-schedule"]["status"] == "fail"
    assert s["checks"]["rpo"]["status"] == "pass"


def rep_since(rep: dict[str, Any]) -> datetime:
    return t(rep["period"]["since"])


def test_archives_show_encryption_verification_and_what_became_of_each(history):
    h = history
    s = source_of(h)
    by_name = {a["name"]: a for a in s["archives"]}
    assert [a["name"] for a in s["archives"]] == h["names"]  # oldest first
    assert [t(a["created"]) for a in s["archives"]] == h["created"]
    first, second, third, newest = (by_name[n] for n in h["names"])
    assert first["state"] == "deleted-outside-prune" and first["status"] == "fail"
    assert first["reason"] == "deleted outside prune" and first["deleted_by"] is None
    prune_runs = [r for r in flow_runs("prune", h["since"]) if (r.parameters or {}).get("store") == str(h["store"])]
    (prune_run,) = prune_runs
    for a, made in ((second, h["made"][1]), (third, h["made"][2])):
        assert a["state"] == "deleted-by-prune"
        assert a["deleted_by"]["flow_run_id"] == str(prune_run.id)
        assert a["deleted_by"]["rule"] == h["pruned"]["deleted_because"][made["url"]]
        assert a["checks"]["archive-integrity"] == "n/a"
    assert h["pruned"]["deleted"] == 2
    assert newest["state"] == "present" and newest["status"] == "pass"
    assert newest["encryption"]["mode"] == h["made"][3]["encryption"]
    assert newest["encryption"]["fingerprints"] == h["made"][3]["key_fingerprints"]
    assert h["keyfacts"]["fingerprint"] in newest["encryption"]["fingerprints"]
    # written by a public-key backup (structure-only), then fully verified by verify-newest
    assert h["made"][3]["verified"] == "structure-only"
    assert h["verified"]["verified"] == 1
    assert (h["store"] / (h["names"][3] + ".verified-full.burrow-meta")).exists()
    assert newest["verification"] == "full"
    (signed,) = sorted((h["store"] / h["names"][3]).parent.glob(Path(h["names"][3]).name + ".verified-full-*"))
    assert newest["full_verified_at"] == json.loads(signed.read_bytes())["at"]
    assert newest["object_lock"] is None  # a local store has no Object Lock
    assert newest["keys"] == len(h["expected"]) and newest["backup_flow_run_id"]
    integrity = s["checks"]["archive-integrity"]
    assert integrity["status"] == "fail" and h["names"][0] in integrity["reason"]
    assert s["checks"]["archive-encrypted"]["status"] == "pass"


def test_rehearsals_and_recoveries_with_their_times_and_triggers(history):
    h = history
    s = source_of(h)
    good, bad = s["rehearsals"]
    marker_file = h["store"] / h["passed"]["marker"]
    marker = json.loads(marker_file.read_bytes())
    assert good["result"] == "passed" and good["status"] == "pass"
    assert good["restore_s"] == marker["restore_s"] and good["marker_authenticated"] is True
    assert good["within_rto"] is True and good["rto_target_s"] == 900
    assert good["archive"] == h["made"][3]["url"]
    assert bad["result"] == "failed" and bad["status"] == "fail" and "failed authentication" in bad["reason"]
    assert bad["archive"] == h["made"][1]["url"]
    assert s["checks"]["rehearsal"]["status"] == "pass"

    (rec,) = s["recoveries"]
    assert rec["kind"] == "restore" and rec["outcome"] == "completed" and rec["status"] == "pass"
    assert rec["created"] == h["restored"]["created"] == len(h["expected"]) and rec["conflicts"] == 0
    assert rec["trigger"]["kind"] == "cli" and rec["trigger"]["by"].endswith("@" + socket.gethostname())
    assert rec["approver"] is None and rec["rto_s"] == h["restored"]["duration_s"]
    run = next(r for r in flow_runs("restore", h["since"]) if str(r.id) == rec["flow_run_id"])
    assert rec["rpo_s"] == round((std(run.start_time) - h["created"][3]).total_seconds(), 3)  # the archive's age
    assert s["checks"]["recovery"]["status"] == "pass"


def test_controls_follow_the_checks_and_the_json_matches_its_schema(history):
    rep = history["report"]
    jsonschema.validate(rep, SCHEMA)
    s = source_of(history)
    conf = ev.load_controls()
    assert [c["id"] for c in rep["controls"]] == [c.id for c in conf.controls]
    for c in rep["controls"]:
        checks = [s["checks"][ch]["status"] for ch in c["checks"]]
        want = "fail" if "fail" in checks else ("pass" if "pass" in checks else "n/a")
        assert c["status"] == s["controls"][c["id"]] == want
        assert c["failing_sources"] == ([s["name"]] if want == "fail" else [])
    assert s["controls"]["SOC2-A1.2"] == "fail"  # a missed slot, a failed backup, an archive deleted outside prune
    assert s["controls"]["SOC2-A1.3"] == "pass"  # a passing rehearsal within 7 days, the restore within its RTO
    # every row names the controls its checks feed
    backup_row = s["backups"]["rows"][0]
    assert backup_row["controls"] == ["SOC2-A1.2", "ISO27001-A.8.13", "NIST-CP-9"]
    assert s["rehearsals"][0]["controls"] == ["SOC2-A1.3", "ISO27001-A.8.13", "NIST-CP-9(1)", "NIST-CP-4",
                                              "PCI-DSS-12.10.2"]
    text = json.dumps(rep)
    assert SECRET.decode() not in text and str(history["ident"]) not in text and history["root"] not in text


def test_the_report_is_an_artifact_and_the_first_link_of_the_store_chain(history, capsys):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    rep = history["report"]
    label = rep["period"]["label"]
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"evidence-{label}"])))
    mine = [a for a in arts if history["src"] in str(a.data)]
    assert mine and mine[-1].type == "markdown" and mine[-1].description == ev.headline(rep)
    assert "{'" not in mine[-1].data and "['" not in mine[-1].data
    chain = rep["chain"]
    assert chain["seq"] == 1 and chain["previous"] is None
    store = history["store"]
    stored = json.loads((store / chain["json"]).read_bytes())
    assert stored == rep
    record = json.loads((store / chain["record"]).read_bytes())
    assert record["seq"] == 1 and record["json"]["sha256"] == ev.sha256((store / chain["json"]).read_bytes())
    assert record["html"]["sha256"] == ev.sha256((store / chain["html"]).read_bytes())
    code, out, err = run_main(capsys, "evidence", "verify", str(store), "--identity", str(history["ident"]))
    assert code == 0, (out, err)
    assert "1 reports in the chain; the newest is report 1" in out


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.open: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag not in ("meta", "br", "link", "img", "input"):
            self.open.append(tag)

    def handle_endtag(self, tag: str) -> None:
        assert self.open and self.open[-1] == tag, (tag, self.open[-5:])
        self.open.pop()


def test_the_html_report_is_self_contained_parses_and_prints(history):
    html_text = (history["store"] / history["report"]["chain"]["html"]).read_text()
    p = _Collect()
    p.feed(html_text)
    p.close()
    assert not p.open  # every element closed, in order
    tags = [tag for tag, _ in p.tags]
    assert "script" not in tags and "link" not in tags and "img" not in tags and "iframe" not in tags
    assert all("src" not in attrs for _, attrs in p.tags)
    for tag, attrs in p.tags:  # the only URLs are links to the Prefect UI, never assets
        if "href" in attrs:
            assert tag == "a" and attrs["href"].startswith(history["report"]["prefect"]["ui_url"])
    assert "url(" not in html_text and "@import" not in html_text
    assert "@media print" in html_text and "table-header-group" in html_text
    assert history["src"] in html_text and SECRET.decode() not in html_text


def test_the_cli_without_a_store_reports_from_history_alone(history, cli, tmp_path):
    h = history
    page = tmp_path / "report.html"
    r = cli("evidence", "--since", ev.utc_text(h["since"]), "--source", h["src"], "--controls", str(h["controls"]),
            "--json", "--html", str(page))
    assert r.code == 0, r
    rep = json.loads(r.out)  # stdout: one JSON object, nothing else
    rep.pop("command"), rep.pop("exit_code")
    jsonschema.validate(rep, SCHEMA)
    assert rep["store"] is None and rep["chain"] is None
    (s,) = rep["sources"]
    b = s["backups"]
    assert (b["runs"], b["started"], b["completed"], b["failed"]) == (5, 5, 4, 1)
    # without the store, what became of each archive is unknown: never claimed present or deleted
    assert [a["name"] for a in s["archives"]] == h["names"]
    assert {a["state"] for a in s["archives"]} == {"unknown"}
    assert s["checks"]["archive-integrity"]["status"] == "n/a"
    assert [x["result"] for x in s["rehearsals"]] == ["passed", "failed"]
    assert [x["marker_authenticated"] for x in s["rehearsals"]] == [None, None]
    assert page.read_text().startswith("<!DOCTYPE html>") and h["src"] in page.read_text()
    assert SECRET.decode() not in r.out + r.err + page.read_text()
    # for a person: the headline, one line per control, one line per source
    r = cli("evidence", "--since", ev.utc_text(h["since"]), "--source", h["src"], "--controls", str(h["controls"]))
    assert r.code == 0, r
    lines = r.out.splitlines()
    assert lines[0].startswith("evidence for ") and " 1 source, " in lines[0]
    assert [ln.split()[1] for ln in lines[1:8]] == [c["id"] for c in rep["controls"]]
    assert lines[8].startswith(f"{h['src']}: 4/") and "1 failed, 0 crashed" in lines[8]


# ------------------------------------------------------------------------------ the chain


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    from cli import main

    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as exc:
        code = int(exc.code)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def small_report(label_day: int) -> dict[str, Any]:
    since = datetime(2026, 11, label_day, tzinfo=UTC)
    period = ev.Period(since, since + timedelta(days=1), ev.period_label(since, since + timedelta(days=1)))
    return ev.build_report(period=period, controls=ev.load_controls(), runs=[], deployments=[], store=None,
                           generated_at=period.until, sources=["dc-x"])


@pytest.fixture
def chained(tmp_path) -> tuple[Path, Path, list[dict[str, Any]]]:
    from tasks.evidence import write_report

    key = tmp_path / "k.key"
    keygen(key, x25519=False)
    store = tmp_path / "store"
    store.mkdir()
    st = LocalStore(path=str(store))
    keys = ArchiveKeys(_keyring(key))
    reps = [write_report(st, keys, small_report(d)) for d in (1, 2, 3)]
    return store, key, reps


def _keyring_identity(ident: Path) -> Any:
    from blocks.keys import archive_keys

    return archive_keys(identity_files=[str(ident)]).keyring


def _keyring(key: Path) -> Any:
    from blocks.keys import archive_keys

    return archive_keys(key_files=[str(key)]).keyring


def verify_cli(capsys, store: Path, key: Path) -> tuple[int, str, str]:
    return run_main(capsys, "evidence", "verify", str(store), "--key-file", str(key))


def test_an_intact_chain_verifies(chained, capsys, cli):
    store, key, links = chained
    # the evidence outlives Prefect's history: checking it needs the store and the key, no orchestrator
    r = cli("evidence", "verify", str(store), "--key-file", str(key), env={"PREFECT_API_URL": "http://127.0.0.1:9/api"})
    assert r.code == 0 and "3 reports in the chain" in r.out, r
    assert [c["seq"] for c in links] == [1, 2, 3]
    assert links[1]["previous"] == {"record": links[0]["record"],
                                    "sha256": ev.sha256((store / links[0]["record"]).read_bytes())}
    code, out, err = verify_cli(capsys, store, key)
    assert code == 0, (out, err)
    newest = ev.sha256((store / links[2]["record"]).read_bytes())
    assert f"3 reports in the chain; the newest is report 3 ({links[2]['record']}, sha256 {newest})" in out
    code, out, _ = run_main(capsys, "evidence", "verify", str(store), "--key-file", str(key), "--json")
    result = json.loads(out)
    assert code == 0 and result["ok"] is True and result["reports"] == 3 and result["findings"] == []


def test_a_removed_report_is_found(chained, capsys):
    store, key, links = chained
    for part in ("record", "json", "html"):
        (store / links[1][part]).unlink()
    code, out, err = verify_cli(capsys, store, key)
    assert code == EXIT_EVIDENCE == 6
    assert "removed  report 2 is missing from the chain" in out
    assert "burrow: error: the evidence chain of" in err and "report 2 is missing" in err

    (store / links[0]["html"]).unlink()  # and a report's HTML alone
    code, out, _ = verify_cli(capsys, store, key)
    assert code == 6 and f"removed  report 1's HTML ({links[0]['html']}) is not in the store" in out


def test_an_edited_report_is_found(chained, capsys, tmp_path):
    store, key, links = chained
    path = store / links[1]["json"]
    doc = json.loads(path.read_bytes())
    doc["controls"][0]["status"] = "pass"  # a failing control made to pass
    path.write_bytes(ev.to_json(doc))
    code, out, _ = verify_cli(capsys, store, key)
    assert code == 6
    assert f"edited   report 2's JSON ({links[1]['json']}) is not what its record signed (edited)" in out

    other = tmp_path / "second"
    shutil.copytree(store, other)
    (other / links[1]["json"]).write_bytes((store / links[1]["json"]).read_bytes())
    rec_path = other / links[0]["record"]
    rec = json.loads(rec_path.read_bytes())
    rec["period"]["label"] = "2026-10"  # the record itself, its MAC left as it was
    rec_path.write_bytes(json.dumps(rec).encode())
    code, out, _ = verify_cli(capsys, other, key)
    assert code == 6 and "its MAC does not match" in out and "edited   report 1" in out


def test_a_foreign_report_is_found(chained, capsys, tmp_path):
    from tasks.evidence import write_report

    store, key, links = chained
    intruder = tmp_path / "intruder.key"
    keygen(intruder, x25519=False)
    st = LocalStore(path=str(store))
    planted = write_report(st, ArchiveKeys(_keyring(intruder)), small_report(4))
    code, out, _ = verify_cli(capsys, store, key)
    assert code == 6
    assert f"foreign  report 1 ({planted['record']}): it was signed by reader key" in out
    assert "which is not configured here" in out

    # a genuine report of another store (same key), copied in under its own name
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    st2 = LocalStore(path=str(elsewhere))
    copied = write_report(st2, ArchiveKeys(_keyring(key)), small_report(5))
    third = tmp_path / "third"
    shutil.copytree(store, third, ignore=shutil.ignore_patterns(Path(planted["record"]).name.replace(
        ".record.burrow-meta", "*")))
    for part in ("record", "json", "html"):
        shutil.copy(elsewhere / copied[part], third / copied[part])
    code, out, _ = verify_cli(capsys, third, key)
    assert code == 6 and "was written to another store" in out and "foreign" in out


def test_on_s3_the_reports_are_under_object_lock_and_the_chain_verifies(moto, tmp_path):
    from test_stores import minio_store, new_bucket, raw_client

    from tasks.evidence import check_store_chain, write_report

    key = tmp_path / "k.key"
    keygen(key, x25519=False)
    keys = ArchiveKeys(_keyring(key))
    bucket = new_bucket(moto, lock=True)
    store = minio_store(moto, bucket, prefix="ev", object_lock_mode="GOVERNANCE", retain_days=3)
    links = [write_report(store, keys, small_report(d)) for d in (1, 2)]
    check = check_store_chain(store, keys)
    assert check.ok and [r[2]["seq"] for r in check.records] == [1, 2], check.to_dict()
    c = raw_client(moto)
    for link in links:
        for part in ("record", "json", "html"):
            head = c.head_object(Bucket=bucket, Key=f"ev/{link[part]}")
            assert head["ObjectLockMode"] == "GOVERNANCE"
            assert head["ObjectLockRetainUntilDate"] > datetime.now(UTC) + timedelta(days=2)
            with pytest.raises(Exception, match="AccessDenied"):  # not even version by version
                c.delete_object(Bucket=bucket, Key=f"ev/{link[part]}", VersionId=head["VersionId"])
    # the store describes itself as the records name it; the report says where it was chained
    assert json.loads(store.get_sidecar(links[1]["record"]))["store"] == store.describe()


def test_runs_without_facts_are_counted_from_their_state_and_slots_match_within_the_tolerance():
    """A run that crashed before publishing its facts still counts (by its state and the
    parameter that names its source); a slot counts as run when a run for it started within the
    tolerance, and the RPO window before the period's first backup counts from the last backup
    before the period."""
    since = datetime(2026, 11, 1, tzinfo=UTC)
    period = ev.Period(since, since + timedelta(hours=6), "2026-11-01-2026-11-01")
    hour = timedelta(hours=1)
    slots = [since + i * hour for i in range(6)]

    def run(i: int, state: str, *, late_s: float = 0, facts: bool = True) -> ev.HistoryRun:
        at = slots[i]
        url = f"file:///s/dc-x/dc-x-{i}.burrow"
        return ev.HistoryRun(
            id=f"r{i}", name=f"backup-{i}", flow="backup", state=state, expected_start=at + timedelta(seconds=late_s),
            start=at + timedelta(seconds=late_s + 1), end=at + timedelta(seconds=late_s + 30), deployment="backup/b",
            deployment_id="d", parameters={"name": "dc-x", "source": "dc-x"},
            facts={"source": "dc-x", "url": url, "archive_created": ev.utc_text(at + timedelta(seconds=20))}
            if facts else None,
        )

    runs = [run(0, "COMPLETED"), run(1, "CRASHED", facts=False), run(2, "COMPLETED", late_s=200),
            run(4, "COMPLETED", late_s=400), run(5, "FAILED", facts=False)]
    dep = ev.HistoryDeployment(id="d", name="backup/b", flow="backup", source="dc-x", schedules=[
        ev.HistorySchedule(kind="cron", spec="0 * * * *", timezone="UTC", active=False, slots=slots)])
    before = since - timedelta(hours=3)  # the last backup before the period, still in the store
    store = ev.StoreView(describe="file:///s", rows=[{
        "name": "dc-x/dc-x-old.burrow", "url": "file:///s/dc-x/dc-x-old.burrow", "source": "dc-x",
        "created": ev.utc_text(before), "encrypted": True, "encryption_mode": "symmetric", "fingerprints": ["f"],
        "verification": "full", "object_lock": None, "distrust": None, "keys": 1, "size": 10}])
    rep = ev.build_report(period=period, controls=ev.load_controls(), runs=runs, deployments=[dep], store=store,
                          generated_at=period.until + hour)
    jsonschema.validate(rep, SCHEMA)
    (s,) = rep["sources"]
    b = s["backups"]
    assert (b["scheduled"], b["runs"], b["started"], b["completed"], b["failed"], b["crashed"], b["missed"]) == (
        6, 5, 5, 3, 1, 1, 2)
    # slot 3 had no run; slot 4's run started 400 s after it, beyond the 300 s tolerance
    assert b["missed_slots"] == [ev.utc_text(slots[3]), ev.utc_text(slots[4])]
    crashed = next(r for r in b["rows"] if r["state"] == "CRASHED")
    assert crashed["facts"] is False and crashed["status"] == "fail" and crashed["reason"] == "the backup crashed"
    # RPO: from the backup 3 h before the period to its first one (3 h 20 s), then 2 h, 2 h, and
    # 1 h 59 min 40 s to the period's end: the first window is the worst
    points = [before] + [slots[i] + timedelta(seconds=20) for i in (0, 2, 4)]
    assert s["rpo"]["achieved_s"] == (points[1] - points[0]).total_seconds() == 3 * 3600 + 20
    assert s["rpo"]["lead_s"] is None and s["rpo"]["successful_backups"] == 3
    assert s["rpo"]["worst_gap"] == {"from": ev.utc_text(before), "to": ev.utc_text(points[1])}
    assert s["rpo"]["status"] == "fail"  # above the 2 h default target
    # the archives the runs made that the store does not hold were deleted outside prune
    gone = [a for a in s["archives"] if a["state"] == "deleted-outside-prune"]
    assert [a["name"] for a in gone] == ["dc-x/dc-x-0.burrow", "dc-x/dc-x-2.burrow", "dc-x/dc-x-4.burrow"]


def test_verify_newest_fails_a_damaged_archive_and_records_nothing_for_it(zk_a, store, tmp_path):
    ident = tmp_path / "id.key"
    keygen(ident, x25519=True)
    root = unique_root()
    with kazoo(zk_a.url) as c:
        c.create(root + "/a", b"1", makepath=True)
    src = f"ev-{uuid.uuid4().hex[:8]}"
    made = backup(source=f"zk://{zk_a.url}", store=str(store), name=src, root=root, recipients=[str(ident) + ".pub"])
    assert made["verified"] == "structure-only"
    path = Path(made["url"].removeprefix("file://"))
    flip_body_byte(path)
    with pytest.raises(BurrowError, match="did not verify"):
        verify_newest(store=str(store), identity_files=[str(ident)])
    assert not Path(str(path) + ".verified-full.burrow-meta").exists()
    assert Path(str(path) + ".verified-structure-only.burrow-meta").exists()
    assert path.exists()  # a failed verify deletes nothing: that is prune's


def test_the_evidence_and_verify_newest_flows_refuse_credentials_in_their_parameters():
    from burrow.errors import UsageError

    for flow in (evidence, verify_newest):
        with pytest.raises(UsageError) as err:
            flow(store="s3://AKIA:CANARY-secret@127.0.0.1:1/bucket")
        assert "CANARY" not in str(err.value) and "store" in str(err.value)


def test_only_a_signed_full_verify_bound_to_its_archive_counts(history, tmp_path):
    """The plain verification record is a hint anyone who can write to the store could leave; the
    evidence counts a full verify only when its record is signed with the read key, names the
    archive and its manifest, and its file name's time is its signed time."""
    from tasks.evidence import read_store, record_full_verification

    h = history
    copy = tmp_path / "store"
    shutil.copytree(h["store"], copy)
    st = LocalStore(path=str(copy))
    keys = ArchiveKeys(_keyring_identity(h["ident"]))
    newest = h["names"][3]
    (genuine,) = sorted((copy / newest).parent.glob(Path(newest).name + ".verified-full-*"))
    at = json.loads(genuine.read_bytes())["at"]
    # a newer-looking copy (renamed), and a record signed by another key, both ignored
    shutil.copy(genuine, genuine.with_name(Path(newest).name + ".verified-full-20991231T000000000000Z.burrow-meta"))
    other = tmp_path / "other.key"
    keygen(other, x25519=False)
    record_full_verification(st, ArchiveKeys(_keyring(other)), newest, {"manifest_sha256": "x"},
                             at=datetime(2099, 1, 1, tzinfo=UTC))
    (row,) = [r for r in read_store(st, keys).rows if r["name"] == newest]
    assert row["full_verified_at"] == at
    genuine.unlink()
    for p in (copy / newest).parent.glob(Path(newest).name + ".verified-full-2099*"):
        p.unlink()
    (row,) = [r for r in read_store(st, keys).rows if r["name"] == newest]
    assert row["full_verified_at"] is None and row["verification"] == "full"  # the plain record alone: not counted


def test_slots_and_runs_as_prefect_hands_them_out_match():
    """Prefect's client gives pendulum DateTimes; with a stdlib UTC zone their arithmetic came
    back naive and matching a slot to its run failed (a TypeError, the whole report with it)."""
    import pendulum
    from prefect.client.schemas.objects import DeploymentSchedule

    from tasks.evidence import schedule_slots

    sched = DeploymentSchedule.model_validate({
        "id": str(uuid.uuid4()), "active": True,
        "schedule": {"interval": 40.0, "anchor_date": "2026-01-01T00:00:07Z", "timezone": "UTC"}})
    start = datetime(2026, 12, 4, 21, 6, 15, tzinfo=UTC)
    slots = schedule_slots(sched.schedule, start, start + timedelta(minutes=2))
    assert [ev.utc_text(s) for s in slots] == ["2026-12-04T21:06:47Z", "2026-12-04T21:07:27Z", "2026-12-04T21:08:07Z"]
    run = ev.HistoryRun(id="r", name="r", flow="backup", state="COMPLETED",
                        expected_start=pendulum.parse("2026-12-04T21:07:27Z"), start=pendulum.parse("2026-12-04T21:07:28Z"))
    missed, covered = ev.match_slots(ev.HistorySchedule("interval", "40s", "UTC", True, slots).slots, [run], 2)
    assert [ev.utc_text(s) for s in missed] == ["2026-12-04T21:06:47Z", "2026-12-04T21:08:07Z"] and covered == {"r"}


def test_a_missed_slot_never_borrows_its_neighbours_run():
    """Slots closer together than the tolerance: each scheduled run pairs with its own slot
    first, so the slot with no run is the one reported missed (not the next one, whose run a
    greedy nearest match would have taken)."""
    t0 = datetime(2026, 12, 1, tzinfo=UTC)
    slots = [t0 + timedelta(seconds=40 * i) for i in range(4)]

    def run(i: int) -> ev.HistoryRun:
        return ev.HistoryRun(id=f"r{i}", name=f"r{i}", flow="backup", state="COMPLETED",
                             expected_start=slots[i], start=slots[i] + timedelta(seconds=1))

    missed, covered = ev.match_slots(slots, [run(1), run(2), run(3)], 300)
    assert missed == [slots[0]] and covered == {"r1", "r2", "r3"}
    # a manual run near a slot with no scheduled run still covers it, within the tolerance
    late = ev.HistoryRun(id="m", name="m", flow="backup", state="COMPLETED",
                         expected_start=slots[0] + timedelta(seconds=90), start=slots[0] + timedelta(seconds=91))
    missed, covered = ev.match_slots(slots, [late, run(1), run(2), run(3)], 300)
    assert missed == [] and covered == {"m", "r1", "r2", "r3"}
