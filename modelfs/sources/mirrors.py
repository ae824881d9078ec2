"""A registry read through its mirrors: the hosts of its hosts.toml in order, the server last.

A node that runs Dragonfly, Spegel or a Harbor proxy cache names them as containerd mirrors
(``modelfs.sources.hosts``); modelfs then reads a model the way the node pulls images: each
request goes to the first host whose ``capabilities`` allow it (``resolve`` for a tag, ``pull``
for anything by digest), and on to the next when that one fails, the registry's own ``server``
last. A mirror is trusted no more than a peer: every piece is checked as it would be from the
registry, and a mirror whose bytes fail a check is passed over for that blob.

Time: per piece, the whole chain has ``--read-timeout``; each mirror a share of it
(``read_timeout / hosts``), so a stalled mirror leaves the rest to the server. A mirror that is
down is passed over for ``DOWN_MEMORY`` seconds, so only the read that found it down waited.

A pull-through cache answers a range of a blob it does not hold yet with the whole blob (a
``200``) while it fetches it from upstream (distribution's proxy mode, so Harbor's). Its body is
left unread, and the mirror is asked again once it had time to fill (``FILL_POLL``), within its
share of the deadline, the next host after that: the origin sends such a blob to the mirror
once, not once per reader.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from functools import partial
from pathlib import Path

import trio

from modelfs.errors import (
    IntegrityError,
    ManifestError,
    ModelfsError,
    PieceAlteredError,
    RegistryError,
    RegistryUnavailableError,
)
from modelfs.sources.credentials import Credentials
from modelfs.sources.hosts import (
    PULL,
    RESOLVE,
    RegistryHost,
    mirror_hosts,
    namespace_dirs,
    parse_hosts_toml,
    server_host,
)
from modelfs.sources.interface import BlobBytes, Deliver, FetchedManifest
from modelfs.sources.registry import (
    DEFAULT_READ_TIMEOUT,
    HostUnreachableError,
    MeteredRepository,
    RangeIgnoredError,
    RegistryClient,
    RegistryRepository,
)
from modelfs.sources.stats import MountStats

log = logging.getLogger(__name__)

DOWN_MEMORY = 30.0  # a mirror that did not answer is passed over this long
PASS_OVER = 10.0  # ... a mirror that refused a blob (404, 401, an error), for that blob
DISTRUST = 3600.0  # ... a mirror whose bytes failed a check, for that blob
FILL_POLL = (0.25, 2.0)  # first and longest wait for a mirror filling a blob to hold it
_MIRROR_RETRIES = 1
# Tags of the referrers tag scheme (``sha256-<hex>``) and cosign's (``.sig``, ``.att``, ...).
_VOUCHING_TAG = re.compile(r"sha256-[0-9a-f]{64}(\.[a-z]+)?")


def find_hosts(
    registry: str,
    api_host: str,
    *,
    plain_http: bool = False,
    hosts_dir: Path | None = None,
    mirrors: Sequence[str] = (),
    where: str = "the config",
) -> list[RegistryHost]:
    """The hosts to read ``registry`` from, the server last: modelfs's own ``mirrors`` if
    given, else the hosts.toml containerd would use under ``hosts_dir``, else the registry."""
    if mirrors:
        return [*mirror_hosts(mirrors, registry, where), server_host(api_host, plain_http)]
    for name in namespace_dirs(registry) if hosts_dir is not None else []:
        path = Path(hosts_dir or "") / name / "hosts.toml"
        try:
            text = path.read_text()
        except FileNotFoundError:
            continue
        except OSError as error:
            raise RegistryError(f"cannot read {path}: {error.strerror}") from None
        return parse_hosts_toml(text, path, registry, api_host, plain_http)
    return [server_host(api_host, plain_http)]


@asynccontextmanager
async def open_repository(
    repository: str,
    hosts: Sequence[RegistryHost],
    *,
    insecure: bool = False,
    credentials: Credentials | None = None,
    timeout: float = 30.0,
    retries: int = 3,
    read_timeout: float = DEFAULT_READ_TIMEOUT,
    stats: MountStats | None = None,
) -> AsyncIterator[RegistryRepository]:
    """``repository`` on ``hosts`` (``find_hosts``): the server's alone, or through mirrors.
    ``credentials`` are the registry's: they go to the server only (a mirror gets the node's
    login for its own host, if any); ``insecure`` is for the server (a mirror has skip_verify).
    """
    *mirrors, server = hosts
    async with AsyncExitStack() as stack:
        client = await stack.enter_async_context(
            RegistryClient(
                server.netloc,
                insecure=insecure,
                credentials=credentials,
                timeout=timeout,
                retries=retries,
                read_timeout=read_timeout,
                endpoint=server,
            )
        )
        origin = _repository(client, repository, stats)
        if not mirrors:
            yield origin
            return
        share = read_timeout / len(hosts)
        chain = []
        for mirror in mirrors:
            mirror_client = await stack.enter_async_context(
                RegistryClient(
                    mirror.netloc,
                    timeout=min(timeout, share),
                    retries=_MIRROR_RETRIES,
                    read_timeout=share,
                    endpoint=mirror,
                )
            )
            chain.append(_repository(mirror_client, repository, stats))
        yield MirroredRepository(origin, chain, read_timeout)


async def _shifted(deliver: Deliver, first: int, place: int, data: BlobBytes) -> None:
    """``deliver`` for a run that starts ``first`` pieces into the one asked for."""
    await deliver(first + place, data)


def _repository(
    client: RegistryClient, repository: str, stats: MountStats | None
) -> RegistryRepository:
    return (
        client.repository(repository)
        if stats is None
        else MeteredRepository(client, repository, stats)
    )


class MirroredRepository(RegistryRepository):
    """A repository read through mirrors, then its server; what only the server does (pushes,
    referrers, blob checks) goes to the server, as this repository's own client."""

    def __init__(
        self, server: RegistryRepository, mirrors: Sequence[RegistryRepository], read_timeout: float
    ) -> None:
        super().__init__(server.client, server.repository)
        self._server = server
        self._mirrors = list(mirrors)
        self._read_timeout = read_timeout
        self._down: dict[int, float] = {}  # mirror -> until when it is passed over
        self._passed: dict[tuple[int, str], float] = {}  # (mirror, digest) -> until when
        self._filling: dict[tuple[int, str], float] = {}  # (mirror, digest) -> next poll
        self._serving: set[tuple[int, str]] = set()  # (mirror, digest) it served ranges of
        self._probes: dict[tuple[int, str], trio.Lock] = {}

    @property
    def mirrors(self) -> list[str]:
        return [mirror.client.host for mirror in self._mirrors]

    def _hosts(self, capability: str, digest: str) -> list[tuple[int, RegistryRepository]]:
        """The hosts to ask, in order: mirrors that may do it and are not passed over, then the
        server (index -1)."""
        now = trio.current_time()
        usable = [
            (number, mirror)
            for number, mirror in enumerate(self._mirrors)
            if mirror.client.endpoint.can(capability)
            and self._down.get(number, -math.inf) <= now
            and self._passed.get((number, digest), -math.inf) <= now
        ]
        return [*usable, (-1, self._server)]

    def _failed(
        self, number: int, digest: str, error: ModelfsError, what: str, blob: bool = True
    ) -> None:
        """Note a mirror's failure; the caller goes on to the next host. A mirror is down when
        it did not answer, or did not deliver a blob in time (an error answer to a manifest,
        such as distribution's 500 for a tag upstream lacks, is about that manifest only)."""
        now = trio.current_time()
        host = self._mirrors[number].client.endpoint.url
        if isinstance(error, HostUnreachableError) or (
            blob and isinstance(error, RegistryUnavailableError)
        ):
            self._down[number] = now + DOWN_MEMORY
            log.warning("mirror %s: %s; passed over for %.0f s", host, error, DOWN_MEMORY)
        elif isinstance(error, IntegrityError):
            self._passed[(number, digest)] = now + DISTRUST
            log.error("mirror %s sent %s altered (%s); not asked for it again", host, what, error)
        else:
            self._passed[(number, digest)] = now + PASS_OVER
            log.info("mirror %s: %s; asking the next host", host, error)

    async def get_manifest(self, selector: str) -> FetchedManifest:
        if _VOUCHING_TAG.fullmatch(selector):
            # The referrers tag of a manifest (its piece index, profile) or cosign's signature
            # tag names what vouches for bytes, even of a model mounted by digest: the server's.
            return await self._server.get_manifest(selector)
        # Resolving a tag is trusted to ``resolve`` hosts only; a digest checks itself.
        capability = PULL if selector.startswith("sha256:") else RESOLVE
        for number, host in self._hosts(capability, selector):
            if number < 0:
                return await host.get_manifest(selector)
            try:
                return await host.get_manifest(selector)
            except (RegistryError, IntegrityError, ManifestError) as error:
                self._failed(number, selector, error, f"manifest {selector}", blob=False)
        raise AssertionError("the server is always the last host")

    async def get_blob(self, digest: str, max_size: int) -> bytes:
        for number, host in self._hosts(PULL, digest):
            if number < 0:
                return await host.get_blob(digest, max_size)
            try:
                return await host.get_blob(digest, max_size)
            except (RegistryError, IntegrityError, ManifestError) as error:
                self._failed(number, digest, error, f"blob {digest}")
        raise AssertionError("the server is always the last host")

    async def read_pieces(
        self, digest: str, start: int, lengths: Sequence[int], deliver: Deliver
    ) -> None:
        """The pieces from the first host that delivers them, each piece with ``read_timeout``
        over the whole chain; a host that fails mid-run leaves the rest to the next."""
        landed = 0
        refused: list[BaseException] = []  # what ``deliver`` raised: a check the bytes failed

        async def deliver_in_time(place: int, data: BlobBytes) -> None:
            nonlocal landed
            scope.deadline = math.inf  # waiting for the cache writer is not the hosts' time
            try:
                await deliver(place, data)
            except BaseException as error:
                refused.append(error)
                raise
            landed = place + 1
            scope.deadline = trio.current_time() + self._read_timeout

        with trio.CancelScope(deadline=trio.current_time() + self._read_timeout) as scope:
            for number, host in self._hosts(PULL, digest):
                offset = start + sum(lengths[:landed])
                rest, shifted = lengths[landed:], partial(_shifted, deliver_in_time, landed)
                if number < 0:
                    await host.read_pieces(digest, offset, rest, shifted)
                    return
                try:
                    await self._read_from_mirror(number, host, digest, offset, rest, shifted)
                    return
                except PieceAlteredError as error:
                    if error not in refused:
                        raise
                    # A piece failed the piece index: the next host sends it again.
                    self._failed(number, digest, error, f"a piece of blob {digest}")
                except IntegrityError as error:
                    # The blob failed its digest and was dropped: not this mirror's again.
                    self._failed(number, digest, error, f"blob {digest}")
                    raise
                except RegistryError as error:
                    self._failed(number, digest, error, f"blob {digest}")
        end = start + sum(lengths)
        raise RegistryUnavailableError(
            f"no host of {self.name} (mirrors {', '.join(self.mirrors)}, then the registry) "
            f"delivered bytes {start + sum(lengths[:landed])}-{end - 1} of {digest} within "
            f"{self._read_timeout:g} s (--read-timeout): check the mirrors and the registry"
        )

    async def _read_from_mirror(
        self,
        number: int,
        mirror: RegistryRepository,
        digest: str,
        start: int,
        lengths: Sequence[int],
        deliver: Deliver,
    ) -> None:
        """A run from a mirror; one filling the blob from upstream is waited for, within the
        mirror's share of the deadline (``RangeIgnoredError`` when that is over)."""
        key = (number, digest)
        give_up = trio.current_time() + mirror.client.read_timeout
        still_filling = RangeIgnoredError(f"mirror {mirror.client.host} is still filling {digest}")
        wait = FILL_POLL[0]
        while True:
            poll = self._filling.get(key, -math.inf)
            if poll > give_up:
                raise still_filling
            await trio.sleep_until(poll)
            if key in self._serving:
                await mirror.read_pieces(digest, start, lengths, deliver)
                return
            # Until the mirror served the blob once, one request asks it at a time: a filling
            # cache may fetch the blob upstream anew for each request it answers whole.
            with trio.move_on_at(give_up):
                async with self._probes.setdefault(key, trio.Lock()):
                    if key in self._serving or self._filling.get(key, -math.inf) > poll:
                        continue  # settled meanwhile
                    try:
                        await mirror.read_pieces(digest, start, lengths, deliver)
                    except RangeIgnoredError:
                        self._filling[key] = trio.current_time() + wait
                        wait = min(wait * 2, FILL_POLL[1])
                        continue
                    self._serving.add(key)
                    self._filling.pop(key, None)
                    return
            raise still_filling

    def stream_blob(self, digest: str) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        return self._stream_through(digest)

    @asynccontextmanager
    async def _stream_through(self, digest: str) -> AsyncIterator[AsyncIterator[bytes]]:
        chunks = self._chunks(digest)
        try:
            yield chunks
        finally:
            await chunks.aclose()

    async def _chunks(self, digest: str) -> AsyncGenerator[bytes, None]:
        """The whole blob from the first host that sends it; a host that breaks off leaves the
        rest to the next (its first bytes, already passed on, are skipped)."""
        sent = 0
        for number, host in self._hosts(PULL, digest):
            skip = sent
            try:
                async with host.stream_blob(digest) as chunks:
                    async for chunk in chunks:
                        if skip >= len(chunk):
                            skip -= len(chunk)
                            continue
                        chunk, skip = chunk[skip:], 0
                        sent += len(chunk)
                        yield chunk
                return
            except RegistryError as error:
                if number < 0:
                    raise
                self._failed(number, digest, error, f"blob {digest}")
