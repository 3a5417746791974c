"""Turn a multipart adapter upload (an archive, or the adapter's files) into a folder to publish.

Everything lands in a private folder under the registry's staging area, byte-counted against the
configured limits; nothing is interpreted here. The registry validates what comes out.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fastapi import UploadFile

from adapters.archive import ArchiveLimits, unpack_archive
from server.config import Settings
from server.errors import APIError, BadRequest, Conflict, PayloadTooLarge
from server.storage.store import OverQuota

_CHUNK = 1 << 20


@contextmanager
def staged_upload(
    settings: Settings, staging: Path, archive: UploadFile | None, files: list[UploadFile] | None
) -> Iterator[Path]:
    """A folder holding the uploaded adapter; removed when the block ends."""
    files = [f for f in files or [] if f.filename]
    if (archive is None) == (not files):
        raise BadRequest("Send either `archive` (a .tar.gz or .zip) or the adapter's `files`, not both or neither.",
                         param="archive")
    staging.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="upload-", dir=staging))
    try:
        folder = work / "adapter"
        folder.mkdir()
        budget = _Budget(settings.max_upload_bytes)
        if archive is not None:
            packed = work / "archive"
            _save(archive, packed, budget)
            limits = ArchiveLimits(settings.archive_max_files, settings.archive_max_unpacked_bytes)
            unpack_archive(packed, folder, limits)
        else:
            for upload in files:
                _save(upload, folder / _plain_filename(upload.filename), budget)
        yield folder
    finally:
        shutil.rmtree(work, ignore_errors=True)


def quota_error(exc: OverQuota) -> APIError:
    """A tenant's adapter quota, as the uploader reads it: too many adapters 409, too many bytes 413."""
    kind = PayloadTooLarge if exc.what == "adapter_bytes" else Conflict
    return kind(str(exc), code="quota_exceeded")


class _Budget:
    def __init__(self, limit: int):
        self.left = limit

    def spend(self, n: int) -> None:
        self.left -= n
        if self.left < 0:
            raise PayloadTooLarge("The upload is larger than this server accepts.")


def _save(upload: UploadFile, dest: Path, budget: _Budget) -> None:
    upload.file.seek(0)
    try:
        with dest.open("xb") as out:
            for chunk in iter(lambda: upload.file.read(_CHUNK), b""):
                budget.spend(len(chunk))
                out.write(chunk)
    except FileExistsError as exc:
        raise BadRequest(f"The file '{dest.name}' was sent twice.", param="files") from exc


def _plain_filename(name: str) -> str:
    """A file name with no folder part; anything else is refused, never cleaned up into a path."""
    if (
        not name or len(name) > 255 or name in {".", ".."} or "/" in name or "\\" in name
        or not name.isprintable() or name.startswith(".")
    ):
        raise BadRequest("Each uploaded file needs a plain file name, without folders.", param="files")
    return name
