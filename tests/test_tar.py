"""Tar header parsing against archives written by Python's tarfile, plus hand-made edge cases."""

from __future__ import annotations

import io
import tarfile
from typing import Literal

import pytest
import trio

from modelfs.artifact.tar import (
    FIRST_READ,
    HeaderWindow,
    NeedBytes,
    TarMember,
    parse_member,
    read_members,
)
from modelfs.errors import ManifestError

FORMATS = {"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT}
LONG_NAME = "deep/" + "d" * 120 + "/" + "f" * 80 + ".safetensors"  # needs prefix, L or pax path


def make_tar(
    entries: list[tuple[str, bytes | None]], fmt: int, mtime: float = 1_700_000_000
) -> bytes:
    """A tar of (name, data) entries; data None makes a directory."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as archive:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.mtime = mtime
            if data is None:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                archive.addfile(info)
            else:
                info.size = len(data)
                info.mode = 0o640
                archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


def members_of(blob: bytes) -> list[TarMember]:
    async def read(offset: int, length: int) -> bytes:
        return blob[offset : offset + length]

    return trio.run(read_members, read, len(blob))


@pytest.mark.parametrize("fmt", FORMATS.values(), ids=FORMATS.keys())
def test_members_and_data_offsets(fmt: int) -> None:
    entries: list[tuple[str, bytes | None]] = [
        ("1_Pooling", None),
        ("1_Pooling/config.json", b'{"pooling": "mean"}'),
        ("model.safetensors", bytes(range(256)) * 9),
        (LONG_NAME, b"long"),
        ("empty", b""),
    ]
    blob = make_tar(entries, fmt)
    members = members_of(blob)
    assert [m.name for m in members] == [name for name, _ in entries]
    for member, (_, data) in zip(members, entries, strict=True):
        if data is None:
            assert member.is_dir and not member.is_file
            assert member.mode == 0o755 and member.size == 0
        else:
            assert member.is_file and member.size == len(data)
            assert blob[member.data_offset : member.data_offset + member.size] == data
            assert member.mode == 0o640
        assert member.mtime_ns == 1_700_000_000 * 10**9
        assert member.next_offset % 512 == 0


def test_ustar_long_name_uses_prefix_field() -> None:
    name = "p" * 120 + "/model.bin"
    blob = make_tar([(name, b"x")], tarfile.USTAR_FORMAT)
    assert blob[345:465] == b"p" * 120  # really stored in the prefix, not an extension record
    assert members_of(blob)[0].name == name


def test_gnu_long_link_and_pax_fractional_mtime() -> None:
    target = "t" * 150
    gnu = io.BytesIO()
    with tarfile.open(fileobj=gnu, mode="w", format=tarfile.GNU_FORMAT) as archive:
        link = tarfile.TarInfo("link")
        link.type, link.linkname = tarfile.SYMTYPE, target
        archive.addfile(link)
    assert members_of(gnu.getvalue())[0].linkname == target

    pax = make_tar([("f", b"abc")], tarfile.PAX_FORMAT, mtime=1_700_000_000.25)
    assert members_of(pax)[0].mtime_ns == 1_700_000_000_250_000_000


def test_leading_dot_slash_and_root_entry_are_normalized() -> None:
    blob = make_tar([("./", None), ("./a/b.txt", b"hi"), ("./a/", None)], tarfile.GNU_FORMAT)
    assert [m.name for m in members_of(blob)] == ["", "a/b.txt", "a"]


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT], ids=["gnu", "pax"])
def test_size_of_8_gib_and_more(fmt: Literal[1, 2]) -> None:
    size = 9 * 2**30 + 3
    info = tarfile.TarInfo("huge.safetensors")
    info.size = size
    header = info.tobuf(format=fmt)  # just the header: the 9 GiB of data is never made
    if fmt == tarfile.GNU_FORMAT:
        assert header[124] == 0x80  # base-256 size field
    member = parse_member(header, 4096)
    assert isinstance(member, TarMember)
    assert member.size == size
    assert member.data_offset == 4096 + len(header)
    assert member.next_offset == member.data_offset + size + 512 - 3

    # read_members must walk past the data without reading it
    blob_size = member.next_offset + 1024

    async def read(offset: int, length: int) -> bytes:
        if offset == 0:  # the header, then the start of the (zero) data
            return (header + bytes(length))[:length]
        assert offset == member.next_offset - 4096, "read_members touched member data"
        return bytes(length)

    members = trio.run(read_members, read, blob_size)
    assert [m.size for m in members] == [size]


def test_parse_member_asks_for_more_bytes() -> None:
    blob = make_tar([(LONG_NAME, b"x")], tarfile.PAX_FORMAT)
    assert parse_member(blob[:100], 0) == NeedBytes(512)
    need = parse_member(blob[:512], 0)
    assert isinstance(need, NeedBytes) and 512 < need.count <= 2048
    result = parse_member(blob[: need.count], 0)
    if isinstance(result, NeedBytes):  # the pax record read, now the real header
        result = parse_member(blob[: result.count], 0)
    assert isinstance(result, TarMember) and result.name == LONG_NAME


def test_parse_member_accepts_a_memoryview() -> None:
    blob = make_tar([("a.bin", b"abc")], tarfile.USTAR_FORMAT)
    member = parse_member(memoryview(blob), 1024)
    assert isinstance(member, TarMember) and (member.data_offset, member.size) == (1536, 3)


def test_malformed_pax_record_is_refused() -> None:
    header = bytearray(make_tar([(LONG_NAME, b"x")], tarfile.PAX_FORMAT))
    record = header.index(b" path=")
    header[record - 3 : record] = b"zzz"  # the record's length digits
    with pytest.raises(ManifestError, match="offset 0: malformed pax record"):
        members_of(bytes(header))


def test_sparse_pax_member_is_refused() -> None:
    info = tarfile.TarInfo("sparse.bin")
    info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0"}
    with pytest.raises(ManifestError, match="sparse members are not supported"):
        parse_member(info.tobuf(format=tarfile.PAX_FORMAT), 0)


def test_end_of_archive_and_empty_blob() -> None:
    assert parse_member(bytes(512), 0) is None
    assert members_of(make_tar([], tarfile.GNU_FORMAT)) == []
    assert members_of(b"") == []


def test_corrupt_checksum_names_offset() -> None:
    blob = bytearray(make_tar([("a", b"1" * 600), ("b", b"2")], tarfile.GNU_FORMAT))
    second = 512 + 1024
    blob[second + 5] ^= 0xFF
    with pytest.raises(ManifestError, match=f"offset {second}: bad header checksum"):
        members_of(bytes(blob))


def test_garbage_is_refused() -> None:
    with pytest.raises(ManifestError, match="offset 0"):
        members_of(b"this is not a tar archive" * 100)


def test_bad_octal_field_is_refused() -> None:
    header = bytearray(tarfile.TarInfo("f").tobuf(format=tarfile.USTAR_FORMAT))
    header[124:136] = b"00000000009\0"  # '9' is not octal
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    with pytest.raises(ManifestError, match="size field"):
        parse_member(bytes(header), 0)


def test_member_running_past_blob_end_is_refused() -> None:
    blob = make_tar([("model.bin", b"x" * 4000)], tarfile.GNU_FORMAT)
    with pytest.raises(ManifestError, match="runs past the end"):
        members_of(blob[:2048])


def test_truncated_extension_chain_is_refused() -> None:
    blob = make_tar([(LONG_NAME, b"x")], tarfile.GNU_FORMAT)
    with pytest.raises(ManifestError, match="past the end"):
        members_of(blob[:1024])  # the L record's data, but not the header after it


def test_extension_without_member_is_refused() -> None:
    blob = make_tar([(LONG_NAME, b"x")], tarfile.GNU_FORMAT)
    truncated = blob[:1024] + bytes(1024)  # GNU L record, then the end-of-archive blocks
    with pytest.raises(ManifestError, match="extension record with no member"):
        members_of(truncated)


def test_short_read_is_refused() -> None:
    blob = make_tar([("a", b"x")], tarfile.GNU_FORMAT)

    async def read(offset: int, length: int) -> bytes:
        return blob[offset : offset + length // 2]

    with pytest.raises(ManifestError, match="truncated"):
        trio.run(read_members, read, len(blob))


def test_reads_only_header_ranges() -> None:
    data_size = 1 << 20
    blob = make_tar([(f"shard-{i}.bin", bytes(data_size)) for i in range(3)], tarfile.PAX_FORMAT)
    reads: list[tuple[int, int]] = []

    async def read(offset: int, length: int) -> bytes:
        reads.append((offset, length))
        return blob[offset : offset + length]

    members = trio.run(read_members, read, len(blob))
    assert [m.size for m in members] == [data_size] * 3
    assert len(reads) == 4  # three headers and the end-of-archive block
    assert all(length <= FIRST_READ for _, length in reads)
    assert sum(length for _, length in reads) <= 4 * FIRST_READ


def reads_through_a_window(blob: bytes) -> tuple[list[TarMember], list[tuple[int, int]]]:
    """The members, and the (offset, length) of each read the window made of the blob."""
    reads: list[tuple[int, int]] = []

    async def read(offset: int, length: int) -> bytes:
        reads.append((offset, length))
        return blob[offset : offset + length]

    window = HeaderWindow(read, len(blob))
    return trio.run(read_members, window, len(blob)), reads


def test_a_window_lists_many_small_members_in_a_few_reads() -> None:
    blob = make_tar([(f"d/f{n}.txt", b"%d" % n) for n in range(20_000)], tarfile.PAX_FORMAT)
    members, reads = reads_through_a_window(blob)
    assert members == members_of(blob)
    assert len(reads) <= 20  # ~20 MB: the window grows to 4 MiB


def test_a_window_skips_the_data_of_a_large_member() -> None:
    big = bytes(64 << 20)
    members, reads = reads_through_a_window(make_tar([("w.bin", big), ("c.json", b"{}")], 0))
    assert [m.name for m in members] == ["w.bin", "c.json"]
    assert sum(length for _, length in reads) <= 4 * FIRST_READ  # headers only
