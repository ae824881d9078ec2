"""The plugin's gRPC services, CSI's Identity and Node, on a unix socket kubelet calls.

grpcio's thread-pool server: each call runs in a worker thread, its trio work (the registry,
the daemon's control socket) in a ``trio.run`` of its own (modelfs.csi.node). A refusal ends
that call with its status; any other error too (logged with its traceback, status INTERNAL),
and the server serves on.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf.wrappers_pb2 import BoolValue

from modelfs import __version__
from modelfs.csi.api import pb, services
from modelfs.csi.node import Node
from modelfs.csi.volumes import VolumeError, parse_publish, parse_unpublish

log = logging.getLogger(__name__)

WORKERS = 8  # calls served at once: kubelet publishes a node's new pods' volumes together
T = TypeVar("T")


def _answer(context: grpc.ServicerContext, what: str, run: Callable[[], T]) -> T:
    """``run()``, its refusal turned into the call's status."""
    try:
        return run()
    except VolumeError as error:
        log.info("%s: %s", what, error)
        context.abort(error.code, str(error))
    except Exception as error:
        log.exception("%s failed", what)
        context.abort(grpc.StatusCode.INTERNAL, f"{what} failed ({type(error).__name__}: {error})")
    raise AssertionError("abort returns by raising")


class Identity(services.IdentityServicer):  # type: ignore[misc]
    def __init__(self, driver: str, node: Node) -> None:
        self.driver = driver
        self.node = node

    def GetPluginInfo(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.GetPluginInfoResponse(name=self.driver, vendor_version=__version__)

    def GetPluginCapabilities(self, request: Any, context: grpc.ServicerContext) -> Any:
        # A node plugin alone: no controller service, no topology.
        return pb.GetPluginCapabilitiesResponse()

    def Probe(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.ProbeResponse(ready=BoolValue(value=self.node.daemon_ready()))


class NodeService(services.NodeServicer):  # type: ignore[misc]
    def __init__(self, node: Node, node_id: str) -> None:
        self.node = node
        self.node_id = node_id

    def NodeGetInfo(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.NodeGetInfoResponse(node_id=self.node_id)

    def NodeGetCapabilities(self, request: Any, context: grpc.ServicerContext) -> Any:
        # No staging: a model is published straight from the node's mount of it.
        return pb.NodeGetCapabilitiesResponse()

    def NodePublishVolume(self, request: Any, context: grpc.ServicerContext) -> Any:
        what = f"NodePublishVolume {request.volume_id} at {request.target_path}"

        def publish() -> None:
            parsed = parse_publish(
                request.volume_id,
                request.target_path,
                has_capability=request.HasField("volume_capability"),
                block=request.volume_capability.HasField("block"),
                context=dict(request.volume_context),
            )
            self.node.publish(parsed, dict(request.secrets))

        _answer(context, what, publish)
        return pb.NodePublishVolumeResponse()

    def NodeUnpublishVolume(self, request: Any, context: grpc.ServicerContext) -> Any:
        what = f"NodeUnpublishVolume {request.volume_id} at {request.target_path}"

        def unpublish() -> None:
            target = parse_unpublish(request.volume_id, request.target_path)
            self.node.unpublish(request.volume_id, target)

        _answer(context, what, unpublish)
        return pb.NodeUnpublishVolumeResponse()


def serve(node: Node, endpoint: Path, driver: str, node_id: str, ready: Any = None) -> None:
    """Serve the plugin on the unix socket ``endpoint`` until SIGTERM or SIGINT; ``ready()``
    is called once it listens. Published volumes stay: a plugin started later serves them."""
    server = grpc.server(ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="csi"))
    services.add_IdentityServicer_to_server(Identity(driver, node), server)
    services.add_NodeServicer_to_server(NodeService(node, node_id), server)
    endpoint.parent.mkdir(parents=True, exist_ok=True)
    endpoint.unlink(missing_ok=True)  # a socket left by a plugin that died
    server.add_insecure_port(f"unix://{endpoint}")
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    server.start()
    endpoint.chmod(0o600)
    log.warning("CSI node plugin %s serving node %s on %s", driver, node_id, endpoint)
    if ready is not None:
        ready()
    stop.wait()
    server.stop(grace=5).wait()
    endpoint.unlink(missing_ok=True)
