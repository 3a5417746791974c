"""Safe unpacking of an uploaded adapter archive (.tar.gz, .tgz, .tar or .zip) into an empty folder.

An archive is untrusted input. Nothing goes through the standard library's extractall: every member is
checked first (name, kind, count, declared size), then each regular file is streamed into the folder
here, with a running byte budget. Links, devices, paths outside the folder and zip bombs never reach disk.

The archive's own metadata is bounded before the standard library reads it: `tarfile` reads a GNU long
name or pax header whole, whatever size it declares (a 200 MB name fits in a 200 KB .tar.gz), and
`zipfile` turns the whole central directory into objects when it opens a zip. So tar headers go through
`_BoundedTarInfo`, which checks each extended header's size field first, and a zip's end record is read
for its entry count and directory size before `ZipFile` parses anything.
"""

from __future__ import annotations

import lzma
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

_CHUNK = 1 << 20
# What the decompressors raise on damaged input (gzip and bz2 raise OSError, the others their own).
_READ_ERRORS = (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, lzma.LZMAError, OSError)
_ZIP_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
_ZIP_KINDS = {0, stat.S_IFREG, stat.S_IFDIR}  # 0: no Unix type recorded (a zip made on Windows)
# GNU long names and links, pax headers (local, global, Solaris): metadata that tarfile reads whole.
_EXTENDED = {tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
             tarfile.SOLARIS_XHDTYPE}
_SPARSE = tarfile.GNUTYPE_SPARSE  # a module constant: `_proc_member`'s argument is named `tarfile`
_MAX_EXTENDED_BYTES = 64 << 10  # real ones hold a path and a few times, well under 1 kB
_MAX_EXTENDED_CHAIN = 16  # in a row before a member; tarfile recurses once per header
_MAX_ZIP_ENTRY_BYTES = 64 << 10  # a central directory entry: 46 bytes, a name and extra fields
_SHOWN_NAME = 100  # characters of a member's name quoted in a message

Entry = tuple[str, bool, int, Callable[[], IO[bytes]]]  # name, is a folder, declared size, opener


class ArchiveRefused(ValueError):
    """The archive is refused; the message names the problem for the uploader."""


@dataclass(frozen=True)
class ArchiveLimits:
    max_files: int = 16  # members, folders included
    max_unpacked_bytes: int = 1 << 30


def unpack_archive(archive: Path, dest: Path, limits: ArchiveLimits) -> None:
    """Unpack `archive` as flat files into the empty folder `dest`; on any refusal `dest` is left empty."""
    if any(dest.iterdir()):
        raise ValueError(f"{dest} is not empty")
    container, entries = _reading(_open, archive, limits)
    written: list[Path] = []
    try:
        with container:
            plan = _reading(_plan, entries, limits)  # every member is checked before a byte is written
            total = 0
            for name, opener in plan:
                with _reading(opener) as src, open(dest / name, "xb") as out:  # "x": never over another file
                    written.append(dest / name)
                    # Count the bytes really unpacked: sizes in headers are the uploader's word, not a fact.
                    while chunk := _reading(src.read, min(_CHUNK, limits.max_unpacked_bytes - total + 1)):
                        total += len(chunk)
                        if total > limits.max_unpacked_bytes:
                            raise ArchiveRefused(f"The archive unpacks to more than {limits.max_unpacked_bytes} bytes.")
                        out.write(chunk)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise


def _reading(call: Callable[..., Any], *args: Any) -> Any:
    """`call(*args)`, a read of the archive: an error from a parser or decompressor means it is damaged."""
    try:
        return call(*args)
    except _READ_ERRORS as exc:
        raise ArchiveRefused("The archive is corrupt or truncated.") from exc


def _open(archive: Path, limits: ArchiveLimits) -> tuple[zipfile.ZipFile | tarfile.TarFile, Iterator[Entry]]:
    """The opened archive and its members; the format is told by content, whatever the file's name."""
    if zipfile.is_zipfile(archive):
        _check_zip_directory(archive, limits)
        zf = zipfile.ZipFile(archive)
        return zf, _zip_entries(zf)
    # Not `tarfile.is_tarfile`: it reads the first header with the unbounded stock TarInfo.
    try:
        tf = tarfile.open(archive, "r:*", tarinfo=_BoundedTarInfo)  # noqa: SIM115 (the caller closes it)
    except _READ_ERRORS:
        pass
    else:
        return tf, _tar_entries(tf)
    with archive.open("rb") as f:
        if f.read(4).startswith((b"PK\x03\x04", b"\x1f\x8b")):  # a zip's or gzip's start, but not its end
            raise ArchiveRefused("The archive is corrupt or truncated.")
    raise ArchiveRefused("The upload is not a .tar.gz or .zip archive.")


