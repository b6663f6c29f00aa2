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
