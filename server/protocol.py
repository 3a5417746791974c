"""Request and response models of the OpenAI-compatible API and the error shape.

Requests are validated only as far as the gateway needs (the model name, streaming flags, the shape of
messages); other OpenAI fields pass through to the engine, which knows them best.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool | None = None


class GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1, max_length=256)
    stream: bool | None = False
    stream_options: StreamOptions | None = None

    def engine_payload(self, engine_model: str) -> dict[str, Any]:
        """The body for the engine: the client's, with our model name, and usage always reported on
        streams (the gateway counts it; the relay drops it again if the client did not ask)."""
        payload = self.model_dump(exclude_unset=True, exclude_none=False)
        payload["model"] = engine_model
        if self.stream:
            payload["stream_options"] = {**(payload.get("stream_options") or {}), "include_usage": True}
        return payload

    @property
    def wants_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str = Field(min_length=1, max_length=32)
    content: Any = None


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(GenerationRequest):
    prompt: str | list[str] | list[int] | list[list[int]]


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
