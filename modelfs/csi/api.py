"""CSI's Identity and Node services (``csi.v1``) as Python classes, compiled from
``proto/csi.proto`` at import (``modelfs.protos``)."""

from __future__ import annotations

from modelfs.protos import compile_protos

pb, services = compile_protos("modelfs/csi/proto/csi.proto")
