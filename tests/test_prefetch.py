"""Prefetch policy, built-in hints and connection priorities: pure logic, no I/O."""

from __future__ import annotations

import itertools
import json
import random
import struct
from dataclasses import replace

import pytest
import trio
import trio.testing

from modelfs.artifact.tree import BlobRef, FileNode, FileSpec, Tree
from modelfs.fetcher.slots import ConnectionSlots, Priority, Ticket
from modelfs.prefetch.hints import (
    Hint,
    header_hint,
    hinted_pieces,
    index_files,
    shards,
    small_files,
    startup_hints,
    whole_model,
)
from modelfs.prefetch.prefetcher import HintPace, ReadPattern, WindowPolicy

MIB = 1 << 20
PIECE = 4 * MIB
POLICY = WindowPolicy(PIECE, kernel_readahead=4 * MIB, max_window=32 * MIB)


def read_all(pattern: ReadPattern, reads: list[tuple[int, int]]) -> list[tuple[int, int]]:
    spans = []
    for offset, size in reads:
        span = pattern.on_read(offset, size)
        if span is not None:
            spans.append(span)
    return spans


def sequential(start: int, end: int, size: int = MIB) -> list[tuple[int, int]]:
    return [(offset, size) for offset in range(start, end, size)]


def test_sequential_reader_window_doubles_from_one_piece_to_the_cap() -> None:
    pattern = ReadPattern(POLICY, 1 << 30)
    windows = []
    spans = []
    for offset, size in sequential(0, 200 * MIB):
        span = pattern.on_read(offset, size)
        if span is not None:
            spans.append(span)
        if pattern.window not in windows:
            windows.append(pattern.window)
    assert windows == [0, PIECE, 2 * PIECE, 4 * PIECE, 8 * PIECE]
    # Each byte ahead is asked for once, in order, in whole pieces, never past the cap.
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
    assert all(end % PIECE == 0 for _, end in spans)
    assert spans[-1][1] <= 200 * MIB + 32 * MIB + PIECE


def test_nothing_is_prefetched_before_a_run_outgrows_kernel_readahead() -> None:
    pattern = ReadPattern(POLICY, 1 << 30)
    assert read_all(pattern, sequential(0, 4 * MIB)) == []
    assert pattern.on_read(4 * MIB, MIB) == (5 * MIB, 12 * MIB)


def test_kernel_readahead_reordering_keeps_the_stream() -> None:
    rng = random.Random(1)
    pattern = ReadPattern(POLICY, 1 << 30)
    reads = sequential(0, 100 * MIB)
    # The kernel sends a readahead window's reads at once; they arrive in any order.
    for group in range(0, len(reads), 4):
        batch = reads[group : group + 4]
        rng.shuffle(batch)
        read_all(pattern, batch)
    assert pattern.window == 32 * MIB


def test_random_read_closes_the_window_and_a_new_long_run_reopens_it() -> None:
    pattern = ReadPattern(POLICY, 1 << 30)
    read_all(pattern, sequential(0, 40 * MIB))
    assert pattern.window == 32 * MIB
    assert pattern.on_read(500 * MIB, MIB) is None
    assert pattern.window == 0
    assert read_all(pattern, sequential(501 * MIB, 504 * MIB)) == []
    assert pattern.on_read(504 * MIB, MIB) == (505 * MIB, 512 * MIB)
    assert pattern.window == PIECE


def test_backward_jump_beyond_readahead_is_random() -> None:
    pattern = ReadPattern(POLICY, 1 << 30)
    read_all(pattern, sequential(100 * MIB, 130 * MIB))
    assert pattern.window > 0
    assert pattern.on_read(50 * MIB, MIB) is None
    assert pattern.window == 0


def test_mmap_fault_bursts_open_no_window() -> None:
    # A loader faulting in single tensors: each fault reads one readahead window around it.
    pattern = ReadPattern(POLICY, 1 << 30)
    assert read_all(pattern, [(0, 8 + 1000)]) == []  # the safetensors header
    for fault in (300 * MIB, 120 * MIB, 700 * MIB):
        burst = sequential(fault - 2 * MIB, fault + 2 * MIB)
        random.Random(fault).shuffle(burst)
        assert read_all(pattern, burst) == []


def test_at_its_cap_the_window_is_topped_up_a_run_at_a_time() -> None:
    pattern = ReadPattern(POLICY, 1 << 30)
    spans = []
    for offset, size in sequential(0, 200 * MIB):
        span = pattern.on_read(offset, size)
        if span is not None:
            spans.append(span)
            # Never less ahead of the reader than the window less one run.
            assert span[1] - (offset + size) >= pattern.window - POLICY.top_up * PIECE
    steady = [span for span in spans if span[0] >= 64 * MIB]
    assert steady and all(end - start == POLICY.top_up * PIECE for start, end in steady)
    one_at_a_time = ReadPattern(replace(POLICY, top_up=1), 1 << 30)
    steady = [
        span for span in read_all(one_at_a_time, sequential(0, 200 * MIB)) if span[0] >= 64 * MIB
    ]
    assert steady and all(end - start == PIECE for start, end in steady)


