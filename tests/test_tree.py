"""Manifest -> layer plans -> file tree: ModelPack, legacy cnai, plain ORAS, hostile input."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import pytest
import trio

from modelfs.artifact.tar import TarMember, read_members
from modelfs.artifact.tree import (
    ROOT_INODE,
    BlobRef,
    DataNotLocatedError,
    DirNode,
    DirSpec,
    FileNode,
    FileSpec,
    LayerPlan,
    Tree,
    check_path,
    deferred_layer_file,
    deferred_member,
    is_deferrable,
    parse_rfc3339_ns,
    plan_layers,
    raw_layer_file,
    tar_layer_entries,
)
from modelfs.errors import ManifestError
from modelfs.modelpack import (
    ANNOTATION_FILEPATH,
    ANNOTATION_METADATA,
    ANNOTATION_TITLE,
    LEGACY_ANNOTATION_FILEPATH,
    LEGACY_ANNOTATION_METADATA,
    MODEL_ARTIFACT_TYPE,
    MODEL_CONFIG,
    OCI_INDEX,
    OCI_MANIFEST,
    plain_layer_format,
)

MTIME = "2025-03-04T05:06:07.123456789Z"
MTIME_NS = 1741064767_123456789


def digest_of(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def layer(
    path: str | None,
    size: int = 10,
    media_type: str = "application/vnd.cncf.model.weight.v1.raw",
    metadata: dict[str, object] | None = None,
    path_key: str = ANNOTATION_FILEPATH,
    metadata_key: str = ANNOTATION_METADATA,
) -> dict[str, object]:
    annotations: dict[str, str] = {}
    if path is not None:
        annotations[path_key] = path
    if metadata is not None:
        annotations[metadata_key] = json.dumps(metadata)
    return {
        "mediaType": media_type,
        "digest": digest_of(f"{path}{size}{media_type}"),
        "size": size,
        "annotations": annotations,
    }


def model_manifest(*layers: dict[str, object], legacy: bool = False) -> dict[str, object]:
    config_type = MODEL_CONFIG.replace("cncf", "cnai") if legacy else MODEL_CONFIG
    manifest: dict[str, object] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": config_type, "digest": digest_of("config"), "size": 2},
        "layers": list(layers),
    }
    if not legacy:
        manifest["artifactType"] = MODEL_ARTIFACT_TYPE
    return manifest


def tree_of(manifest: dict[str, object]) -> Tree:
    return Tree([raw_layer_file(plan, 0) for plan in plan_layers(manifest)])


def file_spec(path: str, size: int = 1, mode: int = 0o644) -> FileSpec:
    return FileSpec(path, size, mode, 0, BlobRef(digest_of(path), size), 0)


# --- plan_layers -----------------------------------------------------------------------------


def test_modelpack_manifest_plans() -> None:
    metadata = {"name": "config.json", "mode": 0o100644, "size": 10, "mtime": MTIME, "typeflag": 0}
    manifest = model_manifest(
        layer("1_Pooling/config.json", metadata=metadata),
        layer("docs.tar", 2048, "application/vnd.cncf.model.doc.v1.tar"),
        layer(None, 4096, "application/vnd.cncf.model.code.v1.tar+gzip"),
    )
    config, docs, code = plan_layers(manifest)
    assert config == LayerPlan(
        index=0,
        digest=config.digest,
        size=10,
        media_type="application/vnd.cncf.model.weight.v1.raw",
        format="raw",
        path="1_Pooling/config.json",
        mode=0o644,  # Go's FileMode type bits dropped
        mtime_ns=MTIME_NS,
        meta_size=10,
        meta_typeflag=0,
    )
    assert (docs.format, docs.path, docs.index) == ("tar", "docs.tar", 1)
    assert (code.format, code.path, code.mode) == ("tar+gzip", None, None)


def test_legacy_cnai_manifest() -> None:
    manifest = model_manifest(
        layer(
            "model.safetensors",
            media_type="application/vnd.cnai.model.weight.v1.raw",
            metadata={"mode": 0o600, "size": 10, "mtime": "2024-01-01T00:00:00Z"},
            path_key=LEGACY_ANNOTATION_FILEPATH,
            metadata_key=LEGACY_ANNOTATION_METADATA,
        ),
        legacy=True,
    )
    (plan,) = plan_layers(manifest)
    assert (plan.path, plan.format, plan.mode) == ("model.safetensors", "raw", 0o600)
    assert plan.mtime_ns == 1704067200 * 10**9


def test_filepath_annotation_wins_over_legacy_and_title() -> None:
    annotations = {ANNOTATION_TITLE: "title.bin", LEGACY_ANNOTATION_FILEPATH: "legacy.bin"}
    entry = layer(None)
    entry["annotations"] = annotations
    assert plan_layers(model_manifest(entry))[0].path == "legacy.bin"
    annotations[ANNOTATION_FILEPATH] = "new/path.bin"
    assert plan_layers(model_manifest(entry))[0].path == "new/path.bin"


def test_plain_oras_manifest() -> None:
    layers = [
        layer("weights.bin", 7, "application/octet-stream", path_key=ANNOTATION_TITLE),
        layer("dir", 99, "application/vnd.oci.image.layer.v1.tar+gzip", path_key=ANNOTATION_TITLE),
    ]
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.example.thing",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": digest_of("{}")},
        "layers": layers,
    }
    weights, directory = plan_layers(manifest)
    assert (weights.path, weights.format, weights.size) == ("weights.bin", "raw", 7)
    assert (directory.path, directory.format) == ("dir", "tar+gzip")
    assert tree_of({**manifest, "layers": layers[:1]}).lookup(ROOT_INODE, "weights.bin")


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda m: m.update(mediaType=OCI_INDEX), "image index"),
        (lambda m: m.update(manifests=[]), "image index"),
        (lambda m: m.pop("layers"), "no layers"),
        (lambda m: m.update(layers=[]), "no layers"),
        (lambda m: m["layers"][0].pop("digest"), "layer 0 .*digest is missing"),
        (lambda m: m["layers"][0].update(digest="sha512:" + "a" * 128), "not sha256"),
        (lambda m: m["layers"][0].pop("size"), "layer 0 .*size None"),
        (lambda m: m["layers"][0].update(size=-1), "size -1"),
        (lambda m: m["layers"][0].update(size=True), "size True"),
        (lambda m: m["layers"][0].pop("mediaType"), "mediaType is missing"),
        (lambda m: m["layers"][0].update(annotations={}), "raw layer has no file path"),
        (lambda m: m["layers"][0].pop("annotations"), "raw layer has no file path"),
        (lambda m: m["layers"][0].update(annotations={ANNOTATION_FILEPATH: 3}), "map of strings"),
        (lambda m: m.update(layers=["nope"]), "not a JSON object"),
    ],
)
def test_bad_manifests_are_refused(mutate: object, message: str) -> None:
    manifest = model_manifest(layer("a.bin"))
    mutate(manifest)  # type: ignore[operator]
    with pytest.raises(ManifestError, match=message):
        plan_layers(manifest)


@pytest.mark.parametrize(
    ("metadata_text", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"size": 11}', "metadata says 11 bytes but the descriptor says 10"),
        ('{"size": "10"}', "'size' is '10'"),
        ('{"mode": -1}', "'mode' is -1"),
        ('{"mtime": "yesterday"}', "not an RFC 3339 time"),
        ('{"mtime": "2025-13-01T00:00:00Z"}', "not an RFC 3339 time"),
        ('{"mtime": 1700000000}', "not an RFC 3339 time"),
    ],
)
def test_bad_metadata_is_refused(metadata_text: str, message: str) -> None:
    entry = layer("model.bin", 10)
    entry["annotations"][ANNOTATION_METADATA] = metadata_text  # type: ignore[index]
    with pytest.raises(ManifestError, match=f"layer 0 \\(sha256:[0-9a-f]+\\): .*{message}"):
        plan_layers(model_manifest(entry))


def test_tar_layer_metadata_size_is_the_file_size_not_the_blob_size() -> None:
    entry = layer("model.bin", 10240, "application/vnd.cncf.model.weight.v1.tar", {"size": 10})
    assert plan_layers(model_manifest(entry))[0].meta_size == 10


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1970-01-01T00:00:00Z", 0),
        ("2025-03-04T05:06:07.123456789Z", MTIME_NS),
        ("2025-03-04T07:06:07.123456789+02:00", MTIME_NS),
        ("2025-03-04T00:06:07.1234567891-05:00", MTIME_NS),  # beyond ns precision: truncated
        ("2025-03-04t05:06:07.5z", 1741064767_500000000),
        ("1969-12-31T23:59:59Z", -(10**9)),
    ],
)
def test_rfc3339_parsing(text: str, expected: int) -> None:
    assert parse_rfc3339_ns(text) == expected


# --- check_path --------------------------------------------------------------------------------


def test_check_path_splits_relative_paths() -> None:
    assert check_path("1_Pooling/config.json") == ("1_Pooling", "config.json")
    assert check_path("a\\..\\b") == ("a\\..\\b",)  # a backslash is an ordinary character here
    assert check_path("é" * 127) == ("é" * 127,)  # 254 bytes


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("../../etc/passwd", r"'\.\.' component"),
        ("/etc/x", "absolute"),
        ("a/../b", r"'\.\.' component"),
        ("a//b", "empty"),
        ("a/", "empty"),
        (".", r"'\.'"),
        ("./a", r"'\.'"),
        ("", "empty"),
        ("a/\0b", "NUL"),
        ("x" * 256, "longer than 255 bytes"),
        ("é" * 128, "longer than 255 bytes"),
        ("/".join(["x" * 200] * 21), "longer than 4096 bytes"),
        ("bad\udcff", "not valid UTF-8"),
    ],
)
def test_hostile_paths_are_refused(path: str, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        check_path(path)


@pytest.mark.parametrize("path", ["../../etc/passwd", "/etc/x", "a/../b", "a//b", "a/\0b", "."])
def test_hostile_raw_layer_paths_are_refused_with_the_layer(path: str) -> None:
    with pytest.raises(ManifestError, match=r"manifest layer 0 .*file path"):
        plan_layers(model_manifest(layer(path)))


# --- Tree ----------------------------------------------------------------------------------------


def test_nested_tree_lookup_children_and_nodes() -> None:
    manifest = model_manifest(
        layer("config.json", 3, metadata={"mode": 0o644, "size": 3, "mtime": MTIME}),
        layer("1_Pooling/config.json", 5),
        layer("model.safetensors", 100),
        layer("a/b/c/deep.txt", 1),
    )
    tree = tree_of(manifest)
    assert tree.root == ROOT_INODE == 1
    assert [name for name, _ in tree.children(ROOT_INODE)] == [
        "1_Pooling", "a", "config.json", "model.safetensors",
    ]  # fmt: skip
    pooling = tree.lookup(ROOT_INODE, "1_Pooling")
    assert pooling is not None
    pooling_node = tree.node(pooling)
    assert isinstance(pooling_node, DirNode) and pooling_node.mode == 0o555
    inner = tree.lookup(pooling, "config.json")
    assert inner is not None
    inner_node = tree.node(inner)
    assert isinstance(inner_node, FileNode)
    assert (inner_node.path, inner_node.size, inner_node.mode) == (
        "1_Pooling/config.json",
        5,
        0o444,
    )
    assert inner_node.offset == 0 and inner_node.blob.size == 5

    config = tree.node(tree.lookup(ROOT_INODE, "config.json") or 0)
    assert isinstance(config, FileNode) and config.mtime_ns == MTIME_NS and config.mode == 0o444

    assert tree.lookup(ROOT_INODE, "missing") is None
    assert tree.lookup(inner, "x") is None  # a file has no entries
    with pytest.raises(KeyError):
        tree.node(999)
    with pytest.raises(NotADirectoryError):
        tree.children(inner)
    assert [f.path for f in tree.files()] == [
        "1_Pooling/config.json", "a/b/c/deep.txt", "config.json", "model.safetensors",
    ]  # fmt: skip
    assert tree.total_size == 109


def test_inodes_are_stable_and_in_sorted_path_order() -> None:
    specs = [file_spec(p) for p in ["b/x", "a", "b/a/z", "c"]]
    first, second = Tree(specs), Tree(reversed(specs))
    expected = ["", "a", "b", "b/a", "b/a/z", "b/x", "c"]
    for tree in (first, second):
        assert [tree.node(inode).path for inode in range(1, 8)] == expected
    with pytest.raises(KeyError):
        first.node(8)


def test_modes_lose_write_and_special_bits() -> None:
    tree = Tree(
        [file_spec("run.sh", mode=0o4777), file_spec("d/f", mode=0o600)],
        [DirSpec("d", 0o1777, 5)],
        default_mtime_ns=42,
    )
    modes = {node.path: node.mode for node in (tree.node(i) for i in range(1, 5))}
    assert modes == {"": 0o555, "d": 0o555, "d/f": 0o400, "run.sh": 0o555}
    assert tree.node(ROOT_INODE).mtime_ns == 42
    assert tree.node(tree.lookup(ROOT_INODE, "d") or 0).mtime_ns == 5


@pytest.mark.parametrize(
    ("files", "dirs", "message"),
    [
        (["a.bin", "a.bin"], [], "'a.bin' appears twice"),
        (["a", "a/b"], [], "'a' is both a file and a directory"),
        (["a/b", "a"], [], "'a' is both a file and a directory"),
        (["a"], ["a"], "'a' is both a file and a directory"),
        (["a"], ["a/sub"], "'a' is both a file and a directory"),
        ([], ["d"], "no files"),
        ([], [], "no files"),
        (["../x"], [], r"'\.\.' component"),
    ],
)
def test_tree_refuses(files: list[str], dirs: list[str], message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        Tree([file_spec(p) for p in files], [DirSpec(p, 0o755, 0) for p in dirs])


def test_duplicate_across_layers_is_refused() -> None:
    with pytest.raises(ManifestError, match="appears twice"):
        tree_of(model_manifest(layer("same.bin", 1), layer("same.bin", 2)))


# --- tar layers ----------------------------------------------------------------------------------


def tar_blob(fmt: int = tarfile.PAX_FORMAT) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as archive:
        root = tarfile.TarInfo("./")
        root.type = tarfile.DIRTYPE
        archive.addfile(root)
        tokenizer = tarfile.TarInfo("./tok/")
        tokenizer.type, tokenizer.mode, tokenizer.mtime = tarfile.DIRTYPE, 0o700, 99
        archive.addfile(tokenizer)
        data = b"vocabulary"
        vocab = tarfile.TarInfo("./tok/vocab.txt")
        vocab.size, vocab.mode, vocab.mtime = len(data), 0o664, 1234
        archive.addfile(vocab, io.BytesIO(data))
        link = tarfile.TarInfo("tok/vocab-copy.txt")
        link.type, link.linkname = tarfile.LNKTYPE, "./tok/vocab.txt"
        archive.addfile(link)
    return out.getvalue()


def members_of(blob: bytes) -> list[TarMember]:
    async def read(offset: int, length: int) -> bytes:
        return blob[offset : offset + length]

    return trio.run(read_members, read, len(blob))


def test_tar_layer_becomes_files_and_dirs() -> None:
    blob = tar_blob()
    (plan,) = plan_layers(
        model_manifest(layer("tok", len(blob), "application/vnd.cncf.model.code.v1.tar"))
    )
    ref = BlobRef(plan.digest, plan.size)
    files, dirs = tar_layer_entries(plan, members_of(blob), ref)
    assert dirs == [DirSpec("tok", 0o700, 99 * 10**9)]
    tree = Tree(files, dirs)
    tok = tree.lookup(ROOT_INODE, "tok") or 0
    assert tree.node(tok).mode == 0o500
    assert [name for name, _ in tree.children(tok)] == ["vocab-copy.txt", "vocab.txt"]
    for name in ("vocab.txt", "vocab-copy.txt"):
        node = tree.node(tree.lookup(tok, name) or 0)
        assert isinstance(node, FileNode) and node.blob == ref and node.mode == 0o444
        assert blob[node.offset : node.offset + node.size] == b"vocabulary"


def test_tar_layer_refuses_symlinks_and_hostile_names() -> None:
    (plan,) = plan_layers(model_manifest(layer("t", 1, "application/vnd.cncf.model.code.v1.tar")))
    ref = BlobRef(plan.digest, plan.size)

    def member(name: str, typeflag: str = "0", linkname: str = "") -> TarMember:
        return TarMember(name, typeflag, 0, 0o644, 0, 512, 512, linkname)

    with pytest.raises(ManifestError, match=r"layer 0 .*'evil' is of type '2'"):
        tar_layer_entries(plan, [member("evil", "2", "/etc/passwd")], ref)
    with pytest.raises(ManifestError, match=r"layer 0 .*'hard' is of type '1'"):
        tar_layer_entries(plan, [member("hard", "1", "not-earlier")], ref)
    with pytest.raises(ManifestError, match=r"layer 0 .*'\.\.' component"):
        tar_layer_entries(plan, [member("../../etc/passwd")], ref)


@pytest.mark.parametrize(
    ("media_type", "annotations", "expected"),
    [
        ("application/vnd.oci.image.layer.v1.tar", {}, "raw"),
        ("application/vnd.oci.image.layer.v1.tar", {"io.deis.oras.content.unpack": "true"}, "tar"),
        ("application/vnd.oci.image.layer.v1.tar+gzip", {}, "tar+gzip"),
        ("application/vnd.oci.image.layer.v1.tar+zstd", {}, "tar+zstd"),
        ("application/octet-stream", {}, "raw"),
    ],
)
def test_plain_layer_format_follows_oras(
    media_type: str, annotations: dict[str, str], expected: str
) -> None:
    assert plain_layer_format(media_type, annotations) == expected


# --- compressed layers whose one file is known before their bytes ---------------------------------

GZIP_TAR = "application/vnd.cncf.model.weight.v1.tar+gzip"
REGULAR = {"name": "w.bin", "mode": 0o100640, "size": 10, "mtime": MTIME, "typeflag": ord("0")}


@pytest.mark.parametrize(
    ("media_type", "metadata", "deferrable"),
    [
        (GZIP_TAR, REGULAR, True),
        ("application/vnd.cncf.model.weight.v1.tar+zstd", REGULAR, True),
        (GZIP_TAR, {**REGULAR, "typeflag": 0}, True),  # the spec text's spelling of regular
        (GZIP_TAR, {**REGULAR, "typeflag": ord("5"), "mode": 0o20000000755}, False),  # a directory
        (GZIP_TAR, {key: v for key, v in REGULAR.items() if key != "typeflag"}, False),
        (GZIP_TAR, {key: v for key, v in REGULAR.items() if key != "size"}, False),
        (GZIP_TAR, None, False),
        ("application/vnd.cncf.model.weight.v1.tar", REGULAR, False),  # random access anyway
    ],
)
def test_which_compressed_layers_are_deferred(
    media_type: str, metadata: dict[str, object] | None, deferrable: bool
) -> None:
    (plan,) = plan_layers(model_manifest(layer("w.bin", 4096, media_type, metadata)))
    assert is_deferrable(plan) is deferrable


class Located:
    """A deferred file's data as it is after its first read found it."""

    def __init__(self, location: tuple[BlobRef, int] | None) -> None:
        self.location = location

    async def locate(self) -> tuple[BlobRef, int]:
        assert self.location is not None
        return self.location


