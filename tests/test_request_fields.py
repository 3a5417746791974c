"""Fields beyond OpenAI's sampling core, on the real gateway and engine: what the SDK and agent frameworks send for
OpenAI's platform is accepted (and dropped), vLLM's documented sampling extras work within bounds, the deprecated
`functions` form is mapped to tools, and fields that reach the engine's internals stay refused with a 400 naming
them. Before issue 13, `metadata`/`store` gave 400 "Extra inputs are not permitted" and vLLM's benchmark client,
which sends `ignore_eos`, failed on every request.
"""

from __future__ import annotations

import json

import httpx
import pytest

PROMPT = [{"role": "user", "content": "Say hello."}]


def post(gateway, path: str, body: dict, key: str | None = None) -> httpx.Response:
    key = key or gateway.tenants["alpha"].key
    return httpx.post(f"{gateway.url}/v1{path}", json=body, timeout=300, headers={"Authorization": f"Bearer {key}"})


def chat(gateway, **fields) -> httpx.Response:
    return post(gateway, "/chat/completions", {"model": "support", "messages": PROMPT, "max_tokens": 4,
                                               "temperature": 0, **fields})


def completion(gateway, **fields) -> httpx.Response:
    return post(gateway, "/completions", {"model": gateway.settings.served_model_name, "prompt": "Once upon a time",
                                          "max_tokens": 4, "temperature": 0, **fields})


def refused(reply: httpx.Response, param: str) -> str:
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    return error["message"]


def test_platform_fields_the_sdk_sends_are_accepted(gateway):
    """What openai-python, LangChain and the agents SDK send for OpenAI's platform is harmless here."""
    client = gateway.client(gateway.tenants["alpha"].key)
    answer = client.chat.completions.create(
        model="support", messages=PROMPT, max_tokens=4, temperature=0, metadata={"run": "test"}, store=False,
        service_tier="auto", safety_identifier="user-1", prompt_cache_key="k", reasoning_effort="low",
        verbosity="low", user="someone", modalities=["text"],
    )
    assert answer.model == "support" and answer.usage.completion_tokens > 0
    chunks = list(client.chat.completions.create(
        model="support", messages=PROMPT, max_tokens=4, temperature=0, stream=True, store=True,
        stream_options={"include_usage": True, "include_obfuscation": False}))
    assert chunks[-1].usage.completion_tokens > 0


@pytest.mark.parametrize("field, value", [
    ("chat_template", "{{ messages }}"), ("chat_template_kwargs", {"x": 1}), ("request_id", "mine"),
    ("priority", 1), ("vllm_xargs", {"a": 1}), ("guided_json", {"type": "object"}), ("audio", {"voice": "x"}),
    ("add_generation_prompt", False), ("logits_processors", ["x"]),
])
def test_fields_that_reach_engine_internals_are_refused_by_name(gateway, field, value):
    message = refused(chat(gateway, **{field: value}), field)
    assert field in message


def test_ignore_eos_runs_to_max_tokens(gateway):
    """vLLM's benchmark client sends ignore_eos: every answer is exactly max_tokens long."""
    for reply in (completion(gateway, ignore_eos=True, max_tokens=12), chat(gateway, ignore_eos=True, max_tokens=12)):
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] == 12


def test_structured_outputs_constrain_the_answer(gateway):
    reply = chat(gateway, max_tokens=8, structured_outputs={"choice": ["yes", "no"]})
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] in ("yes", "no")
    reply = completion(gateway, max_tokens=8, structured_outputs={"regex": "[0-9]{3}"})
    assert reply.status_code == 200, reply.text
    assert len(reply.json()["choices"][0]["text"]) == 3 and reply.json()["choices"][0]["text"].isdigit()
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
              "additionalProperties": False}
    reply = chat(gateway, max_tokens=40, structured_outputs={"json": schema})
    assert reply.status_code == 200, reply.text
    assert isinstance(json.loads(reply.json()["choices"][0]["message"]["content"])["a"], int)


@pytest.mark.parametrize("value, param", [
    ({"regex": "(unclosed"}, "structured_outputs.regex"),
    ({"choice": ["a"], "regex": "a"}, "structured_outputs"),
    ({}, "structured_outputs"),
    ({"grammar": "x" * ((64 << 10) + 1)}, "structured_outputs.grammar"),
    ({"choice": ["a"] * 257}, "structured_outputs.choice"),
    ({"json": {"type": "object"}, "backend": "outlines"}, "structured_outputs.backend"),
])
def test_bad_structured_outputs_are_refused(gateway, value, param):
    refused(chat(gateway, structured_outputs=value), param)


def test_token_lists_and_bad_words_work_within_bounds(gateway):
    reply = completion(gateway, stop_token_ids=[0, 1, 2], bad_words=["dragon"], include_stop_str_in_output=True,
                       skip_special_tokens=True, spaces_between_special_tokens=True, truncate_prompt_tokens=64)
    assert reply.status_code == 200, reply.text
    refused(completion(gateway, stop_token_ids=[10**8]), "stop_token_ids")
    refused(completion(gateway, allowed_token_ids=[10**8]), "allowed_token_ids")
    refused(completion(gateway, bad_words=["w"] * 65), "bad_words")
    refused(completion(gateway, stop_token_ids=list(range(5000))), "stop_token_ids")


def test_completion_fields_best_of_suffix_echo_logprobs(gateway):
    """best_of equal to n is what the engine does (dropped); above n, and suffix insertion, are refused by
    name; echo and logprobs work."""
    assert completion(gateway, best_of=1).status_code == 200
    assert "best_of" in refused(completion(gateway, best_of=2), "best_of")
    assert "suffix" in refused(completion(gateway, suffix=" The end."), "suffix")
    assert completion(gateway, suffix="").status_code == 200
    reply = completion(gateway, echo=True, logprobs=2)
    assert reply.status_code == 200, reply.text
    choice = reply.json()["choices"][0]
    assert choice["text"].startswith("Once upon a time")
    assert choice["logprobs"]["top_logprobs"]


def test_legacy_functions_are_mapped_to_tools(gateway):
    """Older clients send functions/function_call and role `function` results; they become tools."""
    weather = {"name": "get_weather", "description": "The weather in a city.",
               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
    reply = chat(gateway, max_tokens=40, functions=[weather], function_call={"name": "get_weather"})
    assert reply.status_code == 200, reply.text
    call = reply.json()["choices"][0]["message"]["tool_calls"][0]
    assert call["function"]["name"] == "get_weather"
    assert "city" in json.loads(call["function"]["arguments"])
    conversation = [*PROMPT, {"role": "assistant", "content": None,
                              "function_call": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                    {"role": "function", "name": "get_weather", "content": "Sunny, 21 C."}]
    reply = post(gateway, "/chat/completions", {"model": "support", "messages": conversation, "max_tokens": 4,
                                                "functions": [weather]})
    assert reply.status_code == 200, reply.text
    assert "both" in refused(chat(gateway, functions=[weather], tools=[{"type": "function", "function": weather}]),
                             None)
    orphan = [*PROMPT, {"role": "function", "name": "get_weather", "content": "x"}]
    refused(post(gateway, "/chat/completions", {"model": "support", "messages": orphan}), None)
