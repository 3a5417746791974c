"""The engine pool's rules on its own: affinity, capacity spill-over, round robin, rotation, retirement
and the files of deleted versions.

A stand-in client records loads; the real engines are exercised in `test_scale_out.py`.
"""

from __future__ import annotations

import asyncio

import pytest

from server.engine.pool import EnginePool
from server.errors import EngineUnavailable, EngineUnreachable


class RecordingClient:
    def __init__(self, name: str):
        self.base_url, self.up, self.loads, self.unloads = name, True, [], []
        self.held: set[str] = set()  # what the engine reports it holds, whoever loaded it
        self.unload_failures = 0  # unloads still to fail as if the engine had timed out

    async def healthy(self) -> bool:
        self.checks = getattr(self, "checks", 0) + 1
        await asyncio.sleep(0)
        return self.up

    async def load_adapter(self, name: str, path: str) -> None:
        if not self.up:
            raise EngineUnreachable("gone")
        self.loads.append(name)
        self.held.add(name)

    async def unload_adapter(self, name: str) -> bool:
        if not self.up:
            raise EngineUnreachable("gone")
        if self.unload_failures:
            self.unload_failures -= 1
            raise EngineUnavailable("The inference engine did not answer in time.")
        self.unloads.append(name)
        self.held.discard(name)
        return True

    async def adapters(self) -> set[str] | None:
        return set(self.held) if self.up else None

    async def aclose(self) -> None:
        pass


def make_pool(engines: int = 2, **kwargs) -> tuple[EnginePool, list[RecordingClient]]:
    clients = [RecordingClient(f"e{i}") for i in range(engines)]
    pool = EnginePool(clients, **kwargs)
    asyncio.run(pool.healthy())
    return pool, clients


def serve(pool: EnginePool, name: str) -> str:
    """One request for adapter `name`, start to end; the engine that served it."""
    async def go():
        slot, _ = await pool.acquire(name, f"/registry/{name}")
        pool.release(slot, name)
        return slot.client.base_url
    return asyncio.run(go())


def test_affinity_keeps_each_adapter_on_the_engine_that_loaded_it():
    pool, (e0, e1) = make_pool()
    first = {name: serve(pool, name) for name in "abcd"}
    assert sorted(first.values()) == ["e0", "e0", "e1", "e1"], "new adapters spread over the engines"
    for _ in range(3):
        assert {name: serve(pool, name) for name in "abcd"} == first
    assert sorted(e0.loads + e1.loads) == list("abcd"), "each adapter loaded once, on one engine"


def test_a_full_engine_spills_the_adapter_to_the_least_busy_one():
    pool, (e0, e1) = make_pool(capacity=2)

    async def go():
        held = [await pool.acquire("a", "/a") for _ in range(3)]
        return [slot.client.base_url for slot, _ in held]

    assert asyncio.run(go()) == ["e0", "e0", "e1"]
    assert e0.loads == ["a"] and e1.loads == ["a"]


def test_round_robin_ignores_where_adapters_are():
    pool, (e0, e1) = make_pool(routing="round_robin")
    served = [serve(pool, "a") for _ in range(4)]
    assert served == ["e0", "e1", "e0", "e1"]
    assert e0.loads == ["a"] and e1.loads == ["a"]


def test_an_unreachable_engine_leaves_rotation_and_returns_after_a_passing_check():
    pool, (e0, _) = make_pool(max_failures=1)
    assert serve(pool, "a") == "e0"
    e0.up = False
    assert serve(pool, "a") == "e0", "the pool does not know yet; the adapter is still thought loaded"
    assert serve(pool, "b") == "e1"
    assert serve(pool, "c") == "e1", "e0's turn, but its load fails: taken out of rotation, e1 serves"
    assert not pool.slots[0].up
    asyncio.run(pool.healthy())
    assert not pool.slots[0].up and not pool.slots[0].loaded
    assert [serve(pool, name) for name in "abc"] == ["e1"] * 3
    e0.up = True
    asyncio.run(pool.healthy())
    assert pool.slots[0].up
    assert serve(pool, "d") == "e0", "back in rotation, and the least loaded"


def test_a_failed_load_moves_to_another_engine_and_none_left_is_a_503():
    pool, (e0, e1) = make_pool(max_failures=1)
    e0.up = False  # down, but the last health check said up
    assert serve(pool, "a") == "e1"
    assert not pool.slots[0].up
    e1.up = False
    with pytest.raises(EngineUnavailable):
        serve(pool, "b")


