"""The engine pool's routing on its own: affinity, capacity spill-over, round robin, rotation.

A stand-in client records loads; the real engines are exercised in `test_scale_out.py`.
"""

from __future__ import annotations

import asyncio

import pytest

from server.engine.pool import EnginePool
from server.errors import EngineUnavailable, EngineUnreachable


class RecordingClient:
    def __init__(self, name: str):
        self.base_url, self.up, self.loads = name, True, []

    async def healthy(self) -> bool:
        return self.up

    async def load_adapter(self, name: str, path: str) -> None:
        if not self.up:
            raise EngineUnreachable("gone")
        self.loads.append(name)

    async def unload_adapter(self, name: str) -> bool:
        return True

    async def aclose(self) -> None:
        pass


def make_pool(**kwargs) -> tuple[EnginePool, list[RecordingClient]]:
    clients = [RecordingClient("e0"), RecordingClient("e1")]
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
    pool, (e0, _) = make_pool()
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
    pool, (e0, e1) = make_pool()
    e0.up = False  # down, but the last health check said up
    assert serve(pool, "a") == "e1"
    assert not pool.slots[0].up
    e1.up = False
    with pytest.raises(EngineUnavailable):
        serve(pool, "b")
