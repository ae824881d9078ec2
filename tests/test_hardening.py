"""What one client may send a modelfs server (issue 24, points 1, 2, 4, 5 and 9): exactly the
bytes the issue lists, to the real processes (a mount serving peers, the scheduler, the node
daemon and a mount's stats socket). Each process answers, or drops that one connection, and then
serves on: reads through the mount return the exact bytes, the scheduler answers a signed call,
``modelfs status`` works."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cluster_tools import MIB, publish
from mounting import modelfs, mount_pid, mounted
from registry_tools import Proxy, Registry, free_port, free_ports
from test_service import (
    Notifications,
    daemon_setup,  # noqa: F401 (a fixture)
    mounts_by_path,
    running_daemon,
    stop_daemon,
    wait_until,
)

from modelfs.artifact.tar import parse_member
from modelfs.errors import ManifestError, ModelfsError
from modelfs.jsonsocket import MAX_CONNECTIONS, REQUEST_TIMEOUT
from modelfs.metrics import parse_address
from modelfs.modelpack import OCI_MANIFEST
from modelfs.service.peer_ports import parse_port_range
from modelfs.sources.layout import OciLayout
from modelfs.sources.rangeget import parse_content_range
from modelfs.transport.server import MAX_BODY, parse_listen
from modelfs.transport.tokens import Verdict, check, sign
from modelfs.untrusted import decimal, loads_json

SECRET = b"hardening-test-secret-0123456789abcdef"
DIGEST = "sha256:" + "ab" * 32


@dataclass
class Cluster:
    scheduler: str  # host:port
    scheduler_process: subprocess.Popen[bytes]
    peer: str  # host:port of the mount's peer server
    mount: Path
    expected: bytes

    def mount_pid(self) -> int:
        return mount_pid(self.mount)

    def serves(self) -> None:
        """The mount reads exact bytes, and the scheduler answers a signed call."""
        assert (self.mount / "model.bin").read_bytes() == self.expected
        assert self.scheduler_process.poll() is None
        ask = {"address": "10.0.0.9:1", "digest": DIGEST, "index": 0, "wait": False}
        assert signed_post(self.scheduler, "/v1/ask", ask).status_code == 200


@contextmanager
def scheduler(secret_file: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``modelfs scheduler`` in its own process, once it accepts connections."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "modelfs", "scheduler", "--listen", f"127.0.0.1:{port}",
         "--cluster-secret-file", str(secret_file)],
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for_port(port)
        yield f"127.0.0.1:{port}", process
    finally:
        process.terminate()
        process.wait(10)


def wait_for_port(port: int) -> None:
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            assert time.monotonic() < deadline, f"nothing listens on {port}"
            time.sleep(0.05)


@pytest.fixture
def cluster(registry: Registry, proxy: Proxy, tmp_path: Path) -> Iterator[Cluster]:
    """A scheduler and one node: a mount serving its pieces to peers (nothing read yet)."""
    data = os.urandom(6 * MIB + 5)
    source = tmp_path / "model.bin"
    source.write_bytes(data)
    reference = publish(registry.host, f"test/hardening-{os.urandom(4).hex()}", source)
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    peer = f"127.0.0.1:{free_ports(1)}"
    with ExitStack() as stack:
        address, process = stack.enter_context(scheduler(secret))
        options = [
            "--prefetch", "none", "--scheduler", f"http://{address}",
            "--cluster-secret-file", str(secret), "--peer-listen", peer,
        ]  # fmt: skip
        reference = f"{proxy.host}/{reference}"
        mnt = stack.enter_context(
            mounted(reference, tmp_path / "mnt", tmp_path / "cache", *options)
        )
        wait_for_port(int(peer.rsplit(":", 1)[1]))
        yield Cluster(address, process, peer, mnt, data)


def signed_post(address: str, path: str, document: object) -> httpx.Response:
    body = json.dumps(document).encode()
    headers = sign(SECRET, "POST", path, time.time(), body)
    return httpx.post(f"http://{address}{path}", content=body, headers=headers, timeout=10)


def exchange(address: str, request: bytes) -> bytes:
    """Send raw bytes, read until the server closes or pauses; what it answered."""
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(request)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
                if b"\r\n\r\n" in answer:
                    break
        except TimeoutError:
            pass
    return answer


# --- point 1: a token whose timestamp int() refuses ---------------------------------------------


@pytest.mark.parametrize(
    "timestamp", [b"\xb2", b"9" * 310, b"9" * 5000], ids=["superscript-two", "310-digits", "5000"]
)
def test_a_malformed_token_timestamp_is_refused_and_both_servers_serve_on(
    cluster: Cluster, timestamp: bytes
) -> None:
    pid = cluster.mount_pid()
    request = b"GET /pieces/x/0 HTTP/1.1\r\nHost: x\r\nAuthorization: Modelfs-HMAC %s:00\r\n\r\n"
    for address in (cluster.peer, cluster.scheduler):
        answer = exchange(address, request % timestamp)
        assert answer.startswith(b"HTTP/1.1 403 "), (address, answer[:100])
    assert cluster.mount_pid() == pid
    cluster.serves()


def test_any_bytes_and_any_hangup_end_one_connection_only(cluster: Cluster) -> None:
    body, other = b'{"address": "10.0.0.9:1"}', b'{"address": "10.0.0.8:1"}'
    signed = sign(SECRET, "POST", "/v1/register", time.time(), body)
    swapped = "".join(f"{key}: {value}\r\n" for key, value in signed.items()).encode()
    for address in (cluster.peer, cluster.scheduler):
        for request, status in (
            (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %s\r\n\r\n" % (b"9" * 5000), 400),
            (b"\x00\xff" * 1000 + b"\r\n\r\n", 400),
            # A valid token for one body, sent with another: the body is not the one signed.
            (b"POST /v1/register HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n%s\r\n%s"
             % (len(other), swapped, other), 400),
        ):  # fmt: skip
            answer = exchange(address, request)
            assert answer.startswith(b"HTTP/1.1 %d " % status), (address, request[:60], answer)
        for hangup in (b"GET /pieces/x/0 HTTP/1.1\r\nHost", b"GET / HTTP/1.1\r\n\r\n"):
            host, port = address.rsplit(":", 1)
            with socket.create_connection((host, int(port))) as sock:
                sock.sendall(hangup)  # and gone before any answer
    cluster.serves()


def test_a_refusal_keeps_a_bodyless_connection_and_closes_one_with_a_body_unread(
    cluster: Cluster,
) -> None:
    host, port = cluster.peer.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"GET /pieces/x/0 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 401 ")
        path = f"/pieces/{DIGEST}/0"
        signed = "".join(f"{k}: {v}\r\n" for k, v in sign(SECRET, "GET", path, time.time()).items())
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n{signed}\r\n".encode())
        assert sock.recv(65536).startswith(b"HTTP/1.1 404 ")  # the same connection serves on
    answer = exchange(cluster.peer, b"POST /v1/x HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 401 ") and b"\r\nconnection: close\r\n" in answer.lower()


# --- point 2: signed scheduler calls with bodies json.loads chokes on ---------------------------


def test_the_scheduler_answers_400_to_bodies_json_chokes_on(cluster: Cluster) -> None:
    too_deep = b"[" * 100_000
    for path, body in (
        ("/v1/announce", too_deep),
        ("/v1/ask", b'{"address": "10.0.0.9:1", "digest": "%s", "index": %s}'
         % (DIGEST.encode(), b"9" * 5000)),
        ("/v1/ask", b'{"address": "10.0.0.9:1", "digest": "%s", "index": NaN}' % DIGEST.encode()),
    ):  # fmt: skip
        headers = sign(SECRET, "POST", path, time.time(), body)
        url = f"http://{cluster.scheduler}{path}"
        answer = httpx.post(url, content=body, headers=headers, timeout=10)
        assert answer.status_code == 400, answer.text
        assert "the body is not JSON we take" in answer.json()["error"]
    cluster.serves()


# --- JSON from a registry or a layout is parsed bounded too ------------------------------------


@pytest.mark.parametrize("nested", ["index", "manifest"])
def test_json_nested_past_the_recursion_limit_is_refused_in_one_line(
    tmp_path: Path, nested: str
) -> None:
    layout = OciLayout.create(tmp_path / "layout")
    deep = b"[" * 100_000
    if nested == "index":
        (tmp_path / "layout" / "index.json").write_bytes(deep)
    else:
        stored = layout.write_blob([deep])
        descriptor = {"mediaType": OCI_MANIFEST, "digest": stored.digest, "size": stored.size}
        layout.set_tag("v1", descriptor)
    (tmp_path / "mnt").mkdir()
    result = modelfs(
        "mount", f"oci:{tmp_path / 'layout'}:v1", str(tmp_path / "mnt"),
        "--cache-dir", str(tmp_path / "cache"), timeout=60,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "not" in line and "RecursionError" not in line, line


# --- point 9: nothing buffered before the token is checked --------------------------------------


def peak_rss(pid: int) -> int:
    """The process's peak resident set so far (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise LookupError(pid)