def test_a_far_read_between_two_reads_of_a_sweep_keeps_the_sweep_and_its_window() -> None:
    # A loader copying tensors out of an mmap touches each tensor's end before sweeping it.
    pattern = ReadPattern(POLICY, 1 << 30)
    spans = read_all(pattern, sequential(0, 40 * MIB))
    assert pattern.window == 32 * MIB
    assert pattern.on_read(90 * MIB, MIB) is None  # the tail of the next tensor
    assert pattern.window == 0  # a run of its own
    spans += read_all(pattern, sequential(40 * MIB, 41 * MIB))
    assert pattern.window == 32 * MIB  # the sweep goes on with its window
    spans += read_all(pattern, sequential(41 * MIB, 60 * MIB))
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
    assert spans[-1][1] >= 60 * MIB + 32 * MIB - POLICY.top_up * PIECE


def test_only_the_latest_runs_are_remembered() -> None:
    pattern = ReadPattern(POLICY, 1 << 30)
    read_all(pattern, sequential(0, 40 * MIB))
    for far in range(1, ReadPattern.RUNS + 1):
        assert pattern.on_read(far * 100 * MIB, MIB) is None
    assert pattern.on_read(40 * MIB, MIB) is None  # forgotten: a new run
    assert pattern.window == 0


def test_hinted_prefetch_is_free_until_a_reader_comes_then_keeps_its_lead() -> None:
    pieces = [("a", index) for index in range(20)] + [("b", index) for index in range(20)]
    pace = HintPace(pieces, lead=8)
    assert pace.may_fetch(39)  # no reader yet: the loader is still starting up
    assert pace.on_read("a", range(2, 4))
    assert pace.may_fetch(3 + 8) and not pace.may_fetch(3 + 9)
    assert not pace.on_read("a", range(0, 1))  # behind: no further
    assert not pace.on_read("c", range(0, 50))  # not hinted
    assert pace.on_read("b", range(0, 1))  # the next file, in load order
    assert pace.may_fetch(20 + 8) and not pace.may_fetch(20 + 9)
    pace.released = True  # the readers went quiet
    assert pace.may_fetch(39)


def backwards_faults(top: int, bottom: int) -> list[tuple[int, int]]:
    """The reads of a copy out of an mmap that runs from ``top`` down to ``bottom``: each fault
    reads the 2 MiB below the last one (1 MiB requests) and a page past it."""
    reads = []
    for fault in range(top, bottom, -(2 * MIB + 4096)):
        reads += [(fault - 2 * MIB, MIB), (fault - MIB, MIB), (fault, 4096)]
    return reads


def test_a_reader_going_backwards_gets_the_window_behind_it() -> None:
    pattern = ReadPattern(POLICY, 1 << 30)
    spans = []
    for offset, size in backwards_faults(500 * MIB, 300 * MIB):
        span = pattern.on_read(offset, size)
        if span is not None:
            spans.append(span)
            # Behind the reader, in whole pieces.
            assert span[1] <= offset and span[0] % PIECE == 0 and span[1] - span[0] >= PIECE
    assert pattern.window == 32 * MIB
    # Each byte behind is asked for once, going down, never further than the window.
    assert all(a[0] == b[1] for a, b in itertools.pairwise(spans))
    assert spans[-1][0] >= 300 * MIB - 32 * MIB - 2 * PIECE
    assert sum(end - start for start, end in spans) >= 150 * MIB
    steady = [span for span in spans if span[1] <= 400 * MIB]
    assert steady and all(end - start == POLICY.top_up * PIECE for start, end in steady)


def test_a_backward_run_stops_at_the_start_of_the_file() -> None:
    pattern = ReadPattern(POLICY, 1 << 30)
    spans = read_all(pattern, backwards_faults(40 * MIB, 0))
    assert spans[-1][0] == 0
    assert all(start >= 0 for start, _ in spans)


def test_window_stops_at_end_of_file() -> None:
    size = 10 * MIB + 5
    pattern = ReadPattern(POLICY, size)
    spans = read_all(pattern, sequential(0, size))
    assert spans and spans[-1][1] == size
    assert pattern.on_read(size - 5, 5) is None


# -- hints ----------------------------------------------------------------------------------------


def tree_of(files: dict[str, int]) -> Tree:
    specs = [
        FileSpec(path, size, 0o444, 0, BlobRef(f"sha256:{index:064x}", size), 0)
        for index, (path, size) in enumerate(files.items())
    ]
    return Tree(specs)


