"""Lazy tar reading: parse member headers at known offsets without touching member data.

A member's bytes are contiguous in an uncompressed tar, so once its header is parsed a file inside
a tar layer is served by reading the blob from ``data_offset``. Parsing is pure; ``read_members``
does its I/O only through the reader it is given.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from modelfs.errors import ManifestError

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
# One header plus one pax or GNU long-name record fits, so the common long-path case takes a
# single round trip; a plain header wastes at most 1 KiB of member data.
FIRST_READ = 3 * BLOCK
# Bounds on what a hostile archive can make us fetch before a member appears.
MAX_EXTENSION_SIZE = 1 << 20
MAX_HEADER_CHAIN = 8 << 20
# The most ``HeaderWindow`` reads at once: an archive of many small members is listed in a few
# requests of this size rather than one request per member.
MAX_WINDOW = 4 << 20

REGULAR_TYPES = frozenset({"0", "\0", "7"})
DIRECTORY_TYPE = "5"
HARDLINK_TYPE = "1"
SYMLINK_TYPE = "2"
# Types whose header never has data after it, whatever the size field says (as tar(1) reads them).
_DATALESS_TYPES = frozenset({"1", "2", "3", "4", "5", "6"})
_PAX_TYPE, _PAX_GLOBAL_TYPE, _GNU_LONGNAME_TYPE, _GNU_LONGLINK_TYPE = "x", "g", "L", "K"
_EXTENSION_TYPES = frozenset({_PAX_TYPE, _PAX_GLOBAL_TYPE, _GNU_LONGNAME_TYPE, _GNU_LONGLINK_TYPE})
_USTAR_MAGIC = b"ustar\0"
# Digits a pax number may have: more is no size or time (and Python refuses to parse past 4300).
_PAX_DIGITS = 40
_PAX_INT = re.compile(rf"[0-9]{{1,{_PAX_DIGITS}}}")
_PAX_TIME = re.compile(rf"(-?)([0-9]{{1,{_PAX_DIGITS}}})(?:\.([0-9]*))?")


@dataclass(frozen=True)
class TarMember:
    """One archive member as its header (and any extension records before it) describe it."""

    name: str  # normalized: no leading "./", no trailing "/"; "" for the archive's root "./"
    typeflag: str
    size: int  # 0 for types that carry no data (directories, links, devices)
    mode: int  # permission bits
    mtime_ns: int
    data_offset: int  # absolute offset of the member's data in the blob
    next_offset: int  # absolute offset of the next header
    linkname: str

    @property
    def is_file(self) -> bool:
        return self.typeflag in REGULAR_TYPES

    @property
    def is_dir(self) -> bool:
        return self.typeflag == DIRECTORY_TYPE


@dataclass(frozen=True)
class NeedBytes:
    """parse_member needs at least ``count`` bytes, counted from the header start."""

    count: int


@dataclass(frozen=True)
class _Header:
    name: str
    typeflag: str
    size: int
    mode: int
    mtime: int
    linkname: str


def _corrupt(at: int, problem: str) -> ManifestError:
    return ManifestError(
        f"tar header at offset {at}: {problem}; the layer is corrupt or not a tar archive"
    )


def _octal(field: bytes, what: str, at: int) -> int:
    if field[:1] == b"\x80":  # GNU base-256, used for values that do not fit the octal digits
        return int.from_bytes(field[1:], "big")
    if field[:1] == b"\xff":  # GNU base-256, negative (two's complement)
        return int.from_bytes(field[1:], "big") - (1 << (8 * (len(field) - 1)))
    digits = field.split(b"\0", 1)[0].strip(b" ")
    if not digits:
        return 0
    if digits.strip(b"01234567"):
        raise _corrupt(at, f"{what} field {bytes(field)!r} is not an octal number")
    return int(digits, 8)


def _text(field: bytes, what: str, at: int) -> str:
    try:
        return field.split(b"\0", 1)[0].decode("utf-8")
    except UnicodeDecodeError:
        raise _corrupt(at, f"{what} is not valid UTF-8") from None


def _parse_header(block: bytes, at: int) -> _Header:
    stored = _octal(block[148:156], "checksum", at)
    blanked = block[:148] + b" " * 8 + block[156:]
    # Old tar implementations summed signed bytes; accept either.
    if stored not in (sum(blanked), sum(struct.unpack("512b", blanked))):
        raise _corrupt(at, "bad header checksum")
    name = _text(block[0:100], "member name", at)
    prefix = _text(block[345:500], "name prefix", at) if block[257:263] == _USTAR_MAGIC else ""
    if prefix:
        name = f"{prefix}/{name}"
    typeflag = block[156:157].decode("latin-1")
    if typeflag == "\0" and name.endswith("/"):  # pre-POSIX archives mark directories this way
        typeflag = DIRECTORY_TYPE
    size = _octal(block[124:136], "size", at)
    if size < 0:
        raise _corrupt(at, f"negative member size {size}")
    return _Header(
        name=name,
        typeflag=typeflag,
        size=size,
        mode=_octal(block[100:108], "mode", at) & 0o777,
        mtime=_octal(block[136:148], "mtime", at),
        linkname=_text(block[157:257], "link name", at),
    )


def _pax_records(data: bytes, at: int) -> dict[str, str]:
    """Records of a pax header: ``"<length> <key>=<value>\\n"``, length counting the record."""
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data) and data[pos] != 0:
        space = data.find(b" ", pos)
        length_text = data[pos:space] if space > pos else b""
        if not length_text.isdigit() or len(length_text) > _PAX_DIGITS:  # int() fails past 4300
            raise _corrupt(at, f"malformed pax record at byte {pos}")
        end = pos + int(length_text)
        key, equals, value = data[space + 1 : end - 1].partition(b"=")
        if end <= space or end > len(data) or data[end - 1 : end] != b"\n" or not equals or not key:
            raise _corrupt(at, f"malformed pax record at byte {pos}")
        try:
            records[key.decode("utf-8")] = value.decode("utf-8")
        except UnicodeDecodeError:
            raise _corrupt(at, f"pax record at byte {pos} is not valid UTF-8") from None
        pos = end
    return records


def _pax_int(text: str, what: str, at: int) -> int:
    if _PAX_INT.fullmatch(text) is None:
        raise _corrupt(at, f"pax {what} {text[:60]!r} is not a non-negative integer")
    return int(text)


def _pax_time_ns(text: str, at: int) -> int:
    match = _PAX_TIME.fullmatch(text)
    if match is None:
        raise _corrupt(at, f"pax mtime {text[:60]!r} is not a decimal number")
    sign, whole, fraction = match.groups()
    ns = int(whole) * 1_000_000_000 + int((fraction or "")[:9].ljust(9, "0"))
    return -ns if sign else ns


def _normalize(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    name = name.rstrip("/")
    return "" if name == "." else name


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def parse_member(buf: bytes | memoryview, offset: int) -> TarMember | NeedBytes | None:
    """Parse the member whose header (or first extension record) starts ``buf``.

    ``offset`` is where ``buf`` starts in the blob. Returns None at the end-of-archive block, or
    NeedBytes when ``buf`` is too short to finish. Raises ManifestError for anything malformed.
    """
    view = memoryview(buf)
    pos = 0
    pax: dict[str, str] = {}
    long_name: str | None = None
    long_link: str | None = None
    while True:
        if len(view) < pos + BLOCK:
            return NeedBytes(pos + BLOCK)
        block = bytes(view[pos : pos + BLOCK])
        at = offset + pos
        if block == ZERO_BLOCK:
            if pos:
                raise _corrupt(at, "archive ends after an extension record with no member")
            return None
        header = _parse_header(block, at)
        if header.typeflag not in _EXTENSION_TYPES:
            break
        if header.size > MAX_EXTENSION_SIZE:
            raise _corrupt(at, f"extension record of {header.size} bytes is implausibly large")
        end = pos + BLOCK + _padded(header.size)
        if end > MAX_HEADER_CHAIN:
            raise _corrupt(at, "too many extension records before a member")
        if len(view) < end:
            return NeedBytes(end)
        data = bytes(view[pos + BLOCK : pos + BLOCK + header.size])
        if header.typeflag == _PAX_TYPE:
            for key, value in _pax_records(data, at).items():
                if key.startswith("GNU.sparse."):
                    raise _corrupt(at, "GNU sparse members are not supported")
                if value:
                    pax[key] = value
                else:  # an empty value cancels the keyword
                    pax.pop(key, None)
        elif header.typeflag == _GNU_LONGNAME_TYPE:
            long_name = _text(data, "GNU long name", at)
        elif header.typeflag == _GNU_LONGLINK_TYPE:
            long_link = _text(data, "GNU long link name", at)
        # a pax global record ('g') only sets defaults modelfs does not use
        pos = end

    size = _pax_int(pax["size"], "size", at) if "size" in pax else header.size
    if header.typeflag in _DATALESS_TYPES:
        size = 0
    mtime_ns = _pax_time_ns(pax["mtime"], at) if "mtime" in pax else header.mtime * 1_000_000_000
    data_offset = at + BLOCK
    return TarMember(
        name=_normalize(pax.get("path", long_name if long_name is not None else header.name)),
        typeflag=header.typeflag,
        size=size,
        mode=header.mode,
        mtime_ns=mtime_ns,
        data_offset=data_offset,
        next_offset=data_offset + _padded(size),
        linkname=_normalize(
            pax.get("linkpath", long_link if long_link is not None else header.linkname)
        ),
    )


class HeaderWindow:
    """A reader of header blocks for ``read_members`` that reads ahead, in a window that doubles
    while headers come close together (many small members: a few large reads, not one per
    member) and shrinks back after a far jump (a large member's data is skipped, not read)."""

    def __init__(self, read: Callable[[int, int], Awaitable[bytes]], blob_size: int) -> None:
        self._read = read
        self._blob_size = blob_size
        self._start = 0
        self._held = b""
        self._window = FIRST_READ

    async def __call__(self, start: int, length: int) -> bytes:
        held_end = self._start + len(self._held)
        if self._start <= start and start + length <= held_end:
            return self._held[start - self._start : start + length - self._start]
        # Forward, and less than a window past what is held (a header straddling its end too).
        near = bool(self._held) and self._start <= start < held_end + self._window
        self._window = min(2 * self._window, MAX_WINDOW) if near else FIRST_READ
        size = min(max(length, self._window), self._blob_size - start)
        self._held, self._start = await self._read(start, size), start
        return self._held[:length]


async def read_members(
    read: Callable[[int, int], Awaitable[bytes]], blob_size: int
) -> list[TarMember]:
    """List an uncompressed tar blob's members, reading only their header blocks.

    ``read(offset, length)`` returns that range of the blob. Stops at the end-of-archive block or
    at the blob's end.
    """

    async def read_exact(start: int, length: int) -> bytes:
        data = await read(start, length)
        if len(data) != length:
            raise ManifestError(
                f"tar layer ended at offset {start + len(data)}, before its declared size "
                f"{blob_size}; the blob is truncated"
            )
        return data

    members: list[TarMember] = []
    offset = 0
    while offset < blob_size:
        buf = await read_exact(offset, min(FIRST_READ, blob_size - offset))
        parsed = parse_member(buf, offset)
        while isinstance(parsed, NeedBytes):
            if offset + parsed.count > blob_size:
                raise _corrupt(offset, f"header runs past the end of the {blob_size}-byte blob")
            buf += await read_exact(offset + len(buf), parsed.count - len(buf))
            parsed = parse_member(buf, offset)
        if parsed is None:
            break
        if parsed.data_offset + parsed.size > blob_size:
            raise _corrupt(
                offset,
                f"member {parsed.name!r} of {parsed.size} bytes runs past the end of the "
                f"{blob_size}-byte blob",
            )
        members.append(parsed)
        offset = parsed.next_offset
    return members
