"""containerd's snapshots API and CRI's image service as Python classes, compiled from
``proto/*.proto`` at import (``modelfs.protos``).

The .proto files are modelfs's own minimal copies of containerd's and CRI's (names and numbers
are the wire format); the modules compiled are named after their paths
(``modelfs.snapshot.proto.mount_pb2``).
"""

from __future__ import annotations

import sys

from modelfs.protos import compile_protos

pb, services = compile_protos("modelfs/snapshot/proto/snapshots.proto")
mount_pb = sys.modules["modelfs.snapshot.proto.mount_pb2"]
cri_pb, cri_services = compile_protos("modelfs/snapshot/proto/cri.proto")
