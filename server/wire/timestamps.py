"""Timestamps as the OpenAI API gives them."""

from __future__ import annotations

from datetime import datetime, timezone


def epoch(moment: datetime) -> int:
    """Unix seconds; SQLite hands datetimes back without their zone, and they are all UTC."""
    return int((moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp())
