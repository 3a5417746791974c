"""Admission control: per-tenant limits from the tenant's settings, and one gateway-wide bound.

Per tenant: concurrent sequences, requests per minute, tokens per minute. Concurrency counts sequences
(prompts x `n`), not HTTP requests, so one request cannot hold thousands of engine slots as "one". Tokens are
reserved when a request is admitted (see `server.serving.budget`) and reconciled when it ends with what the engine
really produced, so concurrent requests cannot overshoot the budget before the first is charged. Over a
limit: 429 with `Retry-After`, after a short hold. While other tenants are active, a tenant runs at most its
contended share of sequences and its other requests wait for a turn (`Limiter.acquire`). Gateway-wide: at
most `max_in_flight` sequences at once, else 503 with `Retry-After`, rather than an unbounded queue.
The tenant limits are counted in this process, or, with a shared store (`server.serving.shared_counts`), once
for all gateways; the contended share and the gateway-wide bound are always this gateway's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field

from server.errors import BadRequest, EngineUnavailable, RateLimited
from server.serving.shared_counts import SharedCounts, StoreUnavailable

log = logging.getLogger("loraserve.limits")

_ACTIVE_WINDOW = 1.0  # seconds a tenant counts as active after its last request ended
_MAX_HELD = 64  # refusals held at once per tenant; beyond, they are answered at once


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
    whole reservation stays charged).

    A ticket marked `preemptible` (a request that has sent its client nothing yet) may be preempted once:
    its sequences leave the engine's batch (`preempted` is set; the holder aborts its engine request) and
    `resume` waits for the tenant's next turn to run it again from the start, as vLLM preempts by
    recomputation. `shared`: counted in the shared store, and given back there."""

    def __init__(self, limiter: Limiter, tenant: str, sequences: int, reserved: int, tokens_per_minute: int | None,
                 *, shared: bool = False):
        self.limiter, self.tenant, self.sequences = limiter, tenant, sequences
        self.reserved, self.tokens_per_minute, self.shared = reserved, tokens_per_minute, shared
        self.preemptible = False
        self.preempted = asyncio.Event()
        self._open = self._running = True

    def release(self, tokens: int | None) -> None:
        if self._open:
            self._open = False
            self.limiter._release(self, self.reserved if tokens is None else tokens)

    def _preempt(self) -> None:
        self.preemptible, self._running = False, False  # once: a resumed request runs to its end
        self.limiter._stop_running(self)
        self.preempted.set()

    async def resume(self) -> None:
        """Wait for the tenant's turn and take its sequences back into the batch; 429, as for a request
        queued for its turn, when none came within the limiter's queue timeout."""
        limiter = self.limiter
        deadline = time.monotonic() + limiter.queue_timeout
        while not limiter._may_resume(self):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RateLimited(f"This tenant already runs {limiter.running[self.tenant]} sequences while "
                                  "other tenants wait for the engine; try again shortly.", retry_after=1)
            await limiter._released(min(remaining, _ACTIVE_WINDOW))
        if self._open and not self._running:
            self._running = True
            self.preempted.clear()  # for good: a ticket is preempted once
            limiter._start_running(self)


class _OverShare(Exception):
    """Within the tenant's own limit, but over its share while other tenants are active: wait for a turn."""


