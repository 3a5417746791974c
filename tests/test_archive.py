"""Unpacking uploaded adapter archives: what is accepted, and every way a hostile archive is refused."""

from __future__ import annotations

import gzip
import io
import stat
import struct
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from adapters import archive as archive_module
from adapters.archive import ArchiveLimits, ArchiveRefused, unpack_archive
from adapters.validate import BaseModelSpec, validate_adapter_dir
from tests.adapter_files import write_adapter
from tests.base_files import write_fake_base

LIMITS = ArchiveLimits()


@pytest.fixture
def dest(tmp_path) -> Path:
    folder = tmp_path / "dest"
    folder.mkdir()
    return folder


@pytest.fixture
def adapter_files(tmp_path) -> dict[str, bytes]:
    folder = write_adapter(tmp_path / "adapter")
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def tar_file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def tar_entry(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info, None


def make_tar(path: Path, members, mode: str = "w:gz", fmt: int = tarfile.PAX_FORMAT) -> Path:
    with tarfile.open(path, mode, format=fmt) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def make_zip(path: Path, members) -> Path:
    """`members`: (name or ZipInfo, bytes) pairs, stored deflated."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return path


def patch_zip(path: Path, local_offset: int, central_offset: int, value: bytes) -> Path:
    """Overwrite a field of the first member's local header and of its central directory entry."""
    data = bytearray(path.read_bytes())
    for signature, offset in ((b"PK\x03\x04", local_offset), (b"PK\x01\x02", central_offset)):
        at = data.index(signature) + offset
        data[at:at + len(value)] = value
    path.write_bytes(bytes(data))
    return path


def refused(archive: Path, dest: Path, *words: str, limits: ArchiveLimits = LIMITS) -> str:
    with pytest.raises(ArchiveRefused) as caught:
        unpack_archive(archive, dest, limits)
    message = str(caught.value)
    for word in words:
        assert word in message
    assert list(dest.iterdir()) == []  # nothing is left behind
    return message


def unpacked(dest: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in dest.iterdir()}


# What is accepted

def test_a_flat_tar_gz_unpacks_and_validates(tmp_path, dest, adapter_files):
    archive = make_tar(tmp_path / "a.tar.gz", [tar_file(n, d) for n, d in adapter_files.items()])
    unpack_archive(archive, dest, LIMITS)
    assert unpacked(dest) == adapter_files
    base = BaseModelSpec("HuggingFaceTB/SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct",
                         write_fake_base(tmp_path / "base"), max_rank=16)
    assert validate_adapter_dir(dest, base).tensor_count == 8


def test_a_single_top_folder_is_stripped(tmp_path, dest, adapter_files):
    members = [(zipfile.ZipInfo("my-adapter/"), b"")] + [(f"my-adapter/{n}", d) for n, d in adapter_files.items()]
    unpack_archive(make_zip(tmp_path / "a.zip", members), dest, LIMITS)
    assert unpacked(dest) == adapter_files


def test_dot_slash_names_and_plain_tar(tmp_path, dest, adapter_files):
    members = [tar_entry(".", tarfile.DIRTYPE)] + [tar_file(f"./{n}", d) for n, d in adapter_files.items()]
    unpack_archive(make_tar(tmp_path / "a.tar", members, mode="w"), dest, LIMITS)
    assert unpacked(dest) == adapter_files


def test_the_format_is_told_by_content_not_name(tmp_path, dest, adapter_files):
    archive = make_zip(tmp_path / "really-a-zip.tar.gz", list(adapter_files.items()))
    unpack_archive(archive, dest, LIMITS)
    assert unpacked(dest) == adapter_files


def test_dest_must_be_empty(tmp_path, dest):
    (dest / "mine").write_bytes(b"keep")
    with pytest.raises(ValueError, match="not empty"):
        unpack_archive(make_tar(tmp_path / "a.tgz", [tar_file("x")]), dest, LIMITS)
    assert unpacked(dest) == {"mine": b"keep"}


# Not an archive, or a damaged one

def test_not_an_archive(tmp_path, dest):
    text = tmp_path / "adapter.zip"
    text.write_text("just some text, not an archive\n" * 20)
    refused(text, dest, "not a .tar.gz or .zip archive")


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_truncated_archive(tmp_path, dest, adapter_files, kind):
    if kind == "zip":
        whole = make_zip(tmp_path / "a.zip", list(adapter_files.items()))
    else:
        whole = make_tar(tmp_path / "a.tar.gz", [tar_file(n, d) for n, d in adapter_files.items()])
    data = whole.read_bytes()
    for cut in (len(data) // 2, 100):
        half = tmp_path / f"cut-{cut}.{kind}"
        half.write_bytes(data[:cut])
        refused(half, dest, "corrupt or truncated")


def test_corrupt_zip_data(tmp_path, dest):
    archive = make_zip(tmp_path / "a.zip", [("adapter_config.json", b"{}" * 5000)])
    data = bytearray(archive.read_bytes())
    data[40:60] = b"\xff" * 20  # inside the first member's compressed bytes
    archive.write_bytes(bytes(data))
    refused(archive, dest, "corrupt or truncated")


# Names that could land outside the folder

@pytest.mark.parametrize(("name", "words"), [
    ("../evil", "'..'"),
    ("ok/../../evil", "'..'"),
    ("/abs/evil", "absolute path"),
    ("C:evil", "absolute path"),
    ("a\\..\\evil", "backslash"),
    ("evil\nname", "control character"),
    ("evil\x1bname", "control character"),
    ("nul\x00" + "x" * 200, "NUL"),  # long, so the name goes into a PAX record, which keeps the NUL
    ("x" * 300, "too long"),
])
def test_tar_names_are_refused(tmp_path, dest, name, words):
    archive = make_tar(tmp_path / "a.tar.gz", [tar_file("adapter_config.json"), tar_file(name)])
    refused(archive, dest, words)


@pytest.mark.parametrize(("name", "words"), [("../evil", "'..'"), ("/abs", "absolute path"), ("a\\b", "backslash")])
def test_zip_names_are_refused(tmp_path, dest, name, words):
    info = zipfile.ZipInfo("placeholder")
    info.filename = name  # ZipInfo() would clean some names up; an attacker's tool would not
    refused(make_zip(tmp_path / "a.zip", [(info, b"x")]), dest, words)


# Anything but regular files and folders

@pytest.mark.parametrize(("member", "words"), [
    (tar_entry("link", tarfile.SYMTYPE, "/etc/passwd"), "symbolic link"),
    (tar_entry("hard", tarfile.LNKTYPE, "adapter_config.json"), "hard link"),
    (tar_entry("tty", tarfile.CHRTYPE), "device"),
    (tar_entry("disk", tarfile.BLKTYPE), "device"),
    (tar_entry("pipe", tarfile.FIFOTYPE), "FIFO"),
])
def test_tar_special_members_are_refused(tmp_path, dest, member, words):
    archive = make_tar(tmp_path / "a.tar.gz", [tar_file("adapter_config.json"), member])
    refused(archive, dest, words)


def test_zip_symlink_is_refused(tmp_path, dest):
    link = zipfile.ZipInfo("adapter_model.safetensors")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    refused(make_zip(tmp_path / "a.zip", [("adapter_config.json", b"{}"), (link, b"/etc/passwd")]), dest,
            "symbolic link")


def test_zip_special_file_and_encryption_are_refused(tmp_path, dest):
    fifo = zipfile.ZipInfo("pipe")
    fifo.external_attr = (stat.S_IFIFO | 0o644) << 16
    refused(make_zip(tmp_path / "a.zip", [(fifo, b"")]), dest, "special file")
    locked = make_zip(tmp_path / "b.zip", [("adapter_config.json", b"{}")])
    refused(patch_zip(locked, 6, 8, struct.pack("<H", 0x1)), dest, "encrypted")  # the "encrypted" flag


# Limits

def test_too_many_members(tmp_path, dest):
    files = [tar_file(f"f{i}") for i in range(17)]
    refused(make_tar(tmp_path / "a.tar.gz", files), dest, "more than 16 files and folders")
    unpack_archive(make_tar(tmp_path / "b.tar.gz", files[:16]), dest, LIMITS)  # 16 is fine
    assert len(unpacked(dest)) == 16


def test_folders_count_as_members(tmp_path, dest):
    members = [(zipfile.ZipInfo("top/"), b"")] + [(f"top/f{i}", b"x") for i in range(16)]
    refused(make_zip(tmp_path / "a.zip", members), dest, "more than 16 files and folders")


def test_declared_size_over_the_limit(tmp_path, dest):
    archive = make_tar(tmp_path / "a.tar.gz", [tar_file("adapter_model.safetensors", bytes(2 << 20))])
    refused(archive, dest, "more than 1048576 bytes", limits=ArchiveLimits(max_unpacked_bytes=1 << 20))


def test_zip_bomb(tmp_path, dest):
    archive = make_zip(tmp_path / "bomb.zip", [("adapter_model.safetensors", bytes(50 << 20))])
    assert archive.stat().st_size < 200_000  # 50 MB of zeros, highly compressed
    started = time.monotonic()
    refused(archive, dest, "more than", limits=ArchiveLimits(max_unpacked_bytes=10 << 20))
    assert time.monotonic() - started < 5


def test_zip_bomb_with_lying_headers(tmp_path, dest):
    """A zip that claims its 50 MB member holds 1 kB: never more than the limit reaches disk."""
    archive = make_zip(tmp_path / "liar.zip", [("adapter_model.safetensors", bytes(50 << 20))])
    patch_zip(archive, 22, 24, struct.pack("<I", 1000))  # the uncompressed size
    refused(archive, dest, limits=ArchiveLimits(max_unpacked_bytes=10 << 20))


def test_bytes_are_counted_while_unpacking(tmp_path, dest, monkeypatch):
    """Even were every header to declare 0 bytes, unpacking stops at the limit and removes what it wrote."""
    members = [tar_file("adapter_config.json", b"{}"), tar_file("adapter_model.safetensors", bytes(3 << 20))]
    archive = make_tar(tmp_path / "a.tar.gz", members)
    real_entries, real_open, opened = archive_module._tar_entries, open, []

    def spying_open(path, *args, **kwargs):
        opened.append(Path(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(archive_module, "_tar_entries",
                        lambda tf: ((name, is_dir, 0, opener) for name, is_dir, _, opener in real_entries(tf)))
    monkeypatch.setattr("builtins.open", spying_open)
    refused(archive, dest, "more than 1048576 bytes", limits=ArchiveLimits(max_unpacked_bytes=1 << 20))
    monkeypatch.undo()
    assert [p.name for p in opened if p.parent == dest] == ["adapter_config.json", "adapter_model.safetensors"]


# Layout

@pytest.mark.parametrize("names", [
    ["top/sub/adapter_config.json"],  # too deep
    ["one/adapter_config.json", "two/adapter_model.safetensors"],  # two top folders
    ["adapter_config.json", "top/adapter_model.safetensors"],  # a file beside a folder
])
def test_nested_folders_are_refused(tmp_path, dest, names):
    refused(make_tar(tmp_path / "a.tar.gz", [tar_file(n) for n in names]), dest, "nested folders")


def test_an_empty_folder_beside_flat_files_is_refused(tmp_path, dest):
    members = [tar_file("adapter_config.json"), tar_entry("extra", tarfile.DIRTYPE)]
    refused(make_tar(tmp_path / "a.tar.gz", members), dest, "nested folders")


def test_duplicates_and_empty_archives_are_refused(tmp_path, dest):
    twice = [tar_file("adapter_config.json", b"{}"), tar_file("./adapter_config.json", b"{}")]
    refused(make_tar(tmp_path / "a.tar.gz", twice), dest, "appears twice")
    with pytest.warns(UserWarning, match="Duplicate name"):
        archive = make_zip(tmp_path / "a.zip", [("a/x", b"1"), ("a/x", b"2")])
    refused(archive, dest, "appears twice")
    refused(make_tar(tmp_path / "b.tar.gz", [tar_entry("top", tarfile.DIRTYPE)]), dest, "no files")


# Memory bombs in the archive's own headers (issue 12, item 6)

_PEAK_SCRIPT = """
import resource, sys
from pathlib import Path
from adapters.archive import ArchiveLimits, ArchiveRefused, unpack_archive
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    unpack_archive(Path(sys.argv[1]), Path(sys.argv[2]), ArchiveLimits())
    outcome = "accepted"
except ArchiveRefused as exc:
    outcome = f"refused: {exc}"
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
print(outcome)
"""
PEAK_BOUND = 20 << 20


def header_bomb(path: Path, kind: bytes, size: int = 200 << 20, chained: int = 1) -> Path:
    """A .tar.gz whose first header is a GNU long name/link or pax header declaring `size` bytes (all
    `a`, so it compresses to ~0.1% of that), `chained` times in a row, then a real small file."""
    with gzip.open(path, "wb", compresslevel=9) as gz:
        for _ in range(chained):
            info = tarfile.TarInfo("././@LongLink")
            info.type, info.size = kind, size
            gz.write(info.tobuf(format=tarfile.GNU_FORMAT))
            block = b"a" * (1 << 20)
            for start in range(0, size, len(block)):
                gz.write(block[:size - start])
            gz.write(bytes(-size % tarfile.BLOCKSIZE))
        member, data = tar_file("adapter_config.json", b"{}")
        gz.write(member.tobuf(format=tarfile.GNU_FORMAT) + data + bytes(tarfile.BLOCKSIZE - len(data)))
        gz.write(bytes(2 * tarfile.BLOCKSIZE))
    return path


def peak_while_unpacking(archive: Path, dest: Path) -> tuple[int, str]:
    """Peak memory growth (bytes) of a fresh interpreter unpacking `archive`, and how it ended."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(archive), str(dest)], capture_output=True,
                          text=True, check=True, cwd=Path(__file__).resolve().parents[1])
    grown, outcome = done.stdout.strip().split("\n", 1)
    return int(grown), outcome


def test_a_200_mb_gnu_long_name_is_refused_with_bounded_memory(tmp_path, dest):
    """The issue's bomb: a ~200 KB .tar.gz whose GNU long-name header declares 200 MB. CPython's tarfile
    reads the whole declared size into memory (229 MB measured); the archive module must refuse it from
    the header's size field first. Failed before the fix (the peak grew by ~400 MB, and it was refused
    only later, as an over-long file name)."""
    archive = header_bomb(tmp_path / "bomb.tar.gz", tarfile.GNUTYPE_LONGNAME)
    assert archive.stat().st_size < 300_000
    grown, outcome = peak_while_unpacking(archive, dest)
    assert grown < PEAK_BOUND, f"peak memory grew by {grown >> 20} MB"
    assert outcome.startswith("refused:") and "header" in outcome, outcome[:300]
    assert len(outcome) < 1000  # the message never echoes the member's name at length
    assert list(dest.iterdir()) == []


@pytest.mark.parametrize("kind", [tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
                                  tarfile.SOLARIS_XHDTYPE])
def test_every_extended_header_kind_is_bounded(tmp_path, dest, kind):
    """GNU long link ('K') and pax ('x', 'g', Solaris 'X') headers are read whole by tarfile too; each
    is refused from its size field. Failed before the fix (the whole declared size was read)."""
    archive = header_bomb(tmp_path / "bomb.tar.gz", kind, size=64 << 20)
    grown, outcome = peak_while_unpacking(archive, dest)
    assert grown < PEAK_BOUND, f"peak memory grew by {grown >> 20} MB"
    assert outcome.startswith("refused:") and "header" in outcome, outcome[:300]


def test_a_long_chain_of_small_extended_headers_is_refused(tmp_path, dest):
    """Each pax or long-name header makes tarfile recurse into the next one: thousands of small ones in
    a row are refused as such (before the fix: RecursionError, a 500)."""
    archive = header_bomb(tmp_path / "chain.tar.gz", tarfile.XGLTYPE, size=16, chained=5000)
    refused(archive, dest, "extended headers")


def test_small_extended_headers_are_still_accepted(tmp_path, dest, adapter_files):
    """Real archives use pax headers (GNU tar, bsdtar, Python's default format) and GNU long names."""
    members = [tar_file(f"{'d' * 150}/{name}", data) for name, data in adapter_files.items()]
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        for path in dest.iterdir():
            path.unlink()
        unpack_archive(make_tar(tmp_path / f"{fmt}.tar.gz", members, fmt=fmt), dest, LIMITS)
        assert unpacked(dest) == adapter_files


def test_a_sparse_member_is_refused(tmp_path, dest):
    """GNU sparse members carry their own map of extended headers; an adapter never needs one."""
    info, data = tar_file("adapter_model.safetensors", b"x" * 10)
    info.type = tarfile.GNUTYPE_SPARSE
    raw = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
    path = tmp_path / "sparse.tar"
    path.write_bytes(bytes(raw) + data + bytes(tarfile.BLOCKSIZE - len(data)) + bytes(2 * tarfile.BLOCKSIZE))
    refused(path, dest, "sparse")


def test_a_zip_central_directory_flood_is_refused_before_parsing(tmp_path, dest):
    """zipfile parses the whole central directory into objects when it opens an archive (~0.5 kB of
    memory per entry, 0.6 GB for a 512 MB upload): the entry count and the directory's size are checked
    from its end record first. Failed before the fix (200,000 entries: the peak grew by 21 MB before the
    member limit refused the archive)."""
    path = tmp_path / "flood.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for i in range(200_000):
            zf.writestr(f"{i:05d}", b"")
    grown, outcome = peak_while_unpacking(path, dest)
    assert outcome.startswith("refused:") and "files" in outcome, outcome[:300]
    assert grown < PEAK_BOUND // 2, f"peak memory grew by {grown >> 20} MB"