def test_one_failed_connection_keeps_the_only_engine_in_rotation():
    """Item 11: one socket error took the only engine out of rotation, a 503 for everyone until the next
    health check. Failed before the fix (out after one failure); now that request alone fails, and the
    engine leaves only after `max_failures` in a row, or on a failed health check."""
    pool, (e0,) = make_pool(engines=1, max_failures=3)
    e0.up = False  # its connections fail; the health check has not run yet
    with pytest.raises(EngineUnavailable):
        serve(pool, "a")
    assert pool.slots[0].up, "one failed connection took the only engine out"
    e0.up = True
    assert serve(pool, "a") == "e0"
    e0.up = False
    for _ in range(3):
        with pytest.raises(EngineUnavailable):
            serve(pool, "b")
    assert not pool.slots[0].up, "repeated failures take it out"


def test_a_passing_health_check_resets_the_failure_count():
    pool, _ = make_pool(engines=1, max_failures=2)
    slot = pool.slots[0]
    pool.failed(slot)
    asyncio.run(pool.healthy())
    pool.failed(slot)
    assert slot.up, "the failures were not consecutive"
    pool.failed(slot)
    assert not slot.up


async def settle(pool: EnginePool) -> None:
    """Let the pool's background unloads and removals finish."""
    while pool._tasks:
        await asyncio.wait(set(pool._tasks))


def test_an_unload_that_finds_the_name_busy_retries_when_it_is_released():
    """Item 10: the unload a retirement started returned when it found a request running on the name, and
    nothing tried again: the version stayed loaded forever. Failed before the fix; passes now."""
    pool, (e0, _) = make_pool()

    async def go():
        assert serve_async(await pool.acquire("a", "/a"), pool, "a") == "e0"
        pool.retire(["a"])  # idle: the unload is on its way...
        slot, _ = await pool.acquire("a", "/a")  # ...when a request that resolved "a" before starts on it
        await asyncio.sleep(0)
        await settle(pool)
        assert e0.unloads == [], "unloaded under a running request"
        pool.release(slot, "a")
        await settle(pool)

    asyncio.run(go())
    assert e0.unloads == ["a"]
    assert "a" not in pool.slots[0].loaded and not pool.slots[0].retiring


def test_a_version_retired_while_its_engine_was_briefly_down_is_unloaded_when_it_returns():
    """Item 10: `mark_down` cleared `retiring`, so a version retired while a request ran on it, on an engine
    that then blipped, was never unloaded. Failed before the fix; passes now."""
    pool, (e0, _) = make_pool()

    async def go():
        slot, _ = await pool.acquire("a", "/a")
        pool.retire(["a"])  # a request is running: unload when it ends
        pool.mark_down(slot)  # a blip
        pool.release(slot, "a")
        await settle(pool)
        assert e0.unloads == [], "nothing is sent to an engine out of rotation"
        await pool.healthy()  # back
        await settle(pool)

    asyncio.run(go())
    assert e0.unloads == ["a"]


def test_a_version_retired_while_its_engine_was_out_is_unloaded_when_it_returns():
    """The same when the retirement comes while the engine is out (it may not have restarted)."""
    pool, (e0, _) = make_pool()

    async def go():
        assert serve_async(await pool.acquire("a", "/a"), pool, "a") == "e0"
        pool.mark_down(pool.slots[0])
        pool.retire(["a"])
        await pool.healthy()
        await settle(pool)

    asyncio.run(go())
    assert e0.unloads == ["a"]


def serve_async(acquired, pool: EnginePool, name: str) -> str:
    slot, _ = acquired
    pool.release(slot, name)
    return slot.client.base_url


def test_a_deleted_version_keeps_its_files_until_the_last_engine_unloads_it():
    """Item 10: deleting a version removed its folder while requests still ran on it (vLLM re-reads it
    after evicting it from its CPU cache). Now the files go only after the unload; the end-to-end test is
    tests/test_retire.py."""
    pool, (e0, e1) = make_pool(capacity=1)
    events: list[str] = []

    async def go():
        first, _ = await pool.acquire("a", "/a")
        second, _ = await pool.acquire("a", "/a")  # spilled over: "a" runs on both engines
        assert {first.client.base_url, second.client.base_url} == {"e0", "e1"}
        await asyncio.wait_for(pool.discard("a", lambda: events.append("removed")), 30)  # returns: busy
        assert events == []
        late, _ = await pool.acquire("a", "/a")  # resolved before the delete: still served
        pool.release(first, "a")
        await settle(pool)
        assert events == [], "removed while requests still ran on it"
        pool.release(second, "a")
        pool.release(late, "a")
        await settle(pool)

    asyncio.run(go())
    assert e0.unloads == ["a"] and e1.unloads == ["a"]
    assert events == ["removed"]
    assert all("a" not in s.loaded and not s.retiring for s in pool.slots)


