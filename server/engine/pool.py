"""The engines the gateway can send work to, and which adapters each one holds.

The pool picks an engine for a request and makes sure the adapter version is loaded there under its
internal name before the request goes out. With `affinity` routing (the default) that is an engine
that already holds the adapter and has capacity (fewer than `capacity` requests running), else the
least busy engine, which then loads it: an adapter stays where it was first loaded, so each engine
batches few distinct adapters and loads each once. `round_robin` ignores adapters (the baseline).

Only engines in rotation are chosen: one leaves rotation when its health check or a connection to it
fails, and returns when a health check passes (`watch` checks every few seconds). What an engine holds
is remembered here; the memory is dropped when it leaves rotation or restarts, and an engine that says
it does not know a name we thought loaded is believed (see `forget`).

A version that stops being served (another was activated, or it was deleted) is *retired*: unloaded
from each engine as soon as no request is running on it there, so running requests finish on the
weights they started with.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from server.engine.client import AdapterLoadFailed, EngineClient
from server.errors import EngineUnavailable, EngineUnreachable

Routing = Literal["affinity", "round_robin"]

log = logging.getLogger("loraserve.pool")


class PoolObserver:
    """What the pool tells the outside (metrics) about loads and unloads; does nothing by default."""

    def loaded(self, engine: str, seconds: float) -> None:
        pass

    def unloaded(self, engine: str) -> None:
        pass


@dataclass
class EngineSlot:
    client: EngineClient
    loaded: set[str] = field(default_factory=set)
    running: Counter[str] = field(default_factory=Counter)  # requests in flight, by engine model name
    retiring: set[str] = field(default_factory=set)
    up: bool = False  # in rotation: the last health check passed and no connection failed since
    locks: defaultdict[str, asyncio.Lock] = field(default_factory=lambda: defaultdict(asyncio.Lock))

    @property
    def in_flight(self) -> int:
        return sum(self.running.values())


class EnginePool:
    def __init__(
        self, clients: list[EngineClient], observer: PoolObserver | None = None, *,
        routing: Routing = "affinity", capacity: int = 64,
    ):
        if not clients:
            raise ValueError("at least one engine is needed")
        self.slots = [EngineSlot(c) for c in clients]
        self.observer = observer or PoolObserver()
        self.routing, self.capacity = routing, capacity
        # (engine name, path) of the adapter that base-model requests are served through; None: the base
        # model itself (see `adapters.zero`).
        self.base_stand_in: tuple[str, str] | None = None
        self._turn = itertools.count()
        self._tasks: set[asyncio.Task] = set()

    async def aclose(self) -> None:
        for slot in self.slots:
            await slot.client.aclose()

    async def healthy(self) -> bool:
        """Check every engine now, and put each in or out of rotation; True when any is up."""
        results = await asyncio.gather(*(s.client.healthy() for s in self.slots))
        for slot, up in zip(self.slots, results, strict=True):
            if up and not slot.up:
                slot.loaded.clear()  # it may have restarted meanwhile: reload (a no-op if it still holds it)
                slot.retiring.clear()
                slot.up = True
                log.info("engine %s is in rotation", slot.client.base_url)
            elif slot.up and not up:
                self.mark_down(slot)
        return any(results)

    async def watch(self, interval: float) -> None:
        """Health-check the engines every `interval` seconds, for as long as the gateway runs."""
        while True:
            try:
                await self.healthy()
            except Exception:  # a bug here must not end the checks for good
                log.exception("engine health check failed")
            await asyncio.sleep(interval)

    def mark_down(self, slot: EngineSlot) -> None:
        """Out of rotation until a health check passes; what it held is forgotten."""
        if slot.up:
            log.warning("engine %s is out of rotation", slot.client.base_url)
        slot.up = False
        slot.loaded.clear()
        slot.retiring.clear()

    def forget(self, slot: EngineSlot, engine_model: str) -> None:
        slot.loaded.discard(engine_model)

    async def acquire(
        self, engine_model: str, adapter_path: str | None, avoid: Iterable[EngineSlot] = ()
    ) -> tuple[EngineSlot, float]:
        """An engine ready to serve `engine_model`, counted busy with it until `release`, and the
        seconds this call spent loading the adapter there (0 when it was loaded already). Engines in
        `avoid` (already tried for this request) are skipped; an unreachable one is marked down and
        the next is tried."""
        avoid = set(map(id, avoid))
        while True:
            slot = self._choose(engine_model, avoid)
            slot.running[engine_model] += 1  # counted at once, so concurrent choices see it busy
            try:
                load_seconds = 0.0
                if adapter_path is not None:
                    load_seconds = await self._ensure_loaded(slot, engine_model, adapter_path)
            except EngineUnreachable:
                self._unreserve(slot, engine_model)
                self.mark_down(slot)
                avoid.add(id(slot))
                continue
            except BaseException:
                self._unreserve(slot, engine_model)
                raise
            slot.retiring.discard(engine_model)  # asked for again (NAME@N): keep it
            return slot, load_seconds

    def release(self, slot: EngineSlot, engine_model: str) -> None:
        self._unreserve(slot, engine_model)
        if not slot.running[engine_model] and engine_model in slot.retiring:
            self._spawn(self._unload(slot, engine_model))

    @staticmethod
    def _unreserve(slot: EngineSlot, engine_model: str) -> None:
        slot.running[engine_model] -= 1
        if slot.running[engine_model] <= 0:
            del slot.running[engine_model]

    async def preload(self, engine_model: str, adapter_path: str) -> None:
        """Load a version before its first request, on the engine that would serve it."""
        slot, _ = await self.acquire(engine_model, adapter_path)
        self.release(slot, engine_model)

    def retire(self, engine_models: Iterable[str]) -> None:
        """Unload these versions everywhere once idle; a name forgotten now is reloaded if asked again."""
        for name in engine_models:
            for slot in self.slots:
                if name not in slot.loaded:
                    continue
                if slot.running[name]:
                    slot.retiring.add(name)
                else:
                    self._spawn(self._unload(slot, name))

    def _choose(self, engine_model: str, avoid: set[int]) -> EngineSlot:
        candidates = [s for s in self.slots if id(s) not in avoid]
        if not candidates:
            raise EngineUnavailable("No inference engine is reachable; try again shortly.")
        # Engines out of rotation are tried only when none is in: the last check may be stale, and a
        # refused connection costs little.
        candidates = [s for s in candidates if s.up] or candidates
        if self.routing == "round_robin":
            return candidates[next(self._turn) % len(candidates)]
        # An engine holds the adapter once loaded, and already while a request waits for its load there.
        holding = [s for s in candidates if (engine_model in s.loaded or s.running[engine_model])
                   and s.in_flight < self.capacity]
        # Least busy first; among equals, the one holding fewest adapters, so new adapters spread out.
        return min(holding or candidates, key=lambda s: (s.in_flight, len(s.loaded)))

    async def _ensure_loaded(self, slot: EngineSlot, name: str, path: str) -> float:
        if name in slot.loaded:
            return 0.0
        started = time.perf_counter()
        async with slot.locks[name]:  # concurrent first requests load once
            if name in slot.loaded:
                return time.perf_counter() - started  # waited for another request's load
            try:
                await slot.client.load_adapter(name, path)
            except AdapterLoadFailed as exc:
                # The registry validated this adapter, so a refusal here is the server's fault; the
                # engine's message may carry paths, so it goes to the log, not the client.
                log.error("engine refused adapter %s: %s (%s)", name, exc, exc.status)
                raise EngineUnavailable("The adapter could not be loaded on the inference engine.") from exc
            slot.loaded.add(name)
            seconds = time.perf_counter() - started
            self.observer.loaded(slot.client.base_url, seconds)
            log.info("loaded adapter %s on %s in %.3f s", name, slot.client.base_url, seconds)
            return seconds

    async def _unload(self, slot: EngineSlot, name: str) -> None:
        async with slot.locks[name]:
            if slot.running[name] or name not in slot.loaded:
                return  # picked up again meanwhile, or already gone
            slot.retiring.discard(name)
            slot.loaded.discard(name)
            try:
                await slot.client.unload_adapter(name)
                self.observer.unloaded(slot.client.base_url)
                log.info("unloaded adapter %s from %s", name, slot.client.base_url)
            except Exception as exc:  # the engine may be down; a restart clears it anyway
                log.warning("could not unload adapter %s from %s: %s", name, slot.client.base_url, exc)

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)  # keep a reference until done, or the task may be collected
        task.add_done_callback(self._tasks.discard)
