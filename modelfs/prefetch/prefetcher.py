"""The prefetcher: what to fetch before anyone asks for it.

Two sources of foresight:

- Per open file, the read pattern. A reader that keeps reading where it left off gets a window of
  bytes fetched ahead of it, starting at one piece and doubling each time it reaches a new piece,
  up to a cap (mountpoint-s3 and hf-mount do the same). Kernel readahead sends several reads at
  once and they arrive out of order, so a read within the kernel readahead window of the furthest
  byte read still counts as sequential, and so does a read just below the run (a reader going
  backwards gets its window behind it); anything else is a random read, which starts a new run
  without a window. The last few runs are remembered, so a far read between two reads of a
  sweep does not end it. A run opens a window only once it is longer than the kernel
  readahead window: shorter ones may be a single burst of readahead around an mmap page fault
  (a loader reading one tensor), which the kernel already asked for in full. Once the window is
  a few pieces wide it is topped up a run of pieces at a time (one range request each).
- Per model, hints: the ranges a recorded load read, in its order, when the model has a read
  profile (``modelfs.prefetch.profile``); else the built-in ones (``modelfs.prefetch.hints``):
  config and tokenizer files, safetensors headers, shards in index order. Hints go at full
  speed while no reader has read one, then stay a few pieces ahead of the readers (``HintPace``).
  With ``--prefetch all`` every byte of the model follows.

``ReadPattern`` is the pure policy; ``Prefetcher`` does the I/O. Its tasks run in the mount
session's nursery, fetch at readahead or background priority (a read waiting on a piece always
goes first, see ``modelfs.fetcher.piece_fetcher``), and a failed prefetch is only logged: the read
that needs the bytes fetches them again and reports the error.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from modelfs.artifact.tree import FileNode, Tree
from modelfs.errors import IntegrityError, ModelfsError
from modelfs.fetcher.piece_fetcher import RUN_PIECES, Job, PieceFetcher
from modelfs.fetcher.slots import Priority
from modelfs.pieces import piece_runs, pieces_covering
from modelfs.prefetch.hints import (
    SAFETENSORS_PREFIX,
    Hint,
    header_hint,
    hinted_pieces,
    index_files,
    shards,
    startup_hints,
    whole_model,
)
from modelfs.prefetch.profile import Profile, tree_hints

log = logging.getLogger(__name__)

# Six pieces: one per readahead connection of the piece fetcher, which holds 12 pieces in memory,
# so two streams' windows fit before a prefetched piece is dropped unread. Larger windows
# measured no faster here (the fetch path is CPU-bound) and cost peak RSS: 32 MiB +30 MB,
# 64 MiB +85 MB.
DEFAULT_MAX_WINDOW = 24 << 20

# Hinted prefetch paced on the readers goes at full speed again once they were quiet this long.
PACE_IDLE_SECONDS = 1.0


class PrefetchMode(enum.Enum):
    NONE = "none"  # fetch only what is read
    HINTS = "hints"  # plus the window ahead of sequential readers, and the built-in hints
    ALL = "all"  # plus, after the hints, the whole model in the background


# -- policy (pure) -------------------------------------------------------------------------------


@dataclass(frozen=True)
class WindowPolicy:
    piece_size: int
    # The mount's kernel readahead window. Its reads arrive in any order within it, so a read that
    # close to the furthest byte read is still sequential; and a run no longer than it may be one
    # burst of readahead around an mmap page fault, so the window opens only for longer runs.
    kernel_readahead: int
    max_window: int = DEFAULT_MAX_WINDOW
    # Pieces asked for at once, once the window holds that many: a run the fetcher gets in one
    # request, where one piece at a time would cost the registry a request each.
    top_up: int = RUN_PIECES


@dataclass
class _Run:
    """One run of sequential reads: the bytes it read and the window prefetched around them."""

    low: int  # the lowest byte read
    high: int  # the end of the furthest read
    ahead: int  # prefetch was asked for every byte of the window before this
    behind: int  # and, for a run going backwards, every byte from this one on
    window: int = 0  # bytes to have fetched ahead of the reader; 0 until the run is long


class ReadPattern:
    """The read pattern of one open file, and the bytes to fetch ahead of it (or behind it).

    A few runs are followed at once, most recently read first: a loader copying a tensor out of
    an mmap may touch the tensor's end before it sweeps it from the start (seen in the
    benchmark's load), and that one far read must not end the sweep's run and its window.
    """

    RUNS = 4

    def __init__(self, policy: WindowPolicy, file_size: int) -> None:
        self.policy = policy
        self.file_size = file_size
        self._runs: list[_Run] = []

    @property
    def window(self) -> int:
        """The window of the run read last."""
        return self._runs[0].window if self._runs else 0

    def on_read(self, offset: int, size: int) -> tuple[int, int] | None:
        """Note a read; return the (start, end) of file bytes to prefetch now, if any."""
        end = min(offset + size, self.file_size)
        run = self._continued(offset, end)
        if run is None:
            # The first read, or a random one: a new run starts here, without a window.
            self._runs.insert(0, _Run(low=offset, high=end, ahead=end, behind=offset))
            del self._runs[self.RUNS :]
            return None
        self._runs.remove(run)
        self._runs.insert(0, run)
        return self._extend(run, offset, end)

    def _continued(self, offset: int, end: int) -> _Run | None:
        """The run a read continues: one it is near the front of (kernel readahead arrives out
        of order within its window), else one it is just below; the widest window first."""
        readahead = self.policy.kernel_readahead
        near = [run for run in self._runs if abs(offset - run.high) <= readahead]
        near = near or [run for run in self._runs if abs(end - run.low) <= readahead]
        return max(near, key=lambda run: run.window, default=None)

    def _extend(self, run: _Run, offset: int, end: int) -> tuple[int, int] | None:
        low, high = run.low, run.high
        run.low, run.high = min(low, offset), max(high, end)
        if run.high - run.low <= self.policy.kernel_readahead:
            return None  # no longer than what the kernel reads ahead by itself
        piece = self.policy.piece_size
        forward = run.high > high
        if not forward and run.low == low:
            return None  # within what the run read already
        if run.window == 0:
            run.window = piece
        elif (
            (run.high - 1) // piece > (high - 1) // piece
            if forward
            else run.low // piece < low // piece
        ):
            # The reader got into a new piece: it keeps consuming, so look further ahead.
            run.window = min(2 * run.window, self.policy.max_window)
        # Whole pieces: the next span is asked for only once the reader needs a new piece, and
        # only once a run's worth is due (or the file ends there).
        due = min(self.policy.top_up * piece, run.window)
        if forward:
            start = max(run.ahead, run.high)
            stop = min(-(-(run.high + run.window) // piece) * piece, self.file_size)
            if stop <= start or (stop - start < due and stop < self.file_size):
                return None
            run.ahead = stop
            return start, stop
        # Backwards: a large copy out of an mmap may run from the end (safetensors' numpy
        # loader here reads its largest tensor so), one kernel readahead burst below the last.
        start = max((run.low - run.window) // piece * piece, 0)
        stop = min(run.behind, run.low)
        if stop <= start or (stop - start < due and start > 0):
            return None
        run.behind = start
        return start, stop


class HintPace:
    """How far hinted prefetch may run ahead of the readers.

    Hints are in load order. Until a reader reads a hinted piece, prefetch goes as fast as it can
    (the loader is still starting up). From then on it stays within ``lead`` pieces, in that
    order, of the furthest hinted piece read: fetched further ahead, a piece is stored and read
    back out of the cache when the loader gets there, while readahead keeps what it fetches in
    memory (a recorded load of the whole 2.2 GB model read 2.6 GB back out of the cache so).
    """

    def __init__(self, pieces: list[tuple[str, int]], lead: int) -> None:
        # Each piece once (``hinted_pieces``), at its place in hint order.
        self._place = {piece: place for place, piece in enumerate(pieces)}
        self.lead = lead
        self.read_up_to = -1  # the furthest place read, in hint order; -1: no reader yet
        self.released = False  # the readers went quiet: no more pacing

    def on_read(self, digest: str, indexes: range) -> bool:
        """Note a read of pieces ``indexes`` of blob ``digest``; whether prefetch may go further."""
        places = [self._place.get((digest, index), -1) for index in indexes]
        furthest = max(places, default=-1)
        if furthest <= self.read_up_to:
            return False
        self.read_up_to = furthest
        return True

    def may_fetch(self, place: int) -> bool:
        return self.released or self.read_up_to < 0 or place <= self.read_up_to + self.lead


# -- I/O -----------------------------------------------------------------------------------------

Reader = Callable[[FileNode, int, int], Awaitable[bytes | memoryview]]
HintSink = Callable[[list[Hint]], Awaitable[None]]
ProfileLookup = Callable[[], Awaitable[Profile | None]]


async def read_indexes(tree: Tree, read: Reader) -> dict[str, bytes]:
    """The bytes of the ``*.safetensors.index.json`` files, which say the shards' order."""
    return {node.path: bytes(await read(node, 0, node.size)) for node in index_files(tree)}


