"""Every parser of untrusted bytes, as a fuzz target with a ``hypothesis`` strategy.

The invariant for each: what it is handed either parses or fails with a ``ModelfsError`` (one
line for the user); a server answers with the status its protocol gives a bad request. Anything
else (another exception, a hang, a connection dropped without an answer, a 500) is a failure.
The suite runs each target briefly (tests/test_fuzz.py); ``scripts/fuzz`` runs them for minutes.
"""

from __future__ import annotations

import hashlib
import json
import socket
import string
import struct
import tarfile
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from hypothesis import strategies as st

from modelfs.artifact.tar import read_members
from modelfs.artifact.tree import (
    BlobRef,
    FileSpec,
    LayerPlan,
    Tree,
    check_sizes,
    plan_layers,
    raw_layer_file,
    tar_layer_entries,
)
from modelfs.cache import PieceCache
from modelfs.csi.volumes import DOCKER_CONFIG_SECRET, secret_credentials
from modelfs.errors import ModelfsError
from modelfs.fetcher.index import parse_index
from modelfs.jsonsocket import open_control_socket, serve_control
from modelfs.modelpack import (
    ANNOTATION_FILEPATH,
    ANNOTATION_METADATA,
    ANNOTATION_TITLE,
    MODEL_ARTIFACT_TYPE,
    MODEL_CONFIG,
    OCI_MANIFEST,
    layer_media_type,
)
from modelfs.peer.server import PeerServer
from modelfs.prefetch.profile import parse_profile, profile_hints
from modelfs.reference import parse_any_reference
from modelfs.scheduler.service import run_scheduler
from modelfs.service.config import parse_config
from modelfs.service.daemon import Daemon
from modelfs.service.mount_table import parse_mount_request
from modelfs.snapshot.models import model_config_type, parse_marker
from modelfs.sources.credentials import parse_challenge, token_from_response
from modelfs.sources.hosts import parse_hosts_toml
from modelfs.sources.interface import FetchedManifest
from modelfs.sources.redirects import stated_expiry
from modelfs.sources.referrers import index_referrers, manifest_layers
from modelfs.sources.registry import manifest_media_type, registry_message
from modelfs.transport.tokens import sign
from modelfs.trust import TrustError
from modelfs.trust.cosign import read_bundle, read_simple_signing
from modelfs.trust.policy import parse_policy
from modelfs.trust.safetensors import header_length, header_problems
from modelfs.untrusted import loads_json
from robustness.servers import exchange, flaw_log, serving


class Flaw(AssertionError):
    """A target broke its invariant (not a clean ModelfsError)."""


Check = Callable[[Any], None]


@dataclass(frozen=True)
class Target:
    name: str
    strategy: st.SearchStrategy[Any]
    # What checks one example; a context: servers are started once per target, not per example.
    open: Callable[[], AbstractContextManager[Check]]


def _clean(parse: Callable[[Any], object]) -> Callable[[], AbstractContextManager[Check]]:
    """A target whose parser may raise ModelfsError and nothing else."""

    def check(value: Any) -> None:
        with suppress(ModelfsError):
            parse(value)

    return lambda: nullcontext(check)


