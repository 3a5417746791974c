"""Scoring one model (the base, or an adapter version) on a set, through the serving engine.

Each example costs the engine two requests, both on token ids rendered here with the base model's chat template
(the one the engine serves with), so the two measure the same conversation:
- the reference answer's loss, from the prompt logprobs of the whole conversation (`echo` with `logprobs`): the
  same tokens the training loss counts (`adapters.train.data.tokenize_conversation`: the answer and its end of turn);
- a greedy answer (temperature 0) to the prompt alone, scored against the reference.
Requests go concurrently (at most CONCURRENCY at a time) so the engine batches them, as it batches traffic.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from adapters.train.data import IGNORE, DataError, tokenize_conversation
from server.errors import EngineUnavailable
from server.evaluation.golden_set import Example
from server.evaluation.scoring import ExampleScore, SetScore, aggregate

CONCURRENCY = 8  # an evaluation shares the engine with traffic: a few sequences, not the whole batch
FEW_SHOT = 3  # examples shown before the prompt in the few-shot baseline
MAX_NEW_TOKENS = 256

# (engine model, adapter path or None for the base, API path, JSON payload) -> the engine's JSON answer
EngineCall = Callable[[str, str | None, str, dict], Awaitable[dict]]


class EvaluationFailed(EngineUnavailable):
    """The engine did not answer an evaluation request as expected (a 503); the message says which and why."""


def few_shot_prompts(examples: list[Example], shots: list[Example] | None = None) -> list[list[dict]]:
    """Each example's prompt after FEW_SHOT solved examples: the "prompt engineering instead of an adapter?"
    baseline. The solved examples are `shots` (the training data's first ones) where given; else other examples of
    the set itself, leave-one-out: an example never sees its own answer."""
    prompts = []
    for i, example in enumerate(examples):
        shown = shots[:FEW_SHOT] if shots else [examples[(i + k) % len(examples)]
                                                for k in range(1, min(FEW_SHOT, len(examples) - 1) + 1)]
        turns = [m for shot in shown for m in (*shot.prompt[-1:], {"role": "assistant", "content": shot.answer})]
        system = [m for m in example.prompt[:1] if m["role"] == "system"]
        prompts.append([*system, *turns, *example.prompt[len(system):]])
    return prompts


@dataclass(frozen=True)
class Rendered:
    """One example as the engine sees it: the conversation's token ids, where the answer starts, and which
    positions the loss counts."""

    ids: list[int]
    start: int
    answer: list[int]  # positions of the answer's tokens
    line: int


def render(tokenizer, examples: list[Example], prompts: list[list[dict]] | None = None,
           max_len: int = 2048) -> list[Rendered]:
    """Every example with its reference answer (after `prompts[i]` instead of its own prompt, e.g. few-shot).
    DataError names the line whose conversation the template cannot render or that is longer than `max_len`."""
    prompts = prompts or [e.prompt for e in examples]
    rendered = []
    for prompt, example in zip(prompts, examples, strict=True):
        messages = [{**m, "weight": 0} if m["role"] == "assistant" else m for m in prompt]
        messages.append({"role": "assistant", "content": example.answer})
        try:
            ids, labels = tokenize_conversation(tokenizer, messages, max_len)
        except DataError as exc:
            raise DataError(f"golden set line {example.line}: {exc}", [example.line]) from exc
        answer = [i for i, label in enumerate(labels) if label != IGNORE]
        rendered.append(Rendered(ids, answer[0], answer, example.line))
    return rendered


async def score_set(call: EngineCall, model: str, adapter_path: str | None, rendered: list[Rendered],
                    references: list[str], max_len: int = 2048) -> SetScore:
    """`model` (an adapter version, or the base with `adapter_path` None) on every rendered example. `call` bounds
    how many requests are in the engine at once (`gated`)."""

    async def one(example: Rendered) -> ExampleScore:
        echoed = await call(model, adapter_path, "/v1/completions", {
            "prompt": example.ids, "echo": True, "logprobs": 0, "max_tokens": 1, "temperature": 0})
        generated = await call(model, adapter_path, "/v1/completions", {
            "prompt": example.ids[:example.start], "temperature": 0,
            "max_tokens": min(MAX_NEW_TOKENS, 2 * len(example.answer) + 16, max_len - example.start)})
        try:
            logprobs = echoed["choices"][0]["logprobs"]["token_logprobs"]
            nll = -sum(logprobs[i] for i in example.answer)
            text = generated["choices"][0]["text"]
        except (KeyError, IndexError, TypeError) as exc:
            raise EvaluationFailed(f"The inference engine's answer for golden set line {example.line} has no "
                                   "logprobs or text; nothing was stored.") from exc
        return ExampleScore(nll=nll, tokens=len(example.answer), generated=text)

    return aggregate(await all_or_none(one(r) for r in rendered), references)


def gated(call: EngineCall, limit: int = CONCURRENCY) -> EngineCall:
    """`call` with at most `limit` requests in flight, however many models and examples an evaluation runs at once."""
    gate = asyncio.Semaphore(limit)

    async def limited(*args):
        async with gate:
            return await call(*args)

    return limited


async def all_or_none(coroutines) -> list:
    """Their results, in order; when one fails, the others are cancelled (no request left running) and it raises."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
