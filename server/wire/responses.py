"""`POST /v1/responses`, typed after openai-python's `ResponseCreateParams`: the input items a text model can
take (messages, function calls and their outputs), function tools, text formats. Each part is bounded, like
chat. Nothing is stored here: `store` is accepted and treated as false; what needs a stored
response (`previous_response_id`, `background`, `conversation`) is refused with a 400 naming the field.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from server.wire.chat import (
    MAX_TOOLS,
    MAX_TOTAL_SCHEMA_BYTES,
    Description,
    FunctionName,
    JSONSchemaObject,
    ShortText,
    invalid_value,
    json_size,
)
from server.wire.request_fields import Metadata, VllmSampling

# Fields accepted and not sent to the engine (OpenAI platform fields; reasoning for a model without any).
RESPONSES_DROPPED = frozenset({
    "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key", "prompt_cache_retention",
    "reasoning", "include", "truncation", "max_tool_calls", "stream_options",
})
Status = Literal["in_progress", "completed", "incomplete"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputText(_Strict):
    type: Literal["input_text"]
    text: str


class OutputText(_Strict):
    """Text the model wrote, sent back as part of the conversation."""

    type: Literal["output_text"]
    text: str
    annotations: list[dict[str, Any]] | None = Field(None, max_length=0)
    logprobs: list[dict[str, Any]] | None = Field(None, exclude=True)


class Refusal(_Strict):
    type: Literal["refusal"]
    refusal: str


TextPart = Annotated[InputText | OutputText | Refusal, Field(discriminator="type")]
ItemContent = Annotated[
    Annotated[str, Tag("text")] | Annotated[list[TextPart], Field(max_length=1000), Tag("parts")],
    Discriminator(lambda v: "text" if isinstance(v, str) else "parts"),
]


class MessageItem(_Strict):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: ItemContent
    id: ShortText | None = None
    status: Status | None = None


class FunctionCallItem(_Strict):
    type: Literal["function_call"]
    call_id: ShortText
    name: FunctionName
    arguments: str
    id: ShortText | None = None
    status: Status | None = None


class FunctionCallOutputItem(_Strict):
    type: Literal["function_call_output"]
    call_id: ShortText
    output: str
    id: ShortText | None = None
    status: Status | None = None


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")],
    # A message may come without `type` (openai-python's EasyInputMessage).
    Discriminator(lambda v: (v.get("type") or "message") if isinstance(v, dict) else getattr(v, "type", None)),
]


class FunctionTool(_Strict):
    type: Literal["function"]
    name: FunctionName
    description: Description | None = None
    parameters: JSONSchemaObject | None = None
    strict: bool | None = None


class NamedFunctionChoice(_Strict):
    type: Literal["function"]
    name: FunctionName


ToolChoice = Annotated[
    Annotated[Literal["none", "auto", "required"], Tag("mode")] | Annotated[NamedFunctionChoice, Tag("function")],
    Discriminator(lambda v: "mode" if isinstance(v, str) else "function"),
]


class TextFormatText(_Strict):
    type: Literal["text"]


class TextFormatJSONObject(_Strict):
    type: Literal["json_object"]


class TextFormatJSONSchema(_Strict):
    model_config = ConfigDict(extra="forbid", serialize_by_alias=True)
    type: Literal["json_schema"]
    name: FunctionName
    schema_: JSONSchemaObject = Field(alias="schema")
    description: Description | None = None
    strict: bool | None = None


class TextConfig(_Strict):
    format: Annotated[TextFormatText | TextFormatJSONObject | TextFormatJSONSchema,
                      Field(discriminator="type")] | None = None
    verbosity: Literal["low", "medium", "high"] | None = Field(None, exclude=True)


class Reasoning(_Strict):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None


class ResponsesStreamOptions(_Strict):
    include_obfuscation: bool | None = None


class ResponsesRequest(VllmSampling):
    """The fields of `POST /v1/responses` this server takes; the engine's own extras stay refused."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=256)
    input: Annotated[str, Field(min_length=1)] | list[InputItem] = Field(max_length=1000)
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1, le=1_000_000)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, le=1000)
    min_p: float | None = Field(None, ge=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=2)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[FunctionTool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    stream: bool | None = False
    stream_options: ResponsesStreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    # Accepted, not passed on (RESPONSES_DROPPED).
    metadata: Metadata | None = None
    store: bool | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None
    safety_identifier: str | None = Field(None, max_length=256)
    prompt_cache_key: str | None = Field(None, max_length=256)
    prompt_cache_retention: Literal["in-memory", "in_memory", "24h"] | None = None
    reasoning: Reasoning | None = None
    include: list[Literal["message.output_text.logprobs", "reasoning.encrypted_content"]] | None = Field(
        None, max_length=2)
    truncation: Literal["auto", "disabled"] | None = None
    max_tool_calls: int | None = Field(None, ge=1, le=1000)
    # Refused unless empty: they need a stored response.
    previous_response_id: str | None = Field(None, max_length=256)
    background: bool | None = None
    conversation: str | dict[str, Any] | None = None

    @field_validator("previous_response_id", "conversation")
    @classmethod
    def _nothing_stored(cls, value: Any) -> None:
        if value:
            raise invalid_value("responses are not stored on this server: send the whole conversation in input")
        return None

    @field_validator("background")
    @classmethod
    def _no_background(cls, value: bool | None) -> None:
        if value:
            raise invalid_value("background responses are not supported: use stream for long answers")
        return None

    @model_validator(mode="after")
    def _tools_fit(self) -> ResponsesRequest:
        names = [tool.name for tool in self.tools or ()]
        if len(set(names)) != len(names):
            raise invalid_value("each function needs its own name")
        schemas = [tool.parameters for tool in self.tools or () if tool.parameters]
        if self.text and isinstance(self.text.format, TextFormatJSONSchema):
            schemas.append(self.text.format.schema_)
        if sum(map(json_size, schemas)) > MAX_TOTAL_SCHEMA_BYTES:
            raise invalid_value(f"tools and text.format hold more than {MAX_TOTAL_SCHEMA_BYTES} bytes of schemas")
        choice = self.tool_choice
        if isinstance(choice, NamedFunctionChoice) and choice.name not in names:
            raise invalid_value(f"the function '{choice.name}' is not in tools")
        if choice == "required" and not names:
            raise invalid_value("tool_choice required needs tools")
        return self

    # The interface the serving path reads of every generation request (see GenerationRequest).
    n: ClassVar[None] = None
    wants_usage: ClassVar[bool] = True
    wants_continuous_usage: ClassVar[bool] = False
    prompt_count: ClassVar[int] = 1

    @property
    def requested_tokens(self) -> int | None:
        return self.max_output_tokens

    def cap_tokens(self, cap: int) -> None:
        self.max_output_tokens = cap

    @property
    def messages(self) -> list:
        """The input as the prompt estimate reads it (see server.serving.budget)."""
        items = [self.input] if isinstance(self.input, str) else self.input
        return [*([self.instructions] if self.instructions else []), *items]

    def engine_payload(self, engine_model: str, cache_salt: str) -> dict[str, Any]:
        """The engine's body: ours but for model, the tenant's cache salt, and nothing stored there."""
        payload = self.model_dump(exclude_unset=True, exclude_none=True, by_alias=True, exclude=RESPONSES_DROPPED)
        payload.update(model=engine_model, cache_salt=cache_salt, store=False)
        return payload
