"""Running one benchmark phase in a child process, so that its peak RSS is its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def run_child(script: str, name: str, args: list[str], env: dict[str, str] | None = None) -> tuple[dict, float, float]:
    """Run ``script --phase NAME --result FILE ARGS...`` in a child process. The child writes
    its JSON result to FILE. Returns that result, the child's peak RSS in MiB and its CPU
    seconds (from os.wait4's rusage)."""
    fd, result = tempfile.mkstemp(prefix=f"bench-{name}-", suffix=".json")
    os.close(fd)
    try:
        cmd = [sys.executable, script, "--phase", name, "--result", result, *args]
        proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})})
        _, status, usage = os.wait4(proc.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            raise SystemExit(f"bench phase {name} failed with exit code {code}")
        data = json.loads(Path(result).read_text())
    finally:
        os.unlink(result)
    return data, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime  # ru_maxrss is KiB on Linux


#: Key settings a developer's shell may carry: a bench's CLI runs name their keys themselves.
_KEY_VARS = ("BURROW_KEY_FILE", "BURROW_KEY", "BURROW_IDENTITY_FILE", "BURROW_PASSPHRASE_ENV", "BURROW_KEY_BLOCK",
             "BURROW_RECIPIENTS", "BURROW_KEYRING")


def cli_env(workdir: Path, prefect_url: str) -> dict[str, str]:
    """The environment of a bench's ``burrow`` commands: the bench's own Prefect server, a
    private BURROW_HOME and staging directory under ``workdir``, and none of the caller's keys."""
    env = {**os.environ, "PREFECT_API_URL": prefect_url + "/api",
           "PREFECT_HOME": str(workdir / "prefect" / "prefect-home"), "BURROW_HOME": str(workdir / "home"),
           "BURROW_STAGING_DIR": str(workdir / "staging")}
    for var in _KEY_VARS:
        env.pop(var, None)
    return env
