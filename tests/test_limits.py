"""Tenant limits and the gateway-wide bound: the admission rules alone, then through the real gateway."""

from __future__ import annotations

import httpx
import pytest

from server.errors import BadRequest, EngineUnavailable, RateLimited
from server.serving.budget import plan_cost
from server.serving.cache_salt import CacheSalts, load_or_create_secret
from server.serving.limits import Limiter
from server.wire.openai import ChatCompletionRequest, CompletionRequest


def test_concurrency_limit_and_release():
    limiter = Limiter(max_in_flight=100)
    first = limiter.admit("t", {"max_concurrent_requests": 1})
    with pytest.raises(RateLimited) as caught:
        limiter.admit("t", {"max_concurrent_requests": 1})
    assert caught.value.headers()["Retry-After"] == "1"
    limiter.admit("other", {"max_concurrent_requests": 1})  # another tenant is not affected
    first.release(0)
    first.release(0)  # twice is once
    limiter.admit("t", {"max_concurrent_requests": 1})


def test_requests_per_minute_says_when_to_retry():
    limiter = Limiter(max_in_flight=100)
    for _ in range(3):
        limiter.admit("t", {"requests_per_minute": 3}).release(0)
    with pytest.raises(RateLimited) as caught:
        limiter.admit("t", {"requests_per_minute": 3})
    assert 1 <= int(caught.value.headers()["Retry-After"]) <= 20  # one request refills in 20 s


def test_tokens_per_minute_are_charged_when_a_request_ends():
    limiter = Limiter(max_in_flight=100)
    limiter.admit("t", {"tokens_per_minute": 100}).release(150)  # over budget after the fact
    with pytest.raises(RateLimited):
        limiter.admit("t", {"tokens_per_minute": 100})


def test_tokens_are_reserved_at_admission_and_reconciled_at_the_end():
    """Concurrent requests see each other's reservations: the third 137-token request of a 300-token budget
    waits, although nothing was charged yet (before the fix all were admitted). The end gives back what was
    not used."""
    limiter = Limiter(max_in_flight=100)
    limits = {"tokens_per_minute": 300}
    first = limiter.admit("t", limits, tokens=137)
    limiter.admit("t", limits, tokens=137)
    with pytest.raises(RateLimited) as caught:
        limiter.admit("t", limits, tokens=137)
    assert int(caught.value.headers()["Retry-After"]) >= 1
    first.release(20)  # it used 20 of its 137
    limiter.admit("t", limits, tokens=137)


def test_an_unknown_use_keeps_the_whole_reservation():
    limiter = Limiter(max_in_flight=100)
    limiter.admit("t", {"tokens_per_minute": 300}, tokens=200).release(None)
    with pytest.raises(RateLimited):
        limiter.admit("t", {"tokens_per_minute": 300}, tokens=150)


def test_concurrency_counts_sequences():
    limiter = Limiter(max_in_flight=100)
    limits = {"max_concurrent_requests": 8}
    wide = limiter.admit("t", limits, sequences=8)
    with pytest.raises(RateLimited):
        limiter.admit("t", limits)
    wide.release(0)
    with pytest.raises(BadRequest) as caught:
        limiter.admit("t", limits, sequences=9)  # could never be admitted: not a 429 to retry
    assert caught.value.code == "too_many_sequences"
    with pytest.raises(BadRequest):
        Limiter(max_in_flight=4).admit("t", {}, sequences=5)


def test_the_reservation_covers_every_sequence():
    body = CompletionRequest(model="m", prompt=["a b c", "d e f"], n=3, max_tokens=10)
    cost = plan_cost(body, context_window=2048, token_budget=None)
    assert cost.sequences == 6 and cost.reserved_tokens == cost.prompt_tokens + 60
    chat = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x" * 300}], max_tokens=5)
    assert plan_cost(chat, context_window=2048, token_budget=None).prompt_tokens >= 75