async def feed_hints(
    tree: Tree, read: Reader, recorded: ProfileLookup | None, feed: HintSink
) -> int:
    """Feed ``feed`` the model's hints in order, in batches; returns how many ranges.

    The recorded profile's ranges if there is one; else the built-in hints: config and tokenizer
    files and each shard's header prefix, then (once those prefixes are read) the headers.
    """
    profile = None if recorded is None else await recorded()
    if profile is not None:
        hints = tree_hints(tree, profile)
        await feed(hints)
        return len(hints)
    indexes = await read_indexes(tree, read)
    hints = startup_hints(tree, indexes)
    await feed(hints)
    headers = []
    for shard in shards(tree, indexes):
        header = header_hint(shard, bytes(await read(shard, 0, SAFETENSORS_PREFIX)))
        if header is not None:
            headers.append(header)
    await feed(headers)
    return len(hints) + len(headers)


class FileReader:
    """One open file handle: reads go through the fetcher, the window ahead is prefetched."""

    def __init__(self, prefetcher: Prefetcher, node: FileNode) -> None:
        self._prefetcher = prefetcher
        self.node = node
        self.keep_cache = not prefetcher.fetcher.serve_unverified
        self.pattern = ReadPattern(prefetcher.policy, node.size)
        self._rejections: int | None = None  # of its blob, when this handle's first read began

    async def read(self, offset: int, size: int) -> bytes | memoryview:
        started = time.monotonic()
        await self.node.locate()  # a deferred file's first read fetches its layer
        fetcher = self._prefetcher.fetcher
        if self._rejections is None:
            self._rejections = fetcher.rejections(self.node.blob.digest)
        self._check_given()
        if self._prefetcher.mode != PrefetchMode.NONE:
            ahead = self.pattern.on_read(offset, size)
            if ahead is not None:
                self._prefetcher.start_readahead(self.node, *ahead)
        self._prefetcher.note_read(self.node, offset, size)
        data = await fetcher.read_file(self.node, offset, size)
        if fetcher.serve_unverified and offset + len(data) >= self.node.size:
            # The read that ends the file returns only once the blob checked out.
            await fetcher.check_whole(self.node.blob)
            self._check_given()
        fetcher.stats.read_bytes += len(data)
        fetcher.stats.read_seconds.observe(time.monotonic() - started)
        return data

    def _check_given(self) -> None:
        """With --serve-unverified: fail once the blob failed its check after this handle's
        first read began, since bytes it was given may be among those that failed."""
        fetcher = self._prefetcher.fetcher
        digest = self.node.blob.digest
        if fetcher.serve_unverified and fetcher.rejections(digest) != self._rejections:
            raise IntegrityError(
                f"{self.node.path}: its blob {digest} failed its check after this open file "
                "was given some of its bytes (--serve-unverified); open it again"
            )


