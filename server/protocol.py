"""Request and response models of the OpenAI-compatible API and the error shape.

Generation requests take an allowlist of OpenAI's sampling fields (plus vLLM's common ones: top_k, min_p,
repetition_penalty, min_tokens), each bounded. Anything else is refused with a 400 naming the field,
because fields such as chat templates, their arguments or guided-decoding back-ends reach the engine's
internals, and the engine trusts what it is given.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

T = TypeVar("T")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


Stop = Annotated[str, Field(max_length=256)]
TokenIdText = Annotated[str, Field(pattern=r"^[0-9]{1,9}$")]  # a logit_bias key; below the vocabulary size too


class GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=256)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1, le=1_000_000)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, le=8)
    stop: Stop | list[Stop] | None = Field(None, max_length=8)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[TokenIdText, Annotated[float, Field(ge=-100, le=100)]] | None = Field(None, max_length=300)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    user: str | None = Field(None, max_length=256)
    top_k: int | None = Field(None, ge=-1, le=1000)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=2)
    min_tokens: int | None = Field(None, ge=0, le=4096)

    def engine_payload(self, engine_model: str, cache_salt: str) -> dict[str, Any]:
        """The body for the engine: the client's, with our model name and the tenant's prefix-cache salt,
        and usage reported on every chunk of a stream (the gateway charges what was produced even when the
        client hangs up; the relay drops what the client did not ask for)."""
        payload = self.model_dump(exclude_unset=True, exclude_none=True)
        payload["model"] = engine_model
        payload["cache_salt"] = cache_salt
        if self.stream:
            payload["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
        return payload

    @property
    def wants_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def wants_continuous_usage(self) -> bool:
        return self.wants_usage and bool(self.stream_options.continuous_usage_stats)

    @property
    def prompt_count(self) -> int:
        """Prompts in this request; each runs `n` sequences."""
        return 1

    @property
    def requested_tokens(self) -> int | None:
        return self.max_tokens


# Chat structure, typed after openai-python's request params: every part of a message that reaches the engine has
# a known shape and a bounded size, because vLLM renders it into its chat template, compiles schemas into grammars
# and fetches media URLs. What the engine cannot do for this base model is refused in server/bounds.py.

NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"  # OpenAI's rule for function and response-format names
MAX_SCHEMA_BYTES = 64 << 10  # one JSON schema, compactly serialized
MAX_SCHEMA_DEPTH = 32  # nesting of objects and arrays in one schema
MAX_TOTAL_SCHEMA_BYTES = 256 << 10  # all tools' parameters and the response format together
MAX_TOOLS = 64

FunctionName = Annotated[str, Field(pattern=NAME_PATTERN)]
ShortText = Annotated[str, Field(max_length=256)]
Description = Annotated[str, Field(max_length=16384)]


def _nodes(value: Any) -> Iterator[tuple[Any, int]]:
    """Every object and array in `value` with its nesting level, without recursion (deep nesting is looked for)."""
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict | list):
            yield item, level
            stack.extend((child, level + 1) for child in (item.values() if isinstance(item, dict) else item))


def _bounded_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """Bound a JSON schema's size and nesting, and refuse what makes the engine's grammar compiler fail with a
    server error rather than a 400 (seen on vLLM 0.32 with xgrammar): broken regexes and `$ref`s that only
    point at each other."""
    nodes = list(_nodes(schema))
    if max(level for _, level in nodes) > MAX_SCHEMA_DEPTH:
        raise _invalid(f"the schema nests more than {MAX_SCHEMA_DEPTH} levels deep")
    if json_size(schema) > MAX_SCHEMA_BYTES:
        raise _invalid(f"the schema is larger than {MAX_SCHEMA_BYTES} bytes as JSON")
    for node, _ in nodes:
        if not isinstance(node, dict):
            continue
        pattern_keys = node.get("patternProperties")
        patterns = [node.get("pattern"), *(pattern_keys if isinstance(pattern_keys, dict) else ())]
        for pattern in patterns:
            try:
                if isinstance(pattern, str):
                    re.compile(pattern)
            except (re.error, RecursionError, OverflowError):
                raise _invalid("the schema holds a pattern that is not a valid regular expression") from None
        if isinstance(node.get("$ref"), str) and _ref_loops(schema, node):
            raise _invalid("the schema holds $refs that only point at each other")
    return schema


def _ref_loops(root: dict[str, Any], node: dict[str, Any]) -> bool:
    """Whether following local `$ref`s from `node` comes back to it without meeting anything else."""
    seen = [node]
    while isinstance(node, dict) and isinstance(node.get("$ref"), str) and node["$ref"].startswith("#"):
        node = root
        for token in filter(None, _pointer_keys(seen[-1]["$ref"])):
            node = node.get(token) if isinstance(node, dict) else None
        if any(node is earlier for earlier in seen):
            return True
        if len(seen) > MAX_SCHEMA_DEPTH:
            return True  # a chain this long is no schema anyone writes
        seen.append(node)
    return False


def _pointer_keys(ref: str) -> list[str]:
    """The object keys of a local JSON pointer such as `#/$defs/a~1b`."""
    return [t.replace("~1", "/").replace("~0", "~") for t in ref[1:].split("/")]


def json_size(value: Any) -> int:
    """Bytes of `value` as compact JSON (NaN and Infinity are not JSON: refused)."""
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode())


JSONSchemaObject = Annotated[dict[str, Any], AfterValidator(_bounded_schema)]


def _invalid(message: str) -> PydanticCustomError:
    """A validation error that reads as `message` (no "Value error," before it); no braces in it."""
    return PydanticCustomError("invalid_value", message)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class RefusalPart(_Strict):
    type: Literal["refusal"]
    refusal: str


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high", "original"] | None = None


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class InputAudio(_Strict):
    data: str
    format: Literal["wav", "mp3"]


class AudioPart(_Strict):
    type: Literal["input_audio"]
    input_audio: InputAudio


class FileData(_Strict):
    file_data: str | None = None
    file_id: ShortText | None = None
    filename: ShortText | None = None


class FilePart(_Strict):
    type: Literal["file"]
    file: FileData


ContentPart = Annotated[TextPart | RefusalPart | ImagePart | AudioPart | FilePart, Field(discriminator="type")]
# A string or a list of parts; the callable discriminator keeps errors about the branch the client meant.
Content = Annotated[
    Annotated[str, Tag("text")] | Annotated[list[ContentPart], Field(max_length=1000), Tag("parts")],
    Discriminator(lambda v: "text" if isinstance(v, str) else "parts"),
]
# Part types each role may send (openai-python's message params); media parts are user input only.
ROLE_PARTS = {
    "system": {"text"}, "developer": {"text"}, "tool": {"text"},
    "user": {"text", "image_url", "input_audio", "file"}, "assistant": {"text", "refusal"},
}


class FunctionCall(_Strict):
    name: FunctionName
    arguments: str


class ToolCall(_Strict):
    """A call the model made earlier, sent back in an assistant message."""

    id: ShortText
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(_Strict):
    """One message; fields besides role and content are data of the conversation, each typed."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Content | None = None
    name: ShortText | None = None
    tool_calls: list[ToolCall] | None = Field(None, max_length=MAX_TOOLS)
    tool_call_id: ShortText | None = None
    refusal: str | None = None
    function_call: FunctionCall | None = None  # deprecated by OpenAI, still sent by older clients

    @model_validator(mode="after")
    def _fits_role(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise _invalid(f"a {self.role} message needs content")
        for part in self.content if isinstance(self.content, list) else ():
            if part.type not in ROLE_PARTS[self.role]:
                raise _invalid(f"a {self.role} message cannot hold {part.type} parts")
        if self.role != "assistant" and (self.tool_calls or self.refusal is not None or self.function_call):
            raise _invalid("only assistant messages carry tool_calls, function_call or refusal")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise _invalid("tool messages, and only they, carry a tool_call_id")
        return self


class FunctionDefinition(_Strict):
    name: FunctionName
    description: Description | None = None
    parameters: JSONSchemaObject | None = None
    strict: bool | None = None


class Tool(_Strict):
    """A function tool. OpenAI's `custom` tools take free-form text the engine cannot constrain: refused."""

    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: FunctionName


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class JSONSchemaFormat(_Strict):
    model_config = ConfigDict(extra="forbid", serialize_by_alias=True)
    name: FunctionName
    description: Description | None = None
    schema_: JSONSchemaObject | None = Field(None, alias="schema")
    strict: bool | None = None


class TextFormat(_Strict):
    type: Literal["text"]


class JSONObjectFormat(_Strict):
    type: Literal["json_object"]


class JSONSchemaResponseFormat(_Strict):
    type: Literal["json_schema"]
    json_schema: JSONSchemaFormat


ToolChoice = Annotated[
    Annotated[Literal["none", "auto", "required"], Tag("mode")] | Annotated[NamedToolChoice, Tag("function")],
    Discriminator(lambda v: "mode" if isinstance(v, str) else "function"),
]
ResponseFormat = Annotated[TextFormat | JSONObjectFormat | JSONSchemaResponseFormat, Field(discriminator="type")]


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=1000)
    max_completion_tokens: int | None = Field(None, ge=1, le=1_000_000)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None

    @field_validator("tools")
    @classmethod
    def _tools_fit(cls, tools: list[Tool] | None, info: ValidationInfo) -> list[Tool] | None:
        names = [tool.function.name for tool in tools or ()]
        if len(set(names)) != len(names):
            raise _invalid("each function needs its own name")
        schemas = [tool.function.parameters for tool in tools or () if tool.function.parameters]
        response_format = info.data.get("response_format")
        if isinstance(response_format, JSONSchemaResponseFormat) and response_format.json_schema.schema_:
            schemas.append(response_format.json_schema.schema_)
        if sum(map(json_size, schemas)) > MAX_TOTAL_SCHEMA_BYTES:
            raise _invalid(f"tools and response_format hold more than {MAX_TOTAL_SCHEMA_BYTES} bytes of schemas")
        return tools or None  # an empty list is as if absent (the engine refuses one)

    @field_validator("tool_choice")
    @classmethod
    def _choice_fits(cls, choice: str | NamedToolChoice | None, info: ValidationInfo) -> str | NamedToolChoice | None:
        if choice in (None, "none") or "tools" not in info.data:  # tools already failed: that error is enough
            return choice
        names = [tool.function.name for tool in info.data["tools"] or ()]
        if not names:
            raise _invalid("a tool_choice other than none needs tools")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise _invalid(f"the function '{choice.function.name}' is not in tools")
        return choice

    @property
    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]  # below the vocabulary size: server/bounds.py
