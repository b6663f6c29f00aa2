"""An encrypted backup never writes plaintext to disk, and its faults leave nothing behind
(issue 8: item 13 and the fault-matrix rows "source server killed mid-backup" and "scratch
disk full or file-size limit hit during backup").

* Staging holds only sealed spools (burrow/staging.py: a key that lives in memory only) and
  the encrypted archive; staging directories are 0700, files 0600, removed when the run
  ends, and leftovers of killed runs are swept at the next start.
* A source killed during the walk: the run fails, the store shows nothing, staging is gone,
  and what staging held at the moment of the kill was ciphertext.
* A write that hits the file-size limit (RLIMIT_FSIZE, with SIGXFSZ ignored so write()
  fails with EFBIG): exit 1 with one line naming the cause, nothing in the store, staging gone.
"""

from __future__ import annotations

import base64
import errno
import os
import resource
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from zkutil import kazoo, unique_root

from blocks.local import LocalStore
from blocks.resolve import register
from blocks.zookeeper import ZooKeeperCluster
from burrow.errors import BurrowError
from burrow.keys import keygen

ENV_VARS = ("BURROW_KEY_FILE", "BURROW_KEY", "BURROW_RECIPIENTS", "BURROW_PASSPHRASE_ENV", "BURROW_KEY_BLOCK",
            "BURROW_IDENTITY_FILE", "BURROW_KEYRING")
TAG = uuid.uuid4().hex[:10]
CANARY_VALUE = f"CANARY-VALUE-{TAG}".encode()
CANARY_KEY = f"canary-key-{TAG}"


def plaintext_in(data: bytes) -> list[str]:
    """Which canaries (a stored value, a key) ``data`` holds, raw or base64 (as a record line has it)."""
    found = []
    for name, secret in (("value", CANARY_VALUE), ("key", CANARY_KEY.encode())):
        # base64 of the secret at each of the three alignments it can have inside a longer value
        forms = [secret] + [base64.b64encode(b"x" * i + secret)[4:-4] for i in range(3)]
        if any(f in data for f in forms):
            found.append(name)
    return found


def seed(hosts: str, root: str, n: int, fanout: int = 100) -> None:
    """``n`` nodes below ``root`` in parents of ``fanout``, every value holding the canary."""
    value = CANARY_VALUE + b"-" + b"v" * 60
    with kazoo(hosts) as c:
        c.create(root, b"root", makepath=True)
        pending = []
        for start in range(0, n, 1000):
            t = c.transaction()
            for i in range(start, min(n, start + 1000)):
                if i % fanout == 0:
                    t.create(f"{root}/p{i // fanout:04d}", value)
                t.create(f"{root}/p{i // fanout:04d}/{CANARY_KEY}-{i % fanout:03d}", value)
            pending.append(t.commit_async())
            if len(pending) >= 16:
                assert not any(isinstance(r, Exception) for r in pending.pop(0).get())
        for p in pending:
            assert not any(isinstance(r, Exception) for r in p.get())


@pytest.fixture
def env(tmp_path, monkeypatch):
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    import blocks.resolve

    monkeypatch.setattr(blocks.resolve, "_registered", {})  # blocks registered here stay here
    staging = tmp_path / "staging"
    monkeypatch.setenv("BURROW_STAGING_DIR", str(staging))
    store = tmp_path / "store"
    store.mkdir()
    key = tmp_path / "k.key"
    keygen(key, x25519=False)
    return staging, store, key


def leftovers(staging: Path) -> list[str]:
    return sorted(str(p.relative_to(staging)) for p in staging.rglob("*")) if staging.exists() else []


