"""The time window of one read: the last N hours, or from one moment to another.

The JSON endpoints take `since_hours` (the last N hours, 24 by default) or `since`, and optionally
`until`: the page's presets send the first, its custom range the second. Resolved here once, so that
every endpoint means the same window by the same parameters and refuses the same nonsense.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

from action_metrics.errors import InvalidFilter
from action_metrics.validation import as_utc

DEFAULT_HOURS: Final = 24.0
MAX_HOURS: Final = 24 * 366 * 10
"""Ten years: a window reaching further back is a typo, not a question; and a longer one in weeks or
months makes a breakdown's statement grow with its buckets (centuries of months take minutes)."""


@dataclass(frozen=True, slots=True)
class TimeWindow:
    """`since` inclusive and `until` exclusive, in UTC; an open window (`until` None) ends now for its
    length but still counts actions stamped later (a writer's clock ahead of ours)."""

    since: datetime
    until: datetime | None
    hours: float
    """Its length: `until - since`, or `now - since` when open."""

    @classmethod
    def resolve(
        cls,
        *,
        now: datetime,
        since_hours: float | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> TimeWindow:
        """The window the parameters name; `InvalidFilter` names the parameter at fault.

        `since` and `since_hours` exclude each other; without either, the 24 hours before the end. At
        most `MAX_HOURS` long.
        """
        if since is not None and since_hours is not None:
            raise InvalidFilter("since_hours", "give since or since_hours, not both")
        end = now if until is None else as_utc("until", until, InvalidFilter)
        if since is None:
            try:
                start = end - timedelta(hours=DEFAULT_HOURS if since_hours is None else since_hours)
            except OverflowError:
                raise InvalidFilter("until", f"{end.isoformat()} is too early to reach back from") from None
        else:
            start = as_utc("since", since, InvalidFilter)
        if start >= end:
            if since is None:
                raise InvalidFilter("since_hours", f"{since_hours} hours is shorter than a microsecond")
            if until is None:
                raise InvalidFilter("since", f"{start.isoformat()} is not in the past: give an until")
            raise InvalidFilter("until", f"{end.isoformat()} is not after since ({start.isoformat()})")
        hours = (end - start).total_seconds() / 3600
        if hours > MAX_HOURS:
            raise InvalidFilter(
                "since" if since is not None else "since_hours",
                f"the window spans {hours / 24:,.0f} days, more than ten years: narrow since/until",
            )
        return cls(start, None if until is None else end, hours)

    @property
    def shown_hours(self) -> int | float:
        """The length as the seed's `time_window_hours` shows it: a whole number when it is one."""
        return int(self.hours) if self.hours.is_integer() else self.hours
