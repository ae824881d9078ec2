"""Test tooling around a real registry: the distribution binary, a counting/faulting proxy, push.

Nothing here fakes a registry: ``Registry`` runs Debian's ``docker-registry`` (distribution 2.8)
on a loopback port, optionally with its ``redirect`` storage middleware sending blob GETs to
``Nginx`` (Debian's nginx-light) serving its storage directory, as object storage would;
``Proxy`` only forwards to either, counting and optionally tampering or redirecting, the way a
CDN or a broken middlebox would.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import re
import secrets
import selectors
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType

import trio

from modelfs.fetcher.index import BlobPieces, PieceHasher, PieceIndex, publish_index
from modelfs.modelpack import MODEL_ARTIFACT_TYPE, MODEL_CONFIG, OCI_MANIFEST
from modelfs.pieces import DEFAULT_PIECE_SIZE
from modelfs.sources.credentials import Credentials
from modelfs.sources.interface import FetchedManifest
from modelfs.sources.registry import RegistryClient

REGISTRY_BINARY = "/usr/bin/docker-registry"
NGINX_BINARY = "/usr/sbin/nginx"
HTPASSWD_BINARY = "/usr/bin/htpasswd"
_CHUNK = 1024 * 1024
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "proxy-authorization",
        "proxy-authenticate",
    }
)
_BLOB_PATH = re.compile(r"^/v2/.+/blobs/sha256:[0-9a-f]{64}$")
_MANIFEST_PATH = re.compile(r"^/v2/.+/manifests/[^/]+$")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_ports(count: int) -> int:
    """The first of ``count`` consecutive ports free now, below the ephemeral range: a port
    range to hand out that no outgoing connection takes meanwhile."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    while True:
        first = secrets.randbelow(low - count - 10000) + 10000
        with ExitStack() as held:
            try:
                for port in range(first, first + count):
                    sock = held.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return first


def self_signed_certificate(
    directory: Path, name: str = "tls", subject: str = "127.0.0.1"
) -> tuple[Path, Path]:
    """A certificate for ``subject`` (an IP is also its subjectAltName) and its key
    (``NAME-cert.pem``, ``NAME-key.pem``), made by openssl: trusted only where a test says so
    (``SSL_CERT_FILE``)."""
    cert, key = directory / f"{name}-cert.pem", directory / f"{name}-key.pem"
    alt_name = ["-addext", f"subjectAltName=IP:{subject}"] if subject[0].isdigit() else []
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            f"/CN={subject}",
            *alt_name,
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _libtrust_key_id(public_key_der: bytes) -> str:
    """The key id distribution derives from a certificate's key (docker's libtrust format)."""
    encoded = base64.b32encode(hashlib.sha256(public_key_der).digest()[:30]).decode().rstrip("=")
    return ":".join(encoded[i : i + 4] for i in range(0, len(encoded), 4))


@dataclass(frozen=True)
class TokenRequest:
    scopes: tuple[str, ...]
    username: str | None
    grant: str  # "basic", "anonymous" or "refresh_token"


class _TokenHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _TokenHTTPServer

    def log_message(self, format: str, *args: object) -> None:
        """Keep test output clean."""

    def do_GET(self) -> None:
        self.server.tokens.handle(self, urllib.parse.urlsplit(self.path).query)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.server.tokens.handle(self, self.rfile.read(length).decode())


class _TokenHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    tokens: TokenServer


