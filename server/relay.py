"""Send one OpenAI generation request to an engine and relay the answer to the client.

The relay rewrites only what it must: the engine-side model name back to the client's, and the usage
chunk the gateway asked for on the client's behalf. Streams go out event by event as they arrive.
Engine errors become `APIError`s here, before any byte is sent, or an SSE error event after.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import httpx
from starlette.background import BackgroundTask
from starlette.responses import JSONResponse, Response, StreamingResponse

from server.engine.pool import EnginePool, EngineSlot
from server.errors import (
    APIError,
    BadRequest,
    EngineUnavailable,
    EngineUnreachable,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    Unprocessable,
    api_error_body,
)
from server.metrics import RequestRecorder
from server.protocol import GenerationRequest
from server.tenancy import ModelRoute

log = logging.getLogger("loraserve.relay")

_ENGINE_STATUS = {400: BadRequest, 404: NotFound, 413: PayloadTooLarge, 422: Unprocessable, 429: RateLimited}


class _EngineForgotModel(Exception):
    """The engine does not know a model we loaded there (it restarted behind our back)."""


async def forward(
    pool: EnginePool, route: ModelRoute, endpoint: str, request: GenerationRequest, recorder: RequestRecorder
) -> Response:
    """Serve `request` on an engine. It goes to another engine when one proves unreachable before
    answering (no output was sent yet), and once more when an engine had silently lost the adapter."""
    if route.path is None and pool.base_stand_in is not None:
        name, path = pool.base_stand_in
        route = replace(route, engine_model=name, path=Path(path))
    tried: list[EngineSlot] = []
    relearned = False
    while True:
        slot, load_seconds = await pool.acquire(route.engine_model, route.path and str(route.path), avoid=tried)
        release = _Once(lambda slot=slot: pool.release(slot, route.engine_model))
        recorder.engine_sent(load_seconds)
        try:
            if request.stream:
                return await _stream(slot, route, endpoint, request, recorder, release)
            return await _complete(slot, route, endpoint, request, recorder)
        except EngineUnreachable:
            log.warning("engine %s unreachable for %s; trying another", slot.client.base_url, route.engine_model)
            pool.mark_down(slot)
            tried.append(slot)
        except _EngineForgotModel:
            pool.forget(slot, route.engine_model)
            if relearned or route.path is None:
                raise EngineUnavailable("The inference engine lost the model; try again.") from None
            relearned = True
        finally:
            if not request.stream:
                release()


async def _complete(slot: EngineSlot, route, endpoint, request, recorder: RequestRecorder) -> Response:
    reply = await slot.client.complete(endpoint, request.engine_payload(route.engine_model))
    if reply.status != 200:
        raise _engine_error(reply.status, reply.body, route)
    body = reply.json()
    body["model"] = route.requested
    recorder.usage(body.get("usage") or {})
    recorder.finished(200)
    return JSONResponse(body)


async def _stream(slot: EngineSlot, route, endpoint, request, recorder: RequestRecorder, release: _Once) -> Response:
    """Open the engine's stream; its status decides the HTTP status before any byte is sent. From
    then on the response owns the connection and the engine slot."""
    try:
        response = await slot.client.open_stream(endpoint, request.engine_payload(route.engine_model))
    except BaseException:
        release()
        raise
    if response.status_code != 200:
        try:
            raise _engine_error(response.status_code, await response.aread(), route)
        finally:
            await response.aclose()
            release()

    async def finish(status: int = 200) -> None:
        await response.aclose()  # closing the connection makes vLLM abort an unfinished request
        release()
        recorder.finished(status)

    events = _relay_events(response, route, request.wants_usage, recorder, finish)
    # The background task also runs when the client left before the first byte was sent.
    return StreamingResponse(
        events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
        background=BackgroundTask(finish),
    )


class _Once:
    def __init__(self, fn: Callable[[], None]):
        self._fn: Callable[[], None] | None = fn

    def __call__(self) -> None:
        fn, self._fn = self._fn, None
        if fn is not None:
            fn()


async def _relay_events(
    response: httpx.Response, route: ModelRoute, wants_usage: bool, recorder: RequestRecorder,
    finish: Callable[[int], Awaitable[None]],
) -> AsyncIterator[bytes]:
    status = 200
    try:
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                yield b"data: [DONE]\n\n"
                continue
            event = json.loads(data)
            if "error" in event:
                status = 503
                log.error("engine error event for %s: %s", route.engine_model, data[:500])
                event = _broken_stream()
            else:
                if event.get("choices"):
                    recorder.first_token()
                usage = event.get("usage")
                if usage:
                    recorder.usage(usage)
                    if not wants_usage:
                        if not event.get("choices"):
                            continue  # the usage-only chunk the client did not ask for
                        event.pop("usage")
                event["model"] = route.requested
            yield _sse(event)
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        status = 503
        log.error("engine stream for %s broke: %s", route.engine_model, type(exc).__name__)
        yield _sse(_broken_stream())
    finally:
        await finish(status)


def _broken_stream() -> dict:
    return api_error_body(EngineUnavailable("The inference engine failed during the response."))


def _sse(event: dict) -> bytes:
    return b"data: " + json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def _engine_error(status: int, body: bytes, route: ModelRoute) -> APIError:
    """An engine's error as the client may see it: our internal name replaced by the client's."""
    try:
        error = json.loads(body)["error"]
        message, param = str(error.get("message", "")), error.get("param")
    except (ValueError, KeyError, TypeError, AttributeError):
        message, param = "", None
    if status == 404 and route.engine_model in message:
        raise _EngineForgotModel
    if status >= 500 or not message:
        log.error("engine error %s for %s: %s", status, route.engine_model, message[:500])
        return EngineUnavailable("The inference engine failed to serve the request.")
    message = message.replace(route.engine_model, route.requested)
    return _ENGINE_STATUS.get(status, BadRequest)(message, param=param if isinstance(param, str) else None)
