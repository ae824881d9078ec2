"""containerd's snapshots API and CRI's image service as Python classes, compiled from
``proto/*.proto`` at import.

The .proto files are modelfs's own minimal copies of containerd's and CRI's (names and numbers
are the wire format). ``grpc.protos_and_services`` compiles them in memory with grpcio-tools
(~0.1 s) each time the snapshotter starts: no generated code in the repository, no build step,
nothing to keep in step with the .proto files. It finds a .proto by its import path on
``sys.path``, and the modules it makes are named after that path
(``modelfs.snapshot.proto.snapshots_pb2``), so the directory holding the ``modelfs`` package is
put on ``sys.path`` for the call (an editable install leaves it off). The generated classes are
dynamic: mypy sees them as ``Any``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import grpc


def _load(proto: str) -> tuple[Any, Any]:
    root = str(Path(__file__).resolve().parent.parent.parent)
    added = root not in sys.path
    if added:
        sys.path.append(root)
    try:
        return grpc.protos_and_services(proto)  # type: ignore[no-any-return]
    finally:
        if added:
            sys.path.remove(root)


pb, services = _load("modelfs/snapshot/proto/snapshots.proto")
mount_pb = sys.modules["modelfs.snapshot.proto.mount_pb2"]
cri_pb, cri_services = _load("modelfs/snapshot/proto/cri.proto")
