"""The lean range GET (modelfs.fetcher.rangeget) against a real registry and the faulting proxy.

It serves plain ``206`` answers itself and gives everything else back (None) to the general
path; the behaviour seen through ``read_range`` is covered in test_registry and test_auth.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest
import trio
from conftest import AUTH_PASSWORD, AUTH_USERNAME
from registry_tools import Layer, Proxy, Registry, push_artifact

from modelfs.fetcher.auth import Credentials
from modelfs.fetcher.rangeget import Origin, RangeGetter
from modelfs.fetcher.registry import RegistryClient
from modelfs.modelpack import layer_media_type

T = TypeVar("T")
BLOB = bytes(range(256)) * 4096 + b"tail"  # 1 MiB + 4 bytes, every offset distinguishable
BLOB_DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
REPOSITORY = "tests/rangeget"
TARGET = f"/v2/{REPOSITORY}/blobs/{BLOB_DIGEST}"


def with_getter(host: str, action: Callable[[RangeGetter], Awaitable[T]]) -> T:
    address, _, port = host.rpartition(":")
    origin = Origin(host=address, port=int(port), ssl_context=None, host_header=host)

    async def main() -> T:
        getter = RangeGetter(origin, "modelfs-test", timeout=10.0)
        try:
            return await action(getter)
        finally:
            await getter.aclose()

    return trio.run(main)


@pytest.fixture(scope="module")
def pushed(registry: Registry) -> None:
    push_artifact(registry.host, REPOSITORY, "v1", [Layer(layer_media_type("weight", "raw"), BLOB)])


def test_reads_exact_ranges_over_one_kept_connection(proxy: Proxy, pushed: None) -> None:
    spans = [(0, 99), (500_000, 569_999), (len(BLOB) - 10, len(BLOB) - 1)]

    async def read_all(getter: RangeGetter) -> list[bytearray | None]:
        return [await getter.get(TARGET, None, start, end) for start, end in spans]

    assert with_getter(proxy.host, read_all) == [BLOB[start : end + 1] for start, end in spans]
    assert [r.range for r in proxy.blob_requests] == [f"bytes={s}-{e}" for s, e in spans]
    assert proxy.connections == 1


def test_unusual_answers_are_given_back(proxy: Proxy, pushed: None) -> None:
    async def past_end(getter: RangeGetter) -> bytearray | None:
        return await getter.get(TARGET, None, len(BLOB) - 10, len(BLOB) + 99)

    assert with_getter(proxy.host, past_end) is None  # a shorter span than asked
    proxy.fail_next(1, status=503)
    assert with_getter(proxy.host, lambda getter: getter.get(TARGET, None, 0, 9)) is None


def test_a_cut_body_gives_what_came(proxy: Proxy, pushed: None) -> None:
    proxy.cut_blobs(after=1000)
    received = with_getter(proxy.host, lambda getter: getter.get(TARGET, None, 10, 200_009))
    assert received is not None
    assert 0 < len(received) < 200_000
    assert received == BLOB[10 : 10 + len(received)]


def test_a_redirecting_registry_is_left_to_the_general_path(proxy: Proxy, pushed: None) -> None:
    proxy.redirect = True

    async def twice(getter: RangeGetter) -> list[bytearray | None]:
        return [await getter.get(TARGET, None, 0, 9), await getter.get(TARGET, None, 10, 19)]

    assert with_getter(proxy.host, twice) == [None, None]
    assert len(proxy.blob_requests) == 1  # asked once: then it stands aside
    assert not proxy.redirect_requests  # and never follows it with the Authorization


def test_a_refused_login_is_given_back(auth_registry: Registry) -> None:
    creds = Credentials(AUTH_USERNAME, AUTH_PASSWORD)
    push_artifact(
        auth_registry.host,
        REPOSITORY,
        "v1",
        [Layer(layer_media_type("weight", "raw"), BLOB)],
        credentials=creds,
    )

    async def anonymous_then_basic(getter: RangeGetter) -> list[bytearray | None]:
        return [
            await getter.get(TARGET, None, 0, 9),
            await getter.get(TARGET, creds.basic_header(), 0, 9),
        ]

    assert with_getter(auth_registry.host, anonymous_then_basic) == [None, BLOB[:10]]


def test_read_range_resumes_a_cut_of_the_lean_path(proxy: Proxy, pushed: None) -> None:
    async def read(length: int) -> bytes:
        async with RegistryClient(proxy.host, plain_http=True) as client:
            return await client.repository(REPOSITORY).read_range(BLOB_DIGEST, 10, length)

    proxy.cut_blobs(after=1000)
    assert trio.run(read, 200_000) == BLOB[10:200_010]
    assert [r.range for r in proxy.blob_requests] == ["bytes=10-200009", "bytes=1010-200009"]
