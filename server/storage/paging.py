"""Keyset pages of a query: what every list the server offers is read through.

A page is `limit` rows after a cursor, in a total order (a tuple of columns ending in a unique one), plus
whether more follow. Keyset, not OFFSET: a row added or deleted between two pages neither repeats nor
skips another, and a deep page costs what the first does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Select, tuple_
from sqlalchemy.orm import Session


def keyset_page(s: Session, stmt: Select, order: Sequence[Any], *, limit: int, after: tuple | None = None,
                descending: bool = False) -> tuple[list, bool]:
    """The rows of `stmt` ordered by `order` that come after the cursor `after` (the values of `order` of
    the last row of the previous page; None: from the start), at most `limit`, and whether more follow."""
    key = tuple_(*order)
    if after is not None:
        cursor = tuple_(*after)
        stmt = stmt.where(key < cursor if descending else key > cursor)
    stmt = stmt.order_by(*(column.desc() if descending else column.asc() for column in order))
    rows = list(s.scalars(stmt.limit(limit + 1)))
    return rows[:limit], len(rows) > limit
