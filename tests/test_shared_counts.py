"""Counts several gateways keep together in a real Redis (`server/serving/shared_counts.py`): tenant limits, and
the versions each gateway serves.

Each `SharedCounts` here is one gateway's side of the store, as `Services` builds it; the limiter and the engine
pool are the real ones (the pool with the stand-in engine client of test_pool.py). The same behaviour through two
real gateway processes and the real engine: tests/test_several_gateways.py.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from server.engine.pool import EnginePool
from server.errors import RateLimited
from server.serving.limits import Limiter
from server.serving.shared_counts import SharedCounts
from tests.test_pool import RecordingClient

pytest_plugins = ["tests.redis_server"]
GUARD = 60  # seconds any one test may take, on a loaded machine


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, GUARD))


async def gateways(url: str, count: int = 2, **options) -> list[SharedCounts]:
    counts = [SharedCounts(url, **options) for _ in range(count)]
    for c in counts:
        await c.beat()
    return counts


async def close(*counts: SharedCounts) -> None:
    for c in counts:
        await c.aclose()


async def admitted(counts: SharedCounts, tenant: str, limits: dict, *, sequences: int = 1, tokens: int = 0) -> bool:
    try:
        await counts.admit(tenant, limits, sequences=sequences, tokens=tokens)
        return True
    except RateLimited:
        return False


async def settled(*counts: SharedCounts) -> None:
    """Wait for the releases sent in the background."""
    for c in counts:
        await c.flush()


def test_concurrent_sequences_are_counted_once_for_two_gateways(redis_url):
    """A tenant's concurrency limit holds across gateways: what one runs, the other cannot run too."""
    async def go():
        a, b = await gateways(redis_url)
        limits = {"max_concurrent_requests": 3}
        assert await admitted(a, "t1", limits, sequences=2)
        with pytest.raises(RateLimited, match="More than 3 concurrent sequences"):
            await b.admit("t1", limits, sequences=2, tokens=0)
        assert await admitted(b, "t1", limits)  # 3 of 3
        assert not await admitted(a, "t1", limits)
        assert await admitted(b, "t2", limits, sequences=3)  # another tenant has its own count
        a.release("t1", 2, tokens_back=0, tokens_per_minute=None)
        await settled(a)
        assert await admitted(b, "t1", limits, sequences=2)
        await close(a, b)
    run(go())


def test_requests_per_minute_admit_exactly_the_limit_across_gateways(redis_url):
    """20 requests through two gateways, taking turns, against 10 per minute: 10 pass, not 20."""
    async def go():
        a, b = await gateways(redis_url)
        limits = {"requests_per_minute": 10}
        started = time.monotonic()
        results = [await admitted((a, b)[i % 2], "t1", limits) for i in range(20)]
        refill = int((time.monotonic() - started) * 10 / 60)  # requests the bucket regained meanwhile
        assert 10 <= sum(results) <= 10 + refill and results[:10] == [True] * 10
        with pytest.raises(RateLimited) as refused:
            await b.admit("t1", limits, sequences=1, tokens=0)
        assert 0 < refused.value.retry_after <= 6  # one request's refill at 10 a minute
        await close(a, b)
    run(go())


def test_a_token_reservation_on_one_gateway_counts_on_the_other_until_reconciled(redis_url):
    """Tokens are reserved at admission for all gateways, and the unused part comes back at release."""
    async def go():
        a, b = await gateways(redis_url)
        limits = {"tokens_per_minute": 1000}
        assert await admitted(a, "t1", limits, tokens=600)
        with pytest.raises(RateLimited, match="1000 tokens per minute"):
            await b.admit("t1", limits, sequences=1, tokens=600)
        a.release("t1", 1, tokens_back=600 - 100, tokens_per_minute=1000)  # it used 100 of its 600
        await settled(a)
        assert await admitted(b, "t1", limits, tokens=600)
        assert not await admitted(a, "t1", limits, tokens=600)  # 100 + 600 used or held: 300 left
        await close(a, b)
    run(go())


