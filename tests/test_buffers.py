"""The pool of piece buffers: a buffer is handed out again only once nothing refers to it."""

from modelfs.fetcher.buffers import BufferPool


def test_a_buffer_is_reused_once_every_view_of_it_is_gone() -> None:
    pool = BufferPool(size=64, capacity=4)
    first = pool.take(10)
    first[:] = b"A" * 10
    part = first[2:4]  # a slice holds the buffer as well
    del first
    second = pool.take(10)
    second[:] = b"B" * 10
    assert bytes(part) == b"AA"  # the slice's bytes were not handed out again
    del part
    third = pool.take(10)
    assert bytes(third) == b"A" * 10  # the same memory, not zeroed: it was reused
    assert bytes(second) == b"B" * 10


def test_beyond_its_capacity_or_its_size_the_pool_gives_plain_buffers() -> None:
    pool = BufferPool(size=64, capacity=2)
    held = [pool.take(64), pool.take(64)]
    extra = pool.take(64)
    assert isinstance(extra, bytearray) and len(extra) == 64
    large = pool.take(65)
    assert isinstance(large, bytearray) and len(large) == 65
    assert all(isinstance(b, memoryview) and len(b) == 64 and not b.readonly for b in held)
    held.pop()
    assert isinstance(pool.take(64), memoryview)  # one came back to the pool