def paths(nodes: list[FileNode]) -> list[str]:
    return [node.path for node in nodes]


def test_small_files_config_first_then_tokenizer() -> None:
    tree = tree_of(
        {
            "tokenizer.json": 2 * MIB,
            "vocab.txt": 1000,
            "generation_config.json": 100,
            "config.json": 500,
            "model.safetensors.index.json": 300,
            "1_Pooling/config.json": 50,
            "special_tokens_map.json": 90,
            "merges.txt": 77,
            "model-00001-of-00002.safetensors": 100 * MIB,
            "README.md": 10,
            "huge/tokenizer.bin": 65 * MIB,  # too big to be a tokenizer file worth reading first
        }
    )
    assert paths(small_files(tree)) == [
        "config.json",
        "1_Pooling/config.json",
        "generation_config.json",
        "model.safetensors.index.json",
        "merges.txt",
        "special_tokens_map.json",
        "tokenizer.json",
        "vocab.txt",
    ]


def index(*shard_names: str) -> bytes:
    weight_map = {f"tensor.{i}": name for i, name in enumerate(shard_names)}
    return json.dumps({"metadata": {}, "weight_map": weight_map}).encode()


def test_shards_in_index_order_then_unlisted_ones() -> None:
    tree = tree_of(
        {
            "consolidated.safetensors": 300 * MIB,
            "model-00002-of-00002.safetensors": 100 * MIB,
            "model-00001-of-00002.safetensors": 100 * MIB,
            "model.safetensors.index.json": 300,
            "sub/model.safetensors.index.json": 300,
            "sub/a.safetensors": 10,
            "sub/b.safetensors": 10,
        }
    )
    assert paths(index_files(tree)) == [
        "model.safetensors.index.json",
        "sub/model.safetensors.index.json",
    ]
    indexes = {
        # weight_map order is by tensor name; loaders open shards by file name
        "model.safetensors.index.json": index(
            "model-00002-of-00002.safetensors",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "missing.safetensors",
        ),
        "sub/model.safetensors.index.json": index("b.safetensors"),
    }
    assert paths(shards(tree, indexes)) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "sub/b.safetensors",
        "consolidated.safetensors",
        "sub/a.safetensors",
    ]
    # Without (or with a broken) index, shards come by path.
    broken = {
        "model.safetensors.index.json": b"not json",
        "sub/model.safetensors.index.json": b"[]",
    }
    assert paths(shards(tree, broken)) == sorted(
        path for path in paths(tree.files()) if path.endswith(".safetensors")
    )


def test_startup_hints_small_files_whole_then_header_prefixes() -> None:
    tree = tree_of(
        {"config.json": 500, "w2.safetensors": 50 * MIB, "w1.safetensors": 50 * MIB, "x.bin": 9}
    )
    hints = [(hint.file.path, hint.offset, hint.length) for hint in startup_hints(tree, {})]
    assert hints == [
        ("config.json", 0, 500),
        ("w1.safetensors", 0, 8),
        ("w2.safetensors", 0, 8),
    ]


def test_header_hint_from_the_length_prefix() -> None:
    shard = tree_of({"w.safetensors": 10 * MIB}).files()[0]
    assert header_hint(shard, struct.pack("<Q", 123_456)) == Hint(shard, 8, 123_456)
    assert header_hint(shard, struct.pack("<Q", 0)) is None
    assert header_hint(shard, struct.pack("<Q", 10 * MIB)) is None  # longer than the file
    assert header_hint(shard, struct.pack("<Q", 1 << 62)) is None
    assert header_hint(shard, b"\x01\x02") is None  # the file is shorter than a prefix


def test_whole_model_lists_every_file_once_in_load_order() -> None:
    tree = tree_of(
        {
            "a.bin": 10,
            "config.json": 500,
            "w2.safetensors": 50 * MIB,
            "w1.safetensors": 50 * MIB,
            "empty.txt": 0,
            "tokenizer.json": 100,
        }
    )
    assert [(hint.file.path, hint.offset, hint.length) for hint in whole_model(tree, {})] == [
        ("config.json", 0, 500),
        ("tokenizer.json", 0, 100),
        ("w1.safetensors", 0, 50 * MIB),
        ("w2.safetensors", 0, 50 * MIB),
        ("a.bin", 0, 10),
    ]


class NotYetFetched:
    """A deferred file's data before its first read: no location."""

    location = None

    async def locate(self) -> tuple[BlobRef, int]:
        raise AssertionError("hints must not fetch a deferred layer")


