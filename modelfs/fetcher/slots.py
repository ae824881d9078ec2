"""Connection slots by priority: how many fetches run at once, and which waiting one goes next.

A read waiting on the piece (``DEMAND``) goes before the readahead of a sequential reader
(``READAHEAD``), which goes before hints and whole-model prefetch (``BACKGROUND``). Lower
priorities are capped below the total, so prefetch never holds every connection, and a waiting
fetch can be promoted when a read starts waiting on it. No I/O: trio events only.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from enum import IntEnum

import trio


class Priority(IntEnum):
    BACKGROUND = 0  # hints and whole-model prefetch
    READAHEAD = 1  # the window ahead of a sequential reader
    DEMAND = 2  # a read is waiting on it


@dataclass(eq=False)
class Ticket:
    """One fetch's claim on a connection slot; its priority may rise while it waits."""

    priority: Priority
    granted: trio.Event = field(default_factory=trio.Event)


class ConnectionSlots:
    """At most ``total`` fetches at once; a freed slot goes to the highest-priority waiter.

    ``caps[p]`` bounds the slots held by priority ``p`` and those below it together, so with
    readahead capped below the total, a demand read finds a slot free even while prefetch
    runs flat out.
    """

    def __init__(self, total: int, caps: dict[Priority, int]) -> None:
        self._caps = {priority: min(caps.get(priority, total), total) for priority in Priority}
        self._caps[Priority.DEMAND] = total  # all priorities together
        self._held: dict[Priority, int] = dict.fromkeys(Priority, 0)
        self._waiting: deque[Ticket] = deque()

    def _allowed(self, priority: Priority) -> bool:
        # One more slot at ``priority`` counts against its cap and every cap above it.
        return all(
            sum(held for p, held in self._held.items() if p <= level) < self._caps[level]
            for level in Priority
            if level >= priority
        )

    def _grant(self) -> None:
        # Highest priority first, then first come first served.
        for ticket in sorted(self._waiting, key=lambda t: -t.priority):
            if self._allowed(ticket.priority):
                self._waiting.remove(ticket)
                self._held[ticket.priority] += 1
                ticket.granted.set()

    @asynccontextmanager
    async def slot(self, ticket: Ticket) -> AsyncIterator[None]:
        waiting_above = any(t.priority >= ticket.priority for t in self._waiting)
        if not waiting_above and self._allowed(ticket.priority):
            self._held[ticket.priority] += 1
        else:
            self._waiting.append(ticket)
            try:
                await ticket.granted.wait()
            except BaseException:
                if ticket.granted.is_set():  # granted and cancelled in the same breath
                    self._release(ticket.priority)
                else:
                    self._waiting.remove(ticket)
                raise
        held_as = ticket.priority
        try:
            yield
        finally:
            self._release(held_as)

    def promote(self, ticket: Ticket, priority: Priority) -> None:
        """Raise a waiting fetch's priority (a read now waits on it)."""
        if priority > ticket.priority and not ticket.granted.is_set():
            ticket.priority = priority
            self._grant()

    def _release(self, priority: Priority) -> None:
        self._held[priority] -= 1
        self._grant()
