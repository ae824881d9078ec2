"""The lean range GET (modelfs.sources.rangeget) against a real registry and the faulting proxy.

It serves plain ``206`` answers itself, raises redirects and refusals for the caller to act on,
and gives everything else back to the general path; the behaviour seen through ``read_range`` is
covered in test_registry, test_auth and test_redirects.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest
import trio
from conftest import AUTH_PASSWORD, AUTH_USERNAME
from registry_tools import Layer, Proxy, Registry, push_artifact

from modelfs.modelpack import layer_media_type
from modelfs.sources.credentials import Credentials
from modelfs.sources.interface import BlobBytes
from modelfs.sources.rangeget import Origin, RangeGetter, Redirected, Refused
from modelfs.sources.registry import RegistryClient

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


Run = tuple[list[bytes], bytes]  # the pieces delivered, and what came of the next one


async def get_run(
    getter: RangeGetter, start: int, lengths: list[int], authorization: str | None = None
) -> Run:
    delivered: list[bytes] = []

    async def deliver(place: int, data: BlobBytes) -> None:
        assert place == len(delivered)
        delivered.append(bytes(data))

    count, partial = await getter.get_run(TARGET, authorization, start, lengths, deliver)
    assert count == len(delivered)
    return delivered, bytes(partial)


@pytest.fixture(scope="module")
def pushed(registry: Registry) -> None:
    push_artifact(registry.host, REPOSITORY, "v1", [Layer(layer_media_type("weight", "raw"), BLOB)])


def test_runs_of_pieces_come_one_get_each_over_one_kept_connection(
    proxy: Proxy, pushed: None
) -> None:
    runs = [(0, [100]), (500_000, [30_000, 1, 40_000]), (len(BLOB) - 10, [6, 4])]

    async def read_all(getter: RangeGetter) -> list[Run]:
        return [await get_run(getter, start, lengths) for start, lengths in runs]

    expected = []
    for start, lengths in runs:
        offsets = [start + sum(lengths[:place]) for place in range(len(lengths))]
        expected.append(([BLOB[o : o + n] for o, n in zip(offsets, lengths, strict=True)], b""))
    assert with_getter(proxy.host, read_all) == expected
    assert [r.range for r in proxy.blob_requests] == [
        f"bytes={start}-{start + sum(lengths) - 1}" for start, lengths in runs
    ]
    assert proxy.connections == 1


def test_unusual_answers_are_given_back(proxy: Proxy, pushed: None) -> None:
    past_end = with_getter(proxy.host, lambda getter: get_run(getter, len(BLOB) - 10, [110]))
    assert past_end == ([], b"")  # a shorter span than asked
    proxy.fail_next(1, status=503)
    assert with_getter(proxy.host, lambda getter: get_run(getter, 0, [10])) == ([], b"")


def test_a_cut_body_gives_the_pieces_that_came_and_the_start_of_the_next(
    proxy: Proxy, pushed: None
) -> None:
    proxy.cut_blobs(after=150_000)
    pieces, partial = with_getter(
        proxy.host, lambda getter: get_run(getter, 10, [100_000, 100_000, 100_000])
    )
    assert pieces == [BLOB[10:100_010]]
    assert 0 < len(partial) < 100_000
    assert partial == BLOB[100_010 : 100_010 + len(partial)]


def test_a_failing_receiver_ends_the_run_and_its_connection(proxy: Proxy, pushed: None) -> None:
    class Refused(Exception):
        pass

    async def refuse(place: int, data: BlobBytes) -> None:
        raise Refused

    async def refused_then_read(getter: RangeGetter) -> Run:
        with pytest.raises(Refused):
            await getter.get_run(TARGET, None, 0, [1000, 1000], refuse)
        return await get_run(getter, 0, [10])

    assert with_getter(proxy.host, refused_then_read) == ([BLOB[:10]], b"")
    assert proxy.connections == 2  # the first was closed with its body half read


def test_a_redirect_is_given_back_with_its_location(proxy: Proxy, pushed: None) -> None:
    proxy.redirect = True

    async def redirected(getter: RangeGetter) -> str:
        with pytest.raises(Redirected) as raised:
            await get_run(getter, 0, [10])
        return raised.value.location

    location = with_getter(proxy.host, redirected)
    assert location.startswith(f"http://{proxy.redirect_host}/ticket/")
    assert len(proxy.blob_requests) == 1
    assert not proxy.redirect_requests  # the caller decides where to go, and with what


def test_a_refusal_is_given_back_with_its_status(auth_registry: Registry) -> None:
    creds = Credentials(AUTH_USERNAME, AUTH_PASSWORD)
    push_artifact(
        auth_registry.host,
        REPOSITORY,
        "v1",
        [Layer(layer_media_type("weight", "raw"), BLOB)],
        credentials=creds,
    )

    async def anonymous_then_basic(getter: RangeGetter) -> tuple[int, Run]:
        with pytest.raises(Refused) as raised:
            await get_run(getter, 0, [10])
        return raised.value.status, await get_run(getter, 0, [10], creds.basic_header())

    assert with_getter(auth_registry.host, anonymous_then_basic) == (401, ([BLOB[:10]], b""))


def test_read_range_resumes_a_cut_of_the_lean_path(proxy: Proxy, pushed: None) -> None:
    async def read(length: int) -> bytes:
        async with RegistryClient(proxy.host, plain_http=True) as client:
            return await client.repository(REPOSITORY).read_range(BLOB_DIGEST, 10, length)

    proxy.cut_blobs(after=1000)
    assert trio.run(read, 200_000) == BLOB[10:200_010]
    assert [r.range for r in proxy.blob_requests] == ["bytes=10-200009", "bytes=1010-200009"]


def test_read_pieces_goes_on_by_the_general_path_where_the_lean_one_was_cut(
    proxy: Proxy, pushed: None
) -> None:
    async def read(lengths: list[int]) -> list[bytes]:
        delivered: list[bytes] = []

        async def deliver(place: int, data: BlobBytes) -> None:
            delivered.append(bytes(data))

        async with RegistryClient(proxy.host, plain_http=True) as client:
            await client.repository(REPOSITORY).read_pieces(BLOB_DIGEST, 10, lengths, deliver)
        return delivered

    proxy.cut_blobs(after=150_000)
    assert trio.run(read, [100_000] * 3) == [
        BLOB[10 + o : 100_010 + o] for o in (0, 100_000, 200_000)
    ]
    ranges = [r.range for r in proxy.blob_requests]
    # One GET for the run; the cut piece resumed from where it stopped; the last one alone.
    assert ranges == ["bytes=10-300009", "bytes=150010-200009", "bytes=200010-300009"]
