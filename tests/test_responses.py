"""`POST /v1/responses` on the real gateway and engine, tenant-scoped like chat: the tenant's adapter by name,
the client's `model` in every answer and stream event, usage counted, nothing stored (so nothing of another
tenant's can be fetched), and what needs a stored response refused by name. Before issue 13 it was a 404.
"""

from __future__ import annotations

import json
import uuid

import httpx
import openai
import pytest

from server.wire.responses import ResponsesRequest


def client_of(gateway, tenant: str = "alpha"):
    return gateway.client(gateway.tenants[tenant].key)


def post(gateway, body: dict, key: str | None = None) -> httpx.Response:
    key = key or gateway.tenants["alpha"].key
    return httpx.post(f"{gateway.url}/v1/responses", json={"model": "support", "input": "Hi", **body}, timeout=300,
                      headers={"Authorization": f"Bearer {key}"})


def test_a_response_from_the_tenants_adapter(gateway):
    response = client_of(gateway).responses.create(model="support", input="Say hello.", max_output_tokens=8,
                                                   temperature=0, instructions="Be brief.", metadata={"a": "b"})
    assert response.model == "support" and response.status in ("completed", "incomplete")
    assert response.output_text
    assert response.usage.input_tokens > 0 and 0 < response.usage.output_tokens <= 8


def test_a_streamed_response_names_the_clients_model_in_every_event(gateway):
    events = list(client_of(gateway).responses.create(model="support", input="Say hello.", max_output_tokens=8,
                                                      temperature=0, stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] in ("response.completed", "response.incomplete")
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert deltas and final.output_text == deltas
    assert all(e.response.model == "support" for e in events if hasattr(e, "response"))
    assert final.usage.output_tokens > 0


def test_input_items_with_a_function_call_and_its_output(gateway):
    items = [{"role": "user", "content": "What is the weather in Paris?"},
             {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
             {"type": "function_call_output", "call_id": "call_1", "output": "Sunny, 21 C."},
             {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
              "content": [{"type": "output_text", "text": "It is sunny.", "annotations": []}]},
             {"role": "user", "content": [{"type": "input_text", "text": "Thanks."}]}]
    reply = post(gateway, {"input": items, "max_output_tokens": 4})
    assert reply.status_code == 200, reply.text


def test_a_named_function_tool_is_called(gateway):
    tool = {"type": "function", "name": "get_weather", "description": "The weather in a city.", "strict": True,
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                           "additionalProperties": False}}
    response = client_of(gateway).responses.create(
        model="support", input="Weather in Paris?", max_output_tokens=48, temperature=0, tools=[tool],
        tool_choice={"type": "function", "name": "get_weather"})
    calls = [item for item in response.output if item.type == "function_call"]
    assert calls and calls[0].name == "get_weather" and "city" in json.loads(calls[0].arguments)


def test_structured_text_format(gateway):
    schema = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
              "required": ["answer"], "additionalProperties": False}
    response = client_of(gateway).responses.create(
        model="support", input="Answer in JSON.", max_output_tokens=40, temperature=0,
        text={"format": {"type": "json_schema", "name": "reply", "schema": schema, "strict": True}})
    assert json.loads(response.output_text)["answer"] in ("yes", "no")


@pytest.mark.parametrize("field, value", [
    ("previous_response_id", "resp_123"), ("background", True), ("conversation", "conv_1"),
    ("request_id", "mine"), ("chat_template_kwargs", {"x": 1}), ("prompt", {"id": "pmpt_1"}),
    ("tools", [{"type": "web_search"}]),
])
def test_what_needs_a_stored_response_or_the_engine_internals_is_refused(gateway, field, value):
    reply = post(gateway, {field: value})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"].startswith(field), error


def test_nothing_is_stored_so_nothing_can_be_fetched(gateway):
    """A response id from one tenant fetched by another (or by itself) is a 404: no store to read from."""
    response = client_of(gateway).responses.create(model="support", input="Hi", max_output_tokens=2)
    for tenant in ("alpha", "beta"):
        with pytest.raises(openai.NotFoundError) as caught:
            client_of(gateway, tenant).responses.retrieve(response.id)
        assert caught.value.body["param"] == "response_id"


def test_responses_are_tenant_scoped_and_limited(gateway):
    """Another tenant's adapter name is model_not_found; the tenant's token budget holds for responses too."""
    tenant = f"resp-{uuid.uuid4().hex[:6]}"
    limits = {"tokens_per_minute": 100}
    assert gateway.admin("POST", "/tenants", json={"id": tenant, "limits": limits}).status_code == 201
    key = gateway.admin("POST", f"/tenants/{tenant}/keys").json()["key"]
    reply = post(gateway, {"model": "legal"}, key=key)  # beta's adapter
    assert reply.status_code == 404 and reply.json()["error"]["code"] == "model_not_found"
    reply = post(gateway, {"model": gateway.settings.served_model_name, "max_output_tokens": 500}, key=key)
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "tokens_exceed_limit", reply.text


def test_the_engine_body_is_salted_and_never_stored():
    body = ResponsesRequest.model_validate({"model": "support", "input": "Hi", "store": True, "metadata": {"a": "b"},
                                            "reasoning": {"effort": "low"}})
    payload = body.engine_payload("tenant--support--v1", "salt")
    assert payload["store"] is False and payload["cache_salt"] == "salt" and payload["model"] == "tenant--support--v1"
    assert "metadata" not in payload and "reasoning" not in payload
