"""Private scratch space for one run: a 0700 directory removed when the run ends."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staging_dir(parent: str | None = None, prefix: str = "burrow-") -> Iterator[Path]:
    """A fresh private directory (under ``parent`` or $BURROW_STAGING_DIR or the temp dir)."""
    base = parent or os.environ.get("BURROW_STAGING_DIR") or None
    if base:
        Path(base).mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
