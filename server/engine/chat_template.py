"""Tool calling for the embedded engine: the parser flags and, for a ChatML model whose own chat template
knows no tools (SmolLM2, the default), a ChatML template that does.

vLLM turns `tools` into text through the model's chat template and turns the model's output back into
`tool_calls` with a parser; both must agree on one format. Hermes' `<tool_call>` JSON blocks are the usual
one for ChatML models, so the packaged template writes tools and calls that way.
"""

from __future__ import annotations

import json
from pathlib import Path

from server.config import Settings

TOOLS_TEMPLATE = Path(__file__).parent / "templates" / "chatml_tools.jinja"


def model_chat_template(model_path: Path) -> str:
    """The model's own chat template text ('' when it has none or it cannot be read)."""
    template_file = model_path / "chat_template.jinja"
    try:
        if template_file.is_file():
            return template_file.read_text()
        config = json.loads((model_path / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return ""
    template = config.get("chat_template") if isinstance(config, dict) else None
    return template if isinstance(template, str) else ""


def chat_template_for(settings: Settings) -> Path | None:
    """The template the engine is started with; None: the model's own."""
    if settings.engine_chat_template is not None:
        return settings.engine_chat_template
    if not settings.engine_tool_call_parser:
        return None
    own = model_chat_template(settings.model_path)
    if "<|im_start|>" in own and "tools" not in own:
        return TOOLS_TEMPLATE
    return None


def tools_enabled(settings: Settings) -> bool:
    """Whether the embedded engine parses tool calls: a parser is set and the template can show it tools."""
    if not settings.engine_tool_call_parser:
        return False
    template = chat_template_for(settings)
    return template is not None or "tools" in model_chat_template(settings.model_path)


def engine_tool_args(settings: Settings) -> list[str]:
    """The vLLM flags for tool calling and the chat template (none when the engine's extra args set them)."""
    args: list[str] = []
    given = {arg.split("=")[0] for arg in settings.engine_extra_args}
    template = chat_template_for(settings)
    if template is not None and "--chat-template" not in given:
        args += ["--chat-template", str(template)]
    if tools_enabled(settings) and "--tool-call-parser" not in given:
        args += ["--enable-auto-tool-choice", "--tool-call-parser", settings.engine_tool_call_parser,
                 "--tool-strict-level", settings.engine_tool_strict_level]
    return args
