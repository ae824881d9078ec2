"""The daemon's control API, on a unix socket only root may open (mode 0600): the protocol of
``modelfs.jsonsocket``, which each mount's stats socket speaks too."""

from __future__ import annotations

from pathlib import Path

import trio

from modelfs.jsonsocket import ControlError as ControlError
from modelfs.jsonsocket import ask as ask
from modelfs.jsonsocket import open_control_socket as open_control_socket
from modelfs.jsonsocket import serve_control as serve_control

DEFAULT_CONTROL_SOCKET = Path("/run/modelfs/control.sock")
PING_TIMEOUT = 10.0


async def daemon_answers(path: Path) -> bool:
    """Whether a daemon listens on ``path`` (False when nothing does, or we may not connect)."""
    try:
        with trio.fail_after(PING_TIMEOUT):
            await ask(path, {"command": "ping"})
    except trio.TooSlowError:
        raise ControlError(
            f"the modelfs daemon at {path} does not answer; pass --no-daemon to work without it"
        ) from None
    except ControlError:
        return False
    return True
