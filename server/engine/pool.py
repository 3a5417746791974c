"""The engines the gateway can send work to, and which adapters each one holds.

The pool picks an engine for a request (one that already holds the adapter, else the least busy) and
makes sure the adapter version is loaded there under its internal name before the request goes out.
What an engine holds is remembered here; the memory is dropped when an engine restarts, and an engine
that says it does not know a name we thought loaded is believed (see `forget`).
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from dataclasses import dataclass, field

from server.engine.client import AdapterLoadFailed, EngineClient
from server.errors import EngineUnavailable

log = logging.getLogger("loraserve.pool")


@dataclass
class EngineSlot:
    client: EngineClient
    loaded: set[str] = field(default_factory=set)
    in_flight: int = 0
    locks: defaultdict[str, asyncio.Lock] = field(default_factory=lambda: defaultdict(asyncio.Lock))


class EnginePool:
    def __init__(self, clients: list[EngineClient]):
        if not clients:
            raise ValueError("at least one engine is needed")
        self.slots = [EngineSlot(c) for c in clients]

    async def aclose(self) -> None:
        for slot in self.slots:
            await slot.client.aclose()

    async def healthy(self) -> bool:
        results = await asyncio.gather(*(s.client.healthy() for s in self.slots))
        return any(results)

    def forget_all(self, index: int = 0) -> None:
        """The engine restarted: it holds no adapters any more."""
        self.slots[index].loaded.clear()

    def forget(self, slot: EngineSlot, engine_model: str) -> None:
        slot.loaded.discard(engine_model)

    async def acquire(self, engine_model: str, adapter_path: str | None) -> EngineSlot:
        """An engine ready to serve `engine_model`, counted busy until `release`."""
        slot = self._choose(engine_model)
        if adapter_path is not None:
            await self._ensure_loaded(slot, engine_model, adapter_path)
        slot.in_flight += 1
        return slot

    def release(self, slot: EngineSlot) -> None:
        slot.in_flight -= 1

    def _choose(self, engine_model: str) -> EngineSlot:
        holding = [s for s in self.slots if engine_model in s.loaded]
        return min(holding or self.slots, key=lambda s: s.in_flight)

    async def _ensure_loaded(self, slot: EngineSlot, name: str, path: str) -> None:
        if name in slot.loaded:
            return
        async with slot.locks[name]:  # concurrent first requests load once
            if name in slot.loaded:
                return
            try:
                await slot.client.load_adapter(name, path)
            except AdapterLoadFailed as exc:
                # The registry validated this adapter, so a refusal here is the server's fault; the
                # engine's message may carry paths, so it goes to the log, not the client.
                log.error("engine refused adapter %s: %s (%s)", name, exc, exc.status)
                raise EngineUnavailable("The adapter could not be loaded on the inference engine.") from exc
            slot.loaded.add(name)
            log.info("loaded adapter %s on %s", name, slot.client.base_url)