class TokenServer:
    """A docker token endpoint: checks basic credentials or an identity token, signs RS256 JWTs.

    The signing key and certificate come from the ``openssl`` command; the registry trusts the
    certificate through ``auth.token.rootcertbundle``.
    """

    service = "modelfs-test-registry"
    issuer = "modelfs-test-issuer"

    def __init__(self, root: Path, *, username: str, password: str) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.username = username
        self.password = password
        self.identity_token = "refresh-" + secrets.token_hex(8)
        self.cert_path, self.key_path = self_signed_certificate(
            root, "token", "modelfs test token issuer"
        )
        public_der = subprocess.run(
            ["openssl", "pkey", "-in", str(self.key_path), "-pubout", "-outform", "DER"],
            check=True,
            capture_output=True,
        ).stdout
        self._key_id = _libtrust_key_id(public_der)
        self.requests: list[TokenRequest] = []
        self._expired_left = 0
        self._lock = threading.Lock()
        self._server = _TokenHTTPServer(("127.0.0.1", 0), _TokenHandler)
        self._server.tokens = self
        self.realm = f"http://127.0.0.1:{self._server.server_address[1]}/token"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def expire_next(self, count: int = 1) -> None:
        """The next ``count`` tokens are already expired: the registry will refuse them."""
        with self._lock:
            self._expired_left = count

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self._expired_left = 0

    def handle(self, handler: _TokenHandler, query: str) -> None:
        params = urllib.parse.parse_qs(query)
        scopes = tuple(params.get("scope", []))
        username: str | None = None
        if handler.command == "POST":
            grant = "refresh_token"
            valid = params.get("refresh_token") == [self.identity_token]
            username = self.username if valid else None
        elif handler.headers.get("Authorization", "").startswith("Basic "):
            grant = "basic"
            raw = base64.b64decode(handler.headers["Authorization"][len("Basic ") :]).decode()
            username, _, password = raw.partition(":")
            valid = (username, password) == (self.username, self.password)
        else:
            grant, valid = "anonymous", True
        with self._lock:
            self.requests.append(TokenRequest(scopes, username, grant))
            expired = self._expired_left > 0
            self._expired_left -= expired
        if not valid:
            self._reply(handler, 401, {"details": "invalid credentials"})
            return
        token = self._sign(username if grant != "anonymous" else None, scopes, expired=expired)
        field_name = "access_token" if grant == "refresh_token" else "token"
        self._reply(handler, 200, {field_name: token, "expires_in": 300})

    def _sign(self, subject: str | None, scopes: tuple[str, ...], *, expired: bool) -> str:
        now = int(time.time())
        access = []
        for scope in scopes if subject else ():
            kind, name, actions = scope.split(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        claims = {
            "iss": self.issuer,
            "sub": subject or "",
            "aud": self.service,
            "exp": now - 3600 if expired else now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": secrets.token_hex(8),
            "access": access,
        }
        header = {"typ": "JWT", "alg": "RS256", "kid": self._key_id}
        signing_input = (
            _b64url(json.dumps(header).encode()) + "." + _b64url(json.dumps(claims).encode())
        )
        signature = subprocess.run(
            ["openssl", "dgst", "-sha256", "-sign", str(self.key_path)],
            input=signing_input.encode(),
            check=True,
            capture_output=True,
        ).stdout
        return signing_input + "." + _b64url(signature)

    @staticmethod
    def _reply(handler: _TokenHandler, status: int, body: dict[str, object]) -> None:
        data = json.dumps(body).encode()
        handler.send_response_only(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)


class Registry:
    """A ``docker-registry serve`` process on 127.0.0.1 with its own storage and port.

    With ``username``/``password`` it uses htpasswd (bcrypt) basic auth; with ``token_server``
    it uses docker token auth against that server (whose user it takes over).
    """

    def __init__(
        self,
        root: Path,
        *,
        username: str | None = None,
        password: str | None = None,
        token_server: TokenServer | None = None,
        tls: bool = False,
        redirect_to: str | None = None,
        client_certificate: tuple[Path, Path] | None = None,
    ) -> None:
        """``redirect_to`` (a base URL such as an ``Nginx``'s ``url``): blob GETs are answered
        with a 307 there, to the blob's path under the storage directory (``storage``).
        ``client_certificate`` (certificate, key; with ``tls``): TLS clients must present
        that certificate (self-signed: it is its own CA)."""
        self.root = root
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"{'https' if tls else 'http'}://{self.host}"
        self.tls_cert: Path | None = None
        self.client_certificate = client_certificate
        self.token_server = token_server
        if token_server is not None:
            username, password = token_server.username, token_server.password
        self.username = username
        self.password = password
        self.log_path = root / "registry.log"
        self.config_path = root / "config.yml"
        self._process: subprocess.Popen[bytes] | None = None
        self._paused = False
        self.storage = root / "storage"
        self.storage.mkdir(parents=True, exist_ok=True)
        config: dict[str, object] = {
            "version": 0.1,
            "log": {"level": "error", "accesslog": {"disabled": True}},
            "storage": {
                "filesystem": {"rootdirectory": str(root / "storage")},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {"addr": self.host, "secret": secrets.token_hex(16)},
        }
        if tls:
            self.tls_cert, key = self_signed_certificate(root)
            config["http"] = {
                "addr": self.host,
                "secret": secrets.token_hex(16),
                "tls": {
                    "certificate": str(self.tls_cert),
                    "key": str(key),
                    **({"clientcas": [str(client_certificate[0])]} if client_certificate else {}),
                },
            }
        if redirect_to is not None:
            config["middleware"] = {
                "storage": [{"name": "redirect", "options": {"baseurl": redirect_to}}]
            }
        if token_server is not None:
            config["auth"] = {
                "token": {
                    "realm": token_server.realm,
                    "service": token_server.service,
                    "issuer": token_server.issuer,
                    "rootcertbundle": str(token_server.cert_path),
                }
            }
        elif username is not None and password is not None:
            htpasswd = root / "htpasswd"
            line = subprocess.run(
                [HTPASSWD_BINARY, "-Bbn", username, password],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            htpasswd.write_text(line)
            config["auth"] = {"htpasswd": {"realm": "modelfs-test", "path": str(htpasswd)}}
        # YAML is a superset of JSON: no YAML writer needed.
        self.config_path.write_text(json.dumps(config, indent=2))

    @property
    def pid(self) -> int:
        """The running registry's process id (the benchmark reads its CPU time)."""
        assert self._process is not None, "the registry was not started"
        return self._process.pid

    @property
    def credentials(self) -> Credentials | None:
        if self.username is None or self.password is None:
            return None
        return Credentials(self.username, self.password)

    def start(self) -> None:
        if self._process is not None and self._process.poll() is None:
            return
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [REGISTRY_BINARY, "serve", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self._paused = False
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(
                    f"docker-registry exited with {self._process.returncode}: {tail}"
                )
            context = ssl._create_unverified_context()
            if self.client_certificate:
                context.load_cert_chain(*self.client_certificate)
            connection = (
                http.client.HTTPSConnection(self.host, timeout=2, context=context)
                if self.tls_cert
                else http.client.HTTPConnection(self.host, timeout=2)
            )
            try:
                connection.request("GET", "/v2/")
                if connection.getresponse().status in (200, 401):
                    return
            except OSError:
                pass
            finally:
                connection.close()
            time.sleep(0.05)
        raise RuntimeError(f"docker-registry on {self.host} did not answer /v2/ within 20 s")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if self._paused:
            process.send_signal(signal.SIGCONT)
            self._paused = False
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def pause(self) -> None:
        assert self._process is not None
        self._process.send_signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        assert self._process is not None
        self._process.send_signal(signal.SIGCONT)
        self._paused = False


@dataclass(frozen=True)
class Served:
    """One request as nginx logged it."""

    method: str
    path: str
    query: str
    status: int
    range: str | None
    connection: int  # nginx's serial number of the connection it came on
    authorization: str | None
    sent: int  # body bytes
    client_certificate: str | None  # its subject, when the client presented one


class Nginx:
    """Debian's nginx-light on 127.0.0.1 serving ``directory`` (``sendfile on``), the way object
    storage or a CDN serves blobs a registry redirects to; HTTPS with ``tls``
    (``.tls_cert``, self-signed). ``served()`` reads its access log."""

    _LOG_FIELDS = (
        "$request_method",
        "$uri",
        "$args",
        "$status",
        "$http_range",
        "$connection",
        "$http_authorization",
        "$body_bytes_sent",
        "$ssl_client_s_dn",
    )

    def __init__(
        self, root: Path, directory: Path, *, tls: bool = False, client_certs: bool = False
    ) -> None:
        """``client_certs`` (with ``tls``): ask TLS clients for a certificate (any, not
        required) and log its subject, as a storage origin doing mutual TLS would."""
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"{'https' if tls else 'http'}://{self.host}"
        self.tls_cert: Path | None = None
        self._log = root / "access.log"
        listen = f"listen 127.0.0.1:{self.port}"
        tls_lines = ""
        if tls:
            self.tls_cert, key = self_signed_certificate(root)
            listen += " ssl"
            tls_lines = f"ssl_certificate {self.tls_cert}; ssl_certificate_key {key};"
            if client_certs:
                tls_lines += " ssl_verify_client optional_no_ca;"
        log_format = '"' + "\\t".join(self._LOG_FIELDS) + '"'  # nginx reads \t as a tab
        temp = " ".join(
            f"{kind}_temp_path {root / kind};"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        self._config = root / "nginx.conf"
        self._config.write_text(
            f"""
daemon off;
master_process off;
user root;
pid {root / "nginx.pid"};
events {{ worker_connections 256; }}
http {{
    {temp}
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    default_type application/octet-stream;
    log_format fields {log_format};
    access_log {self._log} fields;
    server {{
        {listen};
        {tls_lines}
        root {directory};
    }}
}}
"""
        )
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with (self.root / "error.log").open("ab") as errors:
            self._process = subprocess.Popen(
                [NGINX_BINARY, "-p", str(self.root), "-e", "stderr", "-c", str(self._config)],
                stdout=errors,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                tail = (self.root / "error.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"nginx exited with {self._process.returncode}: {tail}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"nginx on {self.host} did not listen within 10 s")

    @property
    def pid(self) -> int:
        assert self._process is not None, "nginx was not started"
        return self._process.pid

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def __enter__(self) -> Nginx:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def served(self) -> list[Served]:
        """Every request so far: nginx writes a request's line just after its answer went
        out, so the log is read once it stopped growing for a moment."""
        size = -1
        while self._log.exists() and size != self._log.stat().st_size:
            size = self._log.stat().st_size
            time.sleep(0.1)
        if not self._log.exists():
            return []
        entries = []
        for line in self._log.read_text().splitlines():
            method, path, query, status, ranges, connection, auth, sent, client = line.split("\t")
            entries.append(
                Served(
                    method,
                    path,
                    "" if query == "-" else query,
                    int(status),
                    None if ranges == "-" else ranges,
                    int(connection),
                    None if auth == "-" else auth,
                    int(sent),
                    None if client in ("-", "") else client,
                )
            )
        return entries


@dataclass(frozen=True)
class ProxiedRequest:
    method: str
    path: str
    range: str | None
    had_authorization: bool
    headers: dict[str, str]  # as they arrived (lower-case names)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    proxy: Proxy


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 60
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        """Keep test output clean."""

    def setup(self) -> None:
        super().setup()
        self.server.proxy.connected()

    def _any(self) -> None:
        self.server.proxy.handle(self)

    do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _any


class _RedirectTargetHandler(_Handler):
    def _any(self) -> None:
        self.server.proxy.handle_redirected(self)

    do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _any


class Proxy:
    """A threaded HTTP proxy in front of a registry that counts, and on demand tampers/redirects.

    ``redirect=True`` answers blob GETs with a 307 to a second listener (another origin, like
    S3) that records whether ``Authorization`` arrived and serves the bytes itself.
    ``location_query`` is added to the Location of redirects the registry sends (as a registry
    presigning its storage's URLs would). In front of ``Nginx``, it counts requests and injects
    failures at the place blobs are redirected to.
    """

    def __init__(self, upstream: Registry | Nginx) -> None:
        self.upstream = upstream
        self.location_query = ""
        self.tamper = False
        self.tamper_manifests = False
        self.redirect = False
        self.trickle = 0.0  # when set, blob bodies go out one byte per 1/trickle seconds
        # When set, blob answers are cut once this many blob bytes went out in all: a registry
        # that goes away mid-download, and stays away.
        self.blob_budget: int | None = None
        self._closing = threading.Event()
        self.requests: list[ProxiedRequest] = []
        self.redirect_requests: list[ProxiedRequest] = []
        self.blob_bytes = 0
        self.bytes_by_blob: dict[str, int] = {}  # digest -> body bytes sent
        self.connections = 0  # accepted by either listener
        self._lock = threading.Lock()
        self._tickets: dict[str, tuple[str, str | None]] = {}
        self._expired: set[str] = set()  # tickets the redirect target refuses from now on
        self._failures: list[int] = []
        self._cut_after = 0
        self._cuts_left = 0
        self._patch_at = 0
        self._patch = b""
        self._patches_left = 0
        self._patch_digest: str | None = None
        self._held: dict[str, threading.Event] = {}
        self._servers: list[_Server] = []
        self._threads: list[threading.Thread] = []
        main = self._serve(_Handler)
        target = self._serve(_RedirectTargetHandler)
        self.port = main.server_address[1]
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        self.redirect_host = f"127.0.0.1:{target.server_address[1]}"

    def _serve(self, handler: type[_Handler]) -> _Server:
        server = _Server(("127.0.0.1", 0), handler)
        server.proxy = self
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
        thread.daemon = True
        thread.start()
        self._servers.append(server)
        self._threads.append(thread)
        return server

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self.redirect_requests.clear()
            self.blob_bytes = 0
            self.bytes_by_blob.clear()
            self.connections = 0
            self._failures.clear()
            self._cuts_left = 0
            self._patches_left = 0
            self.blob_budget = None
        self._release_held()

    def connected(self) -> None:
        with self._lock:
            self.connections += 1

    def fail_next(self, count: int, status: int = 503) -> None:
        """Answer the next ``count`` requests with ``status`` and a distribution error body."""
        with self._lock:
            self._failures.extend([status] * count)

    def cut_blobs(self, after: int, times: int = 1) -> None:
        """Drop the connection after ``after`` body bytes of the next ``times`` blob answers."""
        with self._lock:
            self._cut_after, self._cuts_left = after, times

    def patch_blobs(self, at: int, data: bytes, times: int = 1, digest: str | None = None) -> None:
        """Write ``data`` over the body of the next ``times`` blob answers (of blob ``digest``
        only, if given) from byte ``at``: an attacker on the path, or a transient fault."""
        with self._lock:
            self._patch_at, self._patch, self._patches_left = at, data, times
            self._patch_digest = digest

    def hold_blob(self, digest: str) -> threading.Event:
        """GETs of blob ``digest`` wait, before any byte of the answer, until the event returned
        is set: a registry slow to start sending one blob, at a moment the test chooses."""
        with self._lock:
            return self._held.setdefault(digest, threading.Event())

    def expire_redirects(self) -> None:
        """Every redirect given so far expires: its target answers 403, as a presigned URL
        past its expiry does (S3's "Request has expired")."""
        with self._lock:
            self._expired.update(self._tickets)
            self._tickets.clear()

    def _release_held(self) -> None:
        with self._lock:
            for event in self._held.values():
                event.set()
            self._held.clear()

    def close(self) -> None:
        self._closing.set()
        self._release_held()
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join()

    def __enter__(self) -> Proxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def blob_requests(self) -> list[ProxiedRequest]:
        return [r for r in self.requests if r.method == "GET" and _BLOB_PATH.match(r.path)]

    def _record(self, into: list[ProxiedRequest], handler: BaseHTTPRequestHandler) -> None:
        entry = ProxiedRequest(
            handler.command,
            handler.path.split("?", 1)[0],
            handler.headers.get("Range"),
            "Authorization" in handler.headers,
            {name.lower(): value for name, value in handler.headers.items()},
        )
        with self._lock:
            into.append(entry)

    def handle(self, handler: _Handler) -> None:
        self._record(self.requests, handler)
        with self._lock:
            failure = self._failures.pop(0) if self._failures else None
        if failure is not None:
            body = json.dumps(
                {"errors": [{"code": "INJECTED", "message": f"proxy answered {failure}"}]}
            ).encode()
            handler.send_response_only(failure)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body)
            return
        path = handler.path.split("?", 1)[0]
        is_blob = handler.command == "GET" and bool(_BLOB_PATH.match(path))
        if is_blob and self.redirect and self._upstream_allows(path, handler):
            ticket = secrets.token_hex(8)
            with self._lock:
                self._tickets[ticket] = (handler.path, handler.headers.get("Authorization"))
            handler.send_response_only(307)
            handler.send_header("Location", f"http://{self.redirect_host}/ticket/{ticket}")
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        with self._lock:
            held = self._held.get(path.rsplit("/", 1)[-1]) if is_blob else None
        if held is not None:
            held.wait(timeout=60)
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in _HOP_BY_HOP}
        is_manifest = handler.command == "GET" and bool(_MANIFEST_PATH.match(path))
        self._forward(
            handler,
            handler.path,
            headers,
            count=is_blob,
            tamper=self.tamper_manifests if is_manifest else self.tamper and is_blob,
        )

    def _upstream_allows(self, path: str, handler: _Handler) -> bool:
        """Whether the registry would serve this blob GET: it authorizes before redirecting."""
        upstream = http.client.HTTPConnection(self.upstream.host, timeout=60)
        try:
            headers = {"Host": self.upstream.host}
            if handler.headers.get("Authorization"):
                headers["Authorization"] = handler.headers["Authorization"]
            upstream.request("HEAD", path, headers=headers)
            return upstream.getresponse().status == 200
        except OSError:
            return False
        finally:
            upstream.close()

    def handle_redirected(self, handler: _Handler) -> None:
        self._record(self.redirect_requests, handler)
        ticket = handler.path.rsplit("/", 1)[-1]
        with self._lock:
            found = self._tickets.get(ticket)
            expired = ticket in self._expired
        if found is None:
            handler.send_error(403 if expired else 404)
            return
        path, authorization = found
        # Like a presigned URL: the ticket carries the right to read, not the client's header.
        headers = {"Host": self.upstream.host}
        if authorization:
            headers["Authorization"] = authorization
        if handler.headers.get("Range"):
            headers["Range"] = handler.headers["Range"]
        self._forward(handler, path, headers, count=True, tamper=self.tamper)

    def _forward(
        self,
        handler: _Handler,
        path: str,
        headers: dict[str, str],
        *,
        count: bool,
        tamper: bool,
    ) -> None:
        upstream = http.client.HTTPConnection(self.upstream.host, timeout=60)
        try:
            try:
                upstream.putrequest(
                    handler.command, path, skip_host=True, skip_accept_encoding=True
                )
                for key, value in headers.items():
                    upstream.putheader(key, value)
                upstream.endheaders()
                remaining = int(handler.headers.get("Content-Length") or 0)
                while remaining:
                    chunk = handler.rfile.read(min(remaining, _CHUNK))
                    if not chunk:
                        break
                    upstream.send(chunk)
                    remaining -= len(chunk)
                response = upstream.getresponse()
            except OSError:
                handler.send_error(502, "registry unreachable")
                return
            handler.send_response_only(response.status, response.reason)
            for key, value in response.getheaders():
                if key.lower() == "location" and self.location_query:
                    value += ("&" if "?" in value else "?") + self.location_query
                if key.lower() not in _HOP_BY_HOP:
                    handler.send_header(key, value)
            bodyless = handler.command == "HEAD" or response.status in (204, 304)
            if response.getheader("Content-Length") is None and not bodyless:
                handler.send_header("Connection", "close")
                handler.close_connection = True
            handler.end_headers()
            if bodyless:
                return
            # A blob by its digest, whatever the query (a mirror client sends ?ns=registry).
            blob = path.split("?", 1)[0].rsplit("/", 1)[-1] if count else None
            self._copy_body(response, handler, counted_as=blob, tamper=tamper)
        except (BrokenPipeError, ConnectionResetError):
            handler.close_connection = True
        finally:
            upstream.close()

    def _copy_body(
        self,
        response: http.client.HTTPResponse,
        handler: _Handler,
        *,
        counted_as: str | None,
        tamper: bool,
    ) -> None:
        limit = None
        patch = b""
        if counted_as is not None:
            with self._lock:
                if self._cuts_left:
                    self._cuts_left -= 1
                    limit = self._cut_after
                if self.blob_budget is not None:
                    left = max(0, self.blob_budget - self.blob_bytes)
                    limit = left if limit is None else min(limit, left)
                if self._patches_left and self._patch_digest in (None, counted_as):
                    self._patches_left -= 1
                    patch = self._patch
                patch_at = self._patch_at
        sent = 0
        while chunk := response.read1(_CHUNK):
            if patch:
                chunk = _patched(chunk, sent, patch, patch_at)
            if limit is not None and sent + len(chunk) > limit:
                # A broken connection: the announced Content-Length is never reached.
                handler.wfile.write(chunk[: limit - sent])
                handler.close_connection = True
                return
            sent += len(chunk)
            if counted_as is not None:
                with self._lock:
                    self.blob_bytes += len(chunk)
                    self.bytes_by_blob[counted_as] = self.bytes_by_blob.get(counted_as, 0) + len(
                        chunk
                    )
            if tamper:
                # Same length, different bytes: only a digest check can notice.
                chunk = bytes([chunk[0] ^ 0x01]) + chunk[1:]
            if counted_as is not None and self.trickle:
                self._trickle(chunk, handler)
                return
            handler.wfile.write(chunk)

    def _trickle(self, chunk: bytes, handler: _Handler) -> None:
        """A registry that answers at once, then sends the body a byte at a time, for ever."""
        handler.close_connection = True
        for byte in chunk:
            if self._closing.wait(1 / self.trickle):
                return
            handler.wfile.write(bytes([byte]))
            handler.wfile.flush()


def _patched(chunk: bytes, chunk_at: int, patch: bytes, patch_at: int) -> bytes:
    """``chunk`` (at ``chunk_at`` in its body) with the part of ``patch`` that falls in it."""
    start, end = max(patch_at, chunk_at), min(patch_at + len(patch), chunk_at + len(chunk))
    if start >= end:
        return chunk
    return (
        chunk[: start - chunk_at]
        + patch[start - patch_at : end - patch_at]
        + chunk[end - chunk_at :]
    )


@dataclass(frozen=True)
class Layer:
    media_type: str
    data: bytes | Path
    annotations: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class _Blob:
    digest: str
    size: int
    source: bytes | Path


def _describe(data: bytes | Path) -> _Blob:
    if isinstance(data, bytes):
        return _Blob("sha256:" + hashlib.sha256(data).hexdigest(), len(data), data)
    digest = hashlib.sha256()
    with data.open("rb") as file:
        while chunk := file.read(4 * _CHUNK):
            digest.update(chunk)
    return _Blob("sha256:" + digest.hexdigest(), data.stat().st_size, data)


async def _chunks(source: bytes | Path) -> AsyncIterator[bytes]:
    if isinstance(source, bytes):
        for start in range(0, len(source), 4 * _CHUNK):
            yield source[start : start + 4 * _CHUNK]
    else:
        async with await trio.open_file(source, "rb") as file:
            while chunk := await file.read(4 * _CHUNK):
                yield chunk


async def _piece_hashes(source: bytes | Path) -> BlobPieces:
    hasher = PieceHasher(DEFAULT_PIECE_SIZE)
    async for chunk in _chunks(source):
        hasher.update(chunk)
    return hasher.finish()


def push_artifact(
    host: str,
    repository: str,
    tag: str,
    layers: list[Layer],
    *,
    config: bytes = b"{}",
    config_media_type: str = MODEL_CONFIG,
    artifact_type: str | None = MODEL_ARTIFACT_TYPE,
    annotations: dict[str, str] | None = None,
    credentials: Credentials | None = None,
    piece_index: bool = True,
) -> str:
    """Push an OCI manifest with these layers over plain HTTP; returns the manifest digest.

    With ``piece_index`` its piece index is published too, as ``modelfs push`` does."""
    config_blob = _describe(config)
    blobs = [_describe(layer.data) for layer in layers]
    manifest: dict[str, object] = {"schemaVersion": 2, "mediaType": OCI_MANIFEST}
    if artifact_type:
        manifest["artifactType"] = artifact_type
    manifest["config"] = {
        "mediaType": config_media_type,
        "digest": config_blob.digest,
        "size": config_blob.size,
    }
    manifest["layers"] = [
        {
            "mediaType": layer.media_type,
            "digest": blob.digest,
            "size": blob.size,
            **({"annotations": layer.annotations} if layer.annotations else {}),
        }
        for layer, blob in zip(layers, blobs, strict=True)
    ]
    if annotations:
        manifest["annotations"] = annotations
    body = json.dumps(manifest, indent=2).encode()

    async def push() -> str:
        async with RegistryClient(host, plain_http=True, credentials=credentials) as client:
            repo = client.repository(repository)
            for blob in [config_blob, *blobs]:
                await repo.push_blob(blob.digest, blob.size, _chunks(blob.source))
            digest = await repo.push_manifest(tag, OCI_MANIFEST, body)
            if piece_index:
                pieces = {blob.digest: await _piece_hashes(blob.source) for blob in blobs}
                index = PieceIndex(digest, DEFAULT_PIECE_SIZE, pieces)
                await publish_index(repo, FetchedManifest(digest, OCI_MANIFEST, body), index)
            return digest

    return trio.run(push)


def isolated_docker_config(directory: Path) -> Path:
    """Point DOCKER_CONFIG at an empty directory so tests never read the user's logins."""
    directory.mkdir(parents=True, exist_ok=True)
    os.environ["DOCKER_CONFIG"] = str(directory)
    return directory


@dataclass(frozen=True)
class ProxyRequest:
    """One request an ``HttpProxy`` got: ``CONNECT host:port``, or a forwarded one."""

    method: str
    target: str
    headers: dict[str, str]


class HttpProxy:
    """A forward HTTP proxy on 127.0.0.1, as a corporate network runs (issue 23): ``CONNECT``
    tunnels (bytes relayed unread), and absolute-form requests forwarded with keep-alive. It
    records every request with its headers; with ``credentials`` it answers 407 without them."""

    def __init__(self, credentials: tuple[str, str] | None = None) -> None:
        self.requests: list[ProxyRequest] = []
        self._lock = threading.Lock()
        self._expected = (
            None
            if credentials is None
            else "Basic " + base64.b64encode(":".join(credentials).encode()).decode()
        )
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_CONNECT(self) -> None:
                if owner._admit(self):
                    owner._tunnel(self)

            def _any(self) -> None:
                if owner._admit(self):
                    owner._forward(self)

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = _any

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def _admit(self, handler: BaseHTTPRequestHandler) -> bool:
        with self._lock:
            self.requests.append(ProxyRequest(handler.command, handler.path, dict(handler.headers)))
        if self._expected is None or handler.headers.get("Proxy-Authorization") == self._expected:
            return True
        handler.send_response(407)
        handler.send_header("Proxy-Authenticate", 'Basic realm="proxy"')
        handler.send_header("Content-Length", "0")
        handler.end_headers()
        return False

    def _tunnel(self, handler: BaseHTTPRequestHandler) -> None:
        host, _, port = handler.path.rpartition(":")
        try:
            upstream = socket.create_connection((host, int(port)), timeout=30)
        except OSError:
            handler.send_error(502)
            return
        handler.send_response(200, "Connection established")
        handler.end_headers()
        handler.wfile.flush()
        client = handler.connection
        sockets = [client, upstream]
        try:
            with selectors.DefaultSelector() as selector:
                for sock in sockets:
                    selector.register(sock, selectors.EVENT_READ)
                while True:
                    for key, _ in selector.select(timeout=30):
                        sock = key.fileobj
                        assert isinstance(sock, socket.socket)
                        data = sock.recv(_CHUNK)
                        if not data:
                            return
                        (upstream if sock is client else client).sendall(data)
        except OSError:
            pass
        finally:
            upstream.close()
            handler.close_connection = True

    def _forward(self, handler: BaseHTTPRequestHandler) -> None:
        target = urllib.parse.urlsplit(handler.path)
        if target.scheme != "http" or not target.netloc:
            handler.send_error(400, "absolute-form http:// requests only")
            return
        upstream = http.client.HTTPConnection(target.netloc, timeout=60)
        try:
            path = target.path + (f"?{target.query}" if target.query else "")
            headers = {k: v for k, v in handler.headers.items() if k.lower() not in _HOP_BY_HOP}
            length = int(handler.headers.get("Content-Length") or 0)
            body = handler.rfile.read(length) if length else None
            upstream.request(handler.command, path, body=body, headers=headers)
            response = upstream.getresponse()
            handler.send_response_only(response.status, response.reason)
            for key, value in response.getheaders():
                if key.lower() not in _HOP_BY_HOP:
                    handler.send_header(key, value)
            if response.getheader("Content-Length") is None:
                handler.send_header("Connection", "close")
                handler.close_connection = True
            handler.end_headers()
            if handler.command != "HEAD":
                while chunk := response.read1(_CHUNK):
                    handler.wfile.write(chunk)
        except OSError:
            handler.close_connection = True
        finally:
            upstream.close()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def __enter__(self) -> HttpProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