def test_hints_leave_deferred_files_to_their_first_read() -> None:
    located = [
        FileSpec(path, size, 0o444, 0, BlobRef(f"sha256:{index:064x}", size), 0)
        for index, (path, size) in enumerate(
            [("model.safetensors.index.json", 300), ("a.safetensors", 10 * MIB)]
        )
    ]
    deferred = [
        FileSpec(path, size, 0o444, 0, NotYetFetched(), 0)
        for path, size in [
            ("config.json", 500),
            ("sub/model.safetensors.index.json", 300),
            ("b.safetensors", 10 * MIB),
        ]
    ]
    tree = Tree([*located, *deferred])
    assert paths(index_files(tree)) == ["model.safetensors.index.json"]
    assert paths(shards(tree, {})) == ["a.safetensors"]
    pieces = hinted_pieces(whole_model(tree, {}), 4 * MIB)
    assert {node.path for node, _ in pieces} == {"model.safetensors.index.json", "a.safetensors"}


# -- connection slots -----------------------------------------------------------------------------


def test_demand_reads_go_before_prefetch() -> None:
    order: list[str] = []

    async def main() -> None:
        slots = ConnectionSlots(2, {Priority.BACKGROUND: 2, Priority.READAHEAD: 2})
        releases = {name: trio.Event() for name in ("bg1", "bg2", "bg3", "bg4", "ra", "demand")}

        async def fetch(name: str, priority: Priority) -> None:
            async with slots.slot(Ticket(priority)):
                order.append(name)
                await releases[name].wait()

        async with trio.open_nursery() as nursery:
            # One at a time, so that the order they queue in is known.
            for name, priority in [
                ("bg1", Priority.BACKGROUND),
                ("bg2", Priority.BACKGROUND),
                ("bg3", Priority.BACKGROUND),
                ("bg4", Priority.BACKGROUND),
                ("ra", Priority.READAHEAD),
                ("demand", Priority.DEMAND),
            ]:
                nursery.start_soon(fetch, name, priority)
                await trio.testing.wait_all_tasks_blocked()
            for name in releases:
                releases[name].set()
                await trio.testing.wait_all_tasks_blocked()

    trio.run(main)
    assert order == ["bg1", "bg2", "demand", "ra", "bg3", "bg4"]


def test_prefetch_never_holds_every_connection() -> None:
    async def main() -> None:
        slots = ConnectionSlots(4, {Priority.BACKGROUND: 2, Priority.READAHEAD: 3})
        release = trio.Event()
        got: list[str] = []

        async def fetch(name: str, priority: Priority) -> None:
            async with slots.slot(Ticket(priority)):
                got.append(name)
                await release.wait()

        async with trio.open_nursery() as nursery:
            for index in range(5):
                nursery.start_soon(fetch, f"bg{index}", Priority.BACKGROUND)
                nursery.start_soon(fetch, f"ra{index}", Priority.READAHEAD)
            await trio.testing.wait_all_tasks_blocked()
            # Prefetch together holds at most 3 of the 4, background at most 2 of those.
            assert len(got) == 3 and sum(name.startswith("bg") for name in got) <= 2
            nursery.start_soon(fetch, "demand", Priority.DEMAND)
            await trio.testing.wait_all_tasks_blocked()
            assert got[3] == "demand"
            release.set()

    trio.run(main)


def test_a_waiting_prefetch_is_promoted_when_a_read_needs_it() -> None:
    order: list[str] = []

    async def main() -> None:
        slots = ConnectionSlots(1, {})
        release = trio.Event()
        tickets = {name: Ticket(Priority.BACKGROUND) for name in ("first", "b", "c", "wanted")}

        async def fetch(name: str) -> None:
            async with slots.slot(tickets[name]):
                order.append(name)
                await release.wait()

        async with trio.open_nursery() as nursery:
            for name in tickets:
                nursery.start_soon(fetch, name)
                await trio.testing.wait_all_tasks_blocked()
            slots.promote(tickets["wanted"], Priority.DEMAND)
            release.set()

    trio.run(main)
    assert order == ["first", "wanted", "b", "c"]


def test_a_cancelled_waiter_gives_up_its_place() -> None:
    async def main() -> None:
        slots = ConnectionSlots(1, {})
        release = trio.Event()
        done: list[str] = []

        async def fetch(name: str) -> None:
            async with slots.slot(Ticket(Priority.DEMAND)):
                done.append(name)
                await release.wait()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(fetch, "holder")
            await trio.testing.wait_all_tasks_blocked()
            with trio.CancelScope() as scope:
                scope.cancel()
                await fetch("cancelled")
            nursery.start_soon(fetch, "next")
            await trio.testing.wait_all_tasks_blocked()
            release.set()
        assert done == ["holder", "next"]

    trio.run(main)


@pytest.mark.parametrize("priority", list(Priority))
def test_free_slots_are_taken_at_once(priority: Priority) -> None:
    async def main() -> None:
        slots = ConnectionSlots(3, {Priority.BACKGROUND: 1, Priority.READAHEAD: 2})
        with trio.fail_after(1):
            async with slots.slot(Ticket(priority)):
                pass

    trio.run(main)
