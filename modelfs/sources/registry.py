"""The OCI distribution client: one registry host, its TLS, the docker auth flow, retries.

Every call is bounded in time: the attempts run inside one trio cancel scope, so a registry
that stops answering gives ``RegistryUnavailableError`` instead of a hang. Blob bytes are
streamed; nothing large is ever held whole in memory.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import ssl
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Sequence,
)
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import partial
from types import TracebackType
from typing import Any, TypeVar

import httpx
import trio
from httpcore._async.http11 import AsyncHTTP11Connection

from modelfs.errors import (
    AuthError,
    IntegrityError,
    ManifestError,
    NotFoundError,
    RegistryError,
    RegistryUnavailableError,
)
from modelfs.modelpack import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    MANIFEST_ACCEPT,
    OCI_INDEX,
    OCI_MANIFEST,
)
from modelfs.pieces import DEFAULT_PIECE_SIZE
from modelfs.sources.credentials import (
    Challenge,
    Credentials,
    load_credentials,
    parse_challenge,
    token_from_response,
)
from modelfs.sources.hosts import RegistryHost, server_host
from modelfs.sources.interface import BlobBytes, Deliver, FetchedManifest, read_as_run
from modelfs.sources.proxy import ProxyRoute, environment_proxy, parse_proxy_url
from modelfs.sources.rangeget import (
    Origin,
    RangeGetter,
    Redirected,
    Refused,
    WholeBlob,
    parse_content_range,
)
from modelfs.sources.redirects import BlobLocations, Location
from modelfs.sources.stats import MIRROR, REGISTRY, MountStats, mark_served_by
from modelfs.untrusted import loads_json

log = logging.getLogger(__name__)

T = TypeVar("T")

MANIFEST_LIMIT = 4 * 1024 * 1024
# The most a piece may take to arrive (a 4 MiB piece: at least ~70 KB/s), retries included.
DEFAULT_READ_TIMEOUT = 60.0
MAX_BLOB_OFFSET = 1 << 63
_ERROR_BODY_LIMIT = 64 * 1024
_TOKEN_BODY_LIMIT = 1024 * 1024
_MAX_REDIRECTS = 5
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_MANIFEST_TYPES = frozenset({OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST})
_USER_AGENT = "modelfs/0.1"

# httpcore reads the socket 64 KiB at a time. Piece bodies are 4 MiB: reading 1 MiB at a time
# means a sixteenth of the recv calls, h11 events and GIL hand-offs (measured ~1.5x the MB/s
# here, lazy-loading.md). httpcore has no per-client setting for it, hence the class attribute.
SOCKET_READ_SIZE = 1 << 20
AsyncHTTP11Connection.READ_NUM_BYTES = SOCKET_READ_SIZE
# The piece fetcher keeps up to 8 range GETs in flight; keep that many connections (and some
# for manifests, tokens and pushes) open between requests rather than reconnecting.
_CONNECTION_LIMITS = httpx.Limits(max_connections=32, max_keepalive_connections=16)
# Places blobs were redirected to whose kept-alive connections stay open (a CDN may spread one
# model's blobs over a few hosts).
_REDIRECT_ORIGINS = 8


class _TransientError(Exception):
    """An answer worth retrying (5xx, 429, a short body): the message says what happened."""


class HostUnreachableError(RegistryUnavailableError):
    """No attempt got an answer (connections refused, broken or timed out), as against answers
    that were errors: a mirror so is down, not only wrong about one thing."""


class RangeIgnoredError(RegistryError):
    """The registry answered a range with the whole blob (its body left unread): a pull-through
    cache does while it fills the blob from upstream (``modelfs.sources.mirrors``)."""


def _backoff(attempt: int) -> float:
    return float(min(0.2 * 2 ** (attempt - 1), 2.0))


# How long a range the registry failed to deliver in time is not asked for again: the kernel
# retries a failed read at once, a page at a time, and each would wait the whole deadline.
LATE_MEMORY = 5.0


class LateRanges:
    """Ranges of blobs the registry did not deliver within the read deadline, for a while."""

    def __init__(self, memory: float = LATE_MEMORY) -> None:
        self._memory = memory
        self._late: dict[str, tuple[float, int, int]] = {}  # digest -> (when, start, end)

    def note(self, digest: str, start: int, end: int, now: float) -> None:
        self._late[digest] = (now, start, end)

    def is_late(self, digest: str, start: int, end: int, now: float) -> bool:
        """Whether [start, end) overlaps a range of ``digest`` found late in the last while."""
        when, late_start, late_end = self._late.get(digest, (-math.inf, 0, 0))
        return now - when < self._memory and start < late_end and late_start < end


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def registry_message(body: bytes) -> str:
    """The ``errors`` of a distribution error body as ``CODE: message``; '' when there are none."""
    try:
        answer = loads_json(body)  # bounded: nesting, numbers
    except ValueError:
        return ""
    errors = answer.get("errors") if isinstance(answer, dict) else None
    if not isinstance(errors, list):
        return ""
    parts = []
    for error in errors:
        if isinstance(error, dict):
            code, message = error.get("code", ""), error.get("message", "")
            parts.append(f"{code}: {message}" if code and message else str(code or message))
    # One line, whatever the registry put in its messages.
    return " ".join("; ".join(part for part in parts if part).split())


def manifest_media_type(content_type: str | None, data: bytes) -> str:
    """The manifest's media type: the Content-Type if it names one, else the body's mediaType."""
    header = (content_type or "").split(";", 1)[0].strip()
    if header in _MANIFEST_TYPES:
        return header
    try:
        declared = loads_json(data).get("mediaType")
    except (ValueError, AttributeError):
        declared = None
    return declared if isinstance(declared, str) and declared else header or OCI_MANIFEST


class SystemTrust(ssl.SSLContext):
    """A TLS client context that loads the system's CA certificates when it first connects.

    Loading them takes ~45 ms here, on the way to a mount's listing, and a plain-HTTP registry
    (or a remount from the cache) may never connect over TLS at all.
    """

    _trust_loaded = False

    def _load_trust(self) -> None:
        if not self._trust_loaded:
            self.load_default_certs()
            self._trust_loaded = True

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        self._load_trust()
        return super().wrap_socket(*args, **kwargs)

    def wrap_bio(self, *args: Any, **kwargs: Any) -> ssl.SSLObject:
        self._load_trust()
        return super().wrap_bio(*args, **kwargs)


def _ssl_context(verify: ssl.SSLContext | bool) -> ssl.SSLContext:
    if isinstance(verify, ssl.SSLContext):
        return verify
    unchecked = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # --insecure: as httpx's verify=False
    unchecked.check_hostname = False
    unchecked.verify_mode = ssl.CERT_NONE
    return unchecked


def host_tls(host: RegistryHost, insecure: bool, *, client: bool) -> ssl.SSLContext:
    """The TLS context for ``host``: the system's CAs (not certifi's bundle, as docker and oras
    use) and its hosts.toml ``ca`` files, unchecked with ``insecure`` or ``skip_verify``; with
    ``client``, its first ``client`` certificate too."""
    verify = False if insecure or host.skip_verify else SystemTrust(ssl.PROTOCOL_TLS_CLIENT)
    tls = _ssl_context(verify)
    try:
        for ca in host.ca:
            tls.load_verify_locations(cafile=ca)
        for certificate, key in host.client[:1] if client else ():
            tls.load_cert_chain(certificate, key)
    except (OSError, ssl.SSLError) as error:
        raise RegistryError(
            f"the TLS files of registry host {host.netloc} do not load ({error}): fix ca or "
            "client in its hosts.toml"
        ) from None
    return tls


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    return (url.scheme, url.host, url.port)


def _connection_origin(
    url: httpx.URL,
    tls: ssl.SSLContext,
    proxy: ProxyRoute | None = None,
    headers: tuple[tuple[str, str], ...] = (),
    dial_timeout: float | None = None,
) -> Origin:
    """Where the lean path connects for ``url`` (http or https), through ``proxy`` if any."""
    https = url.scheme == "https"
    return Origin(
        host=url.host,
        port=url.port or (443 if https else 80),
        ssl_context=tls if https else None,
        host_header=url.netloc.decode("ascii"),
        proxy=proxy,
        headers=headers,
        dial_timeout=dial_timeout,
    )


def _describe_transport_error(error: httpx.TransportError) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


async def _read_limited(response: httpx.Response, limit: int) -> bytes | None:
    """The body, or None as soon as it grows past ``limit`` (the rest is never read)."""
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


class RegistryClient:
    """One registry host: TLS, auth, retries. ``async with RegistryClient(...) as client:``."""

    def __init__(
        self,
        host: str,
        *,
        plain_http: bool = False,
        insecure: bool = False,
        credentials: Credentials | None = None,
        timeout: float = 30.0,
        retries: int = 3,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
        endpoint: RegistryHost | None = None,
    ) -> None:
        """``endpoint``: where the API answers and how to reach it (a hosts.toml host: a
        mirror, or the server); by default ``host`` itself, by ``plain_http`` and ``insecure``."""
        self.endpoint = server_host(host, plain_http) if endpoint is None else endpoint
        self.host = self.endpoint.netloc
        self.base_url = httpx.URL(f"{self.endpoint.scheme}://{self.endpoint.netloc}")
        self.timeout = timeout
        self.retries = retries
        self.read_timeout = read_timeout
        self.late = LateRanges()
        self._insecure = insecure
        self._credentials = credentials
        self._credentials_loaded = credentials is not None
        self._http: httpx.AsyncClient | None = None
        self._http_elsewhere: httpx.AsyncClient | None = None
        self._range_getter: RangeGetter | None = None
        self._tls_elsewhere: ssl.SSLContext | None = None  # set on entry: other origins' TLS
        self._locations = BlobLocations()
        self._redirect_getters: dict[tuple[str, str, int | None], RangeGetter] = {}
        self._basic = False
        self._bearer: Challenge | None = None
        self._tokens: dict[str | None, str] = {}
        self._token_lock = trio.Lock()

    async def __aenter__(self) -> RegistryClient:
        endpoint = self.endpoint
        tls = host_tls(endpoint, self._insecure, client=True)
        # Other origins (storage blobs were redirected to, a token realm) are trusted as this
        # host is (containerd's one transport per host does so), but they never get its
        # client certificate, nor its hosts.toml headers and proxy: those are for it alone.
        self._tls_elsewhere = (
            host_tls(endpoint, self._insecure, client=False) if endpoint.client else tls
        )
        self._http = self._new_http(tls, endpoint.headers, endpoint.proxy, endpoint.dial_timeout)
        self._http_elsewhere = self._new_http(self._tls_elsewhere, (), None, None)
        self._range_getter = RangeGetter(
            _connection_origin(
                self.base_url,
                tls,
                self._proxy_route(self.base_url),
                endpoint.headers,
                endpoint.dial_timeout,
            ),
            _USER_AGENT,
            self.timeout,
        )
        return self

    def _new_http(
        self,
        tls: ssl.SSLContext,
        headers: tuple[tuple[str, str], ...],
        proxy: str | None,
        dial_timeout: float | None,
    ) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            verify=tls,
            timeout=httpx.Timeout(self.timeout, connect=dial_timeout or self.timeout),
            follow_redirects=False,
            headers=[("User-Agent", _USER_AGENT), ("Accept-Encoding", "identity"), *headers],
            limits=_CONNECTION_LIMITS,
            # hosts.toml's proxy for this host overrides the environment's, as in containerd;
            # None: the environment's (HTTPS_PROXY, NO_PROXY).
            proxy=proxy,
        )

    def _proxy_route(self, url: httpx.URL) -> ProxyRoute | None:
        """The proxy the lean path goes through to ``url``: this host's hosts.toml ``proxy``,
        else the environment's (``HTTPS_PROXY``, ``HTTP_PROXY``, ``NO_PROXY``)."""
        if self.endpoint.proxy and _origin(url) == _origin(self.base_url):
            return parse_proxy_url(self.endpoint.proxy)
        named = environment_proxy(url.scheme, url.netloc.decode("ascii"), os.environ)
        return None if named is None else parse_proxy_url(named)

    def api_url(self, path: str) -> httpx.URL:
        """``path`` under the API root (``/v2/`` + path), with ``ns`` for a mirror."""
        url = self.base_url.join(f"{self.endpoint.api_root.rstrip('/')}/{path}")
        namespace = self.endpoint.namespace
        return url if namespace is None else url.copy_add_param("ns", namespace)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._range_getter is not None:
            await self._range_getter.aclose()
            self._range_getter = None
        getters, self._redirect_getters = self._redirect_getters, {}
        for getter in getters.values():
            await getter.aclose()
        for http in (self._http, self._http_elsewhere):
            if http is not None:
                await http.aclose()
        self._http = self._http_elsewhere = None

    def repository(self, name: str) -> RegistryRepository:
        return RegistryRepository(self, name)

    async def ping(self) -> None:
        """GET /v2/ through the auth flow: proves the registry answers and accepts the login."""
        what = "the API check (/v2/)"

        async def attempt() -> None:
            async with self.request("GET", self.api_url(""), None, what=what):
                pass

        await self.retrying(what, attempt)

    async def read_run_plainly(
        self,
        url: httpx.URL,
        scope: str | None,
        start: int,
        lengths: Sequence[int],
        deliver: Deliver,
    ) -> tuple[int, bytearray]:
        """Consecutive pieces from ``start`` at ``url`` by the lean path, each into ``deliver``:
        how many came, and what came of the next (the general path goes on from there).

        A blob the registry redirected is read where it was sent while that place is good."""
        if self._range_getter is None or _origin(url) != _origin(self.base_url):
            return 0, bytearray()
        blob = str(url)
        kept = self._locations.get(blob, trio.current_time())
        if kept is not None:
            try:
                return await self._read_run_at(kept, scope, start, lengths, deliver)
            except (Redirected, Refused):
                self._locations.forget(blob, kept)  # expired or revoked: ask the registry again
        authorization = await self._authorization(scope)
        path = url.raw_path.decode("ascii")
        try:
            return await self._range_getter.get_run(path, authorization, start, lengths, deliver)
        except Refused:
            return 0, bytearray()  # the general path answers challenges and reports refusals
        except Redirected as redirect:
            location = redirect.location
        kept = self._locations.keep(blob, str(url.join(location)), trio.current_time(), time.time())
        try:
            return await self._read_run_at(kept, scope, start, lengths, deliver)
        except (Redirected, Refused):
            self._locations.forget(blob, kept)
            return 0, bytearray()  # a fresh location refused: the general path reports it

    async def _read_run_at(
        self,
        location: Location,
        scope: str | None,
        start: int,
        lengths: Sequence[int],
        deliver: Deliver,
    ) -> tuple[int, bytearray]:
        """A run of pieces from where a blob was redirected: on connections to that place, and
        with the registry's Authorization only if that place is the registry itself."""
        url = httpx.URL(location.url)
        target = url.raw_path.decode("ascii")
        if _origin(url) == _origin(self.base_url):
            assert self._range_getter is not None
            authorization = await self._authorization(scope)
            return await self._range_getter.get_run(target, authorization, start, lengths, deliver)
        if url.scheme not in ("http", "https"):
            return 0, bytearray()
        getter = await self._redirect_getter(url)
        return await getter.get_run(target, None, start, lengths, deliver)

    async def _redirect_getter(self, url: httpx.URL) -> RangeGetter:
        """Kept-alive connections to a place blobs were redirected to; the least recently used
        place beyond ``_REDIRECT_ORIGINS`` is let go (its idle connections close)."""
        key = _origin(url)
        getter = self._redirect_getters.pop(key, None)
        if getter is None:
            assert self._tls_elsewhere is not None, "RegistryClient used outside `async with`"
            origin = _connection_origin(url, self._tls_elsewhere, self._proxy_route(url))
            getter = RangeGetter(origin, _USER_AGENT, self.timeout)
        self._redirect_getters[key] = getter  # most recent last
        while len(self._redirect_getters) > _REDIRECT_ORIGINS:
            oldest = next(iter(self._redirect_getters))
            await self._redirect_getters.pop(oldest).aclose()
        return getter

    def _client_for(self, url: httpx.URL) -> httpx.AsyncClient:
        """The client for requests to ``url``: this host's (its client certificate, hosts.toml
        headers and proxy) for its own origin, another without them for any other."""
        http = self._http if _origin(url) == _origin(self.base_url) else self._http_elsewhere
        if http is None:
            raise RuntimeError("RegistryClient used outside `async with`")
        return http

    # --- time bound and retries ------------------------------------------------------------

    async def retrying(self, what: str, attempt: Callable[[], Awaitable[T]]) -> T:
        """Run ``attempt`` up to ``retries + 1`` times, all within one deadline."""
        deadline = self.timeout * (self.retries + 1) + sum(
            _backoff(n) for n in range(1, self.retries + 1)
        )
        last = "no attempt finished"
        failure: type[RegistryUnavailableError] = HostUnreachableError  # until one answers
        with trio.move_on_after(deadline):
            for number in range(self.retries + 1):
                if number:
                    await trio.sleep(_backoff(number))
                try:
                    return await attempt()
                except _TransientError as error:
                    last = str(error)
                    failure = RegistryUnavailableError
                except httpx.TransportError as error:
                    self._raise_if_tls_failure(error)
                    last = _describe_transport_error(error)
                log.debug("%s: attempt %d failed: %s", what, number + 1, last)
            raise failure(
                f"registry {self.host} failed {what} after {self.retries + 1} attempts "
                f"({last}): check that it is running and reachable, then retry"
            )
        raise failure(
            f"registry {self.host} did not finish {what} within {deadline:.0f} s ({last}): "
            "check that it is running and reachable, then retry"
        )

    def _raise_if_tls_failure(self, error: httpx.TransportError) -> None:
        """A TLS failure will not heal by retrying: say which flag the user probably needs."""
        cause: BaseException | None = error
        while cause is not None and not isinstance(cause, ssl.SSLError):
            cause = cause.__cause__ or cause.__context__
        if isinstance(cause, ssl.SSLError):
            raise RegistryError(
                f"TLS with registry {self.host} failed ({cause.reason or cause}): if it serves "
                "plain HTTP pass --plain-http; if its certificate is self-signed pass --insecure"
            ) from error

    # --- requests through auth and redirects -----------------------------------------------

    @asynccontextmanager
    async def request(
        self,
        method: str,
        url: httpx.URL,
        scope: str | None,
        *,
        what: str,
        headers: dict[str, str] | None = None,
        content: bytes | AsyncIterable[bytes] | None = None,
        allow: frozenset[int] = frozenset(),
    ) -> AsyncIterator[httpx.Response]:
        """An open, streamed response with a 2xx status (or one in ``allow``); closed on exit."""
        response = await self.open(
            method, url, scope, what=what, headers=headers, content=content, allow=allow
        )
        try:
            yield response
        finally:
            await response.aclose()

    async def open(
        self,
        method: str,
        url: httpx.URL,
        scope: str | None,
        *,
        what: str,
        headers: dict[str, str] | None = None,
        content: bytes | AsyncIterable[bytes] | None = None,
        allow: frozenset[int] = frozenset(),
    ) -> httpx.Response:
        """Like ``request`` but the caller closes the response (for streams that outlive it)."""
        response = await self._exchange(method, url, scope, headers or {}, content, what)
        try:
            await self._check_status(response, what, allow)
        except BaseException:
            await response.aclose()
            raise
        return response

    async def _exchange(
        self,
        method: str,
        url: httpx.URL,
        scope: str | None,
        headers: dict[str, str],
        content: bytes | AsyncIterable[bytes] | None,
        what: str,
    ) -> httpx.Response:
        response = await self._send_authorized(method, url, scope, headers, content, what)
        for _ in range(_MAX_REDIRECTS):
            if response.status_code not in _REDIRECT_STATUSES or method not in ("GET", "HEAD"):
                return response
            await response.aclose()
            location = response.headers.get("Location")
            if not location:
                raise RegistryError(
                    f"registry {self.host} redirected {what} without a Location header"
                )
            target = response.url.join(location)
            if _origin(target) == _origin(self.base_url):
                response = await self._send_authorized(method, target, scope, headers, None, what)
            else:
                # Another origin (a CDN, S3): the registry's Authorization must never go there.
                elsewhere = self._client_for(target)
                request = elsewhere.build_request(method, target, headers=headers)
                response = await elsewhere.send(request, stream=True)
        await response.aclose()
        raise RegistryError(
            f"registry {self.host} redirected {what} more than {_MAX_REDIRECTS} times"
        )

    async def _send_authorized(
        self,
        method: str,
        url: httpx.URL,
        scope: str | None,
        headers: dict[str, str],
        content: bytes | AsyncIterable[bytes] | None,
        what: str,
    ) -> httpx.Response:
        """Send with the best authorization known; on 401 answer the challenge and resend.

        An anonymous request is answered once (basic credentials or a first token) and a
        refused token is refreshed once; anything refused after that is an AuthError.
        """
        anonymous_answered = token_refreshed = False
        while True:
            authorization = await self._authorization(scope)
            http = self._client_for(url)
            request = http.build_request(method, url, headers=headers, content=content)
            if authorization:
                request.headers["Authorization"] = authorization
            response = await http.send(request, stream=True)
            if response.status_code != 401:
                return response
            header = response.headers.get("WWW-Authenticate", "")
            await response.aclose()
            replayable = content is None or isinstance(content, bytes)
            if authorization is None and not anonymous_answered and replayable:
                anonymous_answered = True
            elif (authorization or "").startswith("Bearer ") and not token_refreshed and replayable:
                token_refreshed = True
            else:
                raise await self._auth_failure(what)
            await self._answer_challenge(parse_challenge(header), scope, authorization, what)

    async def _credentials_for_host(self) -> Credentials | None:
        if not self._credentials_loaded:
            # Credential helpers are subprocesses: keep them off the event loop.
            self._credentials = await trio.to_thread.run_sync(load_credentials, self.host)
            self._credentials_loaded = True
        return self._credentials

    async def _authorization(self, scope: str | None) -> str | None:
        if self._basic:
            creds = await self._credentials_for_host()
            return creds.basic_header() if creds else None
        token = self._tokens.get(scope)
        if token is None and self._bearer is not None:
            # The registry uses tokens: ask for this scope's token before the first request.
            token = await self._refresh_token(scope, None)
        return f"Bearer {token}" if token else None

    async def _answer_challenge(
        self, challenge: Challenge, scope: str | None, sent: str | None, what: str
    ) -> None:
        if challenge.scheme == "basic":
            if await self._credentials_for_host() is None:
                raise await self._auth_failure(what)
            self._basic = True
        elif challenge.scheme == "bearer":
            if "realm" not in challenge.params:
                raise AuthError(
                    f"registry {self.host} sent a Bearer challenge without a realm for {what}"
                )
            self._bearer = challenge
            await self._refresh_token(scope, sent)
        else:
            raise AuthError(
                f"registry {self.host} asked for unsupported authentication "
                f"{challenge.scheme or '(none)'!r} for {what}"
            )

    async def _refresh_token(self, scope: str | None, rejected: str | None) -> str:
        """Fetch a token for ``scope`` unless another task already replaced the rejected one."""
        async with self._token_lock:
            current = self._tokens.get(scope)
            if current is not None and f"Bearer {current}" != rejected:
                return current
            token = await self._fetch_token(scope)
            self._tokens[scope] = token
            return token

    async def _fetch_token(self, scope: str | None) -> str:
        assert self._bearer is not None
        params = self._bearer.params
        realm = httpx.URL(params["realm"])
        query: dict[str, str] = {}
        if params.get("service"):
            query["service"] = params["service"]
        wanted = scope or params.get("scope")
        if wanted:
            query["scope"] = wanted
        creds = await self._credentials_for_host()
        what = f"a token from {realm} for {wanted or 'the registry'}"
        http = self._client_for(realm)
        if creds is not None and creds.is_identity_token:
            # docker's OAuth2 flow: the stored identity token is a refresh token.
            form = {
                **query,
                "grant_type": "refresh_token",
                "refresh_token": creds.password,
                "client_id": "modelfs",
            }
            request = http.build_request("POST", realm, data=form)
        else:
            request = http.build_request("GET", realm, params=query)
            if creds is not None:
                request.headers["Authorization"] = creds.basic_header()
        response = await http.send(request, stream=True)
        try:
            if response.status_code in (401, 403):
                raise await self._auth_failure(what)
            await self._check_status(response, what, frozenset())
            body = await _read_limited(response, _TOKEN_BODY_LIMIT)
        finally:
            await response.aclose()
        token = token_from_response(body or b"")
        if token is None:
            raise AuthError(f"the token server {realm} of {self.host} sent no token for {wanted}")
        return token

    async def _auth_failure(self, what: str) -> AuthError:
        if await self._credentials_for_host() is None:
            return AuthError(
                f"registry {self.host} requires authentication for {what}: "
                f"run `modelfs login {self.host}`"
            )
        return AuthError(
            f"registry {self.host} rejected the credentials for {what}: check them with "
            f"`modelfs login {self.host}` and that the account may access it"
        )

    async def _check_status(
        self, response: httpx.Response, what: str, allow: frozenset[int]
    ) -> None:
        status = response.status_code
        if 200 <= status < 300 or status in allow:
            return
        if status == 429 or status >= 500:
            raise _TransientError(f"HTTP {status} for {what}")
        body = await _read_limited(response, _ERROR_BODY_LIMIT)
        detail = registry_message(body or b"")
        suffix = f" ({detail})" if detail else ""
        if status == 404:
            raise NotFoundError(
                f"{what} not found on registry {self.host}{suffix}: check the name, tag and digest"
            )
        raise RegistryError(f"registry {self.host} refused {what}: HTTP {status}{suffix}")


