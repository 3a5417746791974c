"""What a generation request may cost, known before it runs: its sequences and its token reservation.

A tenant's token budget is charged when a request is admitted, not when it ends, or a tenant could open its
whole concurrency allowance at once and overshoot before the first answer is counted. The reservation is the
prompt (estimated: the gateway does not tokenize) plus `max_tokens` for every sequence (`n` x prompts); when
the request ends, the limiter gives back what was reserved and charges what the engine reported.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.errors import BadRequest
from server.wire.openai import GenerationRequest
from server.wire.responses import ResponsesRequest

# Characters per token in the estimate: byte-level BPE vocabularies average 3.5-4.5 for English, fewer for
# other scripts; a smaller divisor reserves more. The engine's count replaces it when the request ends.
_CHARS_PER_TOKEN = 3
_TOKENS_PER_MESSAGE = 4  # role markers of the chat template


@dataclass(frozen=True)
class Cost:
    sequences: int  # prompts x n: what concurrency limits count
    prompt_tokens: int  # estimated
    reserved_tokens: int  # prompt + completion cap x sequences


def estimate_prompt_tokens(body: GenerationRequest | ResponsesRequest) -> int:
    """An estimate of the prompt's tokens, from its text (token-id prompts are counted exactly)."""
    messages = getattr(body, "messages", None)
    if messages is not None:
        chars = _characters(messages) + _characters(getattr(body, "tools", None))
        return chars // _CHARS_PER_TOKEN + _TOKENS_PER_MESSAGE * len(messages) + 1
    prompt = getattr(body, "prompt", "")
    if isinstance(prompt, str):
        return len(prompt) // _CHARS_PER_TOKEN + 1
    if prompt and isinstance(prompt[0], int):
        return len(prompt)
    return sum(len(p) if not isinstance(p, str) else len(p) // _CHARS_PER_TOKEN + 1 for p in prompt)


def _characters(value) -> int:
    if value is None:
        return 0
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(_characters(v) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(_characters(v) for v in value)
    if hasattr(value, "model_dump"):
        return _characters(value.model_dump(exclude_none=True))
    return len(str(value))


def plan_cost(body: GenerationRequest | ResponsesRequest, *, context_window: int, token_budget: int | None) -> Cost:
    """The request's sequences and its reservation against `token_budget` (tokens per minute, or None).

    A request that does not say `max_tokens` may run to the end of the context window; with a token budget
    it is capped to what a full budget can pay for, so that it can be admitted at all. One that asks for
    more than the whole budget is refused: it could never be served.
    """
    sequences = (body.n or 1) * body.prompt_count
    prompt = estimate_prompt_tokens(body)
    asked = body.requested_tokens
    cap = asked if asked is not None else max(1, context_window - prompt // max(1, body.prompt_count))
    reserved = prompt + cap * sequences
    if token_budget is not None and reserved > token_budget:
        if asked is not None:
            raise BadRequest(
                f"This request may use {reserved} tokens (prompt and max_tokens x {sequences} sequences), more "
                f"than this tenant's {token_budget} tokens per minute.", param="max_tokens",
                code="tokens_exceed_limit")
        cap = (token_budget - prompt) // sequences
        if cap < 1:
            raise BadRequest(f"The prompt alone is over this tenant's {token_budget} tokens per minute.",
                             param=prompt_field(body),
                             code="tokens_exceed_limit")
        body.cap_tokens(cap)
        reserved = prompt + cap * sequences
    return Cost(sequences, prompt, reserved)


def prompt_field(body: GenerationRequest | ResponsesRequest) -> str:
    return "input" if isinstance(body, ResponsesRequest) else "messages" if hasattr(body, "messages") else "prompt"
