"""The scheduler's state, over a small key-value interface that memory and Redis both provide.

One set of rules (``SchedulerState``) runs over either backend, so one scheduler in memory and
several replicas sharing Redis behave the same. Everything expires: a node that stops
heartbeating disappears, a registry-fetch claim of a node that died frees its slot, a blocked
peer comes back after its penalty.

Any holder of the cluster secret may call the scheduler, so no single member's word goes far:
- registry slots: only a registered node claims one, at most ``MAX_CLAIMS`` at once, and a
  node that has announced nothing lately holds each for ``FIRST_LEASE`` only. Past its share a
  node is still sent to the registry, but holds no slot that makes others wait.
- reports: a peer reported by one node is avoided for a short first penalty; each further
  distinct reporter (the host of a registered node; each reports a peer once per
  ``REPORT_WINDOW``) multiplies it by ``ESCALATION``, up to ``MAX_PENALTY``.
- announcements: only a registered node's count, at most ``MAX_HELD`` new pieces per node per
  ``HOLDERS_TTL``, so a node can grow the state by 2 x ``MAX_HELD`` entries at most.
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
FIRST_LEASE = 2.0  # ... or by this, for a node that has announced nothing in ANNOUNCER_TTL
ANNOUNCER_TTL = 300.0
MAX_CLAIMS = 32  # registry slots one node holds at once
LOAD_WINDOW = 2.0  # assignments count towards a peer's load until this quiet time passes
HOLDERS_TTL = 24 * 3600.0
MAX_HELD = 65_536  # new pieces a node may announce per HOLDERS_TTL (256 GiB of 4 MiB pieces)
REPORT_WINDOW = 3600.0  # reporters of a peer are counted together over this
FIRST_PENALTY = {FailureKind.CORRUPT: 60.0, FailureKind.FAILED: 10.0}
MAX_PENALTY = {FailureKind.CORRUPT: 24 * 3600.0, FailureKind.FAILED: 600.0}
ESCALATION = 10.0  # each further distinct reporter multiplies the penalty by this
_PREFIX = "modelfs:"


def penalty(kind: FailureKind, reporters: int) -> float:
    """How long a peer reported by ``reporters`` distinct nodes is avoided."""
    return min(FIRST_PENALTY[kind] * ESCALATION ** (reporters - 1), MAX_PENALTY[kind])


class KeyValue(Protocol):
    """The few operations the scheduler needs; every key has a time to live."""

    async def put(self, key: str, value: str, ttl: float, only_if_absent: bool = False) -> bool:
        """Set ``key``; with ``only_if_absent`` only if it does not exist. True if set."""
        ...

    async def get_many(self, keys: list[str]) -> list[str | None]: ...

    async def delete(self, key: str) -> None: ...

    async def add_member(self, key: str, member: str, ttl: float) -> bool:
        """Add ``member`` to the set; True if it was not in it."""
        ...

    async def members(self, key: str) -> set[str]: ...

    async def remove_member(self, key: str, member: str) -> None: ...

    async def increment(self, key: str, ttl: float, amount: int = 1) -> int:
        """Add ``amount``; the key expires ``ttl`` after the latest increment."""
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

    async def add_member(self, key: str, member: str, ttl: float) -> bool:
        members = await self.members(key)
        new = member not in members
        members.add(member)
        self._sets[key] = (members, self._clock() + ttl)
        return new

    async def members(self, key: str) -> set[str]:
        found = self._sets.get(key)
        if found is None or found[1] <= self._clock():
            self._sets.pop(key, None)
            return set()
        return found[0]

    async def remove_member(self, key: str, member: str) -> None:
        (await self.members(key)).discard(member)

    async def increment(self, key: str, ttl: float, amount: int = 1) -> int:
        count = int(self._live(key) or 0) + amount
        self._values[key] = (str(count), self._clock() + ttl)
        return count


def _node_key(address: str) -> str:
    return f"{_PREFIX}node:{address}"


def _piece(digest: str, index: int) -> str:
    return f"{digest}/{index}"


class SchedulerState:
    def __init__(
        self,
        store: KeyValue,
        *,
        max_held: int = MAX_HELD,
        max_claims: int = MAX_CLAIMS,
        clock: Callable[[], float] = time.time,  # wall time: replicas share the held windows
    ) -> None:
        self._store = store
        self._max_held = max_held
        self._max_claims = max_claims
        self._clock = clock

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

    async def _registered(self, address: str) -> bool:
        return (await self._store.get_many([_node_key(address)]))[0] is not None

    async def announce(self, address: str, pieces: list[tuple[str, int]]) -> int:
        """``address`` holds these pieces now: it serves them, and its registry claims end.
        Returns how many were taken: none from an unregistered node (it is never offered),
        and no more than its ``max_held`` share of new pieces."""
        if not await self._registered(address):
            return 0
        held_key = f"{_PREFIX}held:{address}:{int(self._clock() // HOLDERS_TTL)}"
        room = self._max_held - int((await self._store.get_many([held_key]))[0] or 0)
        taken = released = 0
        for digest, index in pieces:
            piece = _piece(digest, index)
            if room <= 0:
                break
            if await self._store.add_member(f"{_PREFIX}holders:{piece}", address, HOLDERS_TTL):
                room -= 1
                taken += 1
            released += await self._release_claims(piece, address)
        if taken:
            await self._store.increment(held_key, 2 * HOLDERS_TTL, taken)
        if released:
            await self._store.increment(f"{_PREFIX}claims:{address}", SOURCE_LEASE, -released)
        if taken or released:  # it delivers: its registry claims may last
            await self._store.put(f"{_PREFIX}announcer:{address}", "1", ANNOUNCER_TTL)
        return taken

    async def _release_claims(self, piece: str, address: str) -> int:
        released = 0
        for slot in range(SOURCE_SLOTS):
            key = f"{_PREFIX}source:{piece}:{slot}"
            if (await self._store.get_many([key]))[0] == address:
                await self._store.delete(key)
                released += 1
        return released

    async def ask(self, address: str, digest: str, index: int) -> Decision:
        piece = _piece(digest, index)
        holders = await self._store.members(f"{_PREFIX}holders:{piece}")
        nodes = await self._nodes([*holders, address])
        asker = nodes.pop(address, None)
        live = sorted(nodes)
        blocked = await self._blocked(live)
        load_values = await self._store.get_many([f"{_PREFIX}load:{a}" for a in live])
        loads = {a: int(value or 0) for a, value in zip(live, load_values, strict=True)}
        candidates = rank(asker, address, list(nodes.values()), loads, blocked)
        for candidate in candidates[:1]:
            # The first candidate is the one the node will most likely use.
            await self._store.increment(f"{_PREFIX}load:{candidate}", LOAD_WINDOW)
        may_go_to_source = not candidates and (
            asker is None or await self._claim_source(piece, address)
        )
        return dataclasses.replace(decide(candidates, may_go_to_source), avoided=len(blocked))

    async def _blocked(self, addresses: list[str]) -> set[str]:
        kinds = list(FIRST_PENALTY)
        keys = [_blocked_key(kind, a) for a in addresses for kind in kinds]
        flags = iter(await self._store.get_many(keys))
        return {a for a in addresses if [next(flags) for _ in kinds] != [None] * len(kinds)}

    async def _claim_source(self, piece: str, address: str) -> bool:
        """Whether ``address`` may fetch the piece from the registry: it holds (or now takes) a
        slot, or it has used up its share of slots (it goes, but makes nobody wait)."""
        keys = [f"{_PREFIX}source:{piece}:{slot}" for slot in range(SOURCE_SLOTS)]
        if address in await self._store.get_many(keys):
            return True
        claims_key = f"{_PREFIX}claims:{address}"
        if int((await self._store.get_many([claims_key]))[0] or 0) >= self._max_claims:
            return True
        announcing = (await self._store.get_many([f"{_PREFIX}announcer:{address}"]))[0]
        lease = FIRST_LEASE if announcing is None else SOURCE_LEASE
        for key in keys:
            if await self._store.put(key, address, lease, only_if_absent=True):
                await self._store.increment(claims_key, SOURCE_LEASE)
                return True
        return False

    async def report(
        self, reporter: str, peer: str, digest: str, index: int, kind: FailureKind
    ) -> None:
        """A node failed to get a piece from ``peer``. Only a registered node's report counts,
        and a block grows with the number of distinct reporters (see ``penalty``)."""
        if reporter == peer or not await self._registered(reporter):
            return
        if kind is FailureKind.MISSING:
            await self._store.remove_member(f"{_PREFIX}holders:{_piece(digest, index)}", peer)
            return
        # One report per reporter and peer counts per window: repeating it extends nothing.
        reported = f"{_PREFIX}reported:{kind.value}:{reporter}:{peer}"
        if not await self._store.put(reported, "1", REPORT_WINDOW, only_if_absent=True):
            return
        # Distinct hosts: more ports on one machine are no more witnesses.
        reporters_key = f"{_PREFIX}reporters:{kind.value}:{peer}"
        if not await self._store.add_member(reporters_key, _host(reporter), REPORT_WINDOW):
            return
        count = len(await self._store.members(reporters_key))
        await self._store.put(_blocked_key(kind, peer), str(count), penalty(kind, count))


def _host(address: str) -> str:
    return address.rsplit(":", 1)[0]


def _blocked_key(kind: FailureKind, address: str) -> str:
    return f"{_PREFIX}blocked:{kind.value}:{address}"
