"""A retention policy as a Prefect block, so a prune deployment can carry it by name."""

from __future__ import annotations

from datetime import timedelta
from typing import ClassVar

from pydantic import Field

from blocks.base import BurrowBlock
from burrow.errors import UsageError
from burrow.naming import parse_duration


class RetentionPolicy(BurrowBlock):
    """A GFS retention policy, counted per source (as restic's ``forget`` counts per host).

    ``keep_last`` keeps the newest N archives. ``keep_hourly/daily/weekly/monthly/yearly`` keep
    the newest archive of each of the N most recent calendar hours, days, ISO weeks, months and
    years *that hold an archive* (empty periods do not count). ``keep_within`` keeps every
    archive made within that duration of the source's newest archive. An archive is kept when
    any rule keeps it. With no rule at all, nothing is deleted."""

    _block_type_name: ClassVar[str] = "Burrow Retention Policy"
    _block_type_slug: ClassVar[str] = "burrow-retention-policy"
    _description: ClassVar[str] = "How many hourly, daily, weekly, monthly and yearly archives a prune keeps."

    keep_last: int | None = Field(default=None, ge=0, description="Keep the newest N archives")
    keep_hourly: int | None = Field(default=None, ge=0, description="Newest archive of each of the last N hours with one")
    keep_daily: int | None = Field(default=None, ge=0, description="Newest archive of each of the last N days with one")
    keep_weekly: int | None = Field(default=None, ge=0, description="Newest archive of each of the last N ISO weeks with one")
    keep_monthly: int | None = Field(default=None, ge=0, description="Newest archive of each of the last N months with one")
    keep_yearly: int | None = Field(default=None, ge=0, description="Newest archive of each of the last N years with one")
    keep_within: str | None = Field(default=None, description="Keep all made within this of the newest (e.g. 36h, 14d)")

    def rules(self) -> list[tuple[str, int]]:
        out = []
        for name in ("keep_last", "keep_hourly", "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly"):
            n = getattr(self, name)
            if n is not None:
                if n < 0:
                    raise UsageError(f"{name.replace('_', '-')} must not be negative")
                if n:
                    out.append((name, n))
        return out

    def within(self) -> timedelta | None:
        return parse_duration(self.keep_within, "--keep-within") if self.keep_within else None

    def empty(self) -> bool:
        return not self.rules() and not self.keep_within

    def describe(self) -> str:
        parts = [f"{n.replace('_', '-')} {v}" for n, v in self.rules()]
        if self.keep_within:
            parts.append(f"keep-within {self.keep_within}")
        return ", ".join(parts) or "no rule"
