"""The last resort: an unexpected exception becomes one 500 in the OpenAI shape, and nothing more.

Starlette's own ServerErrorMiddleware sends its 500 and then re-raises, so uvicorn logs the error a
second time and, seeing a failed application, closes the keep-alive connection: a client's next
request on it fails with a connection reset. This middleware sits just inside it, logs the error once,
answers 500 when no response has started, and returns normally, so the connection stays usable. When a
response had already started (a stream), it cannot be repaired: the error is logged and the response
left unfinished, which makes uvicorn close that connection, as it must.
"""

from __future__ import annotations

import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.body_limit import send_error
from server.errors import APIError

log = logging.getLogger("loraserve.app")


class UnhandledErrors:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if not started:
                await send_error(send, APIError("Internal server error."))
