"""One vLLM OpenAI-compatible server, behind a small async interface.

The gateway talks to an engine only through this class: health, load and unload an adapter, and send
an OpenAI request (whole or streamed). Transport failures become `EngineUnavailable`, and those that
mean the engine is gone (no connection, or the connection dropped before an answer) `EngineUnreachable`,
which the caller may retry on another engine. The engine's own answers are returned to the caller, who
decides what a client may see of them.

Timeouts differ by kind of request, because silence means different things:
- a stream sends tokens as they come, so `read_timeout` seconds without a byte means the engine stalled;
- a non-streamed request (a completion, an adapter load) sends nothing until it is done, so silence
  says nothing: it is bounded by `request_timeout` in total and by the engine's liveness, its `/health`
  answering within `read_timeout` (probed every `liveness_interval` seconds while requests wait; one
  probe at a time is shared by all of them).

A keep-alive connection the engine closed while it sat in the pool fails the next request on it before
any byte comes back; such a request is sent once more (when the engine is really gone the second try fails
to connect at once).

The transport is aiohttp (a vLLM dependency), not httpx: httpcore's pool scans every pooled connection (a
`poll` on each) for every request, and with it the gateway spent 7.6 ms of CPU per streamed request at 32
streams against 5.5 ms with aiohttp (`bench/overhead.py`, "proxy CPU"); on a 2-core box whatever the gateway
spends is taken from the engine's front end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp

from server.errors import EngineUnavailable, EngineUnreachable

log = logging.getLogger("loraserve.engine")

_ALREADY_LOADED = "has already been loaded"
# Failures that mean no answer is coming from this engine (as opposed to a slow answer).
_GONE = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)
# What a stale keep-alive connection looks like when a request is sent on it: worth one more try.
_STALE = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)
_JSON = {"Content-Type": "application/json"}
LIVENESS_INTERVAL = 5.0


@dataclass
class EngineReply:
    status: int
    body: bytes

    def json(self):
        return json.loads(self.body)


class EngineStream:
    """An engine's answer whose body is still to be read, whole (`aread`) or line by line (`lines`). The
    caller must `aclose()` it: a body read to its end gives the connection back to the pool, anything
    else drops the connection, which makes vLLM abort the request."""

    def __init__(self, response: aiohttp.ClientResponse):
        self._response = response
        self.status = response.status

    async def aread(self) -> bytes:
        try:
            return await self._response.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise _transport_error(exc) from exc

    async def lines(self) -> AsyncIterator[bytes]:
        """The body's lines without their line ends; a broken or stalled body raises `EngineUnavailable`."""
        pending: list[bytes] = []  # the pieces of a line not ended yet (a long one comes in many reads)
        try:
            async for data in self._response.content.iter_any():
                first, *more = data.split(b"\n")
                pending.append(first)
                if not more:
                    continue
                *ended, last = more
                for line in (b"".join(pending), *ended):
                    yield line.removesuffix(b"\r")
                pending = [last] if last else []
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise _transport_error(exc) from exc
        if any(pending):
            yield b"".join(pending).removesuffix(b"\r")

    async def aclose(self) -> None:
        if self._response.content.at_eof():
            self._response.release()
        else:
            self._response.close()


