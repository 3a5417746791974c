"""Admin API: recent traffic per tenant and adapter on this gateway, and what each engine holds.

Both run on the event loop (no I/O): the pool's sets and the traffic history change there, and reading them from
a worker thread could meet them mid-change."""

from __future__ import annotations

from fastapi import APIRouter

from adapters.names import parse_engine_name
from server.api.deps import AdminDep, ServicesDep

router = APIRouter(prefix="/admin", tags=["admin"])


@router.get("/traffic")
async def traffic(_: AdminDep, services: ServicesDep) -> dict:
    """Requests, errors, tokens and median time to first token over the last minutes, per interval."""
    return services.traffic.report()


@router.get("/engines")
async def engines(_: AdminDep, services: ServicesDep) -> dict:
    """The engines this gateway routes to, whether each is in rotation, and the adapter versions it holds."""
    data = []
    for slot in services.pool.slots:
        held = sorted(filter(None, map(parse_engine_name, slot.loaded)))
        data.append({"url": slot.client.base_url, "up": slot.up, "in_flight": slot.in_flight,
                     "adapters": [{"tenant": t, "adapter": a, "version": v, "model": f"{a}@{v}"} for t, a, v in held]})
    return {"object": "list", "data": data}
