"""``KeyValue`` in Redis, for scheduler replicas that must agree, over a minimal RESP2 client.

redis-py's async client is asyncio-only; this one is trio-native and needs eight commands.
One connection, one command at a time; a broken connection is reopened once per command, so a
restarted Redis costs one error at most. Each command is bounded in time.
"""

from __future__ import annotations

import urllib.parse
from types import TracebackType

import trio

from modelfs.errors import ModelfsError

Reply = bytes | int | list["Reply"] | None


class RedisError(ModelfsError):
    """Redis is unreachable, or refused a command."""


def parse_redis_url(url: str) -> tuple[str, int, str | None, int]:
    """``redis://[:password@]host[:port][/db]`` -> (host, port, password, db)."""
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port or 6379
        db = int(parts.path.strip("/") or 0)
    except ValueError:
        port = db = -1
    if parts.scheme != "redis" or not parts.hostname or port < 0 or db < 0:
        raise RedisError(f"{url!r} is not a Redis URL: use redis://[:password@]host[:port][/db]")
    return parts.hostname, port, parts.password, db


def encode_command(*args: str | bytes) -> bytes:
    out = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg.encode() if isinstance(arg, str) else arg
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class _Reader:
    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._buffer = bytearray()

    async def _line(self) -> bytes:
        while (end := self._buffer.find(b"\r\n")) < 0:
            await self._fill()
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 2]
        return line

    async def _exactly(self, size: int) -> bytes:
        while len(self._buffer) < size + 2:
            await self._fill()
        data = bytes(self._buffer[:size])
        del self._buffer[: size + 2]
        return data

    async def _fill(self) -> None:
        chunk = await self._stream.receive_some(64 * 1024)
        if not chunk:
            raise trio.BrokenResourceError("Redis closed the connection")
        self._buffer += chunk

    async def reply(self) -> Reply:
        line = await self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest
        if kind == b"-":
            raise RedisError(f"Redis refused a command: {rest.decode(errors='replace')}")
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            return None if size < 0 else await self._exactly(size)
        if kind == b"*":
            count = int(rest)
            return None if count < 0 else [await self.reply() for _ in range(count)]
        raise RedisError(f"Redis sent an unknown reply type {kind!r}")


class RedisKeyValue:
    """``async with RedisKeyValue(url) as store:``."""

    def __init__(self, url: str, timeout: float = 2.0) -> None:
        self.url = url
        self._host, self._port, self._password, self._db = parse_redis_url(url)
        self.timeout = timeout
        self._stream: trio.SocketStream | None = None
        self._reader: _Reader | None = None
        self._lock = trio.Lock()

    async def __aenter__(self) -> RedisKeyValue:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._close()

    async def _close(self) -> None:
        if self._stream is not None:
            await self._stream.aclose()
        self._stream = self._reader = None

    async def _connect(self) -> _Reader:
        self._stream = await trio.open_tcp_stream(self._host, self._port)
        self._reader = _Reader(self._stream)
        if self._password:
            await self._send(self._reader, ("AUTH", self._password))
        if self._db:
            await self._send(self._reader, ("SELECT", str(self._db)))
        return self._reader

    async def _send(self, reader: _Reader, args: tuple[str, ...]) -> Reply:
        assert self._stream is not None
        await self._stream.send_all(encode_command(*args))
        return await reader.reply()

    async def command(self, *args: str) -> Reply:
        async with self._lock:
            last = ""
            with trio.move_on_after(self.timeout):
                for _attempt in range(2):
                    try:
                        reader = self._reader or await self._connect()
                        return await self._send(reader, args)
                    except (OSError, trio.BrokenResourceError) as error:
                        last = str(error) or type(error).__name__
                        await self._close()
                    except BaseException:
                        # Cancelled mid-command: its reply would answer the next one.
                        with trio.CancelScope(shield=True):
                            await self._close()
                        raise
            await self._close()
            raise RedisError(
                f"Redis at {self._host}:{self._port} did not answer {args[0]} "
                f"({last or f'no reply within {self.timeout:.1f} s'}): check that it runs"
            )

    async def put(self, key: str, value: str, ttl: float, only_if_absent: bool = False) -> bool:
        extra = ("NX",) if only_if_absent else ()
        reply = await self.command("SET", key, value, "PX", str(int(ttl * 1000)), *extra)
        return reply is not None

    async def get_many(self, keys: list[str]) -> list[str | None]:
        if not keys:
            return []
        reply = await self.command("MGET", *keys)
        assert isinstance(reply, list)
        return [value.decode() if isinstance(value, bytes) else None for value in reply]

    async def delete(self, key: str) -> None:
        await self.command("DEL", key)

    async def add_member(self, key: str, member: str, ttl: float) -> bool:
        added = await self.command("SADD", key, member)
        await self.command("PEXPIRE", key, str(int(ttl * 1000)))
        return added == 1

    async def members(self, key: str) -> set[str]:
        reply = await self.command("SMEMBERS", key)
        assert isinstance(reply, list)
        return {value.decode() for value in reply if isinstance(value, bytes)}

    async def remove_member(self, key: str, member: str) -> None:
        await self.command("SREM", key, member)

    async def increment(self, key: str, ttl: float, amount: int = 1) -> int:
        count = await self.command("INCRBY", key, str(amount))
        await self.command("PEXPIRE", key, str(int(ttl * 1000)))
        assert isinstance(count, int)
        return count