class AdapterLoadFailed(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class EngineClient:
    def __init__(
        self, base_url: str, *, read_timeout: float = 300.0, request_timeout: float = 600.0,
        liveness_interval: float = LIVENESS_INTERVAL,
    ):
        self.base_url = base_url.rstrip("/")
        self.read_timeout, self.request_timeout = read_timeout, request_timeout
        self.liveness_interval = liveness_interval
        # A stream's silence of `read_timeout` means a stall; a whole answer's silence says nothing (`_whole`).
        self._stream_timeout = aiohttp.ClientTimeout(total=None, connect=5.0, sock_read=read_timeout)
        self._whole_timeout = aiohttp.ClientTimeout(total=None, connect=5.0, sock_read=None)
        self._session: aiohttp.ClientSession | None = None  # made in the event loop that uses it
        self._probe: asyncio.Future[bool] | None = None
        self._probe_started = 0.0

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # No connection cap: the engine does its own scheduling, and the gateway bounds concurrency.
            connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
            self._session = aiohttp.ClientSession(connector=connector, timeout=self._stream_timeout)
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def healthy(self, timeout: float = 5.0) -> bool:
        try:
            async with self._http().get(self.base_url + "/health",
                                        timeout=aiohttp.ClientTimeout(total=timeout)) as response:
                return response.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return False

    async def adapters(self, timeout: float = 5.0) -> set[str] | None:
        """The LoRA adapters the engine holds now (the `/v1/models` entries with a parent), whoever loaded
        them; None when it does not answer."""
        try:
            async with self._http().get(self.base_url + "/v1/models",
                                        timeout=aiohttp.ClientTimeout(total=timeout)) as response:
                if response.status != 200:
                    return None
                models = (await response.json(content_type=None)).get("data")
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, AttributeError):
            return None
        if not isinstance(models, list):
            return None
        return {m["id"] for m in models if isinstance(m, dict) and m.get("parent") and isinstance(m.get("id"), str)}

    async def load_adapter(self, name: str, path: str) -> None:
        """Load an adapter under `name`; loading a name that is already there is a success."""
        reply = await self._whole("/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})
        if reply.status == 200 or (reply.status == 400 and _ALREADY_LOADED.encode() in reply.body):
            return
        raise AdapterLoadFailed(reply.status, _error_message(reply))

    async def unload_adapter(self, name: str) -> bool:
        """Unload an adapter; False when the engine did not have it."""
        reply = await self._whole("/v1/unload_lora_adapter", {"lora_name": name})
        if reply.status in (200, 404):
            return reply.status == 200
        raise AdapterLoadFailed(reply.status, _error_message(reply))

    async def complete(self, path: str, payload: dict) -> EngineReply:
        """A non-streamed request; cancelling the call closes its connection, which aborts it on vLLM."""
        return await self._whole(path, payload)

    async def open_stream(self, path: str, payload: dict) -> EngineStream:
        """An open streaming response; the caller must `aclose()` it. Closing it early drops the
        connection, which makes vLLM abort the request: that is how a client's disconnect reaches
        the engine."""
        return await self._send(path, payload, self._stream_timeout)

    async def _whole(self, path: str, payload: dict) -> EngineReply:
        """POST and read the whole answer, bounded by total time and the engine's liveness."""
        work = asyncio.ensure_future(self._read_whole(path, payload))
        deadline = time.monotonic() + self.request_timeout
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise EngineUnavailable("The inference engine did not answer in time.")
                await asyncio.wait({work}, timeout=min(self.liveness_interval, remaining))
                if not work.done() and remaining > self.liveness_interval:
                    probe = self._liveness_probe()
                    await asyncio.wait({work, probe}, timeout=deadline - time.monotonic(),
                                       return_when=asyncio.FIRST_COMPLETED)
                    if not work.done() and probe.done() and not probe.result():
                        log.warning("engine %s stopped answering its health check", self.base_url)
                        raise EngineUnavailable("The inference engine did not answer in time.")
                if work.done():
                    return work.result()
        finally:
            if not work.done():
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError, EngineUnavailable):
                    await work

    async def _read_whole(self, path: str, payload: dict) -> EngineReply:
        response = await self._send(path, payload, self._whole_timeout)
        try:
            body = await response.aread()
        finally:
            await response.aclose()
        return EngineReply(response.status, body)

    async def _send(self, path: str, payload: dict, timeout: aiohttp.ClientTimeout) -> EngineStream:
        """Send a POST and return once the response's headers are in (its body still to read)."""
        body = json.dumps(payload).encode()
        for attempt in (1, 2):
            try:
                response = await self._http().post(self.base_url + path, data=body, headers=_JSON,
                                                   timeout=timeout)
                return EngineStream(response)
            except aiohttp.ClientConnectorError as exc:  # nothing listening: no second try
                raise _transport_error(exc) from exc
            except _STALE as exc:
                if attempt == 2:
                    raise _transport_error(exc) from exc
                log.info("engine %s dropped a connection before answering (%s); sending again",
                         self.base_url, type(exc).__name__)
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                raise _transport_error(exc) from exc
        raise AssertionError("unreachable")

    def _liveness_probe(self) -> asyncio.Future[bool]:
        """Whether the engine's /health answers within `read_timeout`: one probe per interval at most,
        shared by every request waiting (never cancelled by one of them)."""
        now, loop = time.monotonic(), asyncio.get_running_loop()
        probe = self._probe
        if probe is None or probe.get_loop() is not loop or (
                probe.done() and now - self._probe_started >= self.liveness_interval):
            self._probe_started = now
            self._probe = probe = loop.create_task(self.healthy(timeout=self.read_timeout))
        return probe


def _transport_error(exc: BaseException) -> EngineUnavailable:
    if isinstance(exc, asyncio.TimeoutError):  # aiohttp's timeouts are asyncio's too
        return EngineUnavailable("The inference engine did not answer in time.")
    if isinstance(exc, _GONE):
        return EngineUnreachable("The inference engine is not reachable; try again shortly.")
    return EngineUnavailable("The inference engine is not reachable; try again shortly.")


def _error_message(reply: EngineReply) -> str:
    try:
        return str(reply.json()["error"]["message"])
    except Exception:
        return reply.body[:200].decode(errors="replace")