class Prefetcher:
    """Prefetch for one mount according to ``mode``; its tasks live in ``run``'s nursery."""

    def __init__(
        self,
        fetcher: PieceFetcher,
        mode: PrefetchMode,
        policy: WindowPolicy,
        background_tasks: int = 4,
        recorded: ProfileLookup | None = None,
    ) -> None:
        self.fetcher = fetcher
        self.mode = mode
        self.policy = policy
        self._recorded = recorded  # the model's read profile, looked up when hints start
        self._background_tasks = background_tasks
        self._nursery: trio.Nursery | None = None
        self._pace: HintPace | None = None  # while hints are fetched
        self._read_further = trio.Event()  # set (and replaced) when readers get further

    async def run(
        self, tree: Tree, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Own the prefetch tasks until cancelled (the mount session ends); start the hints."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await self._prefetch_model(tree)
            await trio.sleep_forever()

    def open(self, node: FileNode) -> FileReader:
        return FileReader(self, node)

    def note_read(self, node: FileNode, offset: int, size: int) -> None:
        """A reader read these bytes: hinted prefetch paced on the readers may go further."""
        if self._pace is None or not node.located:
            return
        piece_size = self.fetcher.cache.piece_size
        indexes = pieces_covering(node.offset + offset, size, node.blob.size, piece_size)
        if self._pace.on_read(node.blob.digest, indexes):
            self._read_further.set()
            self._read_further = trio.Event()

    def start_readahead(self, node: FileNode, start: int, end: int) -> None:
        if self._nursery is None:
            raise RuntimeError("Prefetcher.start_readahead before Prefetcher.run started")
        piece_size = self.fetcher.cache.piece_size
        indexes = pieces_covering(node.offset + start, end - start, node.blob.size, piece_size)
        for job in self.fetcher.prefetch_jobs(node.blob, indexes, Priority.READAHEAD):
            self._nursery.start_soon(self._prefetch, node, job)

    async def _prefetch_model(self, tree: Tree) -> None:
        """Hints first (a recorded profile, else the built-in ones), then maybe the rest."""
        cache = self.fetcher.cache
        if self.mode == PrefetchMode.NONE or all(
            node.located and cache.is_complete(node.blob.digest, node.blob.size)
            for node in tree.files()
        ):
            return  # nothing to fetch: not even the profile lookup (a remount needs no network)
        try:
            count = await feed_hints(tree, self._read, self._recorded, self._fetch_hints)
            log.info("prefetch: hints fetched (%d ranges)", count)
            if self.mode == PrefetchMode.ALL:
                await self._locate_deferred(tree)
                indexes = await read_indexes(tree, self._read)
                await self._fetch_in_order(whole_model(tree, indexes))
                log.info("prefetch: the whole model is in the cache")
        except ModelfsError as error:
            log.warning("prefetch stopped: %s (reads fetch what they need)", error)

    async def _locate_deferred(self, tree: Tree) -> None:
        """Fetch the deferred layers whole into the cache; one that fails leaves the others be."""
        for node in tree.files():
            if not node.located:
                try:
                    await node.locate()
                except ModelfsError as error:
                    log.warning("prefetch of %s failed: %s (its reads retry)", node.path, error)

    async def _read(self, node: FileNode, offset: int, size: int) -> bytes | memoryview:
        return await self.fetcher.read(
            node.blob, node.offset + offset, size, priority=Priority.BACKGROUND
        )

    async def _fetch_hints(self, hints: list[Hint]) -> None:
        await self._fetch_in_order(hints, paced=True)

    async def _paced(self, place: int) -> None:
        """Wait until prefetch may fetch the hinted piece at ``place``; once the readers have
        been quiet for a second, stop pacing (what is left of the hints is fetched at once)."""
        pace = self._pace
        while pace is not None and not pace.may_fetch(place):
            with trio.move_on_after(PACE_IDLE_SECONDS) as idle:
                await self._read_further.wait()
            if idle.cancelled_caught:
                pace.released = True

    async def _fetch_in_order(self, hints: list[Hint], paced: bool = False) -> None:
        """Fetch the pieces of ``hints`` in order, a few runs at a time, at background priority;
        ``paced``: no further ahead of the readers than ``HintPace`` allows."""
        running = trio.Semaphore(self._background_tasks)

        async def fetch(node: FileNode, jobs: list[Job]) -> None:
            try:
                # Each job a task of its own: one cancelled before it began still lets go of
                # the pieces it claimed.
                async with trio.open_nursery() as nursery:
                    for job in jobs:
                        nursery.start_soon(self._prefetch, node, job)
            finally:
                running.release()

        pieces = hinted_pieces(hints, self.fetcher.cache.piece_size)
        if paced:
            pieces_in_order = [(node.blob.digest, index) for node, index in pieces]
            self._pace = HintPace(pieces_in_order, lead=2 * RUN_PIECES)
        try:
            async with trio.open_nursery() as nursery:
                place = 0
                for node, run in piece_runs(pieces, RUN_PIECES):
                    await self._paced(place)
                    place += len(run)
                    await running.acquire()
                    # Claimed only now: a reader of a piece waits on its fetch once it is under
                    # way.
                    jobs = self.fetcher.prefetch_jobs(node.blob, run, Priority.BACKGROUND)
                    nursery.start_soon(fetch, node, jobs)
        finally:
            self._pace = None

    async def _prefetch(self, node: FileNode, job: Job) -> None:
        try:
            await job()
        except ModelfsError as error:
            log.info("prefetch in %s failed: %s", node.path, error)
