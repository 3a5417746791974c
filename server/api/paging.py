"""The query parameters of every paged list: `limit` (each list has its own default and bound, as OpenAI's
do) and `after`, the id of the last item of the previous page (see `server.wire.pages`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Query

After = Annotated[str | None, Query(max_length=256, description="The id of the last item of the previous page.")]
AdminLimit = Annotated[int, Query(ge=1, le=1000, description="Items in a page (1 to 1000).")]
JobsLimit = Annotated[int, Query(ge=1, le=100, description="Items in a page (1 to 100).")]
FilesLimit = Annotated[int, Query(ge=1, le=10_000, description="Items in a page (1 to 10,000).")]
