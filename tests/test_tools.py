"""Tool calling on by default, on the real gateway and engine: the engine starts with a tool-call parser and, for
the default SmolLM2 (whose own chat template knows no tools), a ChatML template that shows them, so `tools` with
`auto`, `required` and a named function work, through the base model and a tenant's adapter, streamed and not.
Before issue 13, a named or required tool_choice was refused ("this server's model cannot call tools").
"""

from __future__ import annotations

import json

import openai
import pytest
from transformers import AutoTokenizer

from server.engine.chat_template import TOOLS_TEMPLATE, engine_tool_args, model_chat_template
from server.engine.supervisor import engine_command

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                   "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a time zone.",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def ask(gateway, model: str, **fields):
    client = gateway.client(gateway.tenants["alpha"].key)
    return client.chat.completions.create(model=model, messages=ASK, max_tokens=48, temperature=0,
                                          tools=[WEATHER, TIME], **fields)


def test_the_engine_starts_with_a_tool_parser_and_a_template_with_tools(gateway):
    args = engine_tool_args(gateway.settings)
    assert args[args.index("--tool-call-parser") + 1] == "hermes" and "--enable-auto-tool-choice" in args
    assert args[args.index("--chat-template") + 1] == str(TOOLS_TEMPLATE)


def test_the_tools_template_renders_plain_chats_as_the_models_own(base_model_path):
    """Adapters are trained with the model's own template: without tools, prompts must be the same."""
    tokenizer = AutoTokenizer.from_pretrained(base_model_path)
    own, ours = model_chat_template(base_model_path), TOOLS_TEMPLATE.read_text()
    for messages in (ASK, [{"role": "system", "content": "Be brief."}, *ASK,
                           {"role": "assistant", "content": "Sunny."}, {"role": "user", "content": "Thanks"}]):
        rendered = [tokenizer.apply_chat_template(messages, chat_template=t, tokenize=False, add_generation_prompt=True)
                    for t in (own, ours)]
        assert rendered[0] == rendered[1]
    with_tools = tokenizer.apply_chat_template(ASK, chat_template=ours, tools=[WEATHER], tokenize=False)
    assert "<tools>" in with_tools and '"get_weather"' in with_tools


def test_a_schema_the_engines_grammars_lack_is_a_400_and_tool_calls_keep_working(gateway):
    """vLLM's default grammar backend ("auto") picks a library per request, falling back from xgrammar to guidance
    for schemas xgrammar lacks (`multipleOf`, `uniqueItems`, a pattern with a length bound), while its engine
    compiles every request with the library of the first structured request it was sent. Seen 2026-12-07 on a
    fresh engine: a `multipleOf` schema as one tenant's first request made every tool call (whose structural
    tags only xgrammar reads) a 503 for every tenant until the engine restarted; the other way round, a schema
    xgrammar refuses failed inside the engine (a 503, which the SDK retries). The engine now starts with
    xgrammar pinned: such a schema is a 400 whatever came first, and tool calls keep working."""
    other = gateway.client(gateway.tenants["beta"].key)
    for schema in ({"type": "integer", "multipleOf": 3}, {"type": "string", "pattern": "^a+$", "maxLength": 4}):
        with pytest.raises(openai.BadRequestError):
            other.chat.completions.create(
                model=gateway.settings.served_model_name, messages=ASK, max_tokens=3,
                response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}})
    for choice in ("auto", "required"):
        answer = ask(gateway, "support", tool_choice=choice)
        assert answer.choices[0].finish_reason in ("tool_calls", "stop", "length"), choice
    assert ask(gateway, "support", tool_choice="required").choices[0].message.tool_calls
    command = engine_command(gateway.settings)
    assert json.loads(command[command.index("--structured-outputs-config") + 1]) == {"backend": "xgrammar"}


def test_named_tool_choice_calls_that_function_with_valid_arguments(gateway):
    for model in ("support", gateway.settings.served_model_name):
        answer = ask(gateway, model, tool_choice={"type": "function", "function": {"name": "get_time"}})
        call = answer.choices[0].message.tool_calls[0]
        assert answer.model == model and call.function.name == "get_time"
        assert isinstance(json.loads(call.function.arguments)["zone"], str)


def test_required_tool_choice_makes_a_call(gateway):
    answer = ask(gateway, "support", tool_choice="required")
    calls = answer.choices[0].message.tool_calls
    assert calls and calls[0].function.name in ("get_weather", "get_time") and calls[0].id
    assert answer.choices[0].finish_reason == "tool_calls"
    json.loads(calls[0].function.arguments)


def test_auto_tool_choice_answers_with_text_or_a_call(gateway):
    answer = ask(gateway, "support", tool_choice="auto")
    message = answer.choices[0].message
    assert message.content or message.tool_calls
    for call in message.tool_calls or ():
        assert call.function.name in ("get_weather", "get_time")
        json.loads(call.function.arguments)


def test_a_streamed_tool_call_reassembles(gateway):
    client = gateway.client(gateway.tenants["alpha"].key)
    stream = client.chat.completions.create(
        model="support", messages=ASK, max_tokens=48, temperature=0, tools=[WEATHER], stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    name, arguments = "", ""
    for chunk in stream:
        for call in (chunk.choices[0].delta.tool_calls or ()) if chunk.choices else ():
            name += call.function.name or ""
            arguments += call.function.arguments or ""
        assert chunk.model == "support"
    assert name == "get_weather" and "city" in json.loads(arguments)


def test_a_tool_result_sent_back_gets_an_answer(gateway):
    client = gateway.client(gateway.tenants["alpha"].key)
    conversation = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C."}]
    answer = client.chat.completions.create(model="support", messages=conversation, max_tokens=16, temperature=0,
                                            tools=[WEATHER])
    assert answer.choices[0].message.content or answer.choices[0].message.tool_calls
