"""One structured log line per request, and a request id on every response (`X-Request-ID`).

A client's own `X-Request-ID` is kept when it is a plain token; otherwise the gateway makes one. The
line carries the id, method, route, status, latency and, for inference, tenant, adapter and token counts
(from the request's `RequestRecorder`); never a key or prompt text.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("loraserve.access")
_CLIENT_ID = re.compile(rb"[A-Za-z0-9._-]{1,64}")


class AccessLog:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"")
        request_id = given.decode() if _CLIENT_ID.fullmatch(given) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["started"], state["request_id"] = time.perf_counter(), request_id
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            fields = {"request_id": request_id, "method": scope["method"], "path": _route(scope),
                      "status": status, "latency_ms": round((time.perf_counter() - state["started"]) * 1000, 1)}
            recorder = state.get("recorder")
            if recorder is not None:
                if recorder.status == 499:
                    fields["status"] = 499  # the client left before the answer's end (as nginx logs it)
                fields.update(tenant=recorder.tenant, adapter=recorder.adapter,
                              prompt_tokens=recorder.prompt_tokens, completion_tokens=recorder.completion_tokens)
            log.info("request", extra={"fields": fields})


def _route(scope: Scope) -> str:
    """The route template (`/admin/tenants/{tenant}`), so client-chosen path parts stay out of logs."""
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"
