"""Chat training data: OpenAI's fine-tuning JSONL, checked line by line, tokenized with the base model's template.

Each line is `{"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}`. The loss is on
the assistant's tokens only, its end-of-turn token included so that the model learns to stop. An assistant
message with `"weight": 0` is context, not a target, as in OpenAI's format. Every problem is reported with the
file's role and its 1-based line number, because the tenant fixes the file, not us.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

ROLES = ("system", "user", "assistant")
IGNORE = -100  # the label PyTorch's cross-entropy skips
MAX_LINE_BYTES = 4 << 20  # one conversation: far more than max_seq_len tokens of text, even escaped
GENERAL_SET = Path(__file__).with_name("general.jsonl")  # plain facts: shows what an adapter makes the model forget
MAX_PROBLEMS = 5  # enough to fix a file in one go without flooding the tenant with a broken file's every line


T = TypeVar("T")


class DataError(ValueError):
    """The data is refused. The message names the file and the bad lines; `lines` holds their numbers."""

    def __init__(self, message: str, lines: list[int] | None = None):
        super().__init__(message)
        self.lines = lines or []


class TooLong(DataError):
    """One conversation has more tokens than the job trains on."""

    def __init__(self, length: int, max_seq_len: int):
        super().__init__(f"{length} tokens, more than max_seq_len ({max_seq_len})")
        self.length = length


class Conversation(list):
    """A conversation's messages (a plain list of dicts) that remembers its line number in the file."""

    def __init__(self, messages: list[dict], line: int):
        super().__init__(messages)
        self.line = line


class BadLine(Exception):
    """One line's problem, collected into a DataError."""


def load_conversations(path: Path, *, role: str = "training file", max_examples: int = 50_000,
                       max_bytes: int | None = None) -> list[list[dict]]:
    """The file's conversations (each a `Conversation`, i.e. a list of message dicts with a `.line`).

    Raises DataError naming up to MAX_PROBLEMS bad lines, or saying that the file is empty or too big."""
    return list(read_records(path, _conversation, role=role, max_examples=max_examples, max_bytes=max_bytes))


def count_conversations(path: Path, *, role: str = "training file", max_examples: int = 50_000,
                        max_bytes: int | None = None) -> int:
    """Check the file as `load_conversations` does, keeping only one line in memory; the number of examples."""
    return sum(1 for _ in read_records(path, _conversation, role=role, max_examples=max_examples, max_bytes=max_bytes))


def read_records(path: Path, parse: Callable[[bytes, int], T], *, role: str, max_examples: int = 50_000,
                 max_bytes: int | None = None) -> Iterator[T]:
    """A JSONL file's examples one by one, `parse(line, number)` each (which raises BadLine for a bad one), read
    line by line (memory: one line, at most MAX_LINE_BYTES); the DataError, if any, once the file is read."""
    problems: list[tuple[int, str]] = []
    count = 0
    try:
        with Path(path).open("rb") as file:
            for number, line in _lines(file, role, max_bytes):
                if line is None:
                    problems.append((number, f"longer than {MAX_LINE_BYTES} bytes"))
                elif not line.strip():
                    continue  # blank lines (a trailing newline, spacing) are harmless
                else:
                    try:
                        record = parse(line, number)
                    except BadLine as bad:
                        problems.append((number, str(bad)))
                    else:
                        count += 1
                        if count > max_examples:
                            raise DataError(f"the {role} has more than {max_examples} examples; split it or use fewer")
                        if not problems:  # once a line is bad the file is refused: nothing more to hand out
                            yield record
                if len(problems) == MAX_PROBLEMS:
                    break
    except OSError as exc:
        raise DataError(f"the {role} cannot be read: {exc.strerror or type(exc).__name__}") from exc
    if problems:
        listed = "; ".join(f"line {number}: {problem}" for number, problem in problems)
        more = f"; (stopped at the first {MAX_PROBLEMS} problems)" if len(problems) == MAX_PROBLEMS else ""
        raise DataError(f"{role} {listed}{more}", [number for number, _ in problems])
    if not count:
        raise DataError(f"the {role} is empty")


def _lines(file, role: str, max_bytes: int | None):
    """(number, line) for each line of a binary file; line None when it is longer than MAX_LINE_BYTES (the rest
    of it is skipped unread into memory). DataError once more than `max_bytes` were read."""
    read = 0
    for number in itertools.count(1):
        line = file.readline(MAX_LINE_BYTES + 1)
        if not line:
            return
        read += len(line)
        if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
            while (rest := file.readline(1 << 20)) and not rest.endswith(b"\n"):
                read += len(rest)
                _check_size(read, role, max_bytes)
            read += len(rest)
            line = None
        _check_size(read, role, max_bytes)
        yield number, line


def _check_size(read: int, role: str, max_bytes: int | None) -> None:
    if max_bytes is not None and read > max_bytes:
        raise DataError(f"the {role} is larger than {max_bytes} bytes, the most this server trains on")


def _conversation(line: bytes, number: int) -> Conversation:
    """One line's messages, each as `{"role", "content"}` plus `"weight"` where given; or BadLine."""
    shape = 'must be a JSON object with a "messages" list'
    record = json_object(line, shape)
    if "messages" not in record:
        if "preferred_output" in record:
            raise BadLine('a preference pair for DPO; train on it with method {"type": "dpo"}, or give chat lines '
                          'with a "messages" list')
        raise BadLine(shape)
    cleaned = checked_messages(record["messages"], '"messages"')
    if cleaned[0]["role"] == "assistant":
        raise BadLine("the conversation starts with an assistant message; put the prompt it answers before it")
    if not any(m["role"] == "assistant" and m.get("weight", 1) for m in cleaned):
        raise BadLine("no assistant message to learn from")
    return Conversation(cleaned, number)