def test_deferred_file_has_the_annotated_attributes_and_no_blob_until_located() -> None:
    (plan,) = plan_layers(model_manifest(layer("dir/w.bin", 4096, GZIP_TAR, REGULAR)))
    data = Located(None)
    tree = Tree([deferred_layer_file(plan, data, default_mtime_ns=0)])
    (node,) = tree.files()
    assert (node.path, node.size, node.mode, node.mtime_ns) == ("dir/w.bin", 10, 0o440, MTIME_NS)
    assert not node.located
    with pytest.raises(DataNotLocatedError):
        node.blob  # noqa: B018  # the property raises
    derived = BlobRef(f"{plan.digest}+decompressed", 2048)
    data.location = (derived, 512)
    assert node.located and (node.blob, node.offset) == (derived, 512)


def tar_of(files: dict[str, bytes], dirs: tuple[str, ...] = ()) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name in dirs:
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            archive.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


def test_deferred_member_is_the_promised_file() -> None:
    (plan,) = plan_layers(model_manifest(layer("w.bin", 4096, GZIP_TAR, REGULAR)))
    derived = BlobRef(f"{plan.digest}+decompressed", 2048)
    archive = tar_of({"./w.bin": b"0123456789"}, dirs=("./",))
    member = deferred_member(plan, members_of(archive), derived)
    assert (member.path, member.size, member.blob) == ("w.bin", 10, derived)
    assert archive[member.offset : member.offset + member.size] == b"0123456789"


@pytest.mark.parametrize(
    "files",
    [
        {"w.bin": b"012345678"},  # a size other than the annotation's
        {"other.bin": b"0123456789"},  # another name
        {"w.bin": b"0123456789", "extra.bin": b"x"},  # two members
        {},  # none
    ],
)
def test_deferred_member_refuses_an_archive_that_differs_from_its_annotations(
    files: dict[str, bytes],
) -> None:
    (plan,) = plan_layers(model_manifest(layer("w.bin", 4096, GZIP_TAR, REGULAR)))
    derived = BlobRef(f"{plan.digest}+decompressed", 2048)
    with pytest.raises(ManifestError, match=r"^layer 0 \(sha256:[0-9a-f]+\): the archive holds"):
        deferred_member(plan, members_of(tar_of(files)), derived)


def test_deferred_member_refuses_a_directory_beside_the_file() -> None:
    (plan,) = plan_layers(model_manifest(layer("w.bin", 4096, GZIP_TAR, REGULAR)))
    derived = BlobRef(f"{plan.digest}+decompressed", 2048)
    with pytest.raises(ManifestError, match="'sub', 'directory'"):
        deferred_member(plan, members_of(tar_of({"w.bin": b"0123456789"}, ("sub",))), derived)
