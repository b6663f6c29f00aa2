"""Showing a stored value on screen safely: printable text is quoted and cut short, anything
else is shown as hex."""

from __future__ import annotations

import string

_PRINTABLE = set(string.printable.encode()) - set(b"\x0b\x0c")


def preview(value: bytes, limit: int = 64) -> str:
    """A one-line, terminal-safe rendering of ``value``."""
    if not value:
        return "(empty)"
    head = value[:limit]
    more = "..." if len(value) > limit else ""
    if all(b in _PRINTABLE for b in head):
        try:
            text = head.decode("ascii")
            return repr(text) + more
        except UnicodeDecodeError:
            pass
    try:
        text = value[: limit * 4].decode("utf-8")
        if text.isprintable():
            return repr(text[:limit]) + ("..." if len(text) > limit or len(value) > limit * 4 else "")
    except UnicodeDecodeError:
        pass
    return "hex:" + head.hex() + more
