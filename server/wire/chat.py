"""The structure of a chat request, typed after openai-python's request params: messages and their content
parts, tools, tool choices and response formats. Every part of a message that reaches the engine has a known
shape and a bounded size, because vLLM renders it into its chat template, compiles schemas into grammars and
fetches media URLs. What the engine cannot do for this base model is refused in `server.serving.bounds`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator
from pydantic_core import PydanticCustomError

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
    server error rather than a 400 (seen on vLLM 0.32 with xgrammar): broken regexes, `$ref`s that only
    point at each other, and counts of items or properties the schema does not describe."""
    nodes = list(_nodes(schema))
    if max(level for _, level in nodes) > MAX_SCHEMA_DEPTH:
        raise invalid_value(f"the schema nests more than {MAX_SCHEMA_DEPTH} levels deep")
    if json_size(schema) > MAX_SCHEMA_BYTES:
        raise invalid_value(f"the schema is larger than {MAX_SCHEMA_BYTES} bytes as JSON")
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
                raise invalid_value("the schema holds a pattern that is not a valid regular expression") from None
        if isinstance(node.get("$ref"), str) and _ref_loops(schema, node):
            raise invalid_value("the schema holds $refs that only point at each other")
    for node in _subschemas(schema):
        _check_counts(node)
    return schema


# Keywords whose value is a subschema, a list of them, or a name -> subschema map (not `default`, `enum`, ...,
# which hold data and may have any keys).
_SUBSCHEMA = ("items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames",
              "unevaluatedItems", "unevaluatedProperties", "additionalItems")
_SUBSCHEMA_LISTS = ("prefixItems", "anyOf", "oneOf", "allOf")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def _subschemas(schema: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every (sub)schema object in `schema`, without recursion."""
    stack = [schema]
    while stack:
        node = stack.pop()
        if not isinstance(node, dict):
            continue
        yield node
        stack.extend(node.get(key) for key in _SUBSCHEMA)
        for key in _SUBSCHEMA_LISTS:
            stack.extend(node.get(key) if isinstance(node.get(key), list) else ())
        for key in _SUBSCHEMA_MAPS:
            stack.extend(node.get(key).values() if isinstance(node.get(key), dict) else ())


def _check_counts(node: dict[str, Any]) -> None:
    """The engine's grammar compiler (xgrammar) allows no array item and no object property that a schema does
    not describe, so `minItems` above the `prefixItems` without `items`, or `minProperties` above the listed
    `properties` without `additionalProperties`, can never be met. Under vLLM's "auto" backend these failed
    inside the engine (a 503); with xgrammar pinned vLLM refuses them, in its compiler's words."""
    types = node.get("type") if isinstance(node.get("type"), list) else [node.get("type")]
    min_items, min_properties = node.get("minItems"), node.get("minProperties")
    if "array" in types and _is_count(min_items) and node.get("items", False) is False:
        described = len(node["prefixItems"]) if isinstance(node.get("prefixItems"), list) else 0
        if min_items > described:
            raise invalid_value(f"minItems {min_items} asks for more array items than the schema describes: "
                                "give `items` a schema for them")
    if ("object" in types and _is_count(min_properties) and node.get("additionalProperties", False) is False
            and not node.get("patternProperties")):
        described = len(node["properties"]) if isinstance(node.get("properties"), dict) else 0
        if min_properties > described:
            raise invalid_value(f"minProperties {min_properties} asks for more properties than the schema "
                                "describes: list them in `properties` or allow `additionalProperties`")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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


def invalid_value(message: str) -> PydanticCustomError:
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
            raise invalid_value(f"a {self.role} message needs content")
        for part in self.content if isinstance(self.content, list) else ():
            if part.type not in ROLE_PARTS[self.role]:
                raise invalid_value(f"a {self.role} message cannot hold {part.type} parts")
        if self.role != "assistant" and (self.tool_calls or self.refusal is not None or self.function_call):
            raise invalid_value("only assistant messages carry tool_calls, function_call or refusal")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise invalid_value("tool messages, and only they, carry a tool_call_id")
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
