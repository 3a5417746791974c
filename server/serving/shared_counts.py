"""What several gateways count together, in Redis: each tenant's limits (concurrent sequences, requests and
tokens per minute) and the adapter versions each gateway is serving (so that no gateway unloads a version
another one streams from). Each admission and each release is one server-side script (atomic: no
read-modify-write race between gateways).

A count held by gateways (a tenant's running sequences, a version's use) is a hash with one field per gateway.
A gateway refreshes a heartbeat key every few seconds; a field whose gateway stopped beating (it crashed, or
lost the store for longer than the heartbeat lasts) is not counted and is dropped, so a dead gateway holds
nothing for long. A release the store missed, or fields dropped while this gateway could not beat, are written
again from this gateway's own count at its next heartbeat. The buckets are the local limiter's token buckets
with the store's clock: a missing bucket is a full one.

When the store does not answer (`StoreUnavailable`), the limiter counts on its own for a while (fail open to
per-gateway limits: a tenant then gets at most its limit on each gateway) and says so in the log and in
`loraserve_limits_store_up` / `loraserve_limits_store_errors_total`. One standalone Redis (or a primary): the
scripts read the heartbeat keys of other gateways, which Redis Cluster would not allow.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import Counter
from collections.abc import Callable, Coroutine

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from server.errors import RateLimited

log = logging.getLogger("loraserve.limits")

PREFIX = "loraserve:"
# A bucket's level at the store's clock, and its update; an idle bucket is full again well within the 300 s
# after which it expires.
_LEVEL = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
-- The hash's count over the gateways that still beat (all but `except`), dropping the fields of the others.
local function live(key, beat, except)
  local held, fields = 0, redis.call('HGETALL', key)
  for i = 1, #fields, 2 do
    if fields[i] == except then
    elseif redis.call('EXISTS', beat .. fields[i]) == 1 then
      held = held + tonumber(fields[i + 1])
    else
      redis.call('HDEL', key, fields[i])
    end
  end
  return held
end
local function level(key, capacity)
  local saved = redis.call('HMGET', key, 'level', 'stamp')
  if not saved[1] then return capacity end
  return math.min(capacity, tonumber(saved[1]) + (now - tonumber(saved[2])) * capacity / 60)
end
local function store(key, value)
  redis.call('HSET', key, 'level', tostring(value), 'stamp', tostring(now))
  redis.call('PEXPIRE', key, 300000)
end
"""
# KEYS: the tenant's running hash, request bucket, token bucket. ARGV: gateway, heartbeat key prefix, sequences,
# concurrency limit, requests/minute, tokens/minute (-1: no such limit), tokens to reserve.
_ADMIT = _LEVEL + """
local gateway, beat = ARGV[1], ARGV[2]
local sequences, concurrent = tonumber(ARGV[3]), tonumber(ARGV[4])
local rpm, tpm, tokens = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
if concurrent >= 0 then
  local held = live(KEYS[1], beat, gateway) + tonumber(redis.call('HGET', KEYS[1], gateway) or '0')
  if held + sequences > concurrent then return {'concurrency', tostring(held)} end
end
local requests, budget
if rpm >= 0 then
  requests = level(KEYS[2], rpm)
  if requests < 1 then return {'requests', tostring(requests)} end
end
if tpm >= 0 then
  budget = level(KEYS[3], tpm)
  if budget < math.max(1, math.min(tokens, tpm)) then return {'tokens', tostring(budget)} end
end
redis.call('HINCRBY', KEYS[1], gateway, sequences)
if rpm >= 0 then store(KEYS[2], requests - 1) end
if tpm >= 0 then store(KEYS[3], budget - tokens) end
return {'ok', ''}
"""
# KEYS: a hash of counts per gateway (the tenant's running sequences, a version's use), the tenant's token
# bucket. ARGV: gateway, change of its count (negative: given back), tokens/minute (-1: none), tokens to give
# back (the reservation less what was used; negative when more was used).
_CHANGE = _LEVEL + """
local left = redis.call('HINCRBY', KEYS[1], ARGV[1], tonumber(ARGV[2]))
if left <= 0 then redis.call('HDEL', KEYS[1], ARGV[1]) end
local tpm, back = tonumber(ARGV[3]), tonumber(ARGV[4])
if tpm >= 0 and back ~= 0 then store(KEYS[2], level(KEYS[2], tpm) + back) end
return left
"""
# KEYS: a hash of counts per gateway. ARGV: this gateway, heartbeat key prefix. What the other live gateways hold.
_ELSEWHERE = _LEVEL + """
return live(KEYS[1], ARGV[2], ARGV[1])
"""


