"""One vLLM OpenAI-compatible server, behind a small async interface.

The gateway talks to an engine only through this class: health, load and unload an adapter, and send
an OpenAI request (whole or streamed). Transport failures become `EngineUnavailable`, and those that
mean the engine is gone (no connection, or the connection dropped before an answer) `EngineUnreachable`,
which the caller may retry on another engine. The engine's own answers are returned to the caller, who
decides what a client may see of them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import httpx

from server.errors import EngineUnavailable, EngineUnreachable

_ALREADY_LOADED = "has already been loaded"
# Failures that mean no answer is coming from this engine (as opposed to a slow answer).
_GONE = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)


@dataclass
class EngineReply:
    status: int
    body: bytes

    def json(self):
        return json.loads(self.body)


class AdapterLoadFailed(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class EngineClient:
    def __init__(
        self, base_url: str, *, read_timeout: float = 300.0, transport: httpx.AsyncBaseTransport | None = None
    ):
        self.base_url = base_url.rstrip("/")
        timeout = httpx.Timeout(connect=5.0, read=read_timeout, write=30.0, pool=30.0)
        # No connection cap: the engine does its own scheduling, and the gateway bounds concurrency.
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=timeout, limits=limits, transport=transport)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def healthy(self) -> bool:
        try:
            response = await self._http.get("/health", timeout=5.0)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def load_adapter(self, name: str, path: str) -> None:
        """Load an adapter under `name`; loading a name that is already there is a success."""
        reply = await self._post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})
        if reply.status == 200 or (reply.status == 400 and _ALREADY_LOADED.encode() in reply.body):
            return
        raise AdapterLoadFailed(reply.status, _error_message(reply))

    async def unload_adapter(self, name: str) -> bool:
        """Unload an adapter; False when the engine did not have it."""
        reply = await self._post("/v1/unload_lora_adapter", {"lora_name": name})
        if reply.status in (200, 404):
            return reply.status == 200
        raise AdapterLoadFailed(reply.status, _error_message(reply))

    async def complete(self, path: str, payload: dict) -> EngineReply:
        return await self._post(path, payload)

    async def open_stream(self, path: str, payload: dict) -> httpx.Response:
        """An open streaming response; the caller must `aclose()` it. Closing it early drops the
        connection, which makes vLLM abort the request: that is how a client's disconnect reaches
        the engine."""
        request = self._http.build_request("POST", path, json=payload)
        try:
            return await self._http.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise _transport_error(exc) from exc

    async def _post(self, path: str, payload: dict) -> EngineReply:
        try:
            response = await self._http.post(path, json=payload)
        except httpx.HTTPError as exc:
            raise _transport_error(exc) from exc
        return EngineReply(response.status_code, response.content)


def _transport_error(exc: httpx.HTTPError) -> EngineUnavailable:
    if isinstance(exc, _GONE):
        return EngineUnreachable("The inference engine is not reachable; try again shortly.")
    if isinstance(exc, httpx.TimeoutException):
        return EngineUnavailable("The inference engine did not answer in time.")
    return EngineUnavailable("The inference engine is not reachable; try again shortly.")


def _error_message(reply: EngineReply) -> str:
    try:
        return str(reply.json()["error"]["message"])
    except Exception:
        return reply.body[:200].decode(errors="replace")
