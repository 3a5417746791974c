"""OpenAI-compatible inference routes: thin handlers over tenancy and the relay."""

from __future__ import annotations

import functools
import time

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from server.api.deps import ServicesDep, TenantDep
from server.errors import BadRequest, NotFound, as_api_error
from server.observability.metrics import RequestRecorder
from server.publishing import canary
from server.services import Services
from server.serving.bounds import check_request_bounds
from server.serving.budget import plan_cost
from server.serving.relay import forward
from server.serving.tenancy import resolve_model
from server.storage.store import Tenant
from server.wire.openai import ChatCompletionRequest, CompletionRequest, GenerationRequest, ModelCard, ModelList
from server.wire.responses import ResponsesRequest
from server.wire.timestamps import epoch

router = APIRouter(prefix="/v1", tags=["openai"])


@router.get("/models", response_model=ModelList)
def list_models(tenant: TenantDep, services: ServicesDep) -> ModelList:
    base = services.settings.served_model_name
    cards = [ModelCard(id=base, created=0, owned_by="loraserve", root=base)]
    for adapter in services.store.list_adapters(tenant.id):
        if adapter.active_version is not None:
            cards.append(ModelCard(
                id=adapter.name, created=epoch(adapter.created_at), owned_by=tenant.id,
                parent=base, root=base,
            ))
    return ModelList(data=cards)


@router.get("/models/{model:path}", response_model=ModelCard)
def retrieve_model(model: str, tenant: TenantDep, services: ServicesDep) -> ModelCard:
    """A model this tenant may send requests to, by any name it may use (an adapter, `NAME@N`, the base
    model, `default`); 404 `model_not_found` otherwise, as for a request naming it."""
    route = resolve_model(services.settings, services.store, services.registry, tenant, model)
    base = services.settings.served_model_name
    if route.adapter is None:
        return ModelCard(id=model, created=0, owned_by="loraserve", root=base)
    adapter = services.store.get_adapter(tenant.id, route.adapter)
    return ModelCard(id=model, created=epoch(adapter.created_at), owned_by=tenant.id, parent=base, root=base)


@router.post("/chat/completions")
async def chat_completions(
    body: ChatCompletionRequest, tenant: TenantDep, services: ServicesDep, request: Request
) -> Response:
    return await _generate(services, tenant, request, "/v1/chat/completions", body)


@router.post("/completions")
async def completions(body: CompletionRequest, tenant: TenantDep, services: ServicesDep, request: Request) -> Response:
    return await _generate(services, tenant, request, "/v1/completions", body)


@router.post("/responses")
async def responses(body: ResponsesRequest, tenant: TenantDep, services: ServicesDep, request: Request) -> Response:
    return await _generate(services, tenant, request, "/v1/responses", body)


@router.get("/responses/{response_id}")
def get_response(response_id: str, tenant: TenantDep) -> Response:
    raise NotFound("Responses are not stored on this server (store is treated as false); keep the answer you got.",
                   param="response_id", code="response_not_found")


async def _generate(
    services: Services, tenant: Tenant, request: Request, endpoint: str, body: GenerationRequest | ResponsesRequest
) -> Response:
    started = getattr(request.state, "started", None) or time.perf_counter()
    recorder = RequestRecorder(services.metrics, started, tenant.id, endpoint)
    request.state.recorder = recorder  # the access log reads tenant, adapter, tokens and status from it
    try:
        check_request_bounds(services.settings, body)
        limits = {"max_concurrent_requests": services.settings.tenant_max_concurrent_requests, **(tenant.limits or {})}
        _apply_max_tokens(body, limits.get("max_tokens"))
        cost = plan_cost(body, context_window=services.settings.engine_max_model_len,
                         token_budget=limits.get("tokens_per_minute"))
        recorder.prompt_estimate = cost.prompt_tokens
        ticket = await services.limiter.acquire(tenant.id, limits, sequences=cost.sequences,
                                                tokens=cost.reserved_tokens)
        recorder.on_finish = ticket.release
        ticket.preemptible = not body.stream  # nothing is sent before the end: it may run again
        sticky = body.user or request.headers.get("x-request-id")  # keeps a canary's split per end user
        route = await run_in_threadpool(
            resolve_model, services.settings, services.store, services.registry, tenant, body.model, sticky
        )
        recorder.adapter, recorder.version = route.adapter or "base", route.version
        if route.canary is not None:
            recorder.on_status = functools.partial(canary.finished, services, tenant.id, route)
        return await forward(services.pool, route, endpoint, body, recorder,
                             cache_salt=services.cache_salts.for_tenant(tenant.id),
                             client_gone=lambda: _disconnected(request), ticket=ticket)
    except Exception as exc:
        error = as_api_error(exc)
        recorder.finished(error.status if error else 500)
        raise


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body was read already, so the next message is the end)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _apply_max_tokens(body: GenerationRequest | ResponsesRequest, limit: int | None) -> None:
    """Hold the request to the tenant's `max_tokens`: refuse a larger ask, cap an open one."""
    if limit is None:
        return
    asked = body.requested_tokens
    if asked is not None and asked > limit:
        raise BadRequest(f"max_tokens is {asked}, above this tenant's limit of {limit}.", param="max_tokens",
                         code="max_tokens_exceeded")
    if asked is None:
        body.cap_tokens(limit)
