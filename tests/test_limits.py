"""Tenant limits and the gateway-wide bound: the admission rules alone, then through the real gateway."""

from __future__ import annotations

import httpx
import pytest

from server.errors import EngineUnavailable, RateLimited
from server.limits import Limiter


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
    assert httpx.post(url, json=body, headers=headers, timeout=60).status_code == 200
    limited = httpx.post(url, json=body, headers=headers, timeout=60)
    assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
    assert limited.json()["error"]["type"] == "rate_limit_error"
    # Another tenant is served meanwhile.
    other = httpx.post(url, json={**body, "max_tokens": 2},
                       headers={"Authorization": f"Bearer {gateway.tenants['alpha'].key}"}, timeout=60)
    assert other.status_code == 200
