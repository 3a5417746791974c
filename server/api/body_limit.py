"""Refuse request bodies over the configured size with 413, before they fill memory or disk.

A declared Content-Length over the limit is refused at once; a body that grows past it while being
read (chunked uploads) is cut off, and whatever the application then answers is replaced by the 413.
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import APIError, PayloadTooLarge, api_error_body


class BodySizeLimit:
    def __init__(self, app: ASGIApp, *, default: int, uploads: int):
        self.app = app
        self.default = default
        self.uploads = uploads

    @staticmethod
    def _is_upload(path: str) -> bool:
        return path.endswith("/adapters") or path == "/v1/files"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.uploads if self._is_upload(scope["path"]) else self.default
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _send_413(scope, send)
            return
        seen = 0
        exceeded = False

        async def counting_receive() -> Message:
            nonlocal seen, exceeded
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    exceeded = True
                    return {"type": "http.disconnect"}  # stop the application reading further
            return message

        started = False

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded:
                if not started:
                    started = True
                    await _send_413(scope, send)
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not exceeded:
                raise  # a cut-off body makes the application fail; that failure is the 413
        if exceeded and not started:
            await _send_413(scope, send)


async def _send_413(scope: Scope, send: Send) -> None:
    services = getattr(scope["app"].state, "services", None) if "app" in scope else None
    if services is not None:
        services.metrics.rejected("validation")
    await send_error(send, PayloadTooLarge("The request body is larger than this server accepts."))


async def send_error(send: Send, error: APIError, *, close: bool = False) -> None:
    """Answer with `error` in the OpenAI shape, from a middleware (routes raise instead). `close`: the
    request's body was not read, so the connection must not carry another request."""
    body = json.dumps(api_error_body(error)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               *((k.lower().encode(), v.encode()) for k, v in error.headers().items())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
