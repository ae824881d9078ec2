"""Pure scheduling decisions: rank peers by load and locality, ration trips to the registry.

Scores follow Dragonfly's weighting (load first, then locality) with deterministic tie-breaks,
so two replicas reading the same state give the same answer.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from dataclasses import dataclass

LOAD_WEIGHT = 0.6
ZONE_WEIGHT = 0.25
RACK_WEIGHT = 0.15
MAX_CANDIDATES = 3
WAIT_SECONDS = 0.02  # how long a rationed node waits before asking again
# fullmatch with \Z semantics and ASCII only: "$" would let a trailing newline through, and a
# loose character class let "::::1" pass, which httpx then refuses on every reader of the node.
_HOST_PORT = re.compile(
    r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9.\-]+)):(?P<port>[0-9]{1,5})", re.ASCII
)
_HOSTNAME_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?", re.ASCII)
_LABEL = re.compile(r"[A-Za-z0-9._\-]{0,63}", re.ASCII)


@dataclass(frozen=True)
class NodeInfo:
    """A node of the cluster; its peer address (host:port) is its identity."""

    address: str
    zone: str = ""
    rack: str = ""
    capacity: int = 4  # uploads it serves at once before counting as fully busy

    def problem(self) -> str | None:
        """Why this registration is unacceptable, or None."""
        if not valid_address(self.address):
            return f"address {self.address!r} is not host:port (an IP address or a hostname)"
        if not (_LABEL.fullmatch(self.zone) and _LABEL.fullmatch(self.rack)):
            return "zone and rack labels are at most 63 of [A-Za-z0-9._-]"
        if not 1 <= self.capacity <= 10_000:
            return f"capacity {self.capacity} is not between 1 and 10000"
        return None


def valid_address(address: str) -> bool:
    """``host:port`` with an IPv4 address or a hostname, or ``[IPv6]:port``; port 1-65535."""
    found = _HOST_PORT.fullmatch(address)
    if found is None or not 1 <= int(found["port"]) <= 65535:
        return False
    if found["v6"] is not None:
        return _is_ip(found["v6"], ipaddress.IPv6Address)
    host: str = found["host"]
    if host.replace(".", "").isdigit():  # all digits and dots: only an IPv4 address will do
        return _is_ip(host, ipaddress.IPv4Address)
    labels = host.removesuffix(".").split(".")
    return len(host) <= 253 and all(_HOSTNAME_LABEL.fullmatch(label) for label in labels)


def _is_ip(text: str, kind: type[ipaddress.IPv4Address | ipaddress.IPv6Address]) -> bool:
    try:
        kind(text)
    except ValueError:
        return False
    return True


class Action(enum.Enum):
    PEERS = "peers"  # fetch from one of ``peers``, in order
    SOURCE = "source"  # fetch from the registry (this node is one of the few allowed)
    WAIT = "wait"  # others are fetching it from the registry: ask again after ``retry_after``


@dataclass(frozen=True)
class Decision:
    action: Action
    peers: tuple[str, ...] = ()
    retry_after: float = 0.0
    avoided: int = 0  # holders left out because they were reported (for metrics)


class FailureKind(enum.Enum):
    CORRUPT = "corrupt"  # bytes that do not match the piece index: avoid it for a long time
    MISSING = "missing"  # it no longer holds the piece
    FAILED = "failed"  # refused, timed out or unreachable: avoid it for a while


def score(asker: NodeInfo | None, peer: NodeInfo, load: int) -> float:
    busy = min(load / peer.capacity, 1.0)
    same_zone = asker is not None and bool(peer.zone) and peer.zone == asker.zone
    same_rack = same_zone and bool(peer.rack) and asker is not None and peer.rack == asker.rack
    return LOAD_WEIGHT * (1.0 - busy) + ZONE_WEIGHT * same_zone + RACK_WEIGHT * same_rack


def rank(
    asker: NodeInfo | None,
    asker_address: str,
    holders: list[NodeInfo],
    loads: dict[str, int],
    blocked: set[str],
) -> tuple[str, ...]:
    """Up to ``MAX_CANDIDATES`` holders, best first; never the asker or a blocked peer."""
    eligible = [
        node for node in holders if node.address != asker_address and node.address not in blocked
    ]
    ordered = sorted(
        eligible, key=lambda node: (-score(asker, node, loads.get(node.address, 0)), node.address)
    )
    return tuple(node.address for node in ordered[:MAX_CANDIDATES])


def decide(candidates: tuple[str, ...], may_go_to_source: bool) -> Decision:
    if candidates:
        return Decision(Action.PEERS, candidates)
    if may_go_to_source:
        return Decision(Action.SOURCE)
    return Decision(Action.WAIT, retry_after=WAIT_SECONDS)
