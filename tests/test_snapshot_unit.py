"""The snapshotter's pure parts: containerd's filter syntax, the mounts of a snapshot, the
snapshots' state machine (over a real SQLite file), a layer's disk usage, the labels and marker
that name a model, the credentials kept from CRI's pulls."""

from __future__ import annotations

import base64
import io
import tarfile
from pathlib import Path

import pytest

from modelfs.errors import AuthError
from modelfs.mount.session import MountOptions
from modelfs.reference import parse_reference
from modelfs.snapshot.api import cri_pb
from modelfs.snapshot.cri import IMAGE_REF_LABEL, PulledCredentials, auth_credentials
from modelfs.snapshot.disk import disk_usage, marker_in
from modelfs.snapshot.filters import FilterError, Selector, matcher, parse
from modelfs.snapshot.metadata import Code, Metadata, SnapshotError, update_labels
from modelfs.snapshot.mirror import Route, route
from modelfs.snapshot.models import (
    MARKER,
    MODEL_LABEL,
    SNAPSHOT_REF_LABEL,
    marker_descriptor,
    marker_layer,
    model_reference,
    parse_marker,
    remote_layer,
)
from modelfs.snapshot.mounts import Kind, Mount, mounts_for
from modelfs.sources.credentials import IDENTITY_TOKEN_USER, Credentials

SNAPSHOT = {
    ("name",): "sha256:abc",
    ("parent",): "sha256:def",
    ("kind",): "committed",
    ("labels", "containerd.io/snapshot.ref"): "sha256:abc",
}


def _fields(path: tuple[str, ...]) -> str | None:
    return SNAPSHOT.get(path)


def test_the_unpackers_filter_parses() -> None:
    text = 'labels."containerd.io/snapshot.ref"==sha256:abc,parent==sha256:def'
    assert parse(text) == (
        Selector(("labels", "containerd.io/snapshot.ref"), "==", "sha256:abc"),
        Selector(("parent",), "==", "sha256:def"),
    )
    assert matcher([text])(_fields)


@pytest.mark.parametrize(
    ("filters", "matches"),
    [
        ([], True),
        (["name==sha256:abc"], True),
        (["name==other"], False),
        (["name==other", "kind==committed"], True),  # any filter string
        (["kind==committed,name==other"], False),  # every selector of one
        (["name!=other"], True),
        (['name~="^sha256:a"'], True),
        (["name~=^x"], False),
        (['labels."containerd.io/snapshot.ref"'], True),  # present
        (["labels.absent"], False),
        (['name=="sha256:abc"'], True),
        (["unknown==x"], False),
    ],
)
def test_filters_match_as_containerds_do(filters: list[str], matches: bool) -> None:
    assert matcher(filters)(_fields) is matches


@pytest.mark.parametrize("text", ['name=="open', "name==a b", "name==a,", "==a", "name~=("])
def test_a_bad_filter_is_refused(text: str) -> None:
    with pytest.raises(FilterError):
        parse(text)


FS, WORK = Path("/s/9/fs"), Path("/s/9/work")


def test_mounts_are_those_of_containerds_overlay_snapshotter() -> None:
    one, two = Path("/s/2/fs"), Path("/s/1/fs")
    assert mounts_for(Kind.ACTIVE, FS, WORK, []) == [Mount("bind", str(FS), ("rw", "rbind"))]
    assert mounts_for(Kind.VIEW, FS, WORK, []) == [Mount("bind", str(FS), ("ro", "rbind"))]
    assert mounts_for(Kind.VIEW, FS, WORK, [one]) == [Mount("bind", str(one), ("ro", "rbind"))]
    assert mounts_for(Kind.VIEW, FS, WORK, [one, two]) == [
        Mount("overlay", "overlay", ("lowerdir=/s/2/fs:/s/1/fs",))
    ]
    assert mounts_for(Kind.ACTIVE, FS, WORK, [one, two]) == [
        Mount(
            "overlay",
            "overlay",
            ("workdir=/s/9/work", "upperdir=/s/9/fs", "lowerdir=/s/2/fs:/s/1/fs"),
        )
    ]
    with pytest.raises(ValueError):
        mounts_for(Kind.COMMITTED, FS, WORK, [])


def _refused(code: Code, call: object, *args: object) -> None:
    with pytest.raises(SnapshotError) as error:
        call(*args)  # type: ignore[operator]
    assert error.value.code is code


