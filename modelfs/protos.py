"""gRPC APIs as Python classes, compiled from modelfs's own .proto files at import.

The .proto files are minimal copies of the messages a part of modelfs speaks (names and numbers
are the wire format). ``grpc.protos_and_services`` compiles them in memory with grpcio-tools
(~0.1 s) when the part starts: no generated code in the repository, no build step, nothing to
keep in step with the .proto files. It finds a .proto by its import path on ``sys.path``, and
the modules it makes are named after that path (``modelfs/csi/proto/csi.proto`` makes
``modelfs.csi.proto.csi_pb2``), so the directory holding the ``modelfs`` package is put on
``sys.path`` for the call (an editable install leaves it off). The generated classes are
dynamic: mypy sees them as ``Any``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import grpc


def compile_protos(proto: str) -> tuple[Any, Any]:
    """The messages and services of ``proto``, a path from the repository's root."""
    root = str(Path(__file__).resolve().parent.parent)
    added = root not in sys.path
    if added:
        sys.path.append(root)
    try:
        return grpc.protos_and_services(proto)  # type: ignore[no-any-return]
    finally:
        if added:
            sys.path.remove(root)