def test_an_encrypted_backup_writes_no_plaintext_to_staging(zk_a, env, monkeypatch):
    import flows.backup as fb

    staging, store, key = env
    root = unique_root()
    seed(zk_a.url, root, 300)
    seen: dict[str, dict[str, tuple[int, list[str]]]] = {}

    def spy(stage, task):  # noqa: ANN001, ANN202
        def wrapped(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            # what every staging directory holds as the stage starts (the spool, the archive)
            seen[stage] = {
                str(p.relative_to(staging)): (p.stat().st_mode & 0o777, plaintext_in(p.read_bytes()))
                for p in staging.rglob("*") if p.is_file()
            }
            seen[stage + " dirs"] = {str(p): (p.stat().st_mode & 0o777, []) for p in staging.iterdir()}
            return task(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(fb, "compress", spy("compress", fb.compress))
    monkeypatch.setattr(fb, "upload", spy("upload", fb.upload))
    summary = fb.backup(source=f"zk://{zk_a.url}", store=str(store), root=root, key_file=str(key))
    assert summary["status"] == "ok" and summary["keys"] == 304 and summary["encrypted"]
    assert any(seen["compress"].values()) and any(seen["upload"].values()), seen
    leaks = {stage: {f: found for f, (_, found) in files.items() if found} for stage, files in seen.items()}
    assert not any(leaks.values()), f"plaintext in staging: {leaks}"
    modes = {f: oct(mode) for files in (seen["compress"], seen["upload"]) for f, (mode, _) in files.items()}
    assert set(modes.values()) == {"0o600"}, modes
    assert {oct(m) for m, _ in seen["compress dirs"].values()} == {"0o700"}, seen["compress dirs"]
    assert leftovers(staging) == []  # removed at the end of the run


def test_staging_is_private_removed_on_exit_and_old_leftovers_are_swept(tmp_path, monkeypatch):
    import fcntl

    from burrow.staging import LOCK_NAME, ScratchFull, scratch_writes, staging_dir

    base = tmp_path / "staging"
    base.mkdir()
    monkeypatch.setenv("BURROW_STAGING_DIR", str(base))
    two_days_ago = time.time() - 2 * 86400

    def leftover(name: str, *, locked: bool = False, old: bool = True) -> Path:
        d = base / name
        d.mkdir(mode=0o700)
        (d / "records.sealed").write_bytes(b"x" * 100)
        lock = d / LOCK_NAME
        lock.touch()
        if old:
            for p in (lock, d / "records.sealed", d):
                os.utime(p, (two_days_ago, two_days_ago))
        if locked:  # a run that is still alive holds the lock
            fd = os.open(lock, os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_EX)
            held.append(fd)
        return d

    held: list[int] = []
    dead = leftover("burrow-staging-dead1234")
    alive = leftover("burrow-staging-alive123", locked=True)
    recent = leftover("burrow-staging-recent12", old=False)
    foreign = base / "burrow-tests-not-ours"
    foreign.mkdir()
    os.utime(foreign, (two_days_ago, two_days_ago))
    try:
        with staging_dir() as work:
            assert work.parent == base and (work.stat().st_mode & 0o777) == 0o700
            assert not dead.exists(), "a leftover of a dead run older than a day is swept"
            assert alive.exists() and recent.exists() and foreign.exists()
            (work / "spool").write_bytes(b"y")
        assert not work.exists()
        with pytest.raises(RuntimeError), staging_dir() as work:
            raise RuntimeError("the run fails")
        assert not work.exists()
    finally:
        for fd in held:
            os.close(fd)
    with pytest.raises(ScratchFull, match="disk is full") as info:
        with scratch_writes("record spool", base):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert "\n" not in str(info.value)


def test_a_source_killed_mid_backup_fails_the_run_and_leaves_nothing(env, tmp_path, monkeypatch):
    import flows.backup as fb
    from burrow.testing.servers import start_zookeeper

    staging, store, key = env
    server = start_zookeeper(tmp_path / "zk-doomed", lean=True)
    try:
        root = "/doomed"
        seed(server.url, root, 40_000)
        ref = register(ZooKeeperCluster(hosts=[server.url], connect_timeout=2, session_timeout=4))
        monkeypatch.setattr(fb, "extract", fb.extract.with_options(retry_delay_seconds=0))  # keep the retries, not the waits
        at_kill: dict[str, list[str]] = {}

        def killer() -> None:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                files = [p for p in staging.rglob("*") if p.is_file() and p.stat().st_size > 0]
                if [p for p in files if not p.name.startswith(".")]:  # the walk is writing records
                    server.kill()
                    at_kill.update({str(p): plaintext_in(p.read_bytes()) for p in files if p.exists()})
                    return
                time.sleep(0.002)

        t = threading.Thread(target=killer, daemon=True)
        t.start()
        with pytest.raises(BurrowError) as info:
            fb.backup(source=ref, store=str(store), root=root, key_file=str(key))
        t.join(5)
        assert at_kill, "the walk was not caught writing"
        assert "\n" not in str(info.value), info.value
        assert list(store.rglob("*")) == [] and LocalStore(path=str(store)).list() == []
        assert leftovers(staging) == []
        assert not any(at_kill.values()), f"plaintext in staging when the source died: {at_kill}"
    finally:
        server.kill()


CHILD_PREEXEC_LIMIT = 256 * 1024


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so write() fails with EFBIG instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (CHILD_PREEXEC_LIMIT, CHILD_PREEXEC_LIMIT))


def test_a_file_size_limit_during_backup_fails_with_one_line_naming_the_cause(zk_a, env):
    staging, store, key = env
    root = unique_root()
    seed(zk_a.url, root, 3000)  # about 900 KB of records: the spool cannot stay under the limit
    burrow = str(Path(sys.executable).parent / "burrow")
    proc = subprocess.run(
        [burrow, "backup", f"zk://{zk_a.url}", "--to", str(store), "--root", root, "--key-file", str(key)],
        capture_output=True, text=True, timeout=180, env=os.environ.copy(), preexec_fn=_limit_file_size,
    )
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("burrow: error:")]
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
    assert len(errors) == 1 and "file-size limit" in errors[0] and "staging" in errors[0], proc.stderr[-3000:]
    assert list(store.rglob("*")) == []
    assert leftovers(staging) == []
