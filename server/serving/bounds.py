"""Checks of a generation request that need the server's settings or its base model.

`server.wire.openai` types and bounds what a request may hold; this module refuses what is well-formed but beyond
this server: more prompts than `max_prompts_per_request`, token ids outside the base model's vocabulary, media
parts for a text-only model, and tool calling on an engine without a tool parser (vLLM would answer with its
own flag names). Each refusal is a 400 naming the field.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from server.config import Settings
from server.engine.chat_template import tools_enabled
from server.errors import BadRequest
from server.wire.openai import ChatCompletionRequest, CompletionRequest, GenerationRequest
from server.wire.responses import ResponsesRequest

log = logging.getLogger(__name__)

# Which part types need which config.json section (as Hugging Face multimodal models spell them).
MEDIA_CONFIG = {"image_url": "vision_config", "input_audio": "audio_config"}


def check_request_bounds(settings: Settings, body: GenerationRequest | ResponsesRequest) -> None:
    """Raise BadRequest when `body` asks for more than this server and its base model can do."""
    config = model_config(settings.model_path)
    vocab = vocab_size(config)
    if isinstance(body, CompletionRequest):
        _check_prompts(settings, body, vocab)
    if vocab is not None:
        for field, ids in (("logit_bias", list(map(int, getattr(body, "logit_bias", None) or ()))),
                           ("stop_token_ids", body.stop_token_ids), ("allowed_token_ids", body.allowed_token_ids)):
            highest = max(ids or (), default=-1)
            if highest >= vocab:
                raise BadRequest(f"{field}: token id {highest} is outside the vocabulary (0 to {vocab - 1}).",
                                 param=field, code="invalid_value")
    if isinstance(body, ChatCompletionRequest):
        _check_parts(body, config)
    if isinstance(body, ChatCompletionRequest | ResponsesRequest):
        _check_tools(settings, body)


def _check_prompts(settings: Settings, body: CompletionRequest, vocab: int | None) -> None:
    limit = settings.max_prompts_per_request
    if body.prompt_count > limit:
        raise BadRequest(f"prompt holds {body.prompt_count} prompts; at most {limit} are allowed in one request.",
                         param="prompt", code="too_many_prompts")
    if vocab is not None:
        highest = max(body.token_ids(), default=-1)
        if highest >= vocab:
            raise BadRequest(f"prompt: token id {highest} is outside the vocabulary (0 to {vocab - 1}).",
                             param="prompt", code="invalid_value")


def _check_parts(body: ChatCompletionRequest, config: dict[str, Any]) -> None:
    for i, message in enumerate(body.messages):
        if not isinstance(message.content, list):
            continue
        for j, part in enumerate(message.content):
            field = f"messages.{i}.content.{j}"
            if part.type == "file":
                raise BadRequest(f"{field}: file parts are not supported; send the text.", param=field,
                                 code="unsupported_value")
            section = MEDIA_CONFIG.get(part.type)
            if section is None:
                continue
            if section not in config:
                raise BadRequest(f"{field}: {part.type} parts are not supported: this server's model takes text only.",
                                 param=field, code="unsupported_value")
            # The engine fetches URLs it is given: from inside the private network, so only inline data.
            if part.type == "image_url" and not part.image_url.url.startswith("data:"):
                raise BadRequest(f"{field}: images must be sent inline as data: URLs.", param=f"{field}.image_url.url",
                                 code="unsupported_value")


def _check_tools(settings: Settings, body: ChatCompletionRequest | ResponsesRequest) -> None:
    # vLLM treats tools without tool_choice as "auto"; every choice but "none" needs its tool parser.
    if body.tools and body.tool_choice != "none" and not engine_parses_tools(settings):
        raise BadRequest('tool_choice: this server\'s model cannot call tools; send tool_choice "none" to only '
                         "describe them, or no tools.", param="tool_choice", code="unsupported_value")


def engine_parses_tools(settings: Settings) -> bool:
    """Whether the engine can turn output into tool calls. Engines started elsewhere may: they decide."""
    if not settings.embedded_engine:
        return True
    return tools_enabled(settings) or any(arg.split("=")[0] == "--tool-call-parser"
                                          for arg in settings.engine_extra_args)


def vocab_size(config: dict[str, Any]) -> int | None:
    size = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    return size if isinstance(size, int) and size > 0 else None


_configs: dict[Path, dict[str, Any]] = {}


def model_config(model_path: Path) -> dict[str, Any]:
    """The base model's config.json, read once. Empty while this gateway has no copy (engines elsewhere, or not
    prepared yet; read again next time): token ids are then left to the engine, and media parts refused."""
    if model_path not in _configs:
        try:
            config = json.loads((model_path / "config.json").read_text())
        except (OSError, ValueError):
            log.warning("no readable config.json for the base model; vocabulary checks are left to the engine")
            return {}
        _configs[model_path] = config if isinstance(config, dict) else {}
    return _configs[model_path]
