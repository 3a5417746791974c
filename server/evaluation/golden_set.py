"""A golden set: prompts with the reference answers a tenant wants its adapter to give.

The file is OpenAI's chat JSONL (the fine-tuning format): each line's messages are the prompt, and its last
message, from the assistant, is the reference answer. Checked like a training file: every problem by line number.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from adapters.train.data import BadLine, checked_messages, json_object, read_records
from adapters.train.preferences import parse_pair

MAX_EXAMPLES = 200  # every example costs the engine a few requests per model compared: an evaluation stays minutes
MAX_BYTES = 16 << 20


@dataclass(frozen=True)
class Example:
    prompt: list[dict]  # the messages before the answer, as `{"role", "content"}`
    answer: str
    line: int


def load_golden_set(path: Path, *, role: str = "golden set") -> list[Example]:
    """The set's examples; DataError naming the bad lines (an answerless line, bad JSON, too many examples)."""
    return list(read_records(path, _example, role=role, max_examples=MAX_EXAMPLES, max_bytes=MAX_BYTES))


def first_examples(path: Path, count: int, *, preferences: bool) -> list[Example]:
    """The first `count` examples of a training file (chat lines ending with an answer, or DPO pairs with their
    preferred answer): the few-shot baseline's solved examples. Lines of another shape are passed over."""
    found = []
    parse = parse_pair if preferences else _example
    with Path(path).open("rb") as file:
        for number, line in enumerate(file, start=1):
            if len(found) == count:
                break
            try:
                record = parse(line, number)
            except BadLine:
                continue
            found.append(Example(record.prompt, record.preferred, number) if preferences else record)
    return found


def _example(line: bytes, number: int) -> Example:
    record = json_object(line, 'must be a JSON object with a "messages" list')
    if "messages" not in record:
        raise BadLine('must be a JSON object with a "messages" list ending in the reference assistant answer')
    messages = [{"role": m["role"], "content": m["content"]} for m in checked_messages(record["messages"],
                                                                                        '"messages"')]
    *prompt, answer = messages
    if answer["role"] != "assistant" or not answer["content"].strip():
        raise BadLine("no reference answer: the last message must be the assistant's, with content")
    if not prompt or all(m["role"] == "system" for m in prompt):
        raise BadLine("no prompt before the reference answer")
    if prompt[0]["role"] == "assistant":
        raise BadLine("the conversation starts with an assistant message; put the prompt it answers before it")
    return Example(prompt, answer["content"], number)
