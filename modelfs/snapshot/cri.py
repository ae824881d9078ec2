"""The credentials kubelet gives CRI's ``PullImage``, for the model mounts of that pull.

containerd's CRI plugin uses a pull's ``AuthConfig`` for its own requests and hands it to no
snapshotter. So the snapshotter can serve CRI's image service itself (kubelet's
``--image-service-endpoint``): ``CriImageProxy`` forwards every call to containerd's CRI socket
unchanged, and keeps the credentials of each ``PullImage`` (``PulledCredentials``: by image
reference, in memory only, a bounded number, for a limited time). The model mounts of that pull
(containerd's unpacker names the image in the label ``containerd.io/snapshot/cri.image-ref``),
and the mirror's look-up of a model's tag, then use them, before the node's own credentials.
Credentials a pull gives for one registry are used for that registry only.
"""

from __future__ import annotations

import base64
import binascii
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from modelfs.errors import BadReferenceError
from modelfs.reference import Reference, parse_reference
from modelfs.snapshot.api import cri_pb
from modelfs.snapshot.stats import SnapshotterStats
from modelfs.sources.credentials import (
    IDENTITY_TOKEN_USER,
    Credentials,
    normalize_host,
    same_registry,
)

log = logging.getLogger(__name__)

IMAGE_REF_LABEL = "containerd.io/snapshot/cri.image-ref"
_SERVICE = "/runtime.v1.ImageService/"
_MESSAGES = [  # kubelet's own limit on CRI messages (a long ListImages), both ways
    ("grpc.max_receive_message_length", 16 << 20),
    ("grpc.max_send_message_length", 16 << 20),
]
KEEP_SECONDS = 900.0  # a pull's mounts are made during the pull: minutes are plenty
KEEP_PULLS = 1024
_SECRET_LIMIT = 16 << 10  # larger credentials are refused (they travel through a pipe)


def auth_credentials(auth: Any) -> Credentials | None:
    """The credentials a CRI ``AuthConfig`` carries (username and password, ``auth``'s base64
    ``user:password``, or an identity token), or None if it carries none modelfs can use (a
    ``registry_token`` is a bearer token for containerd's own requests)."""
    if auth.identity_token:
        return Credentials(IDENTITY_TOKEN_USER, auth.identity_token)
    if auth.username:
        return Credentials(auth.username, auth.password)
    if auth.auth:
        try:
            username, sep, password = (
                base64.b64decode(auth.auth, validate=True).decode().partition(":")
            )
        except (binascii.Error, UnicodeDecodeError):
            return None
        return Credentials(username, password) if sep and username else None
    return None


@dataclass(frozen=True)
class _Kept:
    credentials: Credentials
    registry: str  # the image's registry: the only one they are used for
    until: float