def test_deleting_an_idle_version_removes_its_files_before_returning():
    pool, (e0, _) = make_pool()
    events: list[str] = []

    async def go():
        assert serve_async(await pool.acquire("a", "/a"), pool, "a") == "e0"
        await asyncio.wait_for(pool.discard("a", lambda: events.append(f"removed after {e0.unloads}")), 30)
        await asyncio.wait_for(pool.discard("never-loaded", lambda: events.append("removed other")), 30)

    asyncio.run(go())
    assert events == ["removed after ['a']", "removed other"]


def test_preload_calls_off_a_retirement_but_not_a_deletion():
    """Rolling back to a version still draining keeps it loaded; a deleted one is unloaded regardless."""
    pool, (e0, _) = make_pool()

    async def go():
        slot, _ = await pool.acquire("a", "/a")
        pool.retire(["a"])
        await pool.preload("a", "/a")  # activated again
        pool.release(slot, "a")
        await settle(pool)
        assert e0.unloads == []
        slot, _ = await pool.acquire("a", "/a")
        await pool.discard("a", lambda: None)
        await pool.acquire("a", "/a")  # a late request on the deleted name does not keep it
        pool.release(slot, "a")
        pool.release(slot, "a")
        await settle(pool)

    asyncio.run(go())
    assert e0.unloads == ["a"]


def test_an_unload_the_engine_missed_is_sent_again_when_it_returns():
    pool, (e0, _) = make_pool()

    async def go():
        assert serve_async(await pool.acquire("a", "/a"), pool, "a") == "e0"
        e0.up = False  # gone, but the health check has not noticed
        pool.retire(["a"])
        await settle(pool)
        await pool.healthy()  # out
        e0.up = True
        await pool.healthy()  # back
        await settle(pool)

    asyncio.run(go())
    assert e0.unloads == ["a"]


def test_a_flood_of_readiness_checks_makes_few_engine_checks():
    """Anyone may call /readyz; 100 of them at once (and again right after) share one engine health check
    each engine. Before, each call health-checked every engine."""
    pool, (e0, _) = make_pool()
    before = e0.checks

    async def go():
        results = await asyncio.gather(*(pool.healthy(reuse=0.25) for _ in range(100)))
        assert all(results)
        assert await pool.healthy(reuse=60)  # just done: reused
        e0.up = False
        assert await pool.healthy()  # no reuse asked: a fresh check sees e0 gone (e1 is still up)

    asyncio.run(go())
    assert e0.checks - before == 2
    assert not pool.slots[0].up


def test_routing_follows_what_the_engines_report_they_hold():
    """Issue 17: a gateway that restarted, or runs beside another, learns each engine's adapters at its health
    checks: one loaded there by another gateway is routed to it without a load, one it lost is loaded again."""
    pool, (e0, e1) = make_pool()
    e1.held.add("warm")  # another gateway loaded it on e1
    asyncio.run(pool.healthy())
    assert [serve(pool, "warm") for _ in range(3)] == ["e1"] * 3 and e1.loads == [] and e0.loads == []
    e1.held.clear()  # e1 restarted between two checks
    asyncio.run(pool.healthy())
    assert "warm" not in pool.slots[1].loaded
    serve(pool, "warm")
    assert e0.loads + e1.loads == ["warm"]


def test_an_unload_the_engine_missed_while_up_is_sent_again_at_the_next_check():
    pool, (e0,) = make_pool(engines=1)
    serve(pool, "a")
    e0.unload_failures = 1  # a timeout: the engine still holds it
    asyncio.run(pool.discard("a", lambda: None))
    assert e0.held == {"a"} and pool.slots[0].retiring == {"a"}

    async def check():  # it says it holds a retiring version: unloaded now
        await pool.healthy()
        await settle(pool)

    asyncio.run(check())
    assert e0.held == set() and e0.unloads == ["a"] and not pool.slots[0].loaded