class _BoundedTarInfo(tarfile.TarInfo):
    """A tar header that refuses, from its size field and before `tarfile` reads a byte of it, an
    extended header over `_MAX_EXTENDED_BYTES` or a chain of more than `_MAX_EXTENDED_CHAIN`, and any
    GNU sparse member (its sparse map, in headers or data, is read whole too). The hooks are CPython's
    private `_proc_*` methods, stable since Python 3.2; tarfile builds every header with this class."""

    def _proc_member(self, tarfile):
        if self.type in _EXTENDED:
            if self.size > _MAX_EXTENDED_BYTES:
                raise ArchiveRefused(f"The archive has a long-name or pax header of {self.size} bytes; at most "
                                     f"{_MAX_EXTENDED_BYTES} are accepted.")
            chain = getattr(tarfile, "_extended_chain", 0) + 1
            if chain > _MAX_EXTENDED_CHAIN:
                raise ArchiveRefused(f"The archive has more than {_MAX_EXTENDED_CHAIN} extended headers "
                                     "(long names or pax) in a row.")
            tarfile._extended_chain = chain
        else:
            tarfile._extended_chain = 0
            if self.type == _SPARSE:
                _refuse_sparse()
        return super()._proc_member(tarfile)

    def _proc_gnusparse_00(self, *_args):
        _refuse_sparse()

    _proc_gnusparse_01 = _proc_gnusparse_10 = _proc_gnusparse_00


def _refuse_sparse() -> None:
    raise ArchiveRefused("The archive has a sparse member; pack the adapter's files as regular files.")


def _check_zip_directory(archive: Path, limits: ArchiveLimits) -> None:
    """Refuse a zip whose end record declares more entries, or a bigger central directory, than the
    limits allow, before `zipfile` parses that directory into memory (`_EndRecData`: zipfile's own
    reader of the end record, zip64 included)."""
    with archive.open("rb") as f:
        end = zipfile._EndRecData(f)
    if end is None:
        return  # ZipFile says it is damaged
    if (end[zipfile._ECD_ENTRIES_TOTAL] > limits.max_files
            or end[zipfile._ECD_SIZE] > limits.max_files * _MAX_ZIP_ENTRY_BYTES):
        raise ArchiveRefused(f"The archive has more than {limits.max_files} files and folders.")


def _tar_entries(tf: tarfile.TarFile) -> Iterator[Entry]:
    for m in tf:  # read lazily, so a flood of headers stops at the member limit
        _check(m.name, (m.issym(), "is a symbolic link"), (m.islnk(), "is a hard link"),
               (m.ischr() or m.isblk(), "is a device"), (m.isfifo(), "is a FIFO"),
               (not (m.isreg() or m.isdir()), "is not a regular file"))
        yield m.name, m.isdir(), m.size, lambda m=m: tf.extractfile(m)


def _zip_entries(zf: zipfile.ZipFile) -> Iterator[Entry]:
    for info in zf.infolist():
        kind = stat.S_IFMT(info.external_attr >> 16)  # the Unix file type, where the zip tool recorded one
        _check(info.filename, (kind == stat.S_IFLNK, "is a symbolic link"),
               (kind not in _ZIP_KINDS, "is a special file"), (info.flag_bits & 0x1, "is encrypted"),
               (info.compress_type not in _ZIP_METHODS, "uses an unsupported compression method"))
        yield info.filename, info.is_dir(), info.file_size, lambda info=info: zf.open(info)


def _plan(entries: Iterator[Entry], limits: ArchiveLimits) -> list[tuple[str, Callable[[], IO[bytes]]]]:
    """The files to write, by final name, after every member passed the rules and the limits."""
    files: dict[tuple[str, ...], Callable[[], IO[bytes]]] = {}
    folders: set[tuple[str, ...]] = set()
    declared = 0
    for count, (name, is_dir, size, opener) in enumerate(entries, 1):
        if count > limits.max_files:
            raise ArchiveRefused(f"The archive has more than {limits.max_files} files and folders.")
        declared += size
        if declared > limits.max_unpacked_bytes:
            raise ArchiveRefused(f"The archive unpacks to more than {limits.max_unpacked_bytes} bytes.")
        parts = _clean(name)
        if is_dir:
            if parts:  # "." or "./", the archive's own root, is no folder
                folders.add(parts)
        else:
            _check(name, (not parts, "is a file without a name"), (parts in files, "appears twice"))
            files[parts] = opener
    if not files:
        raise ArchiveRefused("The archive holds no files.")
    # Adapters are flat. One top folder around them (`my-adapter/adapter_config.json`) is what zipping a
    # folder gives, so it is stripped; any other folder is refused.
    tops = {p[0] for p in files}
    if len(tops) == 1 and all(len(p) == 2 for p in files) and folders <= {(*tops,)}:
        return [(p[1], opener) for p, opener in files.items()]
    if folders or any(len(p) > 1 for p in files):
        raise ArchiveRefused("The archive has nested folders; an adapter is flat files, at most in one top folder.")
    return [(p[0], opener) for p, opener in files.items()]


def _clean(name: str) -> tuple[str, ...]:
    """The parts of a member's relative path; refuses any name that could land outside the folder."""
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    _check(name, (any(ord(c) < 32 or ord(c) == 127 for c in name), "has a NUL or control character in its name"),
           ("\\" in name, "has a backslash in its name"),
           (name.startswith("/") or (name[1:2] == ":" and name[:1].isalpha()), "has an absolute path"),
           (".." in parts, "has '..' in its path"),
           (any(len(p.encode("utf-8", "surrogateescape")) > 255 for p in parts), "has a name too long for a file"))
    return parts


def _check(name: str, *checks: tuple[object, str]) -> None:
    """Refuse the member `name` with the first problem whose condition holds."""
    for failed, problem in checks:
        if failed:
            shown = name if len(name) <= _SHOWN_NAME else f"{name[:_SHOWN_NAME]}..."
            raise ArchiveRefused(f"Archive member {shown!r} {problem}.")
