"""Admission control: per-tenant limits from the tenant's settings, and one gateway-wide bound.

Per tenant: concurrent sequences, requests per minute, tokens per minute. Concurrency counts sequences
(prompts x `n`), not HTTP requests, so one request cannot hold thousands of engine slots as "one". Tokens are
reserved when a request is admitted (see `server.budget`) and reconciled when it ends with what the engine
really produced, so concurrent requests cannot overshoot the budget before the first is charged. Over a
limit: 429 with `Retry-After`. Gateway-wide: at most `max_in_flight` sequences at once, else 503 with
`Retry-After`, rather than an unbounded queue. State is per gateway process.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

from server.errors import BadRequest, EngineUnavailable, RateLimited


@dataclass
class _Bucket:
    """A token bucket holding up to `capacity`, refilled at `capacity` per minute; may go negative when a
    request used more than it reserved, and then admits nothing until it has refilled."""

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
    """One admitted request; `release` once it is done, with the tokens it used (None: unknown, so the
    whole reservation stays charged)."""

    def __init__(self, limiter: Limiter, tenant: str, sequences: int, reserved: int, tokens_per_minute: int | None):
        self.limiter, self.tenant, self.sequences = limiter, tenant, sequences
        self.reserved, self.tokens_per_minute = reserved, tokens_per_minute
        self._open = True

    def release(self, tokens: int | None) -> None:
        if self._open:
            self._open = False
            self.limiter._release(self, self.reserved if tokens is None else tokens)


class Limiter:
    def __init__(self, max_in_flight: int):
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self.running: defaultdict[str, int] = defaultdict(int)
        self.requests: dict[str, _Bucket] = {}
        self.tokens: dict[str, _Bucket] = {}

    def admit(self, tenant: str, limits: dict, *, sequences: int = 1, tokens: int = 0) -> Ticket:
        """Let a request of `sequences` sequences in and reserve `tokens` of the tenant's budget, or raise 429
        (a tenant limit), 400 (a request that no limit could ever admit) or 503 (the gateway is full)."""
        concurrent = limits.get("max_concurrent_requests")
        if concurrent is not None:
            if sequences > concurrent:
                raise BadRequest(f"This request runs {sequences} sequences (prompts x n) at once, more than this "
                                 f"tenant's limit of {concurrent}.", param="n", code="too_many_sequences")
            if self.running[tenant] + sequences > concurrent:
                raise RateLimited(f"More than {concurrent} concurrent sequences for this tenant.", retry_after=1)
        rpm = limits.get("requests_per_minute")
        if rpm is not None:
            bucket = self.requests.setdefault(tenant, _Bucket(rpm, rpm))
            if bucket.refill(rpm) < 1:
                raise RateLimited(f"More than {rpm} requests per minute for this tenant.",
                                  retry_after=bucket.wait_for(1))
        tpm = limits.get("tokens_per_minute")
        if tpm is not None:
            bucket = self.tokens.setdefault(tenant, _Bucket(tpm, tpm))
            need = max(1, min(tokens, tpm))
            if bucket.refill(tpm) < need:
                raise RateLimited(f"More than {tpm} tokens per minute for this tenant (this request reserves "
                                  f"{tokens}).", retry_after=bucket.wait_for(need))
        if sequences > self.max_in_flight:
            raise BadRequest(f"This request runs {sequences} sequences at once, more than this server takes.",
                             param="n", code="too_many_sequences")
        if self.in_flight + sequences > self.max_in_flight:
            raise EngineUnavailable("The server is at capacity; try again shortly.", code="server_busy",
                                    retry_after=1)
        if rpm is not None:
            self.requests[tenant].level -= 1
        if tpm is not None:
            self.tokens[tenant].level -= tokens
        self.in_flight += sequences
        self.running[tenant] += sequences
        return Ticket(self, tenant, sequences, tokens if tpm is not None else 0, tpm)

    def _release(self, ticket: Ticket, tokens: int) -> None:
        self.in_flight -= ticket.sequences
        self.running[ticket.tenant] -= ticket.sequences
        tpm = ticket.tokens_per_minute
        if tpm is not None:
            bucket = self.tokens.setdefault(ticket.tenant, _Bucket(tpm, tpm))
            bucket.refill(tpm)
            bucket.level += ticket.reserved - tokens  # the reservation back, what was used charged
