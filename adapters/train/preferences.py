"""Preference data for DPO: OpenAI's format, checked line by line, tokenized with the base model's template.

Each line is `{"input": {"messages": [...]}, "preferred_output": [{"role": "assistant", "content": "..."}],
"non_preferred_output": [{"role": "assistant", "content": "..."}]}`: a prompt (ending with the user's turn) and two
answers to it, the better first. Other keys of `input` (OpenAI's `tools`, `parallel_tool_calls`) are read past, as
the chat training data's are. Problems are reported with the file's role and 1-based line numbers, as for chat data.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from adapters.train.data import BadLine, Conversation, checked_messages, json_object, read_records, tokenize_all

SHAPE = 'must be a JSON object with "input", "preferred_output" and "non_preferred_output"'


class Pair(NamedTuple):
    """One preference: the prompt's messages, the preferred and the non-preferred answer, and its line."""

    prompt: list[dict]
    preferred: str
    rejected: str
    line: int


def load_pairs(path: Path, *, role: str = "training file", max_examples: int = 50_000,
               max_bytes: int | None = None) -> list[Pair]:
    """The file's pairs; DataError naming up to five bad lines, or saying that the file is empty or too big."""
    return list(read_records(path, parse_pair, role=role, max_examples=max_examples, max_bytes=max_bytes))


def count_pairs(path: Path, *, role: str = "training file", max_examples: int = 50_000,
                max_bytes: int | None = None) -> int:
    """Check the file as `load_pairs` does, one line in memory at a time; the number of pairs."""
    return sum(1 for _ in read_records(path, parse_pair, role=role, max_examples=max_examples, max_bytes=max_bytes))


def parse_pair(line: bytes, number: int) -> Pair:
    record = json_object(line, SHAPE)
    if "messages" in record and "input" not in record:
        raise BadLine(f'a chat line for supervised training ("messages"); each line of a DPO file '
                      f'{SHAPE.removeprefix("must be ")}')
    for key in ("input", "preferred_output", "non_preferred_output"):
        if key not in record:
            raise BadLine(f'missing "{key}" (each line {SHAPE.removeprefix("must be ")})')
    prompt = record["input"]
    if not isinstance(prompt, dict) or "messages" not in prompt:
        raise BadLine('"input" must be an object with a "messages" list')
    messages = checked_messages(prompt["messages"], '"input.messages"')
    if messages[-1]["role"] != "user":
        raise BadLine('"input.messages" must end with the user message the two outputs answer')
    preferred, rejected = _answer(record, "preferred_output"), _answer(record, "non_preferred_output")
    if preferred == rejected:
        raise BadLine("the preferred and non-preferred outputs are the same: there is no preference to learn")
    # Earlier assistant turns of the prompt are context: only the two answers are scored.
    context = [{**m, "weight": 0} if m["role"] == "assistant" else m for m in messages]
    return Pair(context, preferred, rejected, number)


def _answer(record: dict, key: str) -> str:
    output = record[key]
    if (not isinstance(output, list) or len(output) != 1 or not isinstance(output[0], dict)
            or output[0].get("role") != "assistant" or not isinstance(output[0].get("content"), str)):
        raise BadLine(f'"{key}" must be a list of one assistant message: [{{"role": "assistant", "content": "..."}}]')
    return output[0]["content"]


def tokenize_pairs(tokenizer, pairs: list[Pair], max_seq_len: int, role: str = "training file") -> list[tuple]:
    """Each pair's `(preferred, non-preferred)` examples, each `(input_ids, labels)` with labels on the answer
    only; refused by line number as chat examples are (`tokenize_all`: over-long ones are never truncated)."""
    conversations = [Conversation([*pair.prompt, {"role": "assistant", "content": answer}], pair.line)
                     for pair in pairs for answer in (pair.preferred, pair.rejected)]
    examples = tokenize_all(tokenizer, conversations, max_seq_len, role)
    return list(zip(examples[::2], examples[1::2], strict=True))
