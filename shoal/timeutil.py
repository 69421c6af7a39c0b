"""Timestamps as the APIs show them."""

from __future__ import annotations

from datetime import UTC, datetime


def iso(epoch_s: float) -> str:
    """RFC 3339 in UTC with microseconds, as clients of the reference service parse."""
    return datetime.fromtimestamp(epoch_s, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