TokenIds = Annotated[list[TokenId], Field(min_length=1)]


def _prompt_kind(value: Any) -> str:
    if isinstance(value, str):
        return "text"
    first = value[0] if isinstance(value, list) and value else None
    return "texts" if isinstance(first, str) else "token_lists" if isinstance(first, list) else "tokens"


# One text, several texts, one token-id list, or several; the discriminator keeps errors about the form sent.
Prompt = Annotated[
    Annotated[str, Tag("text")]
    | Annotated[list[str], Field(min_length=1), Tag("texts")]
    | Annotated[TokenIds, Tag("tokens")]
    | Annotated[list[TokenIds], Field(min_length=1), Tag("token_lists")],
    Discriminator(_prompt_kind),
]


class CompletionRequest(GenerationRequest):
    prompt: Prompt
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool | None = None

    @property
    def prompt_count(self) -> int:
        """Prompts in this request: 1 for a text or one token list, else the list's length."""
        kind = _prompt_kind(self.prompt)
        return len(self.prompt) if kind in ("texts", "token_lists") else 1

    def token_ids(self) -> list[int]:
        """Every token id in the prompt (empty for text prompts)."""
        kind = _prompt_kind(self.prompt)
        if kind == "tokens":
            return self.prompt
        return [t for ids in self.prompt for t in ids] if kind == "token_lists" else []


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    parent: str | None = None
    root: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# Admin API


