"""Burrow's home on this machine: ``$BURROW_HOME``, else ``~/.burrow`` (the local server, the
local copy of the sealed documents, the records of the locks this host's runs hold). Private to
its user: the home and every directory Burrow makes in it are 0700."""

from __future__ import annotations

import os
import stat
from pathlib import Path


def burrow_home() -> Path:
    """Burrow's own home: ``$BURROW_HOME``, else ``~/.burrow``."""
    return Path(os.environ.get("BURROW_HOME") or Path.home() / ".burrow").expanduser()


def private_dir(path: Path) -> Path:
    """``path`` made (with its parents) and kept 0700, and Burrow's home with it when ``path``
    lies directly in it."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    for d in (path.parent, path) if path.parent == burrow_home() else (path,):
        if stat.S_IMODE(d.stat().st_mode) != 0o700:
            d.chmod(0o700)
    return path
