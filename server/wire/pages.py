"""OpenAI's list object: a page of `data`, `has_more`, and the ids of its first and last items (the SDK's
auto-pagination sends `last_id` back as `after` until `has_more` is false)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Generic, Literal, TypeVar

from pydantic import BaseModel

T = TypeVar("T")

class Page(BaseModel, Generic[T]):
    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool = False
    first_id: str | None = None
    last_id: str | None = None

    @classmethod
    def of(cls, data: Sequence[T], has_more: bool = False, id_of: Callable[[T], object] = lambda item: item.id
           ) -> Page[T]:
        first, last = (str(id_of(data[0])), str(id_of(data[-1]))) if data else (None, None)
        return cls(data=list(data), has_more=has_more, first_id=first, last_id=last)
