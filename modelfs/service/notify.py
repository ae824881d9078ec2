"""systemd's notify protocol: datagrams to ``$NOTIFY_SOCKET`` (no libsystemd needed)."""

from __future__ import annotations

import os
import socket

NOTIFY_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def notify(message: str) -> bool:
    """Send ``message`` (``READY=1``, ``STOPPING=1``, ``WATCHDOG=1``...); False if not sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # the abstract namespace
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(address)
        try:
            # Never block the event loop on a listener that stopped reading; a lost keep-alive
            # is followed by the next one.
            sock.send(message.encode(), socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between keep-alives (half the watchdog timeout), if systemd asks for them."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and int(pid) != os.getpid()):
        return None
    return int(usec) / 2_000_000