class StoreUnavailable(Exception):
    """The shared store did not answer; the caller counts locally."""


class SharedCounts:
    """This gateway's side of the shared counts: admit and release against Redis, the versions it serves, and
    the heartbeat that keeps its counts counted. `on_state(up)` is told each time the store is lost or back."""

    def __init__(self, url: str, *, timeout: float = 0.5, beat_interval: float = 5.0, retry_after: float = 5.0,
                 on_state: Callable[[bool], None] = lambda up: None):
        self.redis = aioredis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        self.gateway = secrets.token_hex(8)
        self.beat_interval, self.retry_after, self.on_state = beat_interval, retry_after, on_state
        self._beat_key = f"{PREFIX}gateway:{self.gateway}"
        self._admit = self.redis.register_script(_ADMIT)
        self._change = self.redis.register_script(_CHANGE)
        self._elsewhere = self.redis.register_script(_ELSEWHERE)
        self.mine: Counter[str] = Counter()  # what this gateway holds in the store, by hash key
        self._dirty: set[str] = set()  # hash keys whose field for this gateway may be wrong: written at the next beat
        self._down_until = 0.0
        self._up: bool | None = None
        self._outbox: asyncio.Queue[Coroutine] = asyncio.Queue()
        self._sender: asyncio.Task | None = None

    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    async def admit(self, tenant: str, limits: dict, *, sequences: int, tokens: int) -> None:
        """Count a request of `sequences` sequences reserving `tokens` against the tenant's limits for all
        gateways, or raise 429; `StoreUnavailable` when the store did not answer."""
        def limit(name: str) -> int:
            value = limits.get(name)
            return -1 if value is None else int(value)

        keys = [_key(tenant, "running"), _key(tenant, "requests"), _key(tenant, "tokens")]
        args = [self.gateway, f"{PREFIX}gateway:", sequences, limit("max_concurrent_requests"),
                limit("requests_per_minute"), limit("tokens_per_minute"), tokens]
        try:
            verdict, value = await self._admit(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            self._lost(exc)
            raise StoreUnavailable from exc
        self._reached()
        verdict = verdict.decode() if isinstance(verdict, bytes) else verdict
        if verdict == "ok":
            self.mine[keys[0]] += sequences
            return
        level = float(value)
        if verdict == "concurrency":
            raise RateLimited(f"More than {limits['max_concurrent_requests']} concurrent sequences for this "
                              "tenant.", retry_after=1)
        if verdict == "requests":
            rpm = limits["requests_per_minute"]
            raise RateLimited(f"More than {rpm} requests per minute for this tenant.",
                              retry_after=(1 - level) * 60.0 / rpm)
        tpm = limits["tokens_per_minute"]
        need = max(1, min(tokens, tpm))
        raise RateLimited(f"More than {tpm} tokens per minute for this tenant (this request reserves {tokens}).",
                          retry_after=(need - level) * 60.0 / tpm)

    def release(self, tenant: str, sequences: int, *, tokens_back: int, tokens_per_minute: int | None) -> None:
        """Give back an admitted request's sequences, and the part of its reservation it did not use (or charge
        what it used beyond it), in the background."""
        self._add(_key(tenant, "running"), -sequences, _key(tenant, "tokens"), tokens_back,
                  -1 if tokens_per_minute is None else tokens_per_minute)

    def use(self, engine_model: str) -> None:
        """This gateway started serving a version (sent in the background)."""
        self._add(_in_use(engine_model), 1)

    def done_with(self, engine_model: str) -> None:
        """This gateway stopped serving a version (sent in the background)."""
        self._add(_in_use(engine_model), -1)

    async def used_elsewhere(self, engine_model: str) -> bool:
        """Whether another live gateway serves this version now; False when the store does not answer (its
        engine may then unload a version another gateway streams from, as without a store)."""
        try:
            held = await self._elsewhere(keys=[_in_use(engine_model)],
                                         args=[self.gateway, f"{PREFIX}gateway:"])
        except (RedisError, OSError) as exc:
            self._lost(exc)
            return False
        self._reached()
        return int(held) > 0

    def _add(self, key: str, count: int, bucket: str = "", tokens_back: int = 0, tpm: int = -1) -> None:
        """Change this gateway's count in `key` here and, in the background, in the store. While the store is
        taken as down nothing is sent (a hung store must not queue a call per request): the next heartbeat that
        reaches it writes this gateway's count instead (unused tokens stay charged)."""
        self.mine[key] += count
        if self.mine[key] <= 0:
            del self.mine[key]
        if not self.available():
            self._dirty.add(key)
            return
        self._post(self._send(key, count, bucket, tokens_back, tpm))

    async def _send(self, key: str, count: int, bucket: str, tokens_back: int, tpm: int) -> None:
        try:
            await self._change(keys=[key, bucket or key], args=[self.gateway, count, tpm, tokens_back])
        except (RedisError, OSError) as exc:
            self._dirty.add(key)  # the next heartbeat writes this gateway's count; unused tokens stay charged
            self._lost(exc)

    def _post(self, send: Coroutine) -> None:
        """Send in the background, in order: a version's release must not overtake its use."""
        self._outbox.put_nowait(send)
        if self._sender is None or self._sender.done():
            self._sender = asyncio.get_running_loop().create_task(self._send_all())

    async def _send_all(self) -> None:
        while True:
            send = await self._outbox.get()
            try:
                await send
            finally:
                self._outbox.task_done()

    async def flush(self) -> None:
        """Wait until everything posted has been sent (or failed)."""
        await self._outbox.join()

    async def beat(self) -> None:
        """Say this gateway is alive (its sequences count for `3 x beat_interval`), and write its count for any
        tenant whose field may be wrong."""
        try:
            before = await self.redis.set(self._beat_key, b"1", px=int(self.beat_interval * 3000), get=True)
            if before is None:  # first beat, or beats missed: admissions elsewhere may have dropped our fields
                self._dirty.update(self.mine)
            if self._dirty:
                dirty, self._dirty = self._dirty, set()
                async with self.redis.pipeline(transaction=False) as pipe:
                    for key in dirty:
                        if self.mine[key] > 0:
                            pipe.hset(key, self.gateway, self.mine[key])
                        else:
                            pipe.hdel(key, self.gateway)
                            self.mine.pop(key, None)
                    await pipe.execute()
        except (RedisError, OSError) as exc:
            self._dirty.update(self.mine)
            self._lost(exc)
            return
        self._down_until = 0.0
        self._reached()

    async def watch(self) -> None:
        """Beat every `beat_interval` seconds (the first beat is the gateway's start-up's)."""
        while True:
            await asyncio.sleep(self.beat_interval)
            await self.beat()

    async def aclose(self) -> None:
        """Stop beating: other gateways stop counting this one's sequences at once."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.flush(), 2)
        if self._sender is not None:
            self._sender.cancel()
        with contextlib.suppress(RedisError, OSError):
            await self.redis.delete(self._beat_key)
        await self.redis.aclose()

    def _lost(self, exc: BaseException) -> None:
        self._down_until = time.monotonic() + self.retry_after
        if self._up is not False:
            log.warning("shared limits store unreachable (%s: %s); counting this gateway's requests on its own "
                        "until it answers", type(exc).__name__, exc)
        self._up = False
        self.on_state(False)

    def _reached(self) -> None:
        if self._up is False:
            log.warning("shared limits store reachable again; limits are counted for all gateways")
        if self._up is not True:
            self._up = True
            self.on_state(True)


def _key(tenant: str, what: str) -> str:
    return f"{PREFIX}limits:{tenant}:{what}"


def _in_use(engine_model: str) -> str:
    return f"{PREFIX}in-use:{engine_model}"
