"""End to end on the real engine: each tenant reaches its own adapter, and only its own."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

PROMPT = [{"role": "user", "content": "Write one sentence about the sea."}]
GEN = {"max_tokens": 24, "temperature": 0}


def chat_text(client, model: str) -> str:
    return client.chat.completions.create(model=model, messages=PROMPT, **GEN).choices[0].message.content


@pytest.fixture(scope="module")
def direct_answers(gateway):
    """What the engine itself answers for each adapter, loaded straight from its source folder."""
    answers = {}
    engine = gateway.engine_client()
    for (tenant, name), source in gateway.adapter_sources.items():
        direct = f"direct-{tenant}-{name}"
        load = {"lora_name": direct, "lora_path": str(source)}
        r = httpx.post(f"{gateway.engine_url}/v1/load_lora_adapter", json=load)
        assert r.status_code == 200, r.text
        answers[(tenant, name)] = chat_text(engine, direct)
    answers["base"] = chat_text(engine, gateway.settings.served_model_name)
    return answers


def test_each_tenant_gets_exactly_its_adapters_answer(gateway, direct_answers):
    alpha = gateway.client(gateway.tenants["alpha"].key)
    beta = gateway.client(gateway.tenants["beta"].key)
    assert chat_text(alpha, "support") == direct_answers[("alpha", "support")]
    assert chat_text(beta, "support") == direct_answers[("beta", "support")]
    assert chat_text(beta, "legal") == direct_answers[("beta", "legal")]
    # Same adapter name, two tenants, two different adapters; neither is the base model.
    assert direct_answers[("alpha", "support")] != direct_answers[("beta", "support")]
    assert direct_answers["base"] not in (direct_answers[("alpha", "support")], direct_answers[("beta", "support")])


def test_response_model_is_the_name_the_client_sent(gateway, direct_answers):
    alpha = gateway.client(gateway.tenants["alpha"].key)
    for model in ("support", "support@1", gateway.settings.served_model_name, "default", "alpha"):
        response = alpha.chat.completions.create(model=model, messages=PROMPT, **GEN)
        assert response.model == model
    base = direct_answers["base"]
    assert chat_text(alpha, "default") == base  # alpha has no default adapter: the base model
    assert chat_text(alpha, "support@1") == direct_answers[("alpha", "support")]


def test_stream_carries_the_same_text_and_usage_when_asked(gateway):
    alpha = gateway.client(gateway.tenants["alpha"].key)
    whole = alpha.chat.completions.create(model="support", messages=PROMPT, **GEN)
    chunks = list(alpha.chat.completions.create(
        model="support", messages=PROMPT, stream=True, stream_options={"include_usage": True}, **GEN
    ))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert all(c.model == "support" for c in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens

    plain = list(alpha.chat.completions.create(model="support", messages=PROMPT, stream=True, **GEN))
    assert "".join(c.choices[0].delta.content or "" for c in plain) == text
    assert all(c.usage is None and c.choices for c in plain)  # usage only when asked


def test_legacy_completions_stream_and_not(gateway):
    beta = gateway.client(gateway.tenants["beta"].key)
    whole = beta.completions.create(model="legal", prompt="The law says", max_tokens=12, temperature=0)
    assert whole.model == "legal" and whole.usage.completion_tokens > 0
    streamed = "".join(c.choices[0].text for c in beta.completions.create(
        model="legal", prompt="The law says", max_tokens=12, temperature=0, stream=True))
    assert streamed == whole.choices[0].text


def test_another_tenants_adapter_is_not_found(gateway):
    alpha = gateway.client(gateway.tenants["alpha"].key)
    errors = []
    for model in ("legal", "legal@1", "no-such-adapter", "beta--legal--v1", "../beta/legal", "support@2"):
        with pytest.raises(openai.NotFoundError) as caught:
            alpha.chat.completions.create(model=model, messages=PROMPT, max_tokens=2)
        body = caught.value.body
        assert body["code"] == "model_not_found" and body["type"] == "invalid_request_error"
        errors.append(body["message"].replace(model, "<m>"))
    assert len(set(errors)) == 1  # another tenant's adapter reads exactly like a missing one


def test_wrong_or_missing_key_is_401(gateway):
    for key in ("wrong", "ls-000000000000-forged", gateway.tenants["alpha"].key + "x"):
        with pytest.raises(openai.AuthenticationError) as caught:
            gateway.client(key).models.list()
        assert caught.value.body["type"] == "authentication_error"
    r = httpx.get(f"{gateway.url}/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_tenant_header_must_match_the_key(gateway):
    alpha_key = gateway.tenants["alpha"].key
    with pytest.raises(openai.PermissionDeniedError):
        gateway.client(alpha_key, default_headers={"X-Tenant-ID": "beta"}).models.list()
    ok = gateway.client(alpha_key, default_headers={"X-Tenant-ID": "alpha"}).models.list()
    assert ok.data


def test_admin_key_is_not_a_tenant_key(gateway):
    with pytest.raises(openai.PermissionDeniedError):
        gateway.client(gateway.settings.admin_key.get_secret_value()).models.list()


def test_models_lists_the_base_and_only_own_adapters(gateway):
    base = gateway.settings.served_model_name
    alpha = {m.id: m for m in gateway.client(gateway.tenants["alpha"].key).models.list().data}
    beta = {m.id for m in gateway.client(gateway.tenants["beta"].key).models.list().data}
    # Other tests may give alpha more adapters; what it sees is exactly what it owns.
    owned = {a["name"] for a in gateway.admin("GET", "/tenants/alpha/adapters").json()["data"]}
    assert set(alpha) == {base} | owned and "support" in owned and "legal" not in owned
    assert {base, "support", "legal"} <= beta and not (beta & (owned - {"support"}))
    assert alpha["support"].parent == base


def test_bad_requests_get_openai_errors(gateway):
    headers = {"Authorization": f"Bearer {gateway.tenants['alpha'].key}"}
    cases = [
        (b"{not json", 400),
        (b'{"model": "support"}', 400),  # no messages
        (b'{"model": 5, "messages": [{"role": "user", "content": "x"}]}', 400),
        (b'{"model": "support", "messages": []}', 400),
    ]
    for body, status in cases:
        r = httpx.post(f"{gateway.url}/v1/chat/completions", content=body,
                       headers={**headers, "Content-Type": "application/json"})
        assert r.status_code == status, (body, r.text)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
    # An engine-side refusal comes back as a 400, with our internal name never shown.
    r = httpx.post(f"{gateway.url}/v1/chat/completions", headers=headers, json={
        "model": "support", "messages": PROMPT, "max_tokens": 10**6})
    assert r.status_code == 400 and "--" not in r.json()["error"]["message"], r.text


def _counter(gateway, name: str, tenant: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = gateway.services.metrics.render().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and s.labels.get("tenant") == tenant)


def test_continuous_usage_is_relayed_when_asked_and_counted_once(gateway):
    """`stream_options.continuous_usage_stats` puts the usage so far on every chunk, and the token metrics
    count the request's tokens once. Before the fix every chunk's cumulative usage was added to the
    counters (a 12-token answer counted as 78 completion tokens)."""
    alpha = gateway.client(gateway.tenants["alpha"].key)
    before = _counter(gateway, "loraserve_completion_tokens_total", "alpha")
    chunks = list(alpha.chat.completions.create(
        model="support", messages=PROMPT, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}, extra_body={"min_tokens": 12}))
    with_text = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert with_text and all(c.usage is not None for c in with_text)
    counts = [c.usage.completion_tokens for c in with_text]
    assert counts == sorted(counts)
    assert chunks[-1].usage.completion_tokens == 12
    # The gateway counts a stream when its relay ends, just after the client has read [DONE].
    deadline = time.monotonic() + 60
    while _counter(gateway, "loraserve_completion_tokens_total", "alpha") - before < 12:
        assert time.monotonic() < deadline, "the stream's tokens were never counted"
        time.sleep(0.1)
    assert _counter(gateway, "loraserve_completion_tokens_total", "alpha") - before == 12
    # Without the option, only the closing chunk has usage; without include_usage, none has.
    plain = list(alpha.chat.completions.create(model="support", messages=PROMPT, max_tokens=4, stream=True,
                                               stream_options={"include_usage": True}))
    assert [c.usage is not None for c in plain].count(True) == 1 and plain[-1].usage is not None
    bare = list(alpha.chat.completions.create(model="support", messages=PROMPT, max_tokens=4, stream=True))
    assert all(c.usage is None for c in bare)
