"""A registry mirror for containerd's ``hosts.toml``: a model's own reference pulls as its model
image, so a pod spec can name ``registry/models/qwen:v1`` itself.

containerd asks the hosts ``hosts.toml`` lists before the registry, passing the registry's name
in the ``ns`` query parameter. For a tag that names a ModelPack model, the mirror answers the
model image (``models.model_image``: the same bytes ``modelfs model-image`` publishes, built
here, nothing written to the registry), and its manifests and blobs after it. Anything else gets
404, and containerd goes on to the next host: the registry itself, as if the mirror were not
there. A reference pinned by the *model's* digest cannot be answered (containerd checks what it
gets against the digest): it reaches the registry and fails as without the mirror.

It runs in the snapshotter's process, in threads of its own (the registry client is trio's, the
snapshotter's loop asyncio's): one thread per request, one ``trio.run`` per manifest asked.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import trio

from modelfs.errors import ModelfsError
from modelfs.metrics import parse_address
from modelfs.modelpack import OCI_INDEX, OCI_MANIFEST
from modelfs.reference import Reference
from modelfs.snapshot.cri import PulledCredentials
from modelfs.snapshot.models import MODEL_CONFIGS, model_config_type, model_image
from modelfs.sources.interface import FetchedManifest
from modelfs.sources.mirrors import find_hosts, open_repository

log = logging.getLogger(__name__)

_NAME = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
_PATH = re.compile(rf"/v2/(?P<name>{_NAME})/(?P<kind>manifests|blobs)/(?P<ref>[\w.:-]+)")
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_KEPT = 4096  # manifests and blobs of model images kept for the requests that follow


@dataclass(frozen=True)
class Route:
    """What a request asks: the API root, or a manifest or blob of a repository."""

    kind: str  # "base", "manifests" or "blobs"
    repository: str = ""
    reference: str = ""  # a tag or a digest


def route(path: str) -> Route | None:
    """The request's route, or None for anything the mirror does not serve (404)."""
    if path in ("/v2", "/v2/"):
        return Route("base")
    match = _PATH.fullmatch(path)
    if match is None:
        return None
    kind, reference = match["kind"], match["ref"]
    if not (_DIGEST.fullmatch(reference) or (kind == "manifests" and _TAG.fullmatch(reference))):
        return None
    return Route(kind, match["name"], reference)


class ModelImages:
    """Model images built for models' tags, and their parts, kept for the requests after."""

    def __init__(
        self,
        plain_http: frozenset[str],
        hosts_dir: Path | None = None,
        pulled: PulledCredentials | None = None,
    ) -> None:
        self.plain_http = plain_http
        # The registries' mirrors, this one among them: it answers itself 404 (``_Handler``).
        self.hosts_dir = hosts_dir
        self.pulled = pulled  # the credentials CRI's pulls gave, when it proxies CRI's images
        self._kept: dict[str, tuple[str, bytes]] = {}  # digest -> (media type, bytes)
        self._lock = threading.Lock()

    def kept(self, digest: str) -> tuple[str, bytes] | None:
        with self._lock:
            return self._kept.get(digest)

    def for_tag(self, host: str, repository: str, tag: str) -> tuple[str, bytes] | None:
        """The model image of ``host/repository:tag``, or None if that is not a model."""
        reference = Reference(host, repository, tag, None)
        fetched = trio.run(self._manifest, reference)
        if model_config_type(fetched.data) not in MODEL_CONFIGS:
            return None
        image = model_image(reference.pinned(fetched.digest), OCI_MANIFEST, OCI_INDEX)
        with self._lock:
            if len(self._kept) > _KEPT:
                self._kept.clear()  # rebuilt on demand: the same model gives the same bytes
            self._kept.update({d: (OCI_MANIFEST, body) for d, body in image.manifests.items()})
            self._kept.update({d: ("application/octet-stream", b) for d, b in image.blobs.items()})
            # containerd resolves the tag, then fetches what it resolved to by digest.
            self._kept["sha256:" + hashlib.sha256(image.index).hexdigest()] = (
                OCI_INDEX,
                image.index,
            )
        return OCI_INDEX, image.index

    async def _manifest(self, reference: Reference) -> FetchedManifest:
        plain = reference.registry in self.plain_http
        # The credentials of CRI's pull of this very tag, if kept; else the node's.
        pulled = (
            None
            if self.pulled is None
            else self.pulled.for_image(str(reference), reference.registry)
        )
        hosts = find_hosts(
            reference.registry, reference.api_host, plain_http=plain, hosts_dir=self.hosts_dir
        )
        async with open_repository(reference.repository, hosts, credentials=pulled) as repository:
            return await repository.get_manifest(reference.selector)


def _answer(images: ModelImages, route_: Route, host: str | None) -> tuple[str, bytes] | None:
    if route_.kind == "base":
        return "application/json", b"{}"
    if _DIGEST.fullmatch(route_.reference):
        return images.kept(route_.reference)
    if host is None:
        return None
    try:
        return images.for_tag(host, route_.repository, route_.reference)
    except ModelfsError as error:  # the registry will tell containerd itself
        log.info("mirror: %s/%s:%s: %s", host, route_.repository, route_.reference, error)
        return None


class _Handler(BaseHTTPRequestHandler):
    server: _MirrorServer

    def do_GET(self) -> None:
        self._serve(body=True)

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def _serve(self, body: bool) -> None:
        url = urlsplit(self.path)
        route_ = route(url.path)
        host = parse_qs(url.query).get("ns", [None])[0]
        # modelfs itself reads a registry through the mirrors of its hosts.toml, this one among
        # them: what it wants is the model, never its image (modelfs.sources.mirrors).
        by_modelfs = self.headers.get("User-Agent", "").startswith("modelfs/")
        answer = None if route_ is None or by_modelfs else _answer(self.server.images, route_, host)
        if answer is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        media_type, data = answer
        self.send_response(200)
        self.send_header("Content-Type", media_type)
        self.send_header("Content-Length", str(len(data)))
        if route_ is not None and route_.kind != "base":
            digest = "sha256:" + hashlib.sha256(data).hexdigest()
            self.send_header("Docker-Content-Digest", digest)
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("mirror: " + format, *args)


class _MirrorServer(ThreadingHTTPServer):
    daemon_threads = True
    images: ModelImages


@contextmanager
def serving_mirror(address: str, images: ModelImages) -> Iterator[int]:
    """Serve the mirror on ``address`` (HOST:PORT) until the block ends; yields the port."""
    try:
        host, port = parse_address(address)
    except ModelfsError:
        raise ModelfsError(f"--mirror-addr {address!r} is not HOST:PORT") from None
    try:
        server = _MirrorServer((host, port), _Handler)
    except OSError as error:
        raise ModelfsError(f"cannot serve the mirror on {address}: {error.strerror}") from None
    server.images = images
    thread = threading.Thread(target=server.serve_forever, name="mirror", daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
