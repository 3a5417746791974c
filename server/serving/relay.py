"""Send one OpenAI generation request to an engine and relay the answer to the client.

The relay rewrites only what it must: the engine-side model name back to the client's, and the usage
chunk the gateway asked for on the client's behalf. Streams go out event by event as they arrive.
Engine errors become `APIError`s here, before any byte is sent, or an SSE error event after.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path

from starlette.background import BackgroundTask
from starlette.responses import JSONResponse, Response, StreamingResponse

from server.engine.client import EngineStream
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
from server.observability.metrics import RequestRecorder
from server.serving.chunk_rewrite import ChunkRewriter
from server.serving.limits import Ticket
from server.serving.tenancy import ModelRoute
from server.wire.openai import GenerationRequest

log = logging.getLogger("loraserve.relay")

_RESPONSE_ENDS = {"response.completed": 200, "response.incomplete": 200, "response.failed": 503}
# "[21:55:17] /project/cpp/json_schema_converter.cc:4944: " before a grammar compiler's message: its build paths.
_SOURCE_LOCATION = re.compile(r"(?:\[\d\d:\d\d:\d\d\] )?/[^\s:]+:\d+: ")
_ENGINE_STATUS = {400: BadRequest, 404: NotFound, 413: PayloadTooLarge, 422: Unprocessable, 429: RateLimited}


class _EngineForgotModel(Exception):
    """The engine does not know a model we loaded there (it restarted behind our back)."""


async def forward(
    pool: EnginePool, route: ModelRoute, endpoint: str, request: GenerationRequest, recorder: RequestRecorder,
    *, cache_salt: str, client_gone: Callable[[], Awaitable[None]], ticket: Ticket | None = None,
) -> Response:
    """Serve `request` on an engine. It goes to another engine when one proves unreachable before
    answering (no output was sent yet), and once more when an engine had silently lost the adapter.
    `client_gone` returns when the client disconnects: a non-streamed request is then abandoned, which
    makes the engine abort it (a stream learns it from its own connection). A non-streamed request whose
    admission `ticket` is preempted is aborted too, and sent again once it has its turn."""
    payload = request.engine_payload(route.engine_model, cache_salt)
    if route.path is None and pool.base_stand_in is not None:
        name, path = pool.base_stand_in
        route = replace(route, engine_model=name, path=Path(path))
        payload["model"] = name
    tried: list[EngineSlot] = []
    relearned = False
    while True:
        slot, load_seconds = await pool.acquire(route.engine_model, route.path and str(route.path), avoid=tried)
        release = _Once(lambda slot=slot: pool.release(slot, route.engine_model))
        recorder.engine_sent(load_seconds)
        try:
            if request.stream:
                return await _stream(slot, route, endpoint, payload, request, recorder, release)
            return await _complete(slot, route, endpoint, payload, recorder, client_gone, ticket)
        except EngineUnreachable:
            log.warning("engine %s unreachable for %s; trying another", slot.client.base_url, route.engine_model)
            pool.failed(slot)  # one dropped connection is no reason to take the engine from everyone
            tried.append(slot)
        except _EngineForgotModel:
            pool.forget(slot, route.engine_model)
            if relearned or route.path is None:
                raise EngineUnavailable("The inference engine lost the model; try again.") from None
            relearned = True
        finally:
            if not request.stream:
                release()


async def _complete(
    slot: EngineSlot, route, endpoint, payload: dict, recorder: RequestRecorder,
    client_gone: Callable[[], Awaitable[None]], ticket: Ticket | None,
) -> Response:
    while True:
        answer = asyncio.ensure_future(slot.client.complete(endpoint, payload))
        outcome = await _first(answer, client_gone, ticket.preempted if ticket else None)
        if outcome == "preempted":  # for another tenant's turn: the engine dropped it; it runs again
            resumed = asyncio.ensure_future(ticket.resume())
            outcome = await _first(resumed, client_gone)
            if outcome == "done":
                resumed.result()  # a 429 when no turn came in time
                continue
        if outcome == "gone":
            recorder.finished(499, usage_unknown=True)
            return Response(status_code=499)  # nobody reads it; the access log and metrics do
        break
    reply = answer.result()
    if reply.status != 200:
        raise _engine_error(reply.status, reply.body, route)
    body = reply.json()
    body["model"] = route.requested
    recorder.usage(body.get("usage") or {})
    recorder.finished(200)
    return JSONResponse(body)


async def _first(work: asyncio.Future, client_gone: Callable[[], Awaitable[None]],
                 preempted: asyncio.Event | None = None) -> str:
    """Wait for `work`, the client leaving or a preemption, whichever comes first: "done", "gone" or
    "preempted". Unfinished `work` is cancelled, which drops its engine connection: vLLM aborts it."""
    others = [asyncio.ensure_future(client_gone())]
    if preempted is not None:
        others.append(asyncio.ensure_future(preempted.wait()))
    try:
        await asyncio.wait((work, *others), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for other in others:
            other.cancel()
        outcome = "done" if work.done() else "preempted" if preempted is not None and preempted.is_set() else "gone"
        if not work.done():
            work.cancel()
    return outcome


async def _stream(
    slot: EngineSlot, route, endpoint, payload: dict, request: GenerationRequest, recorder: RequestRecorder,
    release: _Once,
) -> Response:
    """Open the engine's stream; its status decides the HTTP status before any byte is sent. From
    then on the response owns the connection and the engine slot."""
    try:
        response = await slot.client.open_stream(endpoint, payload)
    except BaseException:
        release()
        raise
    if response.status != 200:
        try:
            raise _engine_error(response.status, await response.aread(), route)
        finally:
            await response.aclose()
            release()
    relay_class = _ResponsesStreamRelay if endpoint == "/v1/responses" else _StreamRelay
    relay = relay_class(response, route, request, recorder, release)
    # The background task also runs when the client left before the first byte was sent.
    return StreamingResponse(
        relay.events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
        background=BackgroundTask(relay.finish),
    )


class _Once:
    def __init__(self, fn: Callable[[], None]):
        self._fn: Callable[[], None] | None = fn

    def __call__(self) -> None:
        fn, self._fn = self._fn, None
        if fn is not None:
            fn()


class _StreamRelay:
    """One engine stream relayed to one client. Usage comes on every engine chunk (the gateway asks for it)
    and is passed on only as the client asked; a stream the client left before its end is a 499, charged
    with what the engine had produced by then. A stream of one sequence (the usual case) is rewritten without
    decoding its chunks (server/serving/chunk_rewrite.py); any chunk that path does not know is parsed whole."""

    decodes_every_chunk = False

    def __init__(self, response: EngineStream, route: ModelRoute, request: GenerationRequest,
                 recorder: RequestRecorder, release: _Once):
        self.response, self.route, self.recorder, self.release = response, route, recorder, release
        self.wants_usage, self.wants_continuous = request.wants_usage, request.wants_continuous_usage
        self.n = request.n or 1
        self.status: int | None = None  # set when the engine's stream ended, or broke
        # The engine's per-chunk usage counts one sequence (choice) and its prompt: summed here.
        self._completion: dict[int, int] = {}
        self._prompt: dict[int, int] = {}
        one_sequence = self.n * request.prompt_count == 1
        self._rewriter = None if self.decodes_every_chunk or not one_sequence else ChunkRewriter(
            route.engine_model, route.requested, usage_on_every_chunk=self.wants_continuous,
            usage_at_end=self.wants_usage)

    async def events(self) -> AsyncIterator[bytes]:
        try:
            async for line in self.response.lines():
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip().decode()
                if data == "[DONE]":
                    # The answer is whole: a client that hangs up now, before the engine's connection
                    # ends, was served (it is not a 499).
                    self.status = self.status or 200
                    yield b"data: [DONE]\n\n"
                    continue
                out = self._relayed(data)
                if out is not None:
                    yield out
            self.status = self.status or 200
        except (EngineUnavailable, json.JSONDecodeError, UnicodeDecodeError) as exc:
            self.status = 503
            log.error("engine stream for %s broke: %s", self.route.engine_model, type(exc).__name__)
            yield _sse(_broken_stream())
        finally:
            await self.finish()

    def _relayed(self, data: str) -> bytes | None:
        """One engine event's JSON as the bytes the client gets; None to drop it."""
        chunk = self._rewriter.rewrite(data) if self._rewriter is not None else None
        if chunk is None:
            event = self._rewrite(json.loads(data))
            return None if event is None else self._encode(event)
        if chunk.has_choices:
            self.recorder.first_token()
        if chunk.usage:
            self._count([{"index": 0}] if chunk.has_choices else None, chunk.usage)
        if not chunk.has_choices and not self.wants_usage:
            return None
        return b"data: " + chunk.text.encode() + b"\n\n"

    def _rewrite(self, event: dict) -> dict | None:
        """The engine's event as the client sees it; None to drop it."""
        if "error" in event:
            self.status = 503
            log.error("engine error event for %s: %s", self.route.engine_model, str(event)[:500])
            return _broken_stream()
        if event.get("choices"):
            self.recorder.first_token()
        usage = event.pop("usage", None)
        if usage:
            self._count(event.get("choices"), usage)
        if not event.get("choices"):  # the closing usage-only chunk
            if not self.wants_usage:
                return None
            event["usage"] = usage
        elif self.wants_continuous:
            event["usage"] = usage
        event["model"] = self.route.requested
        return event

    def _count(self, choices: list | None, usage: dict) -> None:
        if not choices:  # the closing chunk: the request's totals
            self.recorder.usage(usage)
            return
        for choice in choices:
            index = choice.get("index", 0)
            self._completion[index] = usage.get("completion_tokens") or 0
            self._prompt[index // self.n] = usage.get("prompt_tokens") or 0
        self.recorder.usage({"prompt_tokens": sum(self._prompt.values()),
                             "completion_tokens": sum(self._completion.values())})

    def _encode(self, event: dict) -> bytes:
        return _sse(event)

    async def finish(self) -> None:
        await self.response.aclose()  # closing the connection makes vLLM abort an unfinished request
        self.release()
        self.recorder.finished(self.status or 499)


class _ResponsesStreamRelay(_StreamRelay):
    """A Responses API stream: typed events (`event:` names each), the model inside the `response` object of
    the lifecycle events, usage only in the last one. Until then each text delta counts as one token, so a
    client that hangs up is charged for about what it was sent. Every event is parsed whole."""

    decodes_every_chunk = True

    def _rewrite(self, event: dict) -> dict | None:
        kind = event.get("type")
        if kind == "error" or (kind is None and "error" in event):
            self.status = 503
            log.error("engine error event for %s: %s", self.route.engine_model, str(event)[:500])
            return _broken_stream()
        if kind == "response.output_text.delta" or kind == "response.function_call_arguments.delta":
            self.recorder.first_token()
            self._completion[0] = self._completion.get(0, 0) + 1
            self.recorder.usage({"prompt_tokens": self.recorder.prompt_estimate,
                                 "completion_tokens": self._completion[0]})
        response = event.get("response")
        if isinstance(response, dict):
            response["model"] = self.route.requested
            if kind in _RESPONSE_ENDS:
                self.status = _RESPONSE_ENDS[kind]
                if response.get("usage"):
                    self.recorder.usage(response["usage"])
        return event

    def _encode(self, event: dict) -> bytes:
        name = str(event.get("type", "message")).encode()
        return b"event: " + name + b"\n" + _sse(event)


def _broken_stream() -> dict:
    return api_error_body(EngineUnavailable("The inference engine failed during the response."))


def _sse(event: dict) -> bytes:
    return b"data: " + json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def _engine_error(status: int, body: bytes, route: ModelRoute) -> APIError:
    """An engine's error as the client may see it: our internal name replaced by the client's, no source paths."""
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
    message = _SOURCE_LOCATION.sub("", message.replace(route.engine_model, route.requested)).strip()
    return _ENGINE_STATUS.get(status, BadRequest)(message, param=param if isinstance(param, str) else None)