def test_a_gateway_that_stops_beating_no_longer_holds_its_sequences(redis_url):
    """A gateway that dies with requests admitted must not hold its tenants' limits forever: once its heartbeat
    lapses, the next admission elsewhere drops its count."""
    async def go():
        dead, = await gateways(redis_url, 1, beat_interval=0.2)  # its heartbeat lasts 0.6 s
        alive, = await gateways(redis_url, 1)
        limits = {"max_concurrent_requests": 2}
        assert await admitted(dead, "t1", limits, sequences=2)
        assert not await admitted(alive, "t1", limits)  # counted while it beats
        while not await admitted(alive, "t1", limits):  # it never beats again nor releases
            await asyncio.sleep(0.2)
        assert await alive.redis.hkeys("loraserve:limits:t1:running") == [alive.gateway.encode()]
        await close(alive)
        await dead.redis.aclose()
    run(go())


def test_a_release_the_store_missed_is_written_at_the_next_heartbeat(redis_server, redis_url):
    """A release sent while the store was down is not lost: when the store is back (with what it held), the
    gateway's own count replaces its field at the next heartbeat."""
    async def go():
        a, = await gateways(redis_url, 1, retry_after=0)
        limits = {"max_concurrent_requests": 2}
        assert await admitted(a, "t1", limits, sequences=2)
        redis_server.stop()
        a.release("t1", 2, tokens_back=0, tokens_per_minute=None)
        await settled(a)
        redis_server.start()
        await a.beat()
        assert await admitted(a, "t1", limits, sequences=2)  # 0 held again, not 2
        await close(a)
    run(go())


def test_the_limiter_counts_on_its_own_while_the_store_is_down_and_shares_again_after(redis_server, redis_url):
    """The documented choice: fail open to per-gateway limits. With the store gone, requests are still admitted
    and limited by this gateway's own count; the store's state is reported; once it answers, counting is
    shared again."""
    async def go():
        states: list[bool] = []
        shared = SharedCounts(redis_url, retry_after=0, on_state=states.append)
        await shared.beat()
        limiter = Limiter(8, shared=shared)
        limits = {"requests_per_minute": 2}
        first = await limiter.acquire("t1", limits)
        assert first.shared and states == [True]
        first.release(0)
        redis_server.stop()
        local = [await limiter.acquire("t1", limits) for _ in range(2)]  # the local bucket is full: 2
        assert not any(t.shared for t in local) and states[-1] is False
        with pytest.raises(RateLimited, match="2 requests per minute"):
            await limiter.acquire("t1", limits)  # still limited, by this gateway's own count
        for ticket in local:
            ticket.release(0)
        redis_server.start()
        await shared.beat()
        assert states[-1] is True
        second = await limiter.acquire("t1", {"requests_per_minute": 3})  # the store's bucket: 1 of 3 used
        assert second.shared
        second.release(0)
        await settled(shared)
        await shared.aclose()
    run(go())


def test_a_version_another_gateway_serves_is_unloaded_only_once_it_is_done(redis_url):
    """Gateway A retires a version (another was activated, or it was deleted) while gateway B runs a request on
    it on the same engine: A's unload waits until B is done, then A's next health check sends it. Before, A
    unloaded it at once from under B's request, and a deleted version's files went with it."""
    async def go():
        engine = RecordingClient("e0")  # one engine, reached by both gateways
        counts_a, counts_b = await gateways(redis_url)
        a, b = EnginePool([engine], leases=counts_a), EnginePool([engine], leases=counts_b)
        name = "t--x--v1"
        slot, _ = await b.acquire(name, "/registry/x/1")
        await counts_b.flush()
        await a._check_health()  # A learns from the engine that it holds the version
        await asyncio.gather(*a.retire([name]))
        assert engine.unloads == [] and name in engine.held and name in a.slots[0].retiring
        b.release(slot, name)
        await counts_b.flush()
        await a._check_health()
        await asyncio.gather(*a._tasks)
        assert engine.unloads == [name] and not a.slots[0].retiring
        await close(counts_a, counts_b)
    run(go())
