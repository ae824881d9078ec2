"""Which peer port each mount the daemon supervises serves its pieces on.

Every mount process runs its own peer server, so each needs a port of its own from the
``[cluster] peer_ports`` range. The choice is pure and deterministic: a mount keeps the port it
had (across restarts of its process and reloads of the daemon) while that port is still in the
range and not another mount's; otherwise it gets the lowest port of the range no mount holds.
A port is released when its mount stops (it is then no longer among the ``taken``).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from modelfs.untrusted import decimal


@dataclass(frozen=True)
class PortRange:
    first: int
    last: int  # included

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.first <= port <= self.last

    def __len__(self) -> int:
        return self.last - self.first + 1

    def __str__(self) -> str:
        return f"{self.first}-{self.last}"


def parse_port_range(value: object) -> PortRange:
    """``7481`` (a base: ports from it up) or ``"7481-7496"``; ValueError says what is wrong."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a port or a range LOW-HIGH")
    if isinstance(value, int):
        first, last = value, 65535
    elif isinstance(value, str) and value.count("-") == 1:
        low, high = (decimal(part.strip(), 5) for part in value.split("-"))
        if low is None or high is None:
            raise ValueError(f'{value!r} is not a port or a range LOW-HIGH (e.g. "7481-7496")')
        first, last = low, high
    else:
        raise ValueError(f'{value!r} is not a port or a range LOW-HIGH (e.g. "7481-7496")')
    if not 1 <= first <= last <= 65535:
        raise ValueError(f"{value!r} is not a range of ports within 1-65535, low to high")
    return PortRange(first, last)


def choose_port(ports: PortRange, taken: Collection[int], kept: int | None = None) -> int | None:
    """``kept`` if the mount may keep it, else the lowest free port; None when all are taken."""
    if kept is not None and kept in ports and kept not in taken:
        return kept
    return next((port for port in range(ports.first, ports.last + 1) if port not in taken), None)
