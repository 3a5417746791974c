"""Request structure (issue 12, item 12; item 3's prompt bound; the `x@²` Low item).

Messages, content parts, tools, tool_choice and response_format are typed after openai-python's request params
and bounded; token ids must lie in the base model's vocabulary; media parts are refused for a text-only model.
Refusals are checked against the real gateway and engine (a 400 in OpenAI's shape naming the field, and the engine
still answers); what the official SDK, LangChain and LlamaIndex send is checked to still pass.

Before the fix every refusal below but the extra message field reached the engine (which answered 200, a 400 in
its own words naming its flags, or a 500), the prompt list had no bound of its own, `x@²` was a 500, and
`prompt_count` did not exist: these tests failed on commit 78457a3.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from server.config import Settings
from server.errors import BadRequest
from server.serving.bounds import check_request_bounds
from server.wire.chat import MAX_SCHEMA_BYTES, MAX_SCHEMA_DEPTH, MAX_TOOLS
from server.wire.openai import ChatCompletionRequest, CompletionRequest

CHAT = "/v1/chat/completions"
USER = {"role": "user", "content": "Say hi."}
MSG = [USER]
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
SCHEMA = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"],
          "additionalProperties": False}


UNDESCRIBED_COUNTS = {  # more array items or object properties asked for than the schema describes
    "min-items": {"type": "array", "minItems": 1},
    "min-items-past-prefix": {"type": "array", "prefixItems": [{"type": "integer"}], "minItems": 2, "items": False},
    "min-properties": {"type": "object", "minProperties": 1},
    "min-properties-closed": {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
                              "minProperties": 2, "additionalProperties": False},
}


def nested(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


def chat(**fields) -> dict:
    return {"model": "support", "messages": MSG, "max_tokens": 2, **fields}


def text_only_vocab(gateway) -> int:
    return json.loads((gateway.settings.model_path / "config.json").read_text())["vocab_size"]


# name, endpoint, body, the param the 400 names (a prefix of it)
def refusals(vocab: int):
    part = {"role": "user", "content": [{"type": "text", "text": "look:"}]}
    yield "content-wrong-type", CHAT, chat(messages=[{"role": "user", "content": 5}]), "messages.0.content"
    yield "content-dict", CHAT, chat(messages=[{"role": "user", "content": {"text": "x"}}]), "messages.0.content"
    yield "unknown-part", CHAT, chat(messages=[{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": "http://x"}}]}]), "messages.0.content"
    yield "part-extra-field", CHAT, chat(messages=[{"role": "user", "content": [
        {"type": "text", "text": "x", "chat_template": "{{ 1 }}"}]}]), "messages.0.content"
    yield "image-part", CHAT, chat(messages=[{**part, "content": [*part["content"], {
        "type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]), "messages.0.content.1"
    yield "image-url-part", CHAT, chat(messages=[{**part, "content": [{
        "type": "image_url", "image_url": {"url": "http://169.254.169.254/latest"}}]}]), "messages.0.content.0"
    yield "audio-part", CHAT, chat(messages=[{**part, "content": [{
        "type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}]), "messages.0.content.0"
    yield "file-part", CHAT, chat(messages=[{**part, "content": [{
        "type": "file", "file": {"file_id": "file-abc"}}]}]), "messages.0.content.0"
    yield "system-image", CHAT, chat(messages=[{"role": "system", "content": [{
        "type": "image_url", "image_url": {"url": "data:,"}}]}, USER]), "messages.0"
    yield "user-no-content", CHAT, chat(messages=[{"role": "user"}]), "messages.0"
    yield "message-extra-field", CHAT, chat(messages=[{**USER, "chat_template": "{{ x }}"}]), "messages.0"
    yield "tool-without-call-id", CHAT, chat(messages=[USER, {"role": "tool", "content": "x"}]), "messages.1"
    yield "user-tool-calls", CHAT, chat(messages=[{**USER, "tool_calls": [CALL]}]), "messages.0"
    yield "tool-call-free-dict", CHAT, chat(messages=[USER, {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f"}}]}]), "messages.1.tool_calls.0.function"
    yield "custom-tool", CHAT, chat(tools=[{"type": "custom", "custom": {"name": "grep"}}]), "tools.0"
    yield "tool-free-dict", CHAT, chat(tools=[{"type": "function", "function": {"name": "f", "x": 1}}]), "tools.0"
    yield "tool-bad-name", CHAT, chat(tools=[{"type": "function", "function": {"name": "a b" * 50}}]), "tools.0"
    yield "tool-duplicate-names", CHAT, chat(tools=[WEATHER, WEATHER]), "tools"
    yield "too-many-tools", CHAT, chat(tools=[
        {"type": "function", "function": {"name": f"f{i}"}} for i in range(MAX_TOOLS + 1)]), "tools"
    yield "tool-schema-deep", CHAT, chat(tools=[{"type": "function", "function": {
        "name": "f", "parameters": nested(MAX_SCHEMA_DEPTH + 1)}}]), "tools.0.function.parameters"
    yield "tool-schema-large", CHAT, chat(tools=[{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "description": "x" * MAX_SCHEMA_BYTES}}}]), "tools.0"
    yield "tool-choice-unknown", CHAT, chat(tools=[WEATHER], tool_choice="always"), "tool_choice"
    yield "tool-choice-free-dict", CHAT, chat(tools=[WEATHER], tool_choice={"type": "function"}), "tool_choice"
    yield "tool-choice-not-in-tools", CHAT, chat(tools=[WEATHER], tool_choice={
        "type": "function", "function": {"name": "rm_rf"}}), "tool_choice"
    yield "tool-choice-without-tools", CHAT, chat(tool_choice="required"), "tool_choice"
    yield "allowed-tools-choice", CHAT, chat(tools=[WEATHER], tool_choice={
        "type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": []}}), "tool_choice"
    yield "response-format-unknown", CHAT, chat(response_format={"type": "structural_tag"}), "response_format"
    yield "response-format-free", CHAT, chat(response_format={"type": "json_object", "schema": {}}), "response_format"
    yield "json-schema-no-name", CHAT, chat(response_format={
        "type": "json_schema", "json_schema": {"schema": SCHEMA}}), "response_format"
    yield "json-schema-deep", CHAT, chat(response_format={"type": "json_schema", "json_schema": {
        "name": "deep", "schema": nested(MAX_SCHEMA_DEPTH + 1)}}), "response_format"
    # These two made vLLM's grammar compiler fail: a 500 from the engine, a 503 to the client.
    yield "json-schema-ref-loop", CHAT, chat(response_format={"type": "json_schema", "json_schema": {
        "name": "loop", "schema": {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}}}), "response_format"
    yield "json-schema-bad-regex", CHAT, chat(response_format={"type": "json_schema", "json_schema": {
        "name": "re", "schema": {"type": "object", "patternProperties": {"(": {}}}}}), "response_format"
    # And these (2026-12-07): xgrammar allows no array item and no property a schema does not describe, so a
    # count above what is described cannot be met. Where `items` or `additionalProperties` was left out, vLLM's
    # own checks let them through and the compiler failed: a 503 for response formats and structured_outputs
    # (which the SDK retries), a 400 reading "Invalid grammar specification: 'triggers'" for tools; where they
    # are false, vLLM answered 400 without naming the field.
    for name, schema in UNDESCRIBED_COUNTS.items():
        yield f"json-schema-{name}", CHAT, chat(response_format={"type": "json_schema", "json_schema": {
            "name": "n", "schema": schema}}), "response_format"
    yield "structured-outputs-min-items", CHAT, chat(structured_outputs={"json": UNDESCRIBED_COUNTS["min-items"]}), \
        "structured_outputs"
    yield "responses-min-properties", "/v1/responses", {"model": "support", "input": "x", "text": {"format": {
        "type": "json_schema", "name": "n", "schema": UNDESCRIBED_COUNTS["min-properties"]}}}, "text"
    yield "tool-min-items", CHAT, chat(tools=[{"type": "function", "function": {"name": "tag", "parameters": {
        "type": "object", "properties": {"tags": UNDESCRIBED_COUNTS["min-items"]}}}}]), "tools.0"
    yield "token-out-of-vocab", "/v1/completions", {"model": "support", "prompt": [1, vocab], "max_tokens": 2}, "prompt"
    yield "token-huge", "/v1/completions", {"model": "support", "prompt": [[1], [10**12]], "max_tokens": 2}, "prompt"
    yield "token-negative", "/v1/completions", {"model": "support", "prompt": [-1], "max_tokens": 2}, "prompt"
    yield "empty-prompt-list", "/v1/completions", {"model": "support", "prompt": [], "max_tokens": 2}, "prompt"
    yield "prompt-flood", "/v1/completions", {"model": "support", "prompt": ["x"] * 17, "max_tokens": 1}, "prompt"
    yield "logit-bias-word", CHAT, chat(logit_bias={"hello": 5}), "logit_bias"
    yield "logit-bias-out-of-vocab", CHAT, chat(logit_bias={str(vocab): 5}), "logit_bias"


def test_malformed_structure_is_refused_before_the_engine(gateway):
    vocab = text_only_vocab(gateway)
    headers = {"Authorization": f"Bearer {gateway.tenants['alpha'].key}"}
    wrong = []  # every case that went wrong, not only the first
    with httpx.Client(base_url=gateway.url, timeout=120, headers=headers) as client:
        for name, path, body, param in refusals(vocab):
            response = client.post(path, json=body)
            error = response.json().get("error") or {}
            leaks = [s for s in ("Traceback", "--tool-call-parser", "Param", str(gateway.settings.data_dir), "alpha--")
                     if s in response.text]
            if (response.status_code != 400 or set(error) != {"message", "type", "param", "code"} or leaks
                    or not error["message"] or error["type"] != "invalid_request_error"
                    or not (error["param"] or "").startswith(param)):
                wrong.append((name, response.status_code, response.text[:200]))
    assert not wrong, "\n".join(map(str, wrong))
    beta = gateway.client(gateway.tenants["beta"].key)
    assert beta.chat.completions.create(model="legal", messages=MSG, max_tokens=3).choices[0].message.content


def test_nan_in_a_schema_is_refused(gateway):
    body = json.dumps(chat(response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": {}}}))
    body = body.replace('"schema": {}', '"schema": {"maximum": NaN}')
    response = httpx.post(f"{gateway.url}{CHAT}", content=body, timeout=120, headers={
        "Authorization": f"Bearer {gateway.tenants['alpha'].key}", "Content-Type": "application/json"})
    assert response.status_code == 400, response.text[:300]
    assert response.json()["error"]["param"].startswith("response_format")


def test_the_engines_grammar_errors_reach_the_client_without_its_build_paths(gateway):
    """With xgrammar pinned (tests/test_tools.py), a schema it cannot compile is vLLM's 400, whose message began
    with the compiler's source location ("[21:55:17] /project/cpp/json_schema_converter.cc:4944: "): kept, less
    that location."""
    response = httpx.post(f"{gateway.url}{CHAT}", timeout=120, headers={
        "Authorization": f"Bearer {gateway.tenants['alpha'].key}"}, json=chat(response_format={
            "type": "json_schema", "json_schema": {"name": "r", "schema": {"type": "integer", "minimum": 5,
                                                                           "maximum": 1}}}))
    assert response.status_code == 400, response.text[:300]
    message = response.json()["error"]["message"]
    assert "minimum greater than maximum" in message and ".cc:" not in message and "/project" not in message, message


@pytest.mark.parametrize("model", ["x@²", "support@²", "support@\u0663"])
def test_non_ascii_version_digits_are_model_not_found(gateway, model):
    """`str.isdigit` takes "²" (int() then failed: a 500 before the fix) and "٣" (int() reads it as 3, a version
    alpha lacks, so that one was a 404 already: kept as a guard)."""
    response = httpx.post(f"{gateway.url}{CHAT}", json=chat(model=model), timeout=120,
                          headers={"Authorization": f"Bearer {gateway.tenants['alpha'].key}"})
    assert response.status_code == 404, response.text[:300]
    assert response.json()["error"]["code"] == "model_not_found"


def test_what_sdks_send_still_passes(gateway):
    client = gateway.client(gateway.tenants["alpha"].key)

    def ok(**fields):
        reply = client.chat.completions.create(model="support", max_tokens=fields.pop("max_tokens", 3), **fields)
        assert reply.choices and reply.choices[0].finish_reason, fields
        return reply

    # Text parts as lists (LlamaIndex, LangChain content blocks), for system and user.
    ok(messages=[{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                 {"role": "user", "content": [{"type": "text", "text": "Say"}, {"type": "text", "text": " hi."}]}])
    # A tool round trip: assistant tool_calls with content None, then the tool's answer (names as LangChain sends).
    ok(messages=[USER, {"role": "assistant", "content": None, "tool_calls": [CALL]},
                 {"role": "tool", "content": "12 C", "tool_call_id": "call_1", "name": "get_weather"},
                 {"role": "assistant", "content": [{"type": "refusal", "refusal": "No."}], "name": "bot"},
                 {"role": "developer", "content": "Answer in English.", "name": "ops"}, USER])
    # What the SDK and frameworks put beside the messages.
    ok(messages=MSG, tool_choice=None, parallel_tool_calls=False, n=1, temperature=0.0, stream=False)
    chunks = list(client.chat.completions.create(model="support", messages=MSG, max_tokens=3, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].usage and chunks[-1].usage.completion_tokens
    # Describing tools without letting the model call them is something this engine can do.
    ok(messages=MSG, tools=[WEATHER], tool_choice="none")
    # Structured output.
    ok(messages=MSG, response_format={"type": "text"})
    reply = ok(messages=[{"role": "user", "content": "Give me a JSON object."}], max_tokens=24,
               response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA,
                                                                      "strict": True, "description": "An answer."}})
    assert reply.choices[0].message.content.lstrip().startswith("{"), reply.choices[0].message.content
    reply = ok(messages=[{"role": "user", "content": "Reply with JSON."}], max_tokens=8,
               response_format={"type": "json_object"})
    assert reply.choices[0].message.content.lstrip().startswith("{"), reply.choices[0].message.content
    # Counts the schema can meet: the items and properties are described.
    described = {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"},
                                                           "minItems": 1}, "extra": {"type": "object",
                                                           "additionalProperties": {"type": "integer"},
                                                           "minProperties": 1}}, "required": ["tags", "extra"]}
    reply = ok(messages=[{"role": "user", "content": "Tag this: apples."}], max_tokens=8,
               response_format={"type": "json_schema", "json_schema": {"name": "tags", "schema": described}})
    assert reply.choices[0].message.content.lstrip().startswith("{"), reply.choices[0].message.content


def test_token_prompts_and_prompt_lists_within_bounds_pass(gateway):
    client = gateway.client(gateway.tenants["alpha"].key)
    vocab = text_only_vocab(gateway)
    reply = client.completions.create(model="support", prompt=[1, 2, vocab - 1], max_tokens=2)
    assert len(reply.choices) == 1
    limit = gateway.settings.max_prompts_per_request
    reply = client.completions.create(model="support", prompt=[[1, 2]] * (limit - 1) + [[vocab - 1]], max_tokens=1)
    assert len(reply.choices) == limit


# Unit tests of the models and of server/serving/bounds.py (no engine).


def test_prompt_count():
    def count(prompt):
        return CompletionRequest(model="m", prompt=prompt).prompt_count

    assert count("text") == 1
    assert count([1, 2, 3]) == 1
    assert count(["a", "b", "c"]) == 3
    assert count([[1], [2, 3]]) == 2


def test_assistant_tool_calls_reach_the_engine_typed():
    body = ChatCompletionRequest.model_validate(chat(
        messages=[USER, {"role": "assistant", "content": None, "tool_calls": [CALL]},
                  {"role": "tool", "content": "12 C", "tool_call_id": "call_1"}],
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": {"default": None}}}))
    payload = body.model_dump(exclude_unset=True, exclude_none=True)
    assert payload["messages"][1] == {"role": "assistant", "tool_calls": [CALL]}
    # The schema keeps its own nulls and its name for the engine ("schema", not the attribute's name).
    assert payload["response_format"]["json_schema"] == {"name": "a", "schema": {"default": None}}


def bounds_settings(tmp_path: Path, config: dict, **fields) -> Settings:
    (tmp_path / "config.json").write_text(json.dumps(config))
    return Settings(_env_file=None, data_dir=tmp_path, base_model_path=tmp_path, **fields)


def refused(settings: Settings, body) -> str:
    with pytest.raises(BadRequest) as error:
        check_request_bounds(settings, body)
    return error.value.param


def test_bounds_from_settings_and_the_model(tmp_path):
    settings = bounds_settings(tmp_path, {"vocab_size": 100}, max_prompts_per_request=4)
    check_request_bounds(settings, CompletionRequest(model="m", prompt=[[99]] * 4))
    assert refused(settings, CompletionRequest(model="m", prompt=["x"] * 5)) == "prompt"
    assert refused(settings, CompletionRequest(model="m", prompt=[0, 100])) == "prompt"
    assert refused(settings, CompletionRequest(model="m", prompt="x", logit_bias={"100": 1})) == "logit_bias"
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    body = ChatCompletionRequest.model_validate(chat(messages=[{"role": "user", "content": [image]}]))
    assert refused(settings, body) == "messages.0.content.0"
    tools = ChatCompletionRequest.model_validate(chat(tools=[WEATHER]))
    assert refused(settings, tools) == "tool_choice"


def test_a_vision_model_takes_inline_images_only(tmp_path):
    settings = bounds_settings(tmp_path, {"text_config": {"vocab_size": 100}, "vision_config": {}})
    inline = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    check_request_bounds(settings, ChatCompletionRequest.model_validate(chat(messages=[
        {"role": "user", "content": [inline]}])))
    remote = {"type": "image_url", "image_url": {"url": "http://10.0.0.1/secret.png"}}
    assert refused(settings, ChatCompletionRequest.model_validate(chat(messages=[
        {"role": "user", "content": [remote]}]))) == "messages.0.content.0.image_url.url"


def test_an_engine_with_a_tool_parser_gets_tool_calls(tmp_path):
    settings = bounds_settings(tmp_path, {"vocab_size": 100},
                               engine_extra_args="--enable-auto-tool-choice --tool-call-parser=hermes")
    check_request_bounds(settings, ChatCompletionRequest.model_validate(chat(tools=[WEATHER], tool_choice="auto")))
