"""Admission control: per-tenant limits from the tenant's settings, and one gateway-wide bound.

Per tenant: concurrent requests, requests per minute, tokens per minute (prompt + completion, charged
when a request finishes, so a tenant over budget waits until its bucket refills). Over a limit: 429 with
`Retry-After`. Gateway-wide: at most `max_in_flight` requests at once, else 503 with `Retry-After`, rather
than an unbounded queue. State is per gateway process.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

from server.errors import EngineUnavailable, RateLimited


@dataclass
class _Bucket:
    """A token bucket holding up to `capacity`, refilled at `capacity` per minute; may go negative
    (tokens are charged after the fact), and then admits nothing until it has refilled."""

    capacity: float
    level: float
    stamp: float = field(default_factory=time.monotonic)

    def refill(self, capacity: float) -> float:
        now = time.monotonic()
        self.capacity = capacity  # limits may change between requests
        self.level = min(capacity, self.level + (now - self.stamp) * capacity / 60.0)
        self.stamp = now
        return self.level

    def wait_for(self, amount: float) -> float:
        """Seconds until the bucket holds `amount`."""
        return max(0.0, (amount - self.level) * 60.0 / self.capacity)


class Ticket:
    """One admitted request; `release` once it is done, with the tokens it used."""

    def __init__(self, limiter: Limiter, tenant: str, tokens_per_minute: int | None):
        self.limiter, self.tenant, self.tokens_per_minute = limiter, tenant, tokens_per_minute
        self._open = True

    def release(self, tokens: int) -> None:
        if self._open:
            self._open = False
            self.limiter._release(self, tokens)


class Limiter:
    def __init__(self, max_in_flight: int):
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self.running: defaultdict[str, int] = defaultdict(int)
        self.requests: dict[str, _Bucket] = {}
        self.tokens: dict[str, _Bucket] = {}

    def admit(self, tenant: str, limits: dict) -> Ticket:
        """Let a request in, or raise 429 (a tenant limit) or 503 (the gateway is full)."""
        concurrent = limits.get("max_concurrent_requests")
        if concurrent is not None and self.running[tenant] >= concurrent:
            raise RateLimited(f"More than {concurrent} concurrent requests for this tenant.", retry_after=1)
        rpm = limits.get("requests_per_minute")
        if rpm is not None:
            bucket = self.requests.setdefault(tenant, _Bucket(rpm, rpm))
            if bucket.refill(rpm) < 1:
                raise RateLimited(f"More than {rpm} requests per minute for this tenant.",
                                  retry_after=bucket.wait_for(1))
        tpm = limits.get("tokens_per_minute")
        if tpm is not None:
            bucket = self.tokens.setdefault(tenant, _Bucket(tpm, tpm))
            if bucket.refill(tpm) <= 0:
                raise RateLimited(f"More than {tpm} tokens per minute for this tenant.",
                                  retry_after=bucket.wait_for(1))
        if self.in_flight >= self.max_in_flight:
            raise EngineUnavailable("The server is at capacity; try again shortly.", code="server_busy",
                                    retry_after=1)
        if rpm is not None:
            self.requests[tenant].level -= 1
        self.in_flight += 1
        self.running[tenant] += 1
        return Ticket(self, tenant, tpm)

    def _release(self, ticket: Ticket, tokens: int) -> None:
        self.in_flight -= 1
        self.running[ticket.tenant] -= 1
        tpm = ticket.tokens_per_minute
        if tpm is not None and tokens:
            bucket = self.tokens.setdefault(ticket.tenant, _Bucket(tpm, tpm))
            bucket.refill(tpm)
            bucket.level -= tokens
