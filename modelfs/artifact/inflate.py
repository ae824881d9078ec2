"""Decompressing a compressed tar layer in bounded steps, within a limit.

A layer inflates a step (``STEP`` bytes of output) at a time, and stops as soon as it passes its
limit: a decompression bomb (zstd of zeros reaches ~32,700:1) costs the mount a step of memory and
the limit of spool, never its whole inflated size. The limit is the smallest of what the cache
can hold (the stream is kept there), what the disk under it can hold, a ratio no model file comes
near and a size (both configurable: ``InflateBounds``), and, where the layer's annotations declare
its one file's size, that size plus its tar headers.

No I/O of its own: compressed bytes come from ``next_chunk``, output goes to ``write``.
"""

from __future__ import annotations

import gzip
import io
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import zstandard

from modelfs.artifact.tar import MAX_HEADER_CHAIN
from modelfs.artifact.tree import MAX_LAYER_SIZE, LayerPlan

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

# Output per step: what one step of a bomb can cost in memory.
STEP = 1 << 20
# Deflate cannot pass ~1032:1 and model files compress far less (text ~10:1): more is a bomb.
MAX_RATIO = 1100
# What a tar stream adds to the one file it holds: extension records, a header, padding, the
# end-of-archive blocks and record padding.
TAR_OVERHEAD = MAX_HEADER_CHAIN + (1 << 20)
# zstd's window as libzstd limits it by default, said here so that a frame cannot ask for more.
MAX_ZSTD_WINDOW = 1 << 27

# gzip/zlib/zstd's errors for input that is not what the format says.
FORMAT_ERRORS = (zlib.error, gzip.BadGzipFile, EOFError, zstandard.ZstdError)


@dataclass(frozen=True)
class InflateLimit:
    size: int
    reason: str  # what sets it, and what to do


class InflateLimitError(Exception):
    """The stream passed its limit (``size`` bytes out so far)."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.size = size


@dataclass(frozen=True)
class InflateBounds:
    """What an operator lets a layer inflate to: --max-inflate-ratio and --max-inflate-size."""

    ratio: int = MAX_RATIO
    size: int = MAX_LAYER_SIZE


@dataclass(frozen=True)
class InflateRoom:
    """Where the stream goes: what the cache can take (its limit less what live mounts hold)
    and the free space of the disk it is spooled to, then stored on."""

    cache: int
    disk: int


def inflate_limit(plan: LayerPlan, room: InflateRoom, bounds: InflateBounds) -> InflateLimit:
    """The most bytes ``plan``'s layer may decompress to."""
    limits = [
        InflateLimit(
            room.cache,
            "what the cache can hold beside the blobs in use; a bigger --cache-size holds it",
        ),
        # Spooled, then stored: twice on the disk for a moment.
        InflateLimit(room.disk // 2, "half the free space of the cache's disk; free some"),
        InflateLimit(
            plan.size * bounds.ratio,
            f"{bounds.ratio} times its compressed size (--max-inflate-ratio): a decompression bomb",
        ),
        InflateLimit(bounds.size, "--max-inflate-size: a decompression bomb"),
    ]
    if plan.meta_size is not None:
        limits.append(
            InflateLimit(
                plan.meta_size + TAR_OVERHEAD,
                f"the {plan.meta_size} bytes its annotations declare, plus tar headers: "
                "the artifact is inconsistent",
            )
        )
    return min(limits, key=lambda limit: limit.size)


class ChunkReader(io.RawIOBase):
    """A raw stream over the chunks ``next_chunk`` returns (b"" at the end)."""

    def __init__(self, next_chunk: Callable[[], bytes]) -> None:
        super().__init__()
        self._next_chunk = next_chunk
        self._held = memoryview(b"")
        self._ended = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        while not self._held and not self._ended:
            chunk = self._next_chunk()
            self._ended = not chunk
            self._held = memoryview(chunk)
        view = memoryview(buffer).cast("B")
        count = min(len(view), len(self._held))
        view[:count], self._held = self._held[:count], self._held[count:]
        return count


class _Readable(Protocol):
    def read(self, size: int, /) -> bytes: ...


def _decompressed(fmt: str, source: ChunkReader) -> _Readable:
    compressed = io.BufferedReader(source)
    if fmt == "tar+gzip":
        return gzip.GzipFile(fileobj=compressed, mode="rb")
    decompressor = zstandard.ZstdDecompressor(max_window_size=MAX_ZSTD_WINDOW)
    return decompressor.stream_reader(compressed, read_across_frames=True)


def inflate(fmt: str, source: ChunkReader, write: Callable[[bytes], object], limit: int) -> int:
    """Decompress ``source`` (``tar+gzip`` or ``tar+zstd``) into ``write`` a step at a time;
    the bytes written. InflateLimitError once the output passes ``limit``; one of
    ``FORMAT_ERRORS`` if the input is not valid ``fmt``."""
    reader = _decompressed(fmt, source)
    total = 0
    while step := reader.read(STEP):
        total += len(step)
        if total > limit:
            raise InflateLimitError(total)
        write(step)
    return total