def test_an_open_request_is_capped_to_what_the_budget_pays_for():
    body = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}])
    cost = plan_cost(body, context_window=2048, token_budget=300)
    assert cost.reserved_tokens <= 300 and body.max_tokens == 300 - cost.prompt_tokens
    with pytest.raises(BadRequest) as caught:
        plan_cost(ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=400),
                  context_window=2048, token_budget=300)
    assert caught.value.code == "tokens_exceed_limit"


def test_cache_salts_are_per_tenant_and_the_secret_is_kept(tmp_path):
    secret = load_or_create_secret(tmp_path / "salt.secret")
    assert load_or_create_secret(tmp_path / "salt.secret") == secret and len(secret) == 64
    assert (tmp_path / "salt.secret").stat().st_mode & 0o777 == 0o600
    salts = CacheSalts(secret)
    assert salts.for_tenant("a") == CacheSalts(secret).for_tenant("a") != salts.for_tenant("b")
    assert CacheSalts(b"other").for_tenant("a") != salts.for_tenant("a")
    assert secret.decode() not in salts.for_tenant("a")


def test_the_gateway_wide_bound_is_a_503():
    limiter = Limiter(max_in_flight=2)
    limiter.admit("a", {})
    limiter.admit("b", {})
    with pytest.raises(EngineUnavailable) as caught:
        limiter.admit("c", {})
    assert caught.value.status == 503 and "Retry-After" in caught.value.headers()


def test_limits_through_the_gateway(gateway):
    assert gateway.admin("POST", "/tenants", json={"id": "mu", "limits": {
        "requests_per_minute": 3, "max_tokens": 4}}).status_code == 201
    key = gateway.admin("POST", "/tenants/mu/keys").json()["key"]
    headers = {"Authorization": f"Bearer {key}"}
    url = f"{gateway.url}/v1/chat/completions"
    body = {"model": "default", "messages": [{"role": "user", "content": "Tell me a long story."}]}
    capped = httpx.post(url, json=body, headers=headers, timeout=60)
    assert capped.status_code == 200 and capped.json()["usage"]["completion_tokens"] <= 4
    over = httpx.post(url, json={**body, "max_tokens": 50}, headers=headers, timeout=60)
    assert over.status_code == 400 and over.json()["error"]["param"] == "max_tokens"
    # A refused request does not count against the rate.
    for _ in range(2):
        assert httpx.post(url, json=body, headers=headers, timeout=60).status_code == 200
    limited = httpx.post(url, json=body, headers=headers, timeout=60)
    assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
    assert limited.json()["error"]["type"] == "rate_limit_error"
    # Another tenant is served meanwhile.
    other = httpx.post(url, json={**body, "max_tokens": 2},
                       headers={"Authorization": f"Bearer {gateway.tenants['alpha'].key}"}, timeout=60)
    assert other.status_code == 200


def test_alone_a_tenant_gets_its_whole_limit_and_contended_only_its_share():
    """With another tenant active, a tenant runs at most `contended_share` sequences and the rest of its
    requests wait for a turn (the victim's latency target of bench/fairness.py); alone it gets its limit.
    Before, a flooding tenant kept 16 sequences in the batch beside another tenant's one."""
    import asyncio

    limits = {"max_concurrent_requests": 16}

    async def go():
        limiter = Limiter(max_in_flight=100, contended_share=2, queue_timeout=30)
        alone = [await limiter.acquire("attacker", limits) for _ in range(4)]  # nobody else: no share
        for ticket in alone:
            ticket.release(0)
        victim = await limiter.acquire("victim", limits)
        held = [await limiter.acquire("attacker", limits) for _ in range(2)]
        third = asyncio.ensure_future(limiter.acquire("attacker", limits))
        await asyncio.sleep(0.05)
        assert not third.done() and limiter.waiting["attacker"] == 1
        assert (await limiter.acquire("victim", limits)).sequences == 1  # the victim never waits for its turn
        held[0].release(0)
        assert (await asyncio.wait_for(third, 10)).sequences == 1 and limiter.waiting["attacker"] == 0
        assert limiter.running["attacker"] == 2
        victim.release(0)

    asyncio.run(go())