def flood(address: str, method: str, path: str, connections: int) -> list[bytes]:
    """``connections`` clients at once, each sending a MAX_BODY body with a made-up token; the
    start of what each one was answered (b"" when the server closed first)."""
    host, port = address.rsplit(":", 1)
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {MAX_BODY}\r\n"
        "Authorization: Modelfs-HMAC 1:00\r\n\r\n"
    ).encode()
    body = b"[" * MAX_BODY
    answers = [b""] * connections
    barrier = threading.Barrier(connections)

    def client(number: int) -> None:
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            barrier.wait()
            try:
                sock.sendall(head + body)
                answers[number] = sock.recv(64)
            except OSError:
                pass  # the server closed first: it read nothing more of this body

    threads = [threading.Thread(target=client, args=(n,)) for n in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers


@pytest.mark.parametrize(
    ("target", "method", "path", "status"),
    [
        ("peer", "GET", f"/pieces/{DIGEST}/0", 403),
        ("scheduler", "POST", "/v1/announce", 403),
        ("scheduler", "GET", "/metrics", 400),  # served without a token, and without a body
    ],
)
def test_sixty_unauthenticated_bodies_do_not_grow_the_server(
    cluster: Cluster, target: str, method: str, path: str, status: int
) -> None:
    if target == "peer":
        pid, address = cluster.mount_pid(), cluster.peer
    else:
        pid, address = cluster.scheduler_process.pid, cluster.scheduler
    before = peak_rss(pid)
    answers = flood(address, method, path, 60)
    grown = peak_rss(pid) - before
    print(f"\n{target} {path}: peak RSS {before / MIB:.0f} MiB, +{grown / MIB:.1f} MiB")
    # Before the fix each connection held its body until the end: +240 MiB and more.
    assert grown < 40 * MIB
    assert {answer[:13] for answer in answers} <= {b"HTTP/1.1 %d " % status, b""}, answers
    assert any(answers), f"no client was told {status}"
    cluster.serves()


# --- points 4 and 5: the daemon's control socket and a mount's stats socket ---------------------


def say(path: Path, request: bytes, read: bool = True) -> dict[str, object] | None:
    """Send ``request`` on a unix socket; its JSON answer, or None when not read (hung up)."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(path))  # blocking: waits for room in the listen backlog
        sock.settimeout(30)
        sock.sendall(request)
        if not read:
            return None
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    reply: dict[str, object] = json.loads(answer)
    return reply


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def hostile_clients(path: Path, pid: int, requests: list[bytes]) -> None:
    """Clients that hang up before the answer, nested JSON, 300 half-open connections: each
    gets an error line or nothing, and the process behind ``path`` holds no fd for long."""
    for _ in range(20):
        for request in requests:
            say(path, request, read=False)
    for depth in (50_000, 100_000):  # the second one is longer than a request may be
        request = b'{"command": ' + b"[" * depth + b"\n"
        reply = say(path, request)
        assert reply is not None and "send one JSON object" in str(reply["error"])
    baseline = open_fds(pid)
    with ExitStack() as held:
        for _ in range(300):
            sock = held.enter_context(socket.socket(socket.AF_UNIX))
            sock.connect(str(path))
        time.sleep(0.5)
        assert open_fds(pid) <= baseline + MAX_CONNECTIONS + 2
        wait_until(lambda: open_fds(pid) <= baseline + 2, timeout=REQUEST_TIMEOUT + 10)


def test_the_control_socket_survives_any_client(
    daemon_setup: tuple[Path, Path, dict[str, bytes], Path],  # noqa: F811
    tmp_path: Path,
) -> None:
    config, control, files, mnt = daemon_setup
    notifications = Notifications(tmp_path / "notify.sock")
    with running_daemon(config, notifications) as daemon:
        notifications.wait_for("READY=1")
        (before,) = mounts_by_path(control).values()
        hostile_clients(control, daemon.pid, [b'{"command": "ping"}\n', b'{"command": "status"}\n'])
        other = tmp_path / "models" / "other"
        other.mkdir()
        for reference, path, message in (
            (f"oci:{tmp_path}/x\0y:v1", str(other), "NUL byte"),
            (before["reference"], f"{other}\0", "NUL byte"),
        ):
            request = {"command": "mount", "reference": reference, "path": path}
            reply = say(control, json.dumps(request).encode() + b"\n")
            assert reply is not None and message in str(reply["error"]), reply
        assert daemon.poll() is None
        (after,) = mounts_by_path(control).values()
        assert (after["pid"], after["restarts"], after["state"]) == (before["pid"], 0, "mounted")
        assert (mnt / "model.safetensors").read_bytes() == files["model.safetensors"]
        stop_daemon(daemon)


def test_a_mount_stats_socket_survives_any_client(
    daemon_setup: tuple[Path, Path, dict[str, bytes], Path],  # noqa: F811
    tmp_path: Path,
) -> None:
    config, control, files, mnt = daemon_setup
    notifications = Notifications(tmp_path / "notify.sock")
    with running_daemon(config, notifications) as daemon:
        notifications.wait_for("READY=1")
        (before,) = mounts_by_path(control).values()
        (stats,) = control.parent.glob("mount-*.sock")
        hostile_clients(stats, int(before["pid"]), [b'{"command": "stats"}\n'])
        assert (mnt / "model.safetensors").read_bytes() == files["model.safetensors"]
        (after,) = mounts_by_path(control).values()
        assert (after["pid"], after["restarts"]) == (before["pid"], 0)
        # The daemon still gets the mount's counters from that socket.
        assert after["live"]["read_bytes"] >= len(files["model.safetensors"])
        stop_daemon(daemon)


# --- the parsers themselves: any text gives a number, None or a refusal, never an exception -----


NOT_NUMBERS = ["\xb2", "9" * 21, "9" * 5000, "+1", " 1", "1_0", "\u0661", "", "-1", "0x1", "1.0"]


@pytest.mark.parametrize("text", NOT_NUMBERS)
def test_a_number_is_ascii_digits_and_bounded(text: str) -> None:
    assert decimal(text) is None
    assert parse_content_range(f"bytes {text}-{text}/{text}") is None
    assert check(SECRET, f"Modelfs-HMAC {text}:00", "GET", "/", time.time()) is Verdict.REFUSED
    with pytest.raises(ValueError):
        parse_listen(f"127.0.0.1:{text}")
    with pytest.raises(ModelfsError):
        parse_address(f"127.0.0.1:{text}")
    if text == text.strip():  # a port range may have blanks around its ports
        with pytest.raises(ValueError):
            parse_port_range(f"{text}-7490")


@pytest.mark.parametrize("text", ["9" * 21, "9" * 5000, "NaN", "Infinity", "-Infinity", "1e999"])
def test_json_numbers_are_bounded(text: str) -> None:
    with pytest.raises(ValueError):
        loads_json(f'{{"index": {text}}}')


def test_bounded_numbers_still_read_what_clients_send() -> None:
    assert decimal("18446744073709551615") == 2**64 - 1
    assert parse_content_range("bytes 0-9/10") == (0, 9, 10)
    assert loads_json('{"index": -12, "retry_after": 0.5}') == {"index": -12, "retry_after": 0.5}


def test_a_pax_record_length_of_5000_digits_is_a_corrupt_layer() -> None:
    records = b"9" * 5000 + b" path=x\n"
    pax = tarfile.TarInfo("PaxHeaders/x")
    pax.type, pax.size = tarfile.XHDTYPE, len(records)
    member = tarfile.TarInfo("x")
    padding = b"\0" * (-len(records) % tarfile.BLOCKSIZE)
    archive = pax.tobuf(tarfile.USTAR_FORMAT) + records + padding + member.tobuf()
    with pytest.raises(ManifestError, match="malformed pax record"):
        parse_member(archive, 0)
