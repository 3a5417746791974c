"""Generation-request fields beyond OpenAI's sampling core: what clients send for OpenAI's platform, which is
accepted and dropped, and vLLM's documented sampling extras, which are accepted within bounds.

Dropped (never sent to the engine): fields about OpenAI's storage, billing, routing and reasoning models. They
change nothing about the answer a model with no such notion gives, and the SDK and agent frameworks send them.
`prompt_cache_key` is dropped too: prefix-cache separation is the gateway's per-tenant salt, never a client's.

Everything else a client may not send (chat templates and their arguments, guided-decoding back-ends, request
ids, priorities, logits processors) is refused by `extra="forbid"` with a 400 naming the field.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from server.wire.chat import JSONSchemaObject, ShortText, invalid_value

# Fields accepted and not passed on to the engine.
DROPPED_FIELDS = frozenset({
    "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key", "prompt_cache_retention",
    "reasoning_effort", "verbosity", "modalities", "best_of",
})

MAX_TOKEN_ID = 2**31 - 1  # and below the vocabulary: server/serving/bounds.py
MAX_LISTED_TOKENS = 4096  # stop_token_ids, allowed_token_ids
MAX_BAD_WORDS = 64
MAX_PATTERN_CHARS = 4096  # a structured-outputs regex
MAX_GRAMMAR_CHARS = 64 << 10
MAX_CHOICES = 256

# OpenAI's bounds on metadata (chat, responses, fine-tuning jobs): 16 pairs, keys of at most 64 characters,
# values of at most 512.
Metadata = Annotated[dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]],
                     Field(max_length=16)]
TokenId = Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]


class PlatformFields(BaseModel):
    """OpenAI platform fields, typed as OpenAI documents them, then dropped (see DROPPED_FIELDS)."""

    metadata: Metadata | None = None
    store: bool | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None
    safety_identifier: str | None = Field(None, max_length=256)
    prompt_cache_key: str | None = Field(None, max_length=256)
    prompt_cache_retention: Literal["in-memory", "in_memory", "24h"] | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    verbosity: Literal["low", "medium", "high"] | None = None
    modalities: list[Literal["text"]] | None = Field(None, max_length=1)


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs`: exactly one constraint, each bounded in size."""

    model_config = ConfigDict(extra="forbid")
    json_: JSONSchemaObject | None = Field(None, alias="json")
    regex: str | None = Field(None, min_length=1, max_length=MAX_PATTERN_CHARS)
    choice: list[Annotated[str, Field(min_length=1, max_length=256)]] | None = Field(
        None, min_length=1, max_length=MAX_CHOICES)
    grammar: str | None = Field(None, min_length=1, max_length=MAX_GRAMMAR_CHARS)
    json_object: bool | None = None
    disable_any_whitespace: bool | None = None
    disable_additional_properties: bool | None = None

    @field_validator("regex")
    @classmethod
    def _compiles(cls, pattern: str | None) -> str | None:
        try:
            re.compile(pattern or "")
        except (re.error, RecursionError, OverflowError):
            raise invalid_value("not a valid regular expression") from None
        return pattern

    @model_validator(mode="after")
    def _one_kind(self) -> StructuredOutputs:
        kinds = [name for name in ("json_", "regex", "choice", "grammar", "json_object") if getattr(self, name)]
        if len(kinds) != 1:
            raise invalid_value("give exactly one of json, regex, choice, grammar or json_object")
        return self

    def engine_form(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True)


class VllmSampling(BaseModel):
    """vLLM's sampling extras (its OpenAI server documents them), each bounded."""

    ignore_eos: bool | None = None
    stop_token_ids: list[TokenId] | None = Field(None, max_length=MAX_LISTED_TOKENS)
    allowed_token_ids: list[TokenId] | None = Field(None, min_length=1, max_length=MAX_LISTED_TOKENS)
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    bad_words: list[Annotated[str, Field(min_length=1, max_length=256)]] | None = Field(
        None, max_length=MAX_BAD_WORDS)
    truncate_prompt_tokens: int | None = Field(None, ge=1, le=1_000_000)
    structured_outputs: StructuredOutputs | None = None


class LegacyFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: ShortText


def legacy_functions_as_tools(data: Any) -> Any:
    """OpenAI's deprecated `functions`/`function_call` and role `function` messages, as tools (what the engine
    knows): functions become function tools, function_call a tool_choice, an assistant's function_call a
    tool call with an id, and a `function` message that call's tool result."""
    if not isinstance(data, dict):
        return data
    data = dict(data)
    if "functions" in data:
        if "tools" in data:
            raise invalid_value("send tools or the deprecated functions, not both")
        functions = data.pop("functions")
        data["tools"] = [{"type": "function", "function": f} for f in functions] if isinstance(
            functions, list) else functions
    if "function_call" in data:
        if "tool_choice" in data:
            raise invalid_value("send tool_choice or the deprecated function_call, not both")
        choice = data.pop("function_call")
        if isinstance(choice, dict):
            choice = {"type": "function", "function": LegacyFunction.model_validate(choice).model_dump()}
        data["tool_choice"] = choice
    if isinstance(data.get("messages"), list):
        data["messages"] = _legacy_messages(data["messages"])
    return data


def _legacy_messages(messages: list) -> list:
    out, last_call = [], None
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            out.append(message)
            continue
        message = dict(message)
        if message.get("role") == "assistant" and message.get("function_call") and not message.get("tool_calls"):
            last_call = f"call_legacy_{i}"
            message["tool_calls"] = [{"id": last_call, "type": "function", "function": message.pop("function_call")}]
        elif message.get("role") == "function":
            if last_call is None:
                raise invalid_value(f"messages.{i}: a function message must follow an assistant function_call")
            message = {"role": "tool", "tool_call_id": last_call, "content": message.get("content")}
        out.append(message)
    return out