class PulledCredentials:
    """The credentials of recent pulls, by image reference (as containerd's CRI names it).

    The proxy keeps them from gRPC's event loop, the mirror reads them from its threads: a lock
    guards them. At most ``limit`` pulls are kept, each for ``seconds``, the oldest dropped
    first; nothing is written anywhere."""

    def __init__(
        self,
        seconds: float = KEEP_SECONDS,
        limit: int = KEEP_PULLS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.seconds = seconds
        self.limit = limit
        self.clock = clock
        self._kept: OrderedDict[str, _Kept] = OrderedDict()
        self._lock = threading.Lock()

    def keep(self, image: str, auth: Any) -> tuple[bool, str]:
        """Keep the credentials of a pull of ``image``: whether it did, and what happened, for
        the log (never a secret)."""
        try:
            reference = parse_reference(image)
        except BadReferenceError:
            return False, "no credentials kept (containerd will refuse the reference)"
        credentials = auth_credentials(auth)
        if credentials is None:
            return False, "no credentials modelfs can use"
        if len(credentials.username) + len(credentials.password) > _SECRET_LIMIT:
            return False, "credentials not kept: larger than 16 KiB"
        # kubelet names the docker config key the credentials came from (a host, a URL).
        server = auth.server_address
        if server and not same_registry(server, reference.registry):
            host = normalize_host(server)
            return False, f"credentials not kept: they are for {host}, not {reference.registry}"
        key = str(reference)
        with self._lock:
            self._kept.pop(key, None)
            self._kept[key] = _Kept(credentials, reference.registry, self.clock() + self.seconds)
            while len(self._kept) > self.limit:
                self._kept.popitem(last=False)
        return True, f"credentials kept for {reference.registry}"

    def for_image(self, image: str, registry: str) -> Credentials | None:
        """The credentials a recent pull of ``image`` gave, if they are for ``registry``."""
        try:
            key = str(parse_reference(image))
        except BadReferenceError:
            return None
        with self._lock:
            kept = self._kept.get(key)
            if kept is not None and kept.until <= self.clock():
                del self._kept[key]
                kept = None
        if kept is None or not same_registry(kept.registry, registry):
            return None
        return kept.credentials

    def for_model(self, labels: Mapping[str, str], model: Reference) -> Credentials | None:
        """The credentials for mounting ``model`` for the snapshot with these labels."""
        image = labels.get(IMAGE_REF_LABEL)
        return None if image is None else self.for_image(image, model.registry)


class CriImageProxy(grpc.GenericRpcHandler):  # type: ignore[misc]
    """CRI's image service, every call forwarded as it came to containerd's CRI socket and its
    answer (or error) returned as it came; a PullImage's credentials are kept on the way."""

    def __init__(self, endpoint: Path, pulled: PulledCredentials, stats: SnapshotterStats) -> None:
        self.pulled = pulled
        self.stats = stats
        self.channel = grpc.aio.insecure_channel(f"unix://{endpoint}", options=_MESSAGES)

    def service(self, handler_call_details: Any) -> Any:
        method: str = handler_call_details.method
        if not method.startswith(_SERVICE):
            return None  # UNIMPLEMENTED: it serves the image service alone
        forward = self.channel.unary_unary(method)  # bytes in, bytes out

        async def call(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            kept = method == _SERVICE + "PullImage" and self._keep(request)
            name = method.removeprefix(_SERVICE)
            try:
                reply: bytes = await forward(request, timeout=context.time_remaining())
            except grpc.aio.AioRpcError as error:
                self.stats.cri_answered(name, error.code().name, kept)
                await context.abort(error.code(), error.details() or "")
            self.stats.cri_answered(name, grpc.StatusCode.OK.name, kept)
            return reply

        return grpc.unary_unary_rpc_method_handler(call)

    def _keep(self, request: bytes) -> bool:
        """Keep a PullImage's credentials; whether it did."""
        try:
            pull = cri_pb.PullImageRequest.FromString(request)
        except DecodeError:  # containerd will refuse it, and say why
            return False
        if not pull.HasField("auth"):
            return False
        kept, what = self.pulled.keep(pull.image.image, pull.auth)
        log.info("CRI PullImage %s: %s", pull.image.image, what)
        return kept


@asynccontextmanager
async def serving_cri_proxy(
    address: Path, endpoint: Path, pulled: PulledCredentials, stats: SnapshotterStats
) -> AsyncIterator[None]:
    """Serve CRI's image service on the unix socket ``address`` (mode 0600), forwarding to
    containerd's CRI socket ``endpoint``, counted in ``stats``, until the block ends."""
    proxy = CriImageProxy(endpoint, pulled, stats)
    server = grpc.aio.server(handlers=[proxy], options=_MESSAGES)
    address.parent.mkdir(parents=True, exist_ok=True)
    address.unlink(missing_ok=True)  # a socket left by a snapshotter that died
    server.add_insecure_port(f"unix://{address}")
    await server.start()
    address.chmod(0o600)
    log.info("CRI image service on %s, forwarded to %s", address, endpoint)
    try:
        yield
    finally:
        await server.stop(grace=5)
        await proxy.channel.close()
