"""Request and response models of the OpenAI-compatible API and the error shape.

Generation requests take an allowlist of OpenAI's sampling fields (plus vLLM's common ones: top_k, min_p,
repetition_penalty, min_tokens), each bounded. Anything else is refused with a 400 naming the field,
because fields such as chat templates, their arguments or guided-decoding back-ends reach the engine's
internals, and the engine trusts what it is given.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

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
    logit_bias: dict[Annotated[str, Field(max_length=16)], Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        None, max_length=300)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    user: str | None = Field(None, max_length=256)
    top_k: int | None = Field(None, ge=-1, le=1000)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=2)
    min_tokens: int | None = Field(None, ge=0, le=4096)

    def engine_payload(self, engine_model: str) -> dict[str, Any]:
        """The body for the engine: the client's, with our model name, and usage always reported on
        streams (the gateway counts it; the relay drops it again if the client did not ask)."""
        payload = self.model_dump(exclude_unset=True, exclude_none=True)
        payload["model"] = engine_model
        if self.stream:
            payload["stream_options"] = {**(payload.get("stream_options") or {}), "include_usage": True}
        return payload

    @property
    def wants_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def requested_tokens(self) -> int | None:
        return self.max_tokens


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_calls, tool_call_id...: data, not engine settings
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Any = None


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=1000)
    max_completion_tokens: int | None = Field(None, ge=1, le=1_000_000)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = Field(None, max_length=64)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    @property
    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(GenerationRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool | None = None


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
