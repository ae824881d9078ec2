"""The scheduler's state, over a small key-value interface that memory and Redis both provide.

One set of rules (``SchedulerState``) runs over either backend, so one scheduler in memory and
several replicas sharing Redis behave the same. Everything expires: a node that stops
heartbeating disappears, a registry-fetch claim of a node that died frees its slot, a blocked
peer comes back after its penalty.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from typing import Protocol

from modelfs.scheduler.ranking import Decision, FailureKind, NodeInfo, decide, rank

NODE_TTL = 30.0  # a node that has not registered again within this is gone
SOURCE_SLOTS = 1  # nodes that may fetch one piece from the registry at once
SOURCE_LEASE = 10.0  # a claim lapses if the piece is not announced by then
LOAD_WINDOW = 2.0  # assignments count towards a peer's load until this quiet time passes
HOLDERS_TTL = 24 * 3600.0
PENALTY = {FailureKind.CORRUPT: 24 * 3600.0, FailureKind.FAILED: 30.0}
_PREFIX = "modelfs:"


class KeyValue(Protocol):
    """The few operations the scheduler needs; every key has a time to live."""

    async def put(self, key: str, value: str, ttl: float, only_if_absent: bool = False) -> bool:
        """Set ``key``; with ``only_if_absent`` only if it does not exist. True if set."""
        ...

    async def get_many(self, keys: list[str]) -> list[str | None]: ...

    async def delete(self, key: str) -> None: ...

    async def add_member(self, key: str, member: str, ttl: float) -> None: ...

    async def members(self, key: str) -> set[str]: ...

    async def remove_member(self, key: str, member: str) -> None: ...

    async def increment(self, key: str, ttl: float) -> int:
        """Add one; the key expires ``ttl`` after the latest increment."""
        ...


class MemoryKeyValue:
    """``KeyValue`` in this process's memory, for a single scheduler."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._values: dict[str, tuple[str, float]] = {}
        self._sets: dict[str, tuple[set[str], float]] = {}

    def _live(self, key: str) -> str | None:
        found = self._values.get(key)
        if found is None or found[1] <= self._clock():
            self._values.pop(key, None)
            return None
        return found[0]

    async def put(self, key: str, value: str, ttl: float, only_if_absent: bool = False) -> bool:
        if only_if_absent and self._live(key) is not None:
            return False
        self._values[key] = (value, self._clock() + ttl)
        return True

    async def get_many(self, keys: list[str]) -> list[str | None]:
        return [self._live(key) for key in keys]

    async def delete(self, key: str) -> None:
        self._values.pop(key, None)

    async def add_member(self, key: str, member: str, ttl: float) -> None:
        members = await self.members(key)
        members.add(member)
        self._sets[key] = (members, self._clock() + ttl)

    async def members(self, key: str) -> set[str]:
        found = self._sets.get(key)
        if found is None or found[1] <= self._clock():
            self._sets.pop(key, None)
            return set()
        return found[0]

    async def remove_member(self, key: str, member: str) -> None:
        (await self.members(key)).discard(member)

    async def increment(self, key: str, ttl: float) -> int:
        count = int(self._live(key) or 0) + 1
        self._values[key] = (str(count), self._clock() + ttl)
        return count


def _node_key(address: str) -> str:
    return f"{_PREFIX}node:{address}"


def _piece(digest: str, index: int) -> str:
    return f"{digest}/{index}"


class SchedulerState:
    def __init__(self, store: KeyValue) -> None:
        self._store = store

    async def register(self, node: NodeInfo) -> None:
        value = json.dumps(
            {"zone": node.zone, "rack": node.rack, "capacity": node.capacity}, sort_keys=True
        )
        await self._store.put(_node_key(node.address), value, NODE_TTL)

    async def _nodes(self, addresses: list[str]) -> dict[str, NodeInfo]:
        ordered = sorted(addresses)
        values = await self._store.get_many([_node_key(address) for address in ordered])
        nodes = {}
        for address, value in zip(ordered, values, strict=True):
            if value is not None:
                fields = json.loads(value)
                nodes[address] = NodeInfo(
                    address, fields["zone"], fields["rack"], int(fields["capacity"])
                )
        return nodes

    async def announce(self, address: str, pieces: list[tuple[str, int]]) -> None:
        """``address`` holds these pieces now: it serves them, and its registry claims end."""
        for digest, index in pieces:
            piece = _piece(digest, index)
            await self._store.add_member(f"{_PREFIX}holders:{piece}", address, HOLDERS_TTL)
            for slot in range(SOURCE_SLOTS):
                key = f"{_PREFIX}source:{piece}:{slot}"
                if (await self._store.get_many([key]))[0] == address:
                    await self._store.delete(key)

    async def ask(self, address: str, digest: str, index: int) -> Decision:
        piece = _piece(digest, index)
        holders = await self._store.members(f"{_PREFIX}holders:{piece}")
        nodes = await self._nodes([*holders, address])
        asker = nodes.pop(address, None)
        live = sorted(nodes)
        blocked_flags = await self._store.get_many([f"{_PREFIX}blocked:{a}" for a in live])
        blocked = {a for a, flag in zip(live, blocked_flags, strict=True) if flag is not None}
        load_values = await self._store.get_many([f"{_PREFIX}load:{a}" for a in live])
        loads = {a: int(value or 0) for a, value in zip(live, load_values, strict=True)}
        candidates = rank(asker, address, list(nodes.values()), loads, blocked)
        for candidate in candidates[:1]:
            # The first candidate is the one the node will most likely use.
            await self._store.increment(f"{_PREFIX}load:{candidate}", LOAD_WINDOW)
        may_go_to_source = not candidates and await self._claim_source(piece, address)
        return dataclasses.replace(decide(candidates, may_go_to_source), avoided=len(blocked))

    async def _claim_source(self, piece: str, address: str) -> bool:
        keys = [f"{_PREFIX}source:{piece}:{slot}" for slot in range(SOURCE_SLOTS)]
        if address in await self._store.get_many(keys):
            return True
        for key in keys:
            if await self._store.put(key, address, SOURCE_LEASE, only_if_absent=True):
                return True
        return False

    async def report(self, peer: str, digest: str, index: int, kind: FailureKind) -> None:
        if kind is FailureKind.MISSING:
            await self._store.remove_member(f"{_PREFIX}holders:{_piece(digest, index)}", peer)
        else:
            await self._store.put(f"{_PREFIX}blocked:{peer}", kind.value, PENALTY[kind])
