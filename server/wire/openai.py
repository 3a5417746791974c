"""Request and response models of the OpenAI-compatible API and the error shape.

Generation requests take an allowlist of OpenAI's sampling fields, plus vLLM's documented sampling extras and
OpenAI's platform fields (`server.wire.request_fields`), each bounded. Anything else is refused with a 400 naming
the field, because fields such as chat templates, their arguments or guided-decoding back-ends reach the engine's
internals, and the engine trusts what it is given.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)

from server.wire.chat import (
    MAX_TOOLS,
    MAX_TOTAL_SCHEMA_BYTES,
    ChatMessage,
    JSONSchemaResponseFormat,
    NamedToolChoice,
    ResponseFormat,
    Tool,
    ToolChoice,
    invalid_value,
    json_size,
)
from server.wire.request_fields import DROPPED_FIELDS, PlatformFields, VllmSampling, legacy_functions_as_tools


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
    # OpenAI pads its stream events against length side channels; accepted and not passed on.
    include_obfuscation: bool | None = Field(None, exclude=True)


Stop = Annotated[str, Field(max_length=256)]
TokenIdText = Annotated[str, Field(pattern=r"^[0-9]{1,9}$")]  # a logit_bias key; below the vocabulary size too


class GenerationRequest(PlatformFields, VllmSampling):
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
        payload = self.model_dump(exclude_unset=True, exclude_none=True, by_alias=True, exclude=DROPPED_FIELDS)
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

    def cap_tokens(self, cap: int) -> None:
        """Set the completion cap of a request that gave none."""
        self.max_tokens = cap


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=1000)
    _legacy = model_validator(mode="before")(legacy_functions_as_tools)
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
            raise invalid_value("each function needs its own name")
        schemas = [tool.function.parameters for tool in tools or () if tool.function.parameters]
        response_format = info.data.get("response_format")
        if isinstance(response_format, JSONSchemaResponseFormat) and response_format.json_schema.schema_:
            schemas.append(response_format.json_schema.schema_)
        if sum(map(json_size, schemas)) > MAX_TOTAL_SCHEMA_BYTES:
            raise invalid_value(f"tools and response_format hold more than {MAX_TOTAL_SCHEMA_BYTES} bytes of schemas")
        return tools or None  # an empty list is as if absent (the engine refuses one)

    @field_validator("tool_choice")
    @classmethod
    def _choice_fits(cls, choice: str | NamedToolChoice | None, info: ValidationInfo) -> str | NamedToolChoice | None:
        if choice in (None, "none") or "tools" not in info.data:  # tools already failed: that error is enough
            return choice
        names = [tool.function.name for tool in info.data["tools"] or ()]
        if not names:
            raise invalid_value("a tool_choice other than none needs tools")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise invalid_value(f"the function '{choice.function.name}' is not in tools")
        return choice

    @property
    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]  # below the vocabulary size: server/serving/bounds.py
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
    best_of: int | None = Field(None, ge=1, le=8)
    suffix: str | None = Field(None, max_length=65536)

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, best_of: int | None, info: ValidationInfo) -> int | None:
        if best_of is not None and best_of > (info.data.get("n") or 1):
            raise invalid_value("best_of above n is not supported: the engine returns every sequence it samples; "
                                "ask for n sequences and pick")
        return best_of  # dropped: best_of equal to n is what the engine does anyway

    @field_validator("suffix")
    @classmethod
    def _no_insertion(cls, suffix: str | None) -> str | None:
        if suffix:
            raise invalid_value("inserting text before a suffix is not supported by this server's model")
        return None

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
    evaluation: dict | None = Field(None, description="Its latest report on the adapter's golden set.")
    awaiting_evaluation: bool = Field(False, description="Whether it becomes active waits for its evaluation.")


class CanaryRequest(BaseModel):
    """A candidate version for a share of `NAME`'s requests, and when it is rolled back by itself."""

    model_config = ConfigDict(extra="forbid")
    version: int = Field(ge=1, le=1_000_000_000, description="The candidate: a published version, not the active one.")
    weight: int = Field(ge=1, le=99, description="Percent of `NAME`'s requests it serves.")
    max_error_rate_increase: float = Field(
        0.05, ge=0, le=1, description="Rolled back once its error rate is more than this (a fraction) above the "
                                      "active version's, counted from `min_requests` of its requests on.")
    min_requests: int = Field(20, ge=1, le=1_000_000, description="Its requests before its error rate is judged.")
    max_score_drop: float = Field(
        0.05, ge=0, le=1, description="Rolled back (or not started) when its golden-set similarity is more than this "
                                      "below the active version's.")


class CanaryOut(CanaryRequest):
    started: str = Field(description="When it started (UTC, ISO 8601).")


class AdapterOut(BaseModel):
    tenant: str
    name: str
    model: str = Field(description="The `model` a tenant calls it by.")
    active_version: int | None
    golden_set: str | None = Field(None, description="The file its versions are evaluated on.")
    promotion: str = Field("always", description="When a new version becomes active.")
    max_forgetting: float | None = None
    canary: CanaryOut | None = Field(None, description="A candidate version taking a share of `model`'s requests.")
    versions: list[VersionOut]

    @classmethod
    def of(cls, adapter, manifest: Callable[[int], dict | None] | None = None) -> AdapterOut:
        """From a store `AdapterView`; `manifest(version)` adds each version's registry manifest."""
        versions = [
            VersionOut(version=v.version, active=v.version == adapter.active_version, rank=v.rank,
                       size_bytes=v.size_bytes, source=v.source, created_at=v.created_at, evaluation=v.evaluation,
                       awaiting_evaluation=v.awaiting_evaluation, manifest=manifest(v.version) if manifest else None)
            for v in adapter.version_details
        ]
        return cls(tenant=adapter.tenant_id, name=adapter.name, model=adapter.name,
                   active_version=adapter.active_version, golden_set=adapter.golden_set,
                   promotion=adapter.promotion, max_forgetting=adapter.max_forgetting,
                   canary=CanaryOut(**adapter.canary) if adapter.canary else None, versions=versions)


class AdapterUpdate(BaseModel):
    """The adapter's evaluation settings; only the fields given change."""

    model_config = ConfigDict(extra="forbid")
    golden_set: str | None = Field(None, max_length=64,
                                   description="A file of purpose `evals` or `fine-tune` (chat JSONL, each line ending "
                                               "in the reference answer); null detaches it.")
    promotion: Literal["always", "if_better", "if_better_and_retains"] = Field(
        "always", description="When a new version becomes active: always, only if it beats the version it would "
                              "replace on the golden set, or that and it forgets at most `max_forgetting`.")
    max_forgetting: float | None = Field(
        None, ge=0, le=10, description="Under `if_better_and_retains`, how far (a fraction) the general set's loss may "
                                       "rise above the base model's; null: 0.05.")

    def changes(self) -> dict:
        return {field: getattr(self, field) for field in self.model_fields_set}


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