def test_the_state_machine(tmp_path: Path) -> None:
    metadata = Metadata(tmp_path / "metadata.db")
    with metadata.transaction():
        base = metadata.create(Kind.ACTIVE, "extract-1", "", {"a": "1"})
    _refused(Code.ALREADY_EXISTS, metadata.create, Kind.VIEW, "extract-1", "", {})
    _refused(Code.FAILED_PRECONDITION, metadata.create, Kind.ACTIVE, "k", "extract-1", {})
    _refused(Code.NOT_FOUND, metadata.create, Kind.ACTIVE, "k", "nope", {})
    _refused(Code.INVALID_ARGUMENT, metadata.create, Kind.ACTIVE, "", "", {})
    layer = metadata.commit("extract-1", "layer-1", {"b": "2"}, 4096, 3)
    assert (layer.id, layer.kind, dict(layer.labels)) == (base.id, Kind.COMMITTED, {"b": "2"})
    assert metadata.find("extract-1") is None
    _refused(Code.FAILED_PRECONDITION, metadata.commit, "layer-1", "again", {}, 0, 0)
    view = metadata.create(Kind.VIEW, "view", "layer-1", {})
    _refused(Code.FAILED_PRECONDITION, metadata.commit, "view", "again", {}, 0, 0)
    assert [parent.name for parent in metadata.parents(view)] == ["layer-1"]
    _refused(Code.FAILED_PRECONDITION, metadata.remove, "layer-1")
    metadata.remove("view")
    metadata.close()
    # On disk: a new store over the same file sees the same snapshots.
    again = Metadata(tmp_path / "metadata.db")
    assert [(s.name, s.size, s.inodes) for s in again.all()] == [("layer-1", 4096, 3)]


def test_a_failed_transaction_leaves_nothing(tmp_path: Path) -> None:
    metadata = Metadata(tmp_path / "metadata.db")
    with pytest.raises(OSError), metadata.transaction():
        metadata.create(Kind.ACTIVE, "key", "", {})
        raise OSError("the directories could not be made")
    assert metadata.all() == []


def test_update_labels_follows_the_field_mask() -> None:
    current = {"a": "1", "b": "2"}
    assert update_labels(current, {"c": "3"}, []) == {"c": "3"}
    assert update_labels(current, {"c": "3"}, ["labels"]) == {"c": "3"}
    assert update_labels(current, {"a": "9"}, ["labels.a", "labels.b"]) == {"a": "9"}
    with pytest.raises(SnapshotError):
        update_labels(current, {}, ["name"])


def test_disk_usage_counts_each_inode_once(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "file").write_bytes(b"x" * 10000)
    (tmp_path / "d" / "link").hardlink_to(tmp_path / "d" / "file")
    size, inodes = disk_usage(tmp_path)
    assert inodes == 3  # the root, d, the file (its hard link counted once)
    assert 10000 <= size <= 10000 + 3 * 8192 + 3 * 4096


MODEL = "registry.example.com/models/qwen@sha256:" + "a" * 64


def test_the_unpackers_labels_name_a_model_layer() -> None:
    labels = {SNAPSHOT_REF_LABEL: "sha256:" + "c" * 64, MODEL_LABEL: MODEL, "other": "x"}
    remote = remote_layer(labels)
    assert remote is not None
    assert (remote.chain_id, str(remote.model)) == ("sha256:" + "c" * 64, MODEL)
    assert remote_layer({SNAPSHOT_REF_LABEL: "sha256:" + "c" * 64}) is None  # an ordinary layer
    assert remote_layer({MODEL_LABEL: MODEL}) is None  # ctr pull: no chain id, Commit decides
    for bad in ("registry.example.com/models/qwen:v1", "not a reference"):
        with pytest.raises(SnapshotError) as error:
            remote_layer({**labels, MODEL_LABEL: bad})
        assert error.value.code is Code.INVALID_ARGUMENT


def test_the_marker_layer_names_its_model(tmp_path: Path) -> None:
    layer = marker_layer(model_reference(MODEL))
    assert layer == marker_layer(model_reference(MODEL))  # one digest per model
    with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
        [member] = tar.getmembers()
        extracted = tar.extractfile(member)
        assert member.name == MARKER and extracted is not None
        data = extracted.read()
    assert str(parse_marker(data)) == MODEL
    assert marker_descriptor(model_reference(MODEL), layer)["annotations"] == {MODEL_LABEL: MODEL}
    (tmp_path / MARKER).write_bytes(data)
    assert marker_in(tmp_path) == data
    (tmp_path / "more").write_bytes(b"")
    assert marker_in(tmp_path) is None  # a layer with more than the marker is ordinary


@pytest.mark.parametrize("data", [b"{", b"[]", b'{"model": 1}', b'{"model": "x:v1"}'])
def test_a_bad_marker_is_refused(data: bytes) -> None:
    with pytest.raises(SnapshotError):
        parse_marker(data)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/v2/", Route("base")),
        ("/v2/models/qwen/manifests/v1", Route("manifests", "models/qwen", "v1")),
        (f"/v2/m/manifests/sha256:{'a' * 64}", Route("manifests", "m", f"sha256:{'a' * 64}")),
        (f"/v2/m/blobs/sha256:{'b' * 64}", Route("blobs", "m", f"sha256:{'b' * 64}")),
        ("/v2/m/blobs/v1", None),  # blobs only by digest
        ("/v2/../etc/manifests/v1", None),
        ("/v2/Models/manifests/v1", None),  # repository names are lowercase
        ("/v2/m/tags/list", None),
        ("/metrics", None),
    ],
)
def test_the_mirror_routes_only_what_it_serves(path: str, expected: Route | None) -> None:
    assert route(path) == expected


