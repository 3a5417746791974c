"""How close a generated answer is to the reference: exact match and token F1 (SQuAD's similarity), and the
aggregate of one model over a set."""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import asdict, dataclass

_WORD = re.compile(r"\w+")


def normalize(text: str) -> str:
    """Case, surrounding whitespace and punctuation, and runs of spaces do not count."""
    return " ".join(text.casefold().split()).strip(" .!?,;:\"'")


def exact_match(generated: str, reference: str) -> bool:
    return normalize(generated) == normalize(reference)


def token_f1(generated: str, reference: str) -> float:
    """The F1 of the two answers' words (case-folded), 1.0 for the same words in any order."""
    ours, theirs = _WORD.findall(generated.casefold()), _WORD.findall(reference.casefold())
    if not ours or not theirs:
        return float(ours == theirs)
    common = sum((Counter(ours) & Counter(theirs)).values())
    if not common:
        return 0.0
    precision, recall = common / len(ours), common / len(theirs)
    return 2 * precision * recall / (precision + recall)


@dataclass(frozen=True)
class ExampleScore:
    nll: float  # the reference answer's summed negative log-likelihood, in nats
    tokens: int  # its tokens
    generated: str


@dataclass(frozen=True)
class SetScore:
    """One model on one set: the reference answers' loss (mean per token) and perplexity, and how often and how
    closely its greedy answers match them."""

    examples: int
    answer_tokens: int
    loss: float
    perplexity: float
    exact_match: float
    similarity: float

    def as_dict(self) -> dict:
        return {key: round(value, 6) if isinstance(value, float) else value for key, value in asdict(self).items()}


def aggregate(scores: list[ExampleScore], references: list[str]) -> SetScore:
    tokens = sum(s.tokens for s in scores)
    loss = sum(s.nll for s in scores) / tokens
    return SetScore(
        examples=len(scores), answer_tokens=tokens, loss=loss, perplexity=math.exp(min(loss, 700.0)),
        exact_match=sum(exact_match(s.generated, r) for s, r in zip(scores, references, strict=True)) / len(scores),
        similarity=sum(token_f1(s.generated, r) for s, r in zip(scores, references, strict=True)) / len(scores),
    )