class TenantLimits(BaseModel):
    """Per-tenant limits; None means no limit of that kind."""

    model_config = ConfigDict(extra="forbid")
    max_concurrent_requests: int | None = Field(None, ge=1, le=100_000)
    requests_per_minute: int | None = Field(None, ge=1, le=10_000_000)
    tokens_per_minute: int | None = Field(None, ge=1, le=10_000_000_000)
    max_tokens: int | None = Field(None, ge=1, le=10_000_000)


class TenantCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1, max_length=63, description="Lower-case letters, digits and single hyphens.")
    limits: TenantLimits = Field(default_factory=TenantLimits)


class TenantUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    default_adapter: str | None = Field(None, max_length=63, description="An adapter name, or null for the base.")
    limits: TenantLimits | None = None


class TenantOut(BaseModel):
    id: str
    default_adapter: str | None
    limits: TenantLimits
    created_at: datetime


class KeyOut(BaseModel):
    id: str
    tenant: str
    created_at: datetime | None = None
    revoked_at: datetime | None = None
    key: str | None = Field(None, description="The secret; returned once, when the key is made.")


class VersionOut(BaseModel):
    version: int
    active: bool
    rank: int
    size_bytes: int
    source: str
    created_at: datetime
    manifest: dict | None = None


class AdapterOut(BaseModel):
    tenant: str
    name: str
    model: str = Field(description="The `model` a tenant calls it by.")
    active_version: int | None
    versions: list[VersionOut]


class ActivateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = Field(ge=1, le=1_000_000_000)


class AuditOut(BaseModel):
    id: int
    at: datetime
    actor: str
    action: str
    object: str
    result: str
    detail: str | None


class ListOf(BaseModel, Generic[T]):
    object: Literal["list"] = "list"
    data: list[T]