class Limiter:
    def __init__(self, max_in_flight: int, *, contended_share: int | None = None, queue_timeout: float = 30.0,
                 refusal_hold: float = 0.0, shared: SharedCounts | None = None):
        self.max_in_flight, self.shared = max_in_flight, shared
        self.contended_share, self.queue_timeout, self.refusal_hold = contended_share, queue_timeout, refusal_hold
        self.in_flight = 0
        self.running: defaultdict[str, int] = defaultdict(int)
        self.waiting: defaultdict[str, int] = defaultdict(int)  # sequences queued for their tenant's turn
        self.held: defaultdict[str, int] = defaultdict(int)  # refusals being held (see `acquire`)
        self.requests: dict[str, _Bucket] = {}
        self.tokens: dict[str, _Bucket] = {}
        self._last_active: dict[str, float] = {}
        self._tickets: defaultdict[str, list[Ticket]] = defaultdict(list)  # running, oldest first
        self._freed: asyncio.Event | None = None

    async def acquire(self, tenant: str, limits: dict, *, sequences: int = 1, tokens: int = 0) -> Ticket:
        """`admit`, waiting while the tenant is over its share of a contended engine, and holding a refusal
        for a moment. On a CPU engine every sequence in the batch slows all the others, so while other
        tenants are active each tenant runs at most `contended_share` sequences; the rest of its requests
        (up to its own limit) queue for a turn (up to `queue_timeout` seconds) instead of filling the batch.
        Alone, a tenant gets its whole limit. A request over one of its tenant's own limits waits up to
        `refusal_hold` seconds for room before its 429, so a client that retries at once costs the machine
        a few tries a second per connection, not a hot loop of refusals on the cores the engine runs on."""
        now = time.monotonic()
        deadline, hold_until = now + self.queue_timeout, now + self.refusal_hold
        queued = holding = False
        try:
            while True:
                try:
                    return await self._admit(tenant, limits, sequences=sequences, tokens=tokens)
                except _OverShare:
                    concurrent = limits.get("max_concurrent_requests")
                    if queued or concurrent is None or (
                            self.running[tenant] + self.waiting[tenant] + sequences <= concurrent):
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            raise RateLimited(f"This tenant already runs {self.running[tenant]} sequences while "
                                              "other tenants wait for the engine; try again shortly.",
                                              retry_after=1) from None
                        if not queued:
                            queued = True
                            self.waiting[tenant] += sequences
                        await self._released(min(remaining, _ACTIVE_WINDOW))
                        continue
                    # Waiting requests count against the tenant's own limit too: the queue is bounded.
                    refusal = RateLimited(f"More than {concurrent} concurrent sequences for this tenant.",
                                          retry_after=1)
                except RateLimited as error:
                    refusal = error
                remaining = hold_until - time.monotonic()
                if remaining <= 0 or (not holding and self.held[tenant] >= _MAX_HELD):
                    raise refusal
                if not holding:
                    holding = True
                    self.held[tenant] += 1
                await self._released(remaining)
        finally:
            if queued:
                self.waiting[tenant] -= sequences
            if holding:
                self.held[tenant] -= 1

    async def _admit(self, tenant: str, limits: dict, *, sequences: int, tokens: int) -> Ticket:
        """`admit` (fair), with the tenant's limits counted in the shared store while it answers."""
        shared = self.shared
        if shared is None or not shared.available():
            return self.admit(tenant, limits, sequences=sequences, tokens=tokens, fair=True)
        self._refuse_impossible(limits, sequences)
        self._wait_when_over_share(tenant, sequences)
        self._refuse_when_full(sequences)
        tpm = limits.get("tokens_per_minute")
        reserved = tokens if tpm is not None else 0
        try:
            await shared.admit(tenant, limits, sequences=sequences, tokens=reserved)
        except StoreUnavailable:
            return self.admit(tenant, limits, sequences=sequences, tokens=tokens, fair=True)
        ticket = Ticket(self, tenant, sequences, reserved, tpm, shared=True)
        try:
            self._refuse_when_full(sequences)  # filled while the store answered
        except EngineUnavailable:
            ticket._running = False
            ticket.release(0)
            raise
        self._start_running(ticket)
        return ticket

    async def _released(self, timeout: float) -> None:
        """Returns at the next release of any ticket, or after `timeout` seconds."""
        if self._freed is None:
            self._freed = asyncio.Event()
        with contextlib.suppress(asyncio.TimeoutError):  # TimeoutError itself from 3.11 on
            await asyncio.wait_for(self._freed.wait(), timeout)

    def _contended(self, tenant: str) -> bool:
        """Whether another tenant runs sequences now, or finished some a moment ago (a client sending one
        request after another is active between them)."""
        now = time.monotonic()
        for other, at in list(self._last_active.items()):
            if self.running[other] > 0 or now - at < _ACTIVE_WINDOW:
                if other != tenant:
                    return True
            else:
                del self._last_active[other]  # idle: forgotten until its next request
        return False

    def admit(self, tenant: str, limits: dict, *, sequences: int = 1, tokens: int = 0, fair: bool = False) -> Ticket:
        """Let a request of `sequences` sequences in and reserve `tokens` of the tenant's budget, or raise 429
        (a tenant limit), 400 (a request that no limit could ever admit) or 503 (the gateway is full). With
        `fair`, `_OverShare` when the tenant is over its contended share (see `acquire`)."""
        self._refuse_impossible(limits, sequences)
        concurrent = limits.get("max_concurrent_requests")
        if concurrent is not None and self.running[tenant] + sequences > concurrent:
            raise RateLimited(f"More than {concurrent} concurrent sequences for this tenant.", retry_after=1)
        if fair:
            self._wait_when_over_share(tenant, sequences)
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
        self._refuse_when_full(sequences)
        if rpm is not None:
            self.requests[tenant].level -= 1
        if tpm is not None:
            self.tokens[tenant].level -= tokens
        ticket = Ticket(self, tenant, sequences, tokens if tpm is not None else 0, tpm)
        self._start_running(ticket)
        return ticket

    def _refuse_impossible(self, limits: dict, sequences: int) -> None:
        """400 for a request wider than any limit could ever admit."""
        concurrent = limits.get("max_concurrent_requests")
        if concurrent is not None and sequences > concurrent:
            raise BadRequest(f"This request runs {sequences} sequences (prompts x n) at once, more than this "
                             f"tenant's limit of {concurrent}.", param="n", code="too_many_sequences")
        if sequences > self.max_in_flight:
            raise BadRequest(f"This request runs {sequences} sequences at once, more than this server takes.",
                             param="n", code="too_many_sequences")

    def _wait_when_over_share(self, tenant: str, sequences: int) -> None:
        share = self.contended_share
        if share is not None and self.running[tenant] + sequences > share and self._contended(tenant):
            raise _OverShare  # a request wider than the share itself waits for a moment without contention

    def _refuse_when_full(self, sequences: int) -> None:
        if self.in_flight + sequences > self.max_in_flight:
            raise EngineUnavailable("The server is at capacity; try again shortly.", code="server_busy",
                                    retry_after=1)

    def _start_running(self, ticket: Ticket) -> None:
        self.in_flight += ticket.sequences
        self.running[ticket.tenant] += ticket.sequences
        self._last_active[ticket.tenant] = time.monotonic()
        self._tickets[ticket.tenant].append(ticket)
        share = self.contended_share
        if share is None:
            return
        # Another tenant alone may hold its whole limit; now that this one is active too, its newest
        # preemptible sequences beyond its share leave the batch and wait for their turn.
        for other, tickets in list(self._tickets.items()):
            for held in list(reversed(tickets)):
                if other == ticket.tenant or self.running[other] <= share:
                    break
                if held.preemptible:
                    log.info("preempting %d sequences of tenant %s for its turn", held.sequences, other)
                    held._preempt()

    def _stop_running(self, ticket: Ticket) -> None:
        self.in_flight -= ticket.sequences
        self.running[ticket.tenant] -= ticket.sequences
        self._last_active[ticket.tenant] = time.monotonic()
        tickets = self._tickets[ticket.tenant]
        tickets.remove(ticket)
        if not tickets:
            del self._tickets[ticket.tenant]
        if self._freed is not None:  # wake the tenants waiting for a turn
            self._freed.set()
            self._freed = None

    def _may_resume(self, ticket: Ticket) -> bool:
        share = self.contended_share
        return self.in_flight + ticket.sequences <= self.max_in_flight and (
            share is None or self.running[ticket.tenant] + ticket.sequences <= share
            or not self._contended(ticket.tenant))

    def _release(self, ticket: Ticket, tokens: int) -> None:
        if ticket._running:
            self._stop_running(ticket)
        tpm = ticket.tokens_per_minute
        if ticket.shared:
            self.shared.release(ticket.tenant, ticket.sequences, tokens_back=(ticket.reserved - tokens) if tpm else 0,
                                tokens_per_minute=tpm)
            return
        if tpm is not None:
            bucket = self.tokens.setdefault(ticket.tenant, _Bucket(tpm, tpm))
            bucket.refill(tpm)
            bucket.level += ticket.reserved - tokens  # the reservation back, what was used charged