@pytest.mark.parametrize(
    ("auth", "expected"),
    [
        (cri_pb.AuthConfig(username="u", password="p"), Credentials("u", "p")),
        (cri_pb.AuthConfig(auth=base64.b64encode(b"u:p:q").decode()), Credentials("u", "p:q")),
        (cri_pb.AuthConfig(identity_token="t"), Credentials(IDENTITY_TOKEN_USER, "t")),
        (cri_pb.AuthConfig(auth="not base64!"), None),
        (cri_pb.AuthConfig(auth=base64.b64encode(b"no colon").decode()), None),
        (cri_pb.AuthConfig(registry_token="bearer"), None),  # containerd's own, not modelfs's
        (cri_pb.AuthConfig(), None),
    ],
)
def test_a_cri_auth_config_gives_credentials(auth: object, expected: Credentials | None) -> None:
    assert auth_credentials(auth) == expected


def test_a_pulls_credentials_are_kept_for_its_image_and_registry_only() -> None:
    now = [0.0]
    pulled = PulledCredentials(seconds=60, limit=2, clock=lambda: now[0])
    auth = cri_pb.AuthConfig(username="u", password="secret")
    assert pulled.keep("registry.test:5000/models/qwen:v1", auth) == (
        True,
        "credentials kept for registry.test:5000",
    )
    # Found by the reference as containerd's CRI names it, for that registry alone.
    found = pulled.for_image("registry.test:5000/models/qwen:v1", "registry.test:5000")
    assert found == Credentials("u", "secret")
    assert pulled.for_image("registry.test:5000/models/qwen:v2", "registry.test:5000") is None
    assert pulled.for_image("registry.test:5000/models/qwen:v1", "elsewhere.test") is None
    model = parse_reference("registry.test:5000/models/qwen@sha256:" + "a" * 64)
    labels = {IMAGE_REF_LABEL: "registry.test:5000/models/qwen:v1"}
    assert pulled.for_model(labels, model) == found
    assert pulled.for_model({}, model) is None
    other = parse_reference("elsewhere.test/models/qwen@sha256:" + "a" * 64)
    assert pulled.for_model(labels, other) is None  # never sent to another registry
    # Docker Hub's short names are normalized as containerd's CRI does; kubelet names the
    # config key the credentials came from, Docker Hub's historical one included.
    hub = cri_pb.AuthConfig(
        username="u", password="secret", server_address="https://index.docker.io/v1/"
    )
    assert pulled.keep("qwen", hub) == (True, "credentials kept for docker.io")
    assert pulled.for_image("docker.io/library/qwen:latest", "docker.io") == found
    # Bounded: the oldest pull goes first.
    pulled.keep("registry.test:5000/models/third:v1", auth)
    assert pulled.for_image("registry.test:5000/models/qwen:v1", "registry.test:5000") is None
    # Expiring.
    now[0] = 61.0
    assert pulled.for_image("docker.io/library/qwen:latest", "docker.io") is None


@pytest.mark.parametrize(
    ("image", "auth", "said"),
    [
        ("Bad Reference", cri_pb.AuthConfig(username="u", password="p"), "no credentials kept"),
        ("r.test/m:v1", cri_pb.AuthConfig(registry_token="t"), "no credentials modelfs can use"),
        (
            "r.test/m:v1",
            cri_pb.AuthConfig(username="u", password="p", server_address="https://o.test/team"),
            "credentials not kept: they are for o.test, not r.test",
        ),
        ("r.test/m:v1", cri_pb.AuthConfig(username="u", password="p" * (17 << 10)), "16 KiB"),
    ],
)
def test_credentials_that_cannot_be_used_are_not_kept(image: str, auth: object, said: str) -> None:
    pulled = PulledCredentials()
    kept, what = pulled.keep(image, auth)
    assert not kept and said in what
    assert pulled.for_image("r.test/m:v1", "r.test") is None


def test_credentials_stay_out_of_logs_and_settings_files(tmp_path: Path) -> None:
    credentials = Credentials("user", "the-secret")
    assert "the-secret" not in repr(credentials)
    assert Credentials.from_json(credentials.as_json()) == credentials
    options = MountOptions(parse_reference("r.test/m:v1"), tmp_path, credentials=credentials)
    assert "the-secret" not in options.as_json() and "the-secret" not in repr(options)
    assert MountOptions.from_json(options.as_json()).credentials is None


@pytest.mark.parametrize(
    "data", [b"", b"not json", b"[]", b'{"username": "u"}', b'{"username": 1, "password": "p"}']
)
def test_malformed_credentials_on_the_pipe_are_refused(data: bytes) -> None:
    with pytest.raises(AuthError, match="the credentials given to the mount are malformed"):
        Credentials.from_json(data)