class RegistryRepository:
    """One repository of a registry; implements ``modelfs.sources.interface.BlobSource``."""

    def __init__(self, client: RegistryClient, repository: str) -> None:
        self._client = client
        self.repository = repository
        self._pull = f"repository:{repository}:pull"
        self._push = f"repository:{repository}:pull,push"

    @property
    def name(self) -> str:
        return f"{self._client.host}/{self.repository}"

    @property
    def client(self) -> RegistryClient:
        return self._client

    def _url(self, path: str) -> httpx.URL:
        return self._client.api_url(f"{self.repository}/{path}")

    async def get_manifest(self, selector: str) -> FetchedManifest:
        pinned = selector.startswith("sha256:")
        what = f"manifest {self.name}{'@' if pinned else ':'}{selector}"

        async def attempt() -> tuple[str | None, str | None, bytes | None]:
            async with self._client.request(
                "GET",
                self._url(f"manifests/{selector}"),
                self._pull,
                what=what,
                headers={"Accept": MANIFEST_ACCEPT},
            ) as response:
                data = await _read_limited(response, MANIFEST_LIMIT)
                return (
                    response.headers.get("Content-Type"),
                    response.headers.get("Docker-Content-Digest"),
                    data,
                )

        content_type, announced, data = await self._client.retrying(what, attempt)
        if data is None:
            raise ManifestError(f"{what} is larger than {MANIFEST_LIMIT} bytes: refusing it")
        digest = sha256_digest(data)
        expected = selector if pinned else announced
        if expected and expected.startswith("sha256:") and expected != digest:
            raise IntegrityError(
                f"{what} has digest {digest}, not {expected}: the registry or a proxy altered it"
            )
        return FetchedManifest(digest, manifest_media_type(content_type, data), data)

    async def get_blob(self, digest: str, max_size: int) -> bytes:
        what = f"blob {digest} of {self.name}"

        async def attempt() -> bytes | None:
            async with self._client.request(
                "GET", self._url(f"blobs/{digest}"), self._pull, what=what
            ) as response:
                return await _read_limited(response, max_size)

        data = await self._client.retrying(what, attempt)
        if data is None:
            raise ManifestError(f"{what} is larger than {max_size} bytes: refusing to load it")
        actual = sha256_digest(data)
        if actual != digest:
            raise IntegrityError(
                f"{what} arrived with digest {actual}: corrupted by the registry or a proxy"
            )
        return data

    async def read_range(self, digest: str, start: int, length: int) -> BlobBytes:
        return await read_as_run(self, digest, start, length)

    async def read_pieces(
        self, digest: str, start: int, lengths: Sequence[int], deliver: Deliver
    ) -> None:
        """Each piece has ``read_timeout`` seconds to arrive, from the request or from the piece
        before it, whatever path and retries it takes: a read fails within that bound."""
        client = self._client
        end = start + sum(lengths)
        if client.late.is_late(digest, start, end, trio.current_time()):
            raise self._late_error(digest, start, end, "a moment ago")
        landed = 0

        async def deliver_in_time(place: int, data: BlobBytes) -> None:
            nonlocal landed
            scope.deadline = math.inf  # waiting for the cache writer is not the registry's time
            await deliver(place, data)
            landed = place + 1
            scope.deadline = trio.current_time() + client.read_timeout

        with trio.CancelScope(deadline=trio.current_time() + client.read_timeout) as scope:
            await self._read_pieces(digest, start, lengths, deliver_in_time)
        if scope.cancelled_caught and landed < len(lengths):
            first = start + sum(lengths[:landed])
            client.late.note(digest, first, end, trio.current_time())
            raise self._late_error(digest, first, first + lengths[landed], "")

    def _late_error(self, digest: str, start: int, end: int, when: str) -> RegistryUnavailableError:
        what = f"bytes {start}-{end - 1} of {digest}" if end < MAX_BLOB_OFFSET else f"blob {digest}"
        return RegistryUnavailableError(
            f"registry {self._client.host} did not deliver {what} within "
            f"{self._client.read_timeout:g} s{' ' if when else ''}{when} (--read-timeout, "
            "retries included): check the registry and the network"
        )

    async def _read_pieces(
        self, digest: str, start: int, lengths: Sequence[int], deliver: Deliver
    ) -> None:
        try:
            done, partial = await self._client.read_run_plainly(
                self._url(f"blobs/{digest}"), self._pull, start, lengths, deliver
            )
        except WholeBlob:
            raise RangeIgnoredError(
                f"registry {self._client.host} answered bytes {start}- of blob {digest} with the "
                "whole blob: it cannot serve lazy reads"
            ) from None
        offset = start + sum(lengths[:done])
        for place in range(done, len(lengths)):
            # Cut short, or not a plain answer: the general path, one piece at a time, resuming
            # from what came.
            await deliver(
                place, await self._read_range_generally(digest, offset, lengths[place], partial)
            )
            offset += lengths[place]
            partial = bytearray()

    async def _read_range_generally(
        self, digest: str, start: int, length: int, buffer: bytearray
    ) -> bytearray:
        """Bytes ``start..`` of ``length`` by httpx, with retries; ``buffer`` holds the first
        ones already (fewer only where the blob ends)."""
        end = start + length - 1
        what = f"bytes {start}-{end} of blob {digest} of {self.name}"

        async def attempt() -> None:
            # A retried attempt resumes where the previous one was cut off.
            while len(buffer) < length:
                if await self._read_range_into(buffer, digest, start + len(buffer), end, what):
                    return

        await self._client.retrying(what, attempt)
        return buffer  # as received: a piece is not copied on its way

    async def _read_range_into(
        self, buffer: bytearray, digest: str, offset: int, end: int, what: str
    ) -> bool:
        """Append bytes ``offset..end`` to ``buffer``; True when the blob ended before ``end``."""
        async with self._client.request(
            "GET",
            self._url(f"blobs/{digest}"),
            self._pull,
            what=what,
            headers={"Range": f"bytes={offset}-{end}"},
            allow=frozenset({416}),
        ) as response:
            if response.status_code == 416:
                return True
            wanted = end - offset + 1
            if response.status_code == 206:
                span = parse_content_range(response.headers.get("Content-Range"))
                if span is None or span[0] != offset or span[1] > end:
                    raise RegistryError(
                        f"registry {self._client.host} answered {what} with Content-Range "
                        f"{response.headers.get('Content-Range')!r}: it cannot serve lazy reads"
                    )
                first, last, _total = span
                at_blob_end = last < end
            else:
                size = response.headers.get("Content-Length")
                if offset != 0 or size is None or int(size) > wanted:
                    raise RangeIgnoredError(
                        f"registry {self._client.host} ignored the Range header for {what}: "
                        "it cannot serve lazy reads"
                    )
                first, last, at_blob_end = 0, int(size) - 1, True
            expected = last - first + 1
            received = 0
            async for chunk in response.aiter_bytes():
                received += len(chunk)
                if received > expected:
                    raise RegistryError(
                        f"registry {self._client.host} sent more bytes than asked for {what}"
                    )
                buffer += chunk
            if received < expected:
                raise _TransientError(f"body of {what} ended after {received} of {expected} bytes")
            return at_blob_end

    def stream_blob(self, digest: str) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        return self._stream(digest)

    @asynccontextmanager
    async def _stream(self, digest: str) -> AsyncIterator[AsyncIterator[bytes]]:
        chunks = self._blob_chunks(digest)
        try:
            yield chunks
        finally:
            await chunks.aclose()

    async def _blob_chunks(self, digest: str) -> AsyncGenerator[bytes, None]:
        """The blob's bytes; a broken connection resumes with a Range request at the offset.

        Each piece's worth of bytes has ``read_timeout`` seconds of waiting on the registry (the
        time the consumer takes is not counted), as a piece read has: a read waiting for the
        whole blob (a compressed layer) fails within that bound of the registry's last progress.
        """
        what = f"blob {digest} of {self.name}"
        client = self._client
        if client.late.is_late(digest, 0, MAX_BLOB_OFFSET, trio.current_time()):
            raise self._late_error(digest, 0, MAX_BLOB_OFFSET, "a moment ago")
        offset = 0
        breaks = 0
        waited = 0.0  # on the registry, for the piece's worth of bytes under way

        def late() -> RegistryUnavailableError:
            piece = offset - offset % DEFAULT_PIECE_SIZE
            client.late.note(digest, piece, piece + DEFAULT_PIECE_SIZE, trio.current_time())
            return self._late_error(digest, piece, piece + DEFAULT_PIECE_SIZE, "")

        while True:
            asked = trio.current_time()
            with trio.move_on_after(client.read_timeout - waited) as scope:
                response = await client.retrying(what, partial(self._open_blob, digest, offset))
            if scope.cancelled_caught:
                raise late()
            waited += trio.current_time() - asked
            try:
                chunks = aiter(response.aiter_bytes())
                while True:
                    asked = trio.current_time()
                    with trio.move_on_after(client.read_timeout - waited) as scope:
                        chunk = await anext(chunks, b"")
                    if scope.cancelled_caught:
                        raise late()
                    if not chunk:
                        return
                    waited += trio.current_time() - asked
                    if offset // DEFAULT_PIECE_SIZE != (offset + len(chunk)) // DEFAULT_PIECE_SIZE:
                        waited = 0.0
                    offset += len(chunk)
                    yield chunk
            except httpx.TransportError as error:
                breaks += 1
                if breaks > self._client.retries:
                    raise RegistryUnavailableError(
                        f"registry {self._client.host} broke off {what} {breaks} times at "
                        f"byte {offset} ({_describe_transport_error(error)}): retry later"
                    ) from error
            finally:
                await response.aclose()

    async def _open_blob(self, digest: str, offset: int) -> httpx.Response:
        what = f"blob {digest} of {self.name}"
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        response = await self._client.open(
            "GET", self._url(f"blobs/{digest}"), self._pull, what=what, headers=headers
        )
        try:
            span = parse_content_range(response.headers.get("Content-Range"))
            if offset and (response.status_code != 206 or span is None or span[0] != offset):
                raise RegistryError(
                    f"registry {self._client.host} cannot resume {what} at byte {offset}"
                )
        except BaseException:
            await response.aclose()
            raise
        return response

    async def has_blob(self, digest: str) -> bool:
        return await self._has_blob(digest, self._pull)

    async def _has_blob(self, digest: str, scope: str) -> bool:
        what = f"blob {digest} of {self.name}"

        async def attempt() -> bool:
            async with self._client.request(
                "HEAD", self._url(f"blobs/{digest}"), scope, what=what, allow=frozenset({404})
            ) as response:
                return response.status_code != 404

        return await self._client.retrying(what, attempt)

    async def push_blob(self, digest: str, size: int, chunks: AsyncIterable[bytes]) -> None:
        """Upload a blob unless present: one POST, then the bytes streamed in one PUT."""
        if await self._has_blob(digest, self._push):
            return
        what = f"upload of blob {digest} to {self.name}"

        async def start_upload() -> httpx.URL:
            async with self._client.request(
                "POST", self._url("blobs/uploads/"), self._push, what=what
            ) as response:
                location = response.headers.get("Location")
                if not location:
                    raise RegistryError(
                        f"registry {self._client.host} started the {what} without a Location"
                    )
                return response.url.join(location)

        upload = await self._client.retrying(what, start_upload)
        # The stream can be sent only once, so the PUT itself is not retried.
        async with self._client.request(
            "PUT",
            upload.copy_merge_params({"digest": digest}),
            self._push,
            what=what,
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
            content=chunks,
        ):
            pass

    async def push_manifest(self, reference: str, media_type: str, data: bytes) -> str:
        digest = sha256_digest(data)
        what = f"upload of manifest {self.name}:{reference}"

        async def attempt() -> None:
            async with self._client.request(
                "PUT",
                self._url(f"manifests/{reference}"),
                self._push,
                what=what,
                headers={"Content-Type": media_type},
                content=data,
            ):
                pass

        await self._client.retrying(what, attempt)
        return digest

    async def get_referrers(self, digest: str) -> bytes | None:
        """The OCI index the referrers API lists for ``digest``; None if the API is missing.

        Registries without the API (distribution 2.8) answer 404 on its path; callers then use
        the referrers tag scheme.
        """
        what = f"referrers of {self.name}@{digest}"

        async def attempt() -> bytes | None:
            async with self._client.request(
                "GET",
                self._url(f"referrers/{digest}"),
                self._pull,
                what=what,
                headers={"Accept": OCI_INDEX},
                allow=frozenset({404}),
            ) as response:
                if response.status_code == 404:
                    return None
                data = await _read_limited(response, MANIFEST_LIMIT)
                if data is None:
                    raise ManifestError(f"{what} is larger than {MANIFEST_LIMIT} bytes")
                return data

        return await self._client.retrying(what, attempt)


