"""The engines the gateway can send work to, and which adapters each one holds.

The pool picks an engine for a request and makes sure the adapter version is loaded there under its
internal name before the request goes out. With `affinity` routing (the default) that is an engine
that already holds the adapter and has capacity (fewer than `capacity` requests running), else the
least busy engine, which then loads it: an adapter stays where it was first loaded, so each engine
batches few distinct adapters and loads each once. `round_robin` ignores adapters (the baseline).

Only engines in rotation are chosen: one leaves rotation when its health check fails, or after
`max_failures` consecutive failed connections (`failed`; a passing check or load resets the count: one
dropped socket must not take the only engine away from everyone), and returns when a health check passes
(`watch` checks every few seconds). What an engine holds is remembered here; the memory is dropped when
it leaves rotation or restarts, and an engine that says it does not know a name we thought loaded is
believed (see `forget`).

A version that stops being served (another was activated, or it was deleted) is *retired*: unloaded
from each engine as soon as no request is running on it there, so running requests finish on the
weights they started with. Retirement survives the engine leaving rotation (the unload is sent when it
returns) and a request starting on the version meanwhile (the unload waits for it); only `preload` (the
version is served again) cancels it. A *deleted* version (`discard`) also keeps its files until no
engine holds it: vLLM re-reads an adapter's folder whenever it evicts it from its CPU cache, so running
requests need them; they are removed after the last unload.

Several gateways on the same engines tell each other which versions they serve (`Leases`, kept in the shared
store): a retired version that another gateway is still serving is not unloaded yet; the unload is tried again
at each health check until no gateway serves it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal, Protocol

from server.engine.client import AdapterLoadFailed, EngineClient
from server.errors import EngineUnavailable, EngineUnreachable

Routing = Literal["affinity", "round_robin"]


class Leases(Protocol):
    """Which versions the other gateways serve (`server.serving.shared_counts.SharedCounts`)."""

    def use(self, engine_model: str) -> None: ...
    def done_with(self, engine_model: str) -> None: ...
    async def used_elsewhere(self, engine_model: str) -> bool: ...

log = logging.getLogger("loraserve.pool")


class PoolObserver:
    """What the pool tells the outside (metrics) about loads and unloads; does nothing by default."""

    def loaded(self, engine: str, seconds: float) -> None:
        pass

    def unloaded(self, engine: str) -> None:
        pass

    async def verdict(self, engine_model: str, loaded: bool) -> None:
        """An engine's first load of `engine_model` succeeded or was refused (the version's verification)."""


@dataclass
class EngineSlot:
    client: EngineClient
    loaded: set[str] = field(default_factory=set)
    running: Counter[str] = field(default_factory=Counter)  # requests in flight, by engine model name
    retiring: set[str] = field(default_factory=set)  # to unload once idle; kept while out of rotation
    up: bool = False  # in rotation: the last health check passed and connections have not kept failing since
    failures: int = 0  # consecutive failed connections since the last passing health check or load
    locks: defaultdict[str, asyncio.Lock] = field(default_factory=lambda: defaultdict(asyncio.Lock))

    @property
    def in_flight(self) -> int:
        return sum(self.running.values())


class EnginePool:
    def __init__(
        self, clients: list[EngineClient], observer: PoolObserver | None = None, *,
        routing: Routing = "affinity", capacity: int = 64, max_failures: int = 3, leases: Leases | None = None,
    ):
        if not clients:
            raise ValueError("at least one engine is needed")
        self.slots = [EngineSlot(c) for c in clients]
        self.observer = observer or PoolObserver()
        self.routing, self.capacity, self.max_failures = routing, capacity, max_failures
        self.leases = leases
        # (engine name, path) of the adapter that base-model requests are served through; None: the base
        # model itself (see `adapters.zero`).
        self.base_stand_in: tuple[str, str] | None = None
        self._turn = itertools.count()
        self._health: asyncio.Future[bool] | None = None
        self._health_at = 0.0
        self._tasks: set[asyncio.Task] = set()
        # Deleted versions whose files wait for the last engine to unload them: name -> removes the files.
        self._deleted: dict[str, Callable[[], None]] = {}
        self._removing: dict[str, asyncio.Task] = {}

    async def aclose(self) -> None:
        for slot in self.slots:
            await slot.client.aclose()

    async def healthy(self, reuse: float = 0.0) -> bool:
        """Check every engine now, and put each in or out of rotation; True when any is up. Callers at the
        same moment share one check, and one that finished less than `reuse` seconds ago stands for a new
        one: an unauthenticated `/readyz` flood must not become a flood of engine health checks."""
        shared = self._health
        if shared is not None and shared.get_loop() is asyncio.get_running_loop() and (
                not shared.done() or time.monotonic() - self._health_at < reuse):
            return await asyncio.shield(self._health)
        self._health = asyncio.ensure_future(self._check_health())
        self._health_at = float("inf")  # in flight: set when it is done
        self._health.add_done_callback(lambda _: setattr(self, "_health_at", time.monotonic()))
        return await asyncio.shield(self._health)

    async def _check_health(self) -> bool:
        results = await asyncio.gather(*(s.client.healthy() for s in self.slots))
        for slot, up in zip(self.slots, results, strict=True):
            if up:
                slot.failures = 0
            if up and not slot.up:
                slot.loaded.clear()  # it may have restarted meanwhile: reload (a no-op if it still holds it)
                slot.up = True
                log.info("engine %s is in rotation", slot.client.base_url)
                for name in list(slot.retiring):  # retired while it was out (404 if it restarted: fine)
                    if not slot.running[name]:
                        self._spawn(self._unload(slot, name))
            elif slot.up and not up:
                self.mark_down(slot)
        await asyncio.gather(*(self._reconcile(slot) for slot in self.slots if slot.up))
        return any(results)

    async def _reconcile(self, slot: EngineSlot) -> None:
        """Take what the engine says it holds as the truth: adapters another gateway loaded there are routed to
        it without a load, and ones it lost (a restart between two checks) are loaded again when asked for.
        What changed here while the engine was asked (a load finished, an unload began) is kept."""
        before = set(slot.loaded)
        reported = await slot.client.adapters()
        if reported is None:
            return
        loaded_meanwhile, unloaded_meanwhile = slot.loaded - before, before - slot.loaded
        slot.loaded, lost = (reported - unloaded_meanwhile) | loaded_meanwhile, before - reported
        for name in slot.loaded & slot.retiring:  # an unload it missed while it stayed up: sent again once idle
            if not slot.running[name]:
                self._spawn(self._unload(slot, name))
        for name in lost - slot.loaded:  # a deleted version's files can go once no engine holds it
            self._settle(name)

    async def watch(self, interval: float) -> None:
        """Health-check the engines every `interval` seconds, for as long as the gateway runs."""
        while True:
            try:
                await self.healthy()
            except Exception:  # a bug here must not end the checks for good
                log.exception("engine health check failed")
            await asyncio.sleep(interval)

    def mark_down(self, slot: EngineSlot) -> None:
        """Out of rotation until a health check passes; what it held is forgotten, but not what is to be
        unloaded from it (`retiring`), which is sent when it returns."""
        if slot.up:
            log.warning("engine %s is out of rotation", slot.client.base_url)
        slot.up = False
        slot.failures = 0
        forgotten, slot.loaded = slot.loaded, set()
        for name in forgotten:
            self._settle(name)

    def failed(self, slot: EngineSlot) -> None:
        """A connection to this engine failed: out of rotation after `max_failures` in a row."""
        slot.failures += 1
        if slot.failures >= self.max_failures:
            self.mark_down(slot)
        else:
            log.warning("engine %s: connection failed (%d of %d before it leaves rotation)",
                        slot.client.base_url, slot.failures, self.max_failures)

    def forget(self, slot: EngineSlot, engine_model: str) -> None:
        slot.loaded.discard(engine_model)

    async def acquire(
        self, engine_model: str, adapter_path: str | None, avoid: Iterable[EngineSlot] = ()
    ) -> tuple[EngineSlot, float]:
        """An engine ready to serve `engine_model`, counted busy with it until `release`, and the
        seconds this call spent loading the adapter there (0 when it was loaded already). Engines in
        `avoid` (already tried for this request) are skipped; an unreachable one counts a failure
        (`failed`) and the next is tried."""
        avoid = set(map(id, avoid))
        while True:
            slot = self._choose(engine_model, avoid)
            slot.running[engine_model] += 1  # counted at once, so concurrent choices see it busy
            if self.leases is not None and self._serving(engine_model) == 1:
                self.leases.use(engine_model)
            try:
                load_seconds = 0.0
                if adapter_path is not None:
                    load_seconds = await self._ensure_loaded(slot, engine_model, adapter_path)
            except EngineUnreachable:
                self.release(slot, engine_model)
                self.failed(slot)
                avoid.add(id(slot))  # this request tries the next engine; others may still use this one
                continue
            except BaseException:
                self.release(slot, engine_model)
                raise
            return slot, load_seconds

    def release(self, slot: EngineSlot, engine_model: str) -> None:
        self._unreserve(slot, engine_model)
        if slot.running[engine_model]:
            return
        if engine_model in slot.retiring and slot.up:
            self._spawn(self._unload(slot, engine_model))
        else:
            self._settle(engine_model)

    def _unreserve(self, slot: EngineSlot, engine_model: str) -> None:
        slot.running[engine_model] -= 1
        if slot.running[engine_model] <= 0:
            del slot.running[engine_model]
        if self.leases is not None and self._serving(engine_model) == 0:
            self.leases.done_with(engine_model)

    def _serving(self, engine_model: str) -> int:
        """Requests running on this version, on all engines."""
        return sum(s.running[engine_model] for s in self.slots)

    async def preload(self, engine_model: str, adapter_path: str) -> None:
        """Load a version before its first request, on the engine that would serve it. The version is
        served (again): its retirement, if any, is called off."""
        if engine_model not in self._deleted:
            for slot in self.slots:
                slot.retiring.discard(engine_model)
        slot, _ = await self.acquire(engine_model, adapter_path)
        self.release(slot, engine_model)

    def retire(self, engine_models: Iterable[str]) -> list[asyncio.Task]:
        """Unload these versions everywhere once idle (now where idle: the unloads started are returned);
        a name unloaded is loaded again if asked for again. Engines out of rotation unload on return."""
        started = []
        for name in engine_models:
            for slot in self.slots:
                if slot.up and name not in slot.loaded and not slot.running[name]:
                    continue
                slot.retiring.add(name)
                if slot.up and not slot.running[name]:
                    started.append(self._spawn(self._unload(slot, name)))
        return started

    async def discard(self, engine_model: str, remove: Callable[[], None]) -> None:
        """A deleted version: retire it, and call `remove` (in a thread; it deletes the files) once no
        engine holds it. Returns when that is done, or, while requests still run on it, at once: the
        rest happens when the last one ends."""
        self._deleted[engine_model] = remove
        unloads = self.retire([engine_model])
        if unloads:
            await asyncio.wait(unloads)
        self._settle(engine_model)
        removing = self._removing.get(engine_model)
        if removing is not None:
            await asyncio.wait([removing])

    def _holds(self, name: str) -> bool:
        return any(name in s.loaded or s.running[name] for s in self.slots)

    def _settle(self, name: str) -> None:
        """Remove a deleted version's files once no engine holds it (a down engine serves nothing from them,
        and unloads it when it returns)."""
        if name not in self._deleted or self._holds(name):
            return
        remove = self._deleted.pop(name)
        self._removing[name] = self._spawn(self._remove(name, remove))

    async def _remove(self, name: str, remove: Callable[[], None]) -> None:
        try:
            await asyncio.to_thread(remove)
            log.info("removed the files of deleted adapter %s", name)
        except Exception:  # the start-up sweep of the registry gets them later
            log.exception("could not remove the files of deleted adapter %s", name)
        finally:
            self._removing.pop(name, None)

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
                await self.observer.verdict(name, False)
                raise EngineUnavailable("The adapter could not be loaded on the inference engine.") from exc
            slot.loaded.add(name)
            slot.failures = 0
            seconds = time.perf_counter() - started
            self.observer.loaded(slot.client.base_url, seconds)
            await self.observer.verdict(name, True)
            log.info("loaded adapter %s on %s in %.3f s", name, slot.client.base_url, seconds)
            return seconds

    async def _unload(self, slot: EngineSlot, name: str) -> None:
        async with slot.locks[name]:
            # Not retiring: served again (`preload`). Busy again: `release` retries it when the last
            # request ends. Out of rotation: `healthy` retries it when the engine returns.
            if name not in slot.retiring or slot.running[name] or not slot.up:
                return
            if self.leases is not None and await self.leases.used_elsewhere(name):
                log.info("not unloading %s from %s yet: another gateway serves it", name, slot.client.base_url)
                return  # still retiring: the next health check tries again
            slot.loaded.discard(name)
            try:
                if await slot.client.unload_adapter(name):
                    self.observer.unloaded(slot.client.base_url)
                    log.info("unloaded adapter %s from %s", name, slot.client.base_url)
                slot.retiring.discard(name)
            except EngineUnavailable as exc:  # kept retiring: tried again on its next release or return
                log.warning("could not unload adapter %s from %s: %s", name, slot.client.base_url, exc)
            except AdapterLoadFailed as exc:  # the engine refused: nothing to retry
                slot.retiring.discard(name)
                log.warning("engine %s refused to unload %s: %s", slot.client.base_url, name, exc)
        self._settle(name)

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)  # keep a reference until done, or the task may be collected
        task.add_done_callback(self._tasks.discard)
        return task
