"""A Kubernetes CSI node plugin: pods' inline volumes of a ModelPack model, mounted lazily once
per node by the node service and bound read-only into each pod.

- ``volumes``: pure logic (a publish request's attributes and secret, a published volume).
- ``node``: publishing and unpublishing (the registry, the daemon, bind mounts, the records).
- ``api``: CSI's messages and services, compiled from ``proto/csi.proto`` at import.
- ``server``: the Identity and Node gRPC services.

The names here are what deploy/ relies on (tests/test_deploy.py checks they agree).
"""

from pathlib import Path

DEFAULT_DRIVER = "model.csi.modelpack.org"
# Where deploy/csi-node.yaml mounts kubelet's plugin directory for this driver.
DEFAULT_ENDPOINT = Path("/csi/csi.sock")
DEFAULT_STATE_DIR = Path("/var/lib/modelfs/csi")