def _finished(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """The result of a coroutine that never really waits (its reads are in memory)."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    coroutine.close()
    raise Flaw("a coroutine over bytes in memory waited")


# -- values -----------------------------------------------------------------------------------

DIGEST = "sha256:" + "ab" * 32
DIGESTS = st.sampled_from([DIGEST, "sha256:" + "0" * 64, "sha256:" + "ab" * 31, "md5:00", ""])
NUMBERS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 2**31, 2**63 - 1, 2**63, 2**64, 128 << 30, 8 << 40]),
)
SCALARS = st.one_of(
    st.none(), st.booleans(), NUMBERS, st.floats(allow_nan=False, allow_infinity=False), st.text()
)
JSON = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=25,
)


def json_text(document: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    """``document`` as JSON, or bytes no JSON parser should choke on: nesting past the
    recursion limit, numbers of thousands of digits, NaN, binary."""
    return st.one_of(
        document.map(lambda value: json.dumps(value).encode()),
        document.map(lambda value: json.dumps(value).encode()),
        st.binary(max_size=200),
        st.integers(min_value=1, max_value=100_000).map(lambda n: b"[" * n + b"]" * n),
        st.integers(min_value=1, max_value=100_000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
        st.integers(min_value=20, max_value=10_000).map(lambda n: b'{"size":' + b"9" * n + b"}"),
        st.sampled_from([b"NaN", b'{"size": Infinity}', b'{"size": 1e400}', b"\xff\xfe{}"]),
    )


# -- references -------------------------------------------------------------------------------

REFERENCES = st.one_of(
    st.text(max_size=300),
    st.lists(
        st.sampled_from(
            [
                "registry.example.com",
                "localhost:5000",
                "[::1]:5000",
                "/",
                ":",
                "@",
                "sha256:",
                "ab" * 32,
                "models",
                "qwen",
                "v1",
                "oci:",
                "..",
                "UPPER",
                "-",
                "_",
                ".",
                "\0",
                " ",
                "a" * 300,
                "é",
            ]
        ),
        max_size=12,
    ).map("".join),
)


# -- manifests, annotations -------------------------------------------------------------------

MEDIA_TYPES = st.one_of(
    st.sampled_from(
        [
            layer_media_type(kind, fmt)
            for kind in ("weight", "weight.config", "doc", "code", "dataset")
            for fmt in ("raw", "tar", "tar+gzip", "tar+zstd")
        ]
        + ["application/vnd.oci.image.layer.v1.tar", "application/octet-stream", ""]
    ),
    st.text(max_size=40),
)
METADATA = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "name": st.text(max_size=20),
            "mode": NUMBERS | SCALARS,
            "size": NUMBERS | SCALARS,
            "typeflag": NUMBERS | SCALARS,
            "mtime": st.sampled_from(
                [
                    "2024-01-01T00:00:00Z",
                    "9999-12-31T23:59:59.999999999+14:00",
                    "0001-01-01T00:00:00Z",
                    "2024-13-45T99:99:99Z",
                    "",
                    "1e9",
                ]
            )
            | SCALARS,
        },
    ).map(json.dumps),
    json_text(JSON).map(lambda data: data.decode("utf-8", "replace")),
)
ANNOTATIONS = st.dictionaries(
    st.sampled_from([ANNOTATION_FILEPATH, ANNOTATION_METADATA, ANNOTATION_TITLE])
    | st.text(max_size=10),
    st.text(max_size=40) | METADATA | st.sampled_from(["../x", "/etc/passwd", "a//b", "./a", "a/"]),
    max_size=3,
)
LAYER = st.one_of(
    st.fixed_dictionaries(
        {"mediaType": MEDIA_TYPES, "digest": DIGESTS, "size": NUMBERS},
        optional={"annotations": ANNOTATIONS | JSON},
    ),
    JSON,
)
MANIFEST = st.one_of(
    st.fixed_dictionaries(
        {
            "schemaVersion": st.just(2) | SCALARS,
            "mediaType": st.just(OCI_MANIFEST) | SCALARS,
            "config": st.just({"mediaType": MODEL_CONFIG, "digest": DIGEST, "size": 2}) | JSON,
            "layers": st.lists(LAYER, max_size=5) | JSON,
        },
        optional={"artifactType": st.just(MODEL_ARTIFACT_TYPE) | SCALARS},
    ),
    JSON,
)


def _manifest(data: bytes) -> None:
    """As a mount reads a manifest (mount/model.py): JSON, then the tree its layers describe."""
    try:
        manifest = loads_json(data)
    except ValueError:
        return  # refused in one line by load_model
    if not isinstance(manifest, dict):
        return
    plans = plan_layers(manifest)
    files = [raw_layer_file(plan, default_mtime_ns=0) for plan in plans if plan.format == "raw"]
    check_sizes(files)
    Tree(files)
    fetched = FetchedManifest(DIGEST, OCI_MANIFEST, data)
    manifest_layers(fetched)
    manifest_media_type(None, data)
    index_referrers(data)


def _metadata_annotation(metadata: str) -> None:
    layer = {
        "mediaType": layer_media_type("weight", "tar+gzip"),
        "digest": DIGEST,
        "size": 10,
        "annotations": {ANNOTATION_FILEPATH: "w.bin", ANNOTATION_METADATA: metadata},
    }
    plan_layers({"schemaVersion": 2, "artifactType": MODEL_ARTIFACT_TYPE, "layers": [layer]})


def _registry_answers(data: bytes) -> None:
    """What a registry or token server says besides manifests and blobs."""
    registry_message(data)
    token_from_response(data)
    text = data.decode("utf-8", "replace")
    parse_challenge(text)
    stated_expiry("https://storage.example.com/blob?" + text)


# -- signatures, policies, the snapshotter's and the CSI driver's documents -------------------

SIGNED = st.one_of(
    JSON,
    st.fixed_dictionaries(
        {
            "critical": st.fixed_dictionaries(
                {
                    "image": st.fixed_dictionaries({"docker-manifest-digest": DIGESTS | SCALARS})
                    | JSON,
                    "type": st.sampled_from(["cosign container image signature"]) | SCALARS,
                },
                optional={"identity": st.fixed_dictionaries({"docker-reference": SCALARS}) | JSON},
            )
            | JSON
        }
    ),
    st.fixed_dictionaries(
        {
            "dsseEnvelope": st.fixed_dictionaries(
                {
                    "payloadType": st.just("application/vnd.in-toto+json") | SCALARS,
                    "payload": st.sampled_from(["e30=", "W10=", "!!", ""]) | SCALARS,
                    "signatures": st.lists(
                        st.fixed_dictionaries({"sig": SCALARS}) | JSON, max_size=3
                    )
                    | JSON,
                }
            )
            | JSON
        }
    ),
    st.fixed_dictionaries(
        {"default": st.lists(st.fixed_dictionaries({"type": SCALARS}) | JSON, max_size=2) | JSON},
        optional={"transports": JSON},
    ),
)


def _no_key(path: str) -> bytes:
    raise TrustError(f"no key file {path} here")


def _trust_and_nodes(data: bytes) -> None:
    """Signatures and policies (trust/), the snapshotter's marker and manifests, a CSI secret."""
    read_simple_signing(data)
    read_bundle("fuzz", data)
    text = data.decode("utf-8", "replace")
    parse_policy(text, "policy.json", _no_key)
    model_config_type(data)
    secret_credentials({DOCKER_CONFIG_SECRET: text}, "r.example.com")
    parse_marker(data)


# -- tar headers ------------------------------------------------------------------------------

TYPEFLAGS = st.sampled_from([b"0", b"\0", b"5", b"1", b"2", b"L", b"K", b"x", b"g", b"S", b"7"])
TAR_FORMATS: st.SearchStrategy[Any] = st.sampled_from(
    [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]
)
PAX_KEYS = st.sampled_from(
    ["path", "linkpath", "size", "mtime", "GNU.sparse.map", "GNU.sparse.size", "uid", "comment"]
)


@st.composite
def tar_member(draw: st.DrawFn) -> bytes:
    info = tarfile.TarInfo(draw(st.text(min_size=1, max_size=120) | st.just("a/" * 80 + "long")))
    info.type = draw(TYPEFLAGS)
    info.size = draw(st.integers(min_value=0, max_value=2**70) | st.integers(0, 2048))
    info.mtime = draw(st.integers(min_value=-(2**40), max_value=2**40))
    info.mode = draw(st.integers(min_value=0, max_value=0o7777))
    info.linkname = draw(st.text(max_size=120))
    info.pax_headers = draw(st.dictionaries(PAX_KEYS, st.text(max_size=30) | NUMBERS.map(str)))
    try:
        header = info.tobuf(format=draw(TAR_FORMATS), encoding="utf-8", errors="surrogateescape")
    except (ValueError, OverflowError, UnicodeError):  # tarfile refuses to write it
        header = bytes(512)
    data = draw(st.binary(max_size=2048))
    return header + data + bytes(-len(data) % 512)


@st.composite
def tar_field_mutation(draw: st.DrawFn) -> bytes:
    """A valid header with one field (size, mtime, mode, typeflag, magic...) replaced by any
    bytes, its checksum made right again so the parser reads on: base-256 and octal edges."""
    info = tarfile.TarInfo("model.bin")
    info.size = 1024
    block = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
    start, length = draw(
        st.sampled_from([(124, 12), (136, 12), (100, 8), (156, 1), (257, 8), (0, 100), (345, 155)])
    )
    field = draw(
        st.binary(min_size=length, max_size=length)
        | st.binary(min_size=length - 1, max_size=length - 1).map(lambda b: b"\x80" + b)
        | st.binary(min_size=length - 1, max_size=length - 1).map(lambda b: b"\xff" + b)
    )
    block[start : start + length] = field
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % (sum(block) & 0o777777)
    return bytes(block) + bytes(1024)


TAR = st.one_of(
    st.lists(tar_member(), min_size=1, max_size=4).map(
        lambda members: b"".join(members) + bytes(1024)
    ),
    tar_field_mutation(),
    st.binary(max_size=2048).map(lambda data: data + bytes(-len(data) % 512)),
    st.tuples(
        st.lists(tar_member(), min_size=1, max_size=3),
        st.integers(0, 4095),
        st.binary(min_size=1, max_size=4),
    ).map(
        lambda t: (lambda whole: whole[: t[1]] + t[2] + whole[t[1] + len(t[2]) :])(
            b"".join(t[0]) + bytes(1024)
        )
    ),
)


def _tar(blob: bytes) -> None:
    """As a mount lists a tar layer: header blocks only, then the files they describe."""

    async def read(offset: int, length: int) -> bytes:
        return blob[offset : offset + length]

    members = _finished(read_members(read, len(blob)))
    plan = LayerPlan(0, DIGEST, len(blob), "m", "tar", None, None, None, None)
    tar_layer_entries(plan, members, BlobRef(DIGEST, len(blob)))


# -- safetensors headers ----------------------------------------------------------------------

DTYPES = st.sampled_from(["F16", "BF16", "F32", "I64", "U8", "BOOL", "F8_E4M3", "X", ""])
TENSOR = st.one_of(
    st.fixed_dictionaries(
        {
            "dtype": DTYPES | SCALARS,
            "shape": st.lists(NUMBERS, max_size=4) | JSON,
            "data_offsets": st.lists(NUMBERS, max_size=3) | JSON,
        }
    ),
    JSON,
)
SAFETENSORS = st.tuples(
    json_text(st.dictionaries(st.text(max_size=8), TENSOR, max_size=4)),
    st.integers(min_value=-10, max_value=10) | NUMBERS,  # the length field, off by this
    st.integers(min_value=0, max_value=1 << 20),  # data after the header
)


def _safetensors(example: tuple[bytes, int, int]) -> None:
    """As the scan reads a safetensors file: the length prefix, then its JSON header."""
    header, skew, data = example
    length = len(header) + skew
    prefix = struct.pack("<Q", length % (1 << 64))
    file_size = 8 + len(header) + data
    checked, problem = header_length(prefix, file_size)
    if checked is not None:
        header_problems((header + bytes(data))[:checked], file_size)
    elif problem is None:
        raise Flaw("header_length gave neither a length nor a problem")


# -- the piece index, the read profile --------------------------------------------------------

LAYERS = [(DIGEST, 10 << 20), ("sha256:" + "cd" * 32, 5)]
INDEXED_MANIFEST = json.dumps(
    {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": MODEL_CONFIG, "digest": DIGEST, "size": 2},
        "layers": [
            {"mediaType": "application/octet-stream", "digest": digest, "size": size}
            for digest, size in LAYERS
        ],
    }
).encode()
MANIFEST_DIGEST = "sha256:" + hashlib.sha256(INDEXED_MANIFEST).hexdigest()
PIECES = st.lists(st.sampled_from(["ab" * 32, "AB" * 32, "", "x"]) | SCALARS, max_size=4)
PIECE_INDEX = json_text(
    st.fixed_dictionaries(
        {
            "schemaVersion": st.just(1) | SCALARS,
            "manifest": st.just(MANIFEST_DIGEST) | SCALARS,
            "pieceSize": st.sampled_from([4 << 20, 0, -1, 1]) | NUMBERS | SCALARS,
            "blobs": st.dictionaries(
                st.sampled_from([digest for digest, _ in LAYERS]) | st.text(max_size=8),
                st.fixed_dictionaries({"size": NUMBERS | SCALARS, "pieces": PIECES}) | JSON,
                max_size=3,
            )
            | JSON,
        }
    )
    | JSON
)
PROFILE = json_text(
    st.fixed_dictionaries(
        {
            "schemaVersion": st.just(1) | SCALARS,
            "manifest": st.just(MANIFEST_DIGEST) | SCALARS,
            "pieceSize": NUMBERS | SCALARS,
            "ranges": st.lists(
                st.tuples(
                    st.sampled_from(["w.bin", "x"]) | SCALARS, NUMBERS | SCALARS, NUMBERS
                ).map(list)
                | JSON,
                max_size=4,
            )
            | JSON,
        }
    )
    | JSON
)
PROFILED_TREE = Tree([FileSpec("w.bin", 10 << 20, 0o644, 0, BlobRef(DIGEST, 10 << 20), 0)])


def _piece_index(data: bytes) -> None:
    parse_index(data, FetchedManifest(MANIFEST_DIGEST, OCI_MANIFEST, INDEXED_MANIFEST))


def _profile(data: bytes) -> None:
    profile_hints(PROFILED_TREE, parse_profile(data, MANIFEST_DIGEST))


# -- the config file, hosts.toml --------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string, escapes included
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    return str(value)


TOML_KEYS = st.sampled_from(
    ["control_socket", "metrics_addr", "credentials", "dir", "size", "reference", "path",
     "prefetch", "plain_http", "insecure", "mirrors", "scheduler", "secret_file", "listen",
     "peer_port", "name", "labels", "server", "capabilities", "skip_verify", "ca", "client",
     "header", "override_path", "dial_timeout", "proxy", "policy", "scan", "bogus"]
)  # fmt: skip
TOML_TABLES = st.sampled_from(
    ["", "[cache]", "[[mounts]]", "[cluster]", "[trust]", '[registries."r.example.com"]',
     '[host."https://mirror.example.com"]', "[host]", "[registries]", "[cache.size]"]
)  # fmt: skip
TOML_SCALARS = st.one_of(
    st.text(max_size=30),
    st.sampled_from(
        ["1G", "0", "-1G", "1e400T", "/var/cache/x", "all", "10s", "-5m", "pull,resolve"]
    ),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.booleans(),
    st.floats(allow_nan=True),
)
TOML = st.one_of(
    st.lists(
        st.tuples(
            TOML_TABLES,
            st.dictionaries(
                TOML_KEYS, TOML_SCALARS | st.lists(TOML_SCALARS, max_size=3), max_size=4
            ),
        ),
        max_size=5,
    ).map(
        lambda tables: "\n".join(
            head + "\n" + "\n".join(f"{key} = {_toml_value(value)}" for key, value in body.items())
            for head, body in tables
        )
    ),
    st.text(max_size=300),
)


def _config_file(text: str) -> None:
    # What the parser reads; a value NaN writes as "nan", which TOML has as well.
    parse_config(text, "fuzz.toml")
    parse_hosts_toml(text, Path("/nonexistent/hosts.toml"), "r.example.com", "r.example.com", False)


# -- the daemon's control socket ---------------------------------------------------------------

MOUNT_REQUEST = st.fixed_dictionaries(
    {"command": st.sampled_from(["mount", "umount", "status", "ping", "stats", ""]) | SCALARS},
    optional={
        "reference": REFERENCES | SCALARS,
        "path": st.sampled_from(["/mnt/m", "relative", "/a\0b", ""]) | SCALARS,
        "prefetch": st.sampled_from(["none", "hints", "all", "some"]) | SCALARS,
        "plain_http": SCALARS,
        "credentials": st.fixed_dictionaries(
            {}, optional={"username": SCALARS, "password": SCALARS}
        )
        | JSON,
    },
)
CONTROL_LINES = st.one_of(
    json_text(MOUNT_REQUEST | JSON).map(lambda line: line + b"\n"),
    st.binary(max_size=300),
    st.integers(min_value=1, max_value=200_000).map(lambda n: b"x" * n),
)


@contextmanager
def _control_socket() -> Iterator[Check]:
    """A real daemon's control socket (its mount table not started: a mount request gets as far
    as ``parse_mount_request``, which is fuzzed on its own)."""
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        config = parse_config(
            f'control_socket = "{root / "control.sock"}"\n[cache]\ndir = "{root / "cache"}"\n'
            'size = "64M"\n',
            "fuzz.toml",
        )
        daemon = Daemon(config, lambda: config)

        async def serve(task_status: trio.TaskStatus[Path]) -> None:
            listener = await open_control_socket(config.control_socket)
            task_status.started(config.control_socket)
            await serve_control(listener, daemon.handle)

        with flaw_log() as flaws, serving(serve) as path:

            def check(line: bytes) -> None:
                answer = exchange(str(path), socket.AF_UNIX, line)
                if not answer.endswith(b"\n"):
                    raise Flaw(f"no answer line: {answer[:200]!r}")
                reply = loads_json(answer)
                if not isinstance(reply, dict):
                    raise Flaw(f"an answer that is not an object: {answer[:200]!r}")
                found = flaws.take()
                if found or str(reply.get("error", "")).startswith("the request failed ("):
                    raise Flaw(f"{reply!r} {found}")

            try:
                yield check
            finally:
                daemon.cache.close()


def _mount_request(request: Any) -> None:
    if isinstance(request, dict):
        parse_mount_request(request)


# -- the peer and scheduler HTTP servers -------------------------------------------------------

SECRET = b"fuzzing secret of 32 bytes......"
HTTP_METHODS = st.sampled_from(["GET", "POST", "PUT", "HEAD", "DELETE", "G\0T", "get"])
PEER_PATHS = st.one_of(
    st.sampled_from(
        [
            f"/pieces/{DIGEST}/0",
            f"/pieces/{DIGEST}/999999999",
            f"/pieces/{DIGEST}/" + "9" * 5000,
            f"/pieces/{DIGEST}/-1",
            "/pieces/sha256:zz/0",
            "/",
            "/metrics",
            "//",
            "/pieces/" + "a" * 9000,
        ]
    ),
    st.text(alphabet=string.printable, max_size=100).map(lambda text: "/" + text),
)
SCHEDULER_PATHS = st.sampled_from(
    ["/v1/register", "/v1/announce", "/v1/ask", "/v1/report", "/v1/node/report",
     "/v1/node/leave", "/v1/node/jobs", "/v1/node/progress", "/v1/preheat",
     "/v1/preheat/status", "/v1/models", "/v1/nodes", "/metrics", "/v1/none"]
)  # fmt: skip
SCHEDULER_BODY = st.dictionaries(
    st.sampled_from(
        [
            "name",
            "node",
            "address",
            "port",
            "digest",
            "index",
            "pieces",
            "piece",
            "peer",
            "reference",
            "job",
            "id",
            "models",
            "holding",
            "bytes",
            "total",
            "labels",
            "selector",
            "nodes",
            "done",
            "failed",
            "error",
            "manifest",
        ]
    )
    | st.text(max_size=8),
    JSON | DIGESTS | NUMBERS,
    max_size=6,
)


@st.composite
def http_request(
    draw: st.DrawFn, paths: st.SearchStrategy[str], body: st.SearchStrategy[bytes]
) -> bytes:
    method, path, data = draw(HTTP_METHODS), draw(paths), draw(body)
    headers = {"Host": "peer", "Content-Length": str(len(data))}
    signed = draw(st.sampled_from(["signed", "unsigned", "stale", "wrong body", "junk"]))
    if signed != "unsigned":
        when = time.time() - (3600 if signed == "stale" else 0)
        headers.update(sign(SECRET, method, path, when, b"x" if signed == "wrong body" else data))
    if signed == "junk":
        headers["Authorization"] = draw(st.text(alphabet=string.printable, max_size=80))
    extra = draw(
        st.dictionaries(
            st.sampled_from(["Content-Length", "Transfer-Encoding", "Expect", "X-Junk"]),
            st.sampled_from(["chunked", "100-continue", "-1", "99999999999", "5", "a"]),
            max_size=2,
        )
    )
    headers.update(extra)
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    request = head.encode("utf-8", "surrogateescape") + b"\r\n" + data
    return draw(
        st.just(request)
        | st.binary(max_size=300)
        | st.just(request[: draw(st.integers(0, len(request)))])
    )


def _http_check(address: tuple[str, int], flaws: Any, request: bytes) -> None:
    answer = exchange(address, socket.AF_INET, request)
    found = flaws.take()
    if found:
        raise Flaw(f"the server met an unforeseen error: {found}")
    if not answer:
        # Nothing back is right only for bytes that never made a whole request head.
        if b"\r\n\r\n" in request and request.startswith((b"GET ", b"POST ")):
            raise Flaw("no answer to a whole request")
        return
    status = answer.split(b"\r\n", 1)[0].split(b" ")
    if len(status) < 2 or not status[1].isdigit():
        raise Flaw(f"not an HTTP answer: {answer[:100]!r}")
    if int(status[1]) == 500:  # 501, 503, 505 are what HTTP says to some requests
        raise Flaw(f"answered {int(status[1])}: {answer[:300]!r}")


@contextmanager
def _peer_server() -> Iterator[Check]:
    with tempfile.TemporaryDirectory() as scratch:
        cache = PieceCache(Path(scratch), 64 << 20)
        cache.put(DIGEST, 0, b"piece", 5)
        server = PeerServer(cache, SECRET, lambda digest, index: None)

        async def serve(task_status: trio.TaskStatus[Any]) -> None:
            await server.serve("127.0.0.1", 0, task_status=task_status)

        try:
            with flaw_log() as flaws, serving(serve) as listeners:
                address = listeners[0].socket.getsockname()[:2]
                yield lambda request: _http_check(address, flaws, request)
        finally:
            cache.close()


@contextmanager
def _scheduler() -> Iterator[Check]:
    async def serve(task_status: trio.TaskStatus[Any]) -> None:
        await run_scheduler("127.0.0.1", 0, SECRET, None, task_status=task_status)

    with flaw_log() as flaws, serving(serve) as listeners:
        address = listeners[0].socket.getsockname()[:2]
        yield lambda request: _http_check(address, flaws, request)


# -- the targets ------------------------------------------------------------------------------

TARGETS = [
    Target("reference", REFERENCES, _clean(parse_any_reference)),
    Target("manifest", json_text(MANIFEST), _clean(_manifest)),
    Target("metadata annotation", METADATA, _clean(_metadata_annotation)),
    Target("registry answers", json_text(JSON), _clean(_registry_answers)),
    Target("signatures, policies", json_text(SIGNED), _clean(_trust_and_nodes)),
    Target("tar headers", TAR, _clean(_tar)),
    Target("safetensors header", SAFETENSORS, _clean(_safetensors)),
    Target("piece index", PIECE_INDEX, _clean(_piece_index)),
    Target("read profile", PROFILE, _clean(_profile)),
    Target("config file", TOML, _clean(_config_file)),
    Target("mount request", MOUNT_REQUEST | JSON, _clean(_mount_request)),
    Target("control socket", CONTROL_LINES, _control_socket),
    Target(
        "peer HTTP",
        http_request(PEER_PATHS, st.binary(max_size=100)),
        _peer_server,
    ),
    Target(
        "scheduler HTTP",
        http_request(SCHEDULER_PATHS, json_text(SCHEDULER_BODY)),
        _scheduler,
    ),
]