def json_object(line: bytes, shape: str) -> dict:
    """One line as a JSON object, or BadLine saying why not (`shape`: what the line must be)."""
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        raise BadLine("not valid UTF-8") from None
    except RecursionError:
        raise BadLine("not valid JSON: nested too deeply") from None
    except ValueError:  # JSONDecodeError, and numbers with more digits than Python converts
        raise BadLine("not valid JSON") from None
    if not isinstance(record, dict):
        raise BadLine(shape)
    return record


def checked_messages(messages, name: str) -> list[dict]:
    """A non-empty list of chat messages, each as `{"role", "content"}` plus `"weight"` where given; or BadLine."""
    if not isinstance(messages, list):
        raise BadLine(f"{name} must be a list")
    if not messages:
        raise BadLine("empty conversation")
    cleaned = []
    for index, message in enumerate(messages, start=1):
        where = f" (message {index})"
        if not isinstance(message, dict):
            raise BadLine(f'each message must be an object with "role" and "content"{where}')
        role = message.get("role")
        if role not in ROLES:
            raise BadLine(f"role {role!r} is not one of {', '.join(ROLES)}{where}")
        if not isinstance(message.get("content"), str):
            raise BadLine(f"content must be a string{where}")
        entry = {"role": role, "content": message["content"]}
        if "weight" in message:
            weight = message["weight"]
            if weight not in (0, 1) or isinstance(weight, bool):
                raise BadLine(f"weight must be 0 or 1{where}")
            if role != "assistant":
                raise BadLine(f"weight is only allowed on assistant messages{where}")
            entry["weight"] = weight
        cleaned.append(entry)
    return cleaned


def tokenize_conversation(tokenizer, messages: list[dict], max_seq_len: int) -> tuple[list[int], list[int]]:
    """`(input_ids, labels)` for one conversation; labels are IGNORE except on the learned assistant turns.

    Each assistant turn is located by rendering the conversation up to it: the turn's tokens are those
    between `messages[:i]` with the generation prompt and `messages[:i + 1]`. That holds only if the chat
    template renders earlier turns identically whatever follows them, which is checked, not assumed.
    Raises TooLong past `max_seq_len` tokens, DataError if the template cannot render the conversation."""
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    input_ids = _render(tokenizer, plain)
    if len(input_ids) > max_seq_len:
        raise TooLong(len(input_ids), max_seq_len)
    labels = [IGNORE] * len(input_ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or message.get("weight", 1) == 0:
            continue
        prompt = _render(tokenizer, plain[:i], add_generation_prompt=True)
        turn = _render(tokenizer, plain[: i + 1])
        if input_ids[: len(prompt)] != prompt or input_ids[: len(turn)] != turn or len(turn) <= len(prompt):
            raise DataError("the base model's chat template does not render earlier turns the same way once later "
                            "ones follow, so the assistant's tokens cannot be located; this conversation's shape "
                            "(e.g. where its system message is) may be what the template rewrites")
        start, end = len(prompt), len(turn)
        # Learn the end-of-turn token but not what a template adds after it (ChatML's newline): generation
        # stops at that token, so nothing after it is ever produced.
        ends = [j for j in range(start, end) if input_ids[j] == tokenizer.eos_token_id]
        if ends:
            end = ends[-1] + 1
        labels[start:end] = input_ids[start:end]
    return input_ids, labels


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    """The chat template's token ids. transformers 5 may answer with a BatchEncoding; we want the plain list."""
    try:
        ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                            return_dict=False)
    except Exception as exc:  # the template is a program over the data: its refusals are the data's problem
        raise DataError(f"the base model's chat template cannot render this conversation: {exc}") from exc
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return [int(t) for t in ids]


def tokenize_all(tokenizer, conversations: list[list[dict]], max_seq_len: int,
                 role: str = "training file") -> list[tuple[list[int], list[int]]]:
    """Every conversation's `(input_ids, labels)`. Over-long ones are refused by line number, never truncated:
    cutting a conversation would silently train on a reply without its end, or on no reply at all."""
    examples, too_long = [], []
    for index, messages in enumerate(conversations):
        line = getattr(messages, "line", index + 1)
        try:
            examples.append(tokenize_conversation(tokenizer, messages, max_seq_len))
        except TooLong as exc:
            if not too_long or too_long[-1][0] != line:  # a DPO pair's two answers share a line: named once
                too_long.append((line, exc.length))
        except DataError as exc:
            raise DataError(f"{role} line {line}: {exc}", [line]) from exc
    if too_long:
        shown = ", ".join(f"line {line} ({length} tokens)" for line, length in too_long[:MAX_PROBLEMS])
        more = f" and {len(too_long) - MAX_PROBLEMS} more" if len(too_long) > MAX_PROBLEMS else ""
        raise DataError(f"{role}: {len(too_long)} example(s) are longer than max_seq_len ({max_seq_len} tokens): "
                        f"{shown}{more}; shorten or split them, or raise max_seq_len",
                        [line for line, _ in too_long])
    return examples