class MeteredRepository(RegistryRepository):
    """A repository that counts every blob byte it receives in a mount's stats (pieces, configs,
    tar headers, compressed layers fetched whole), and times its range reads: as the registry's,
    or a mirror's (``source="mirror"``, and by mirror) when its client is a mirror."""

    def __init__(self, client: RegistryClient, repository: str, stats: MountStats) -> None:
        super().__init__(client, repository)
        self.stats = stats
        self.kind = MIRROR if client.endpoint.is_mirror else REGISTRY

    def _fetched(self, size: int) -> None:
        self.stats.fetched(self.kind, size)
        if self.kind == MIRROR:
            self.stats.fetched_from_mirror(self._client.host, size)

    async def get_blob(self, digest: str, max_size: int) -> bytes:
        data = await super().get_blob(digest, max_size)
        self._fetched(len(data))
        return data

    async def read_pieces(
        self, digest: str, start: int, lengths: Sequence[int], deliver: Deliver
    ) -> None:
        mark_served_by(self.kind)
        counted = self.stats.counting(lambda: self.kind, deliver)
        if self.kind == MIRROR:
            counted = partial(self._from_mirror, counted)
        await super().read_pieces(digest, start, lengths, counted)

    async def _from_mirror(self, deliver: Deliver, place: int, data: BlobBytes) -> None:
        self.stats.fetched_from_mirror(self._client.host, len(data))
        await deliver(place, data)

    @asynccontextmanager
    async def _stream(self, digest: str) -> AsyncIterator[AsyncIterator[bytes]]:
        async with super()._stream(digest) as chunks:
            counted = self._counted(chunks)
            try:
                yield counted
            finally:
                await counted.aclose()

    async def _counted(self, chunks: AsyncIterator[bytes]) -> AsyncGenerator[bytes, None]:
        async for chunk in chunks:
            self._fetched(len(chunk))
            yield chunk