def test_a_turn_not_given_in_time_is_a_429_and_the_queue_is_bounded():
    import asyncio

    async def go():
        limiter = Limiter(max_in_flight=100, contended_share=1, queue_timeout=0.2)
        await limiter.acquire("victim", {})
        await limiter.acquire("attacker", {"max_concurrent_requests": 3})
        with pytest.raises(RateLimited):
            await limiter.acquire("attacker", {"max_concurrent_requests": 3})  # waited 0.2 s for a turn
        waiting = [asyncio.ensure_future(limiter.acquire("attacker", {"max_concurrent_requests": 3}))
                   for _ in range(2)]
        await asyncio.sleep(0.05)
        with pytest.raises(RateLimited) as caught:  # 1 running + 2 waiting: at its limit of 3
            await limiter.acquire("attacker", {"max_concurrent_requests": 3})
        assert "concurrent" in caught.value.message
        for w in waiting:
            with pytest.raises(RateLimited):
                await w

    asyncio.run(go())


def test_a_tenant_over_its_share_is_preempted_once_when_another_arrives():
    """Alone a tenant may hold its whole limit; when another tenant is admitted, its newest preemptible
    tickets beyond the contended share leave the batch (`preempted` is set) and `resume` waits for a turn.
    A ticket is preempted at most once, and one that is not preemptible (a stream) is never. Guards the
    first requests of bench/fairness.py's victim, which waited behind the attacker's full batch."""
    import asyncio

    limits = {"max_concurrent_requests": 16}

    async def go():
        limiter = Limiter(max_in_flight=100, contended_share=2, queue_timeout=30)
        hog = [await limiter.acquire("hog", limits) for _ in range(6)]
        for ticket in hog[1:]:
            ticket.preemptible = True
        newcomer = await limiter.acquire("newcomer", limits)
        assert limiter.running["hog"] == 2 and limiter.in_flight == 3
        assert [t.preempted.is_set() for t in hog] == [False, False, True, True, True, True]
        resumed = [asyncio.ensure_future(t.resume()) for t in hog[2:]]
        await asyncio.sleep(0.05)
        assert not any(r.done() for r in resumed)  # the newcomer is still active: no turn yet
        hog[0].release(0)
        await asyncio.sleep(0.05)
        assert sum(r.done() for r in resumed) == 1 and limiter.running["hog"] == 2
        newcomer.release(0)
        await asyncio.wait_for(asyncio.gather(*resumed), 10)  # the newcomer idle: all of them run
        assert limiter.running["hog"] == 5 and not any(t.preempted.is_set() for t in hog)
        again = await limiter.acquire("newcomer", limits)
        # Only the one preemptible ticket never preempted goes; the resumed ones run to their end.
        assert [t.preempted.is_set() for t in hog] == [False, True, False, False, False, False]
        assert limiter.running["hog"] == 4
        for ticket in (*hog, again):
            ticket.release(0)
        assert limiter.in_flight == 0 and not limiter._tickets

    asyncio.run(go())


def test_a_preempted_ticket_that_gets_no_turn_in_time_is_a_429():
    """Like a request queued for its turn: a preempted one that gets none within the queue timeout is a 429
    (it does not join the batch over its share)."""
    import asyncio

    async def go():
        limiter = Limiter(max_in_flight=100, contended_share=1, queue_timeout=0.2)
        hog = [await limiter.acquire("hog", {}) for _ in range(2)]
        hog[1].preemptible = True
        newcomer = await limiter.acquire("newcomer", {})
        assert hog[1].preempted.is_set()
        with pytest.raises(RateLimited):
            await hog[1].resume()
        assert limiter.running["hog"] == 1
        for ticket in (*hog, newcomer):
            ticket.release(0)
        assert limiter.in_flight == 0

    asyncio.run(go())
