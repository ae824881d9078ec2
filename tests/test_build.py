"""`modelfs build` into real OCI layouts on disk, and LayoutSource reading them back."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
from click.testing import CliRunner, Result
from safetensors.numpy import save_file

from modelfs.builder.build import generate_for_directory, plan_build, write_build
from modelfs.builder.config import validate_model_config
from modelfs.builder.modelfile import ModelfileError
from modelfs.cli import cli
from modelfs.errors import IntegrityError, ManifestError, NotFoundError
from modelfs.modelpack import (
    ANNOTATION_FILEPATH,
    ANNOTATION_METADATA,
    ANNOTATION_MODELFILE,
    ANNOTATION_UNTESTED,
    MODEL_ARTIFACT_TYPE,
    MODEL_CONFIG,
    OCI_INDEX,
    OCI_MANIFEST,
)
from modelfs.sources.layout import LayoutSource, OciLayout

REF = "localhost:5000/models/bert:v1"
MODELFILE = """\
# bert, tiny
NAME bert-tiny
FAMILY bert
ARCH transformer
PRECISION float32
PARAMSIZE 4K
CONFIG *.json
CONFIG 1_Pooling/config.json
MODEL *.safetensors
DOC README.md
"""
LAYER_ORDER = [
    ("1_Pooling/config.json", "weight.config"),
    ("config.json", "weight.config"),
    ("tokenizer.json", "weight.config"),
    ("model.safetensors", "weight"),
    ("README.md", "doc"),
]


def make_model_dir(parent: Path, name: str = "bert-tiny") -> Path:
    """A small Hugging Face style model directory with a Modelfile."""
    model = parent / name
    (model / "1_Pooling").mkdir(parents=True)
    weights = np.arange(64 * 64, dtype=np.float32).reshape(64, 64)
    save_file({"embeddings": weights}, str(model / "model.safetensors"))
    (model / "model.safetensors").chmod(0o640)
    config = {"model_type": "bert", "torch_dtype": "float32", "transformers_version": "4.40.0"}
    (model / "config.json").write_text(json.dumps(config))
    (model / "tokenizer.json").write_text(json.dumps({"vocab": {"[CLS]": 0, "hello": 1}}))
    (model / "README.md").write_text("# bert-tiny\n\nA test model.\n")
    (model / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    (model / "Modelfile").write_text(MODELFILE)
    return model


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, [str(arg) for arg in args])


def build(model: Path, store: Path, *extra: str | Path, ref: str = REF) -> str:
    """Build and return the manifest digest printed."""
    result = run("build", "-t", ref, "--store", store, *extra, model)
    assert result.exit_code == 0, result.output
    return result.stdout.split()[1]


def snapshot(store: Path) -> dict[str, bytes]:
    """Every path in the store, with the contents of index.json (what a build may change)."""
    listing = {str(path.relative_to(store)): b"" for path in store.rglob("*")}
    listing["index.json"] = (store / "index.json").read_bytes()
    return listing


def manifest_of(store: Path, name: str = REF) -> tuple[str, dict[str, Any]]:
    layout = OciLayout.open(store)
    descriptor = layout.resolve(name)
    assert descriptor is not None
    digest = descriptor["digest"]
    return digest, json.loads(layout.blob_path(digest).read_bytes())


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return make_model_dir(tmp_path)


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "store"


# -- the artifact ------------------------------------------------------------------------


def test_raw_build_layers_annotations_config(model: Path, store: Path) -> None:
    digest = build(model, store)
    assert digest == manifest_of(store)[0]
    layout = OciLayout.open(store)
    _, manifest = manifest_of(store)
    assert manifest["schemaVersion"] == 2
    assert manifest["mediaType"] == OCI_MANIFEST
    assert manifest["artifactType"] == MODEL_ARTIFACT_TYPE
    assert manifest["config"]["mediaType"] == MODEL_CONFIG
    assert manifest["annotations"] == {ANNOTATION_MODELFILE: MODELFILE}

    layers = manifest["layers"]
    assert [
        (layer["annotations"][ANNOTATION_FILEPATH], layer["mediaType"]) for layer in layers
    ] == [(path, f"application/vnd.cncf.model.{kind}.v1.raw") for path, kind in LAYER_ORDER]
    for layer in layers:
        path = layer["annotations"][ANNOTATION_FILEPATH]
        content = (model / path).read_bytes()
        assert layer["digest"] == "sha256:" + hashlib.sha256(content).hexdigest()
        assert layer["size"] == len(content)
        assert layout.blob_path(layer["digest"]).read_bytes() == content
        assert layer["annotations"][ANNOTATION_UNTESTED] == "false"
        assert json.loads(layer["annotations"][ANNOTATION_METADATA]) == {
            "name": Path(path).name,
            "mode": (model / path).stat().st_mode & 0o777,
            "uid": 0,
            "gid": 0,
            "size": len(content),
            "mtime": "1970-01-01T00:00:00Z",
            "typeflag": 0,
        }
    assert json.loads(layers[3]["annotations"][ANNOTATION_METADATA])["mode"] == 0o640

    config_bytes = layout.blob_path(manifest["config"]["digest"]).read_bytes()
    assert manifest["config"]["size"] == len(config_bytes)
    config = json.loads(config_bytes)
    validate_model_config(config)
    assert config == {
        "descriptor": {"createdAt": "1970-01-01T00:00:00Z", "family": "bert", "name": "bert-tiny"},
        "config": {"architecture": "transformer", "paramSize": "4K", "precision": "float32"},
        "modelfs": {"type": "layers", "diffIds": [layer["digest"] for layer in layers]},
    }


def test_layout_is_a_valid_oci_layout(model: Path, store: Path) -> None:
    build(model, store)
    assert json.loads((store / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((store / "index.json").read_text())
    assert index["schemaVersion"] == 2
    assert index["mediaType"] == OCI_INDEX
    [entry] = index["manifests"]
    assert entry["mediaType"] == OCI_MANIFEST
    assert entry["artifactType"] == MODEL_ARTIFACT_TYPE
    assert entry["annotations"] == {"org.opencontainers.image.ref.name": REF}
    blobs = sorted((store / "blobs" / "sha256").iterdir())
    assert len(blobs) == 1 + 1 + len(LAYER_ORDER)  # manifest, config, layers
    for blob in blobs:
        assert blob.name == hashlib.sha256(blob.read_bytes()).hexdigest()
    assert entry["size"] == (store / "blobs" / "sha256" / entry["digest"][7:]).stat().st_size


def test_same_inputs_give_the_same_digest(model: Path, tmp_path: Path) -> None:
    first = build(model, tmp_path / "one")
    for path in model.rglob("*"):
        os.utime(path, (1_700_000_000, 1_700_000_000))
    assert build(model, tmp_path / "two") == first
    before = snapshot(tmp_path / "one")
    assert build(model, tmp_path / "one") == first
    assert snapshot(tmp_path / "one") == before  # nothing new: every blob was there already
    tar_first = build(model, tmp_path / "tar-one", "--tar")
    assert build(model, tmp_path / "tar-two", "--tar") == tar_first


def test_created_time_is_recorded_and_changes_the_digest(model: Path, tmp_path: Path) -> None:
    fixed = build(model, tmp_path / "fixed")
    dated = build(model, tmp_path / "dated", "--created", "2025-03-15T16:30:00+02:00")
    assert dated != fixed
    layout = OciLayout.open(tmp_path / "dated")
    _, manifest = manifest_of(tmp_path / "dated")
    config = json.loads(layout.blob_path(manifest["config"]["digest"]).read_bytes())
    assert config["descriptor"]["createdAt"] == "2025-03-15T14:30:00Z"
    metadata = json.loads(manifest["layers"][0]["annotations"][ANNOTATION_METADATA])
    assert metadata["mtime"] == "2025-03-15T14:30:00Z"
    result = run("build", "-t", REF, "--store", tmp_path / "x", "--created", "soon", model)
    assert result.exit_code == 2 and "'soon' is not an RFC 3339 time" in result.output


def test_tar_layers_hold_one_member_named_by_path(model: Path, store: Path) -> None:
    deep = Path("nested/" + "d" * 60 + "/" + "e" * 60 + "/extra.json")  # > 100 chars: pax
    (model / deep).parent.mkdir(parents=True)
    (model / deep).write_text('{"deep": true}')
    (model / "Modelfile").write_text(MODELFILE + f"CONFIG {deep}\n")
    build(model, store, "--tar")
    layout = OciLayout.open(store)
    _, manifest = manifest_of(store)
    assert manifest["layers"][2]["annotations"][ANNOTATION_FILEPATH] == str(deep)
    for layer in manifest["layers"]:
        assert layer["mediaType"].endswith(".v1.tar")
        path = layer["annotations"][ANNOTATION_FILEPATH]
        blob = layout.blob_path(layer["digest"]).read_bytes()
        assert len(blob) % 512 == 0
        with tarfile.open(fileobj=io.BytesIO(blob)) as archive:
            [member] = archive.getmembers()
            assert member.name == path
            assert member.isreg()
            assert (member.uid, member.gid, member.mtime) == (0, 0, 0)
            assert member.mode == (model / path).stat().st_mode & 0o777
            extracted = archive.extractfile(member)
            assert extracted is not None
            assert extracted.read() == (model / path).read_bytes()
        metadata = json.loads(layer["annotations"][ANNOTATION_METADATA])
        assert metadata["size"] == (model / path).stat().st_size


def test_modelfile_labels_become_layer_annotations(model: Path, store: Path) -> None:
    (model / "notes.unknown").write_text("?")
    (model / "Modelfile").write_text(
        MODELFILE + f"CODE --label={ANNOTATION_UNTESTED}=true --label=team=nlp notes.unknown\n"
    )
    build(model, store)
    _, manifest = manifest_of(store)
    code = manifest["layers"][-2]
    assert code["mediaType"] == "application/vnd.cncf.model.code.v1.raw"
    assert code["annotations"][ANNOTATION_UNTESTED] == "true"
    assert code["annotations"]["team"] == "nlp"


# -- bad input ---------------------------------------------------------------------------


def _sparse(path: Path, size: int) -> None:
    with open(path, "wb") as sparse:
        sparse.truncate(size)


def _many_files(model: Path) -> None:
    (model / "shards").mkdir()
    for number in range(2049):
        (model / "shards" / f"{number}.bin").write_bytes(b"x")
    (model / "Modelfile").write_text(MODELFILE + "MODEL shards/*.bin\n")


def _huge_file(model: Path) -> None:
    _sparse(model / "huge.bin", 128 * 1024**3 + 1)
    (model / "Modelfile").write_text(MODELFILE + "MODEL huge.bin\n")


def _huge_total(model: Path) -> None:
    (model / "parts").mkdir()
    for number in range(65):  # each at the per-file limit, 8.125 TiB together
        _sparse(model / "parts" / f"{number}.bin", 128 * 1024**3)
    (model / "Modelfile").write_text(MODELFILE + "MODEL parts/*.bin\n")


def _append(line: str) -> Callable[[Path], None]:
    def edit(model: Path) -> None:
        (model / "Modelfile").write_text(MODELFILE + line)

    return edit


def _fifo(model: Path) -> None:
    os.mkfifo(model / "pipe.bin")
    _append("MODEL pipe.bin\n")(model)


BAD_INPUTS: list[tuple[str, Callable[[Path], object], str]] = [
    ("unknown-directive", _append("FROM base\n"), "line 11: unknown directive 'FROM'"),
    ("no-match", _append("DOC LICENSE*\n"), "line 11: DOC 'LICENSE*' matches no file in"),
    ("directory", _append("MODEL 1_Pooling\n"), "matches the directory '1_Pooling'"),
    ("two-kinds", _append("CODE config.json\n"), "'config.json' is already a CONFIG file (line 7)"),
    ("fifo", _fifo, "'pipe.bin' is not a regular file"),
    ("no-files", lambda m: (m / "Modelfile").write_text("NAME x\n"), "names no files"),
    ("no-modelfile", lambda m: (m / "Modelfile").unlink(), "no Modelfile at"),
    ("file-limit", _huge_file, "huge.bin is 137438953473 bytes; a layer holds at most"),
    ("count-limit", _many_files, "selects 2054 files; an artifact holds at most 2048"),
    ("total-limit", _huge_total, "an artifact holds at most 8796093022208"),
]


@pytest.mark.parametrize(
    ("setup", "message"), [case[1:] for case in BAD_INPUTS], ids=[case[0] for case in BAD_INPUTS]
)
def test_bad_input_is_an_error_and_leaves_the_store_unchanged(
    model: Path, store: Path, setup: Callable[[Path], object], message: str
) -> None:
    build(model, store)
    before = snapshot(store)
    setup(model)
    result = run("build", "-t", "localhost:5000/models/bert:v2", "--store", store, model)
    assert result.exit_code == 1
    assert result.stderr.startswith("modelfs: error: ")
    assert message in result.stderr
    assert result.stderr.count("\n") == 1
    assert snapshot(store) == before


def test_store_must_be_a_layout_or_new(model: Path) -> None:
    before = sorted(model.rglob("*"))
    result = run("build", "-t", REF, "--store", model, model)
    assert result.exit_code == 1
    assert "holds files but is not an OCI image layout" in result.stderr
    assert sorted(model.rglob("*")) == before


def test_bad_input_does_not_create_a_store(model: Path, store: Path) -> None:
    (model / "Modelfile").write_text("MODEL *.gguf\n")
    result = run("build", "-t", REF, "--store", store, model)
    assert result.exit_code == 1
    assert not store.exists()


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (f"{REF}@sha256:{'a' * 64}", "has a digest; builds in the store are named by tag"),
        ("Bad/Name", "must be lowercase path components"),
    ],
)
def test_bad_target_reference(model: Path, store: Path, target: str, message: str) -> None:
    result = run("build", "-t", target, "--store", store, model)
    assert result.exit_code == 1 and message in result.stderr
    assert not store.exists()


def test_failure_while_writing_removes_what_the_build_added(model: Path, store: Path) -> None:
    build(model, store)
    before = snapshot(store)
    (model / "README.md").write_text("changed, so its blob is new\n")
    (model / "config.json").write_text('{"changed": 1}')
    plan = plan_build(model, model / "Modelfile")
    seen = []

    def interrupt(count: int) -> None:
        seen.append(count)
        if len(seen) == 4:  # after some layers, new ones among them, are in the store
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_build(plan, OciLayout.open(store), "other:v1", progress=interrupt)
    assert snapshot(store) == before


def test_file_changing_size_during_the_build(model: Path, store: Path) -> None:
    build(model, store)
    before = snapshot(store)
    plan = plan_build(model, model / "Modelfile")
    with open(model / "model.safetensors", "ab") as grow:
        grow.write(b"more")
    with pytest.raises(ModelfileError, match=r"model\.safetensors changed size while being packed"):
        write_build(plan, OciLayout.open(store), "other:v1")
    assert snapshot(store) == before


# -- CLI: generate, tag, ls --------------------------------------------------------------


def test_modelfile_generate(model: Path, tmp_path: Path) -> None:
    (model / "__pycache__").mkdir()
    (model / "__pycache__" / "x.pyc").write_bytes(b"")
    (model / ".git").mkdir()
    (model / ".git" / "HEAD").write_text("ref")
    result = run("modelfile", "generate", model)
    assert result.exit_code == 0, result.output
    assert result.stdout == generate_for_directory(model)
    lines = result.stdout.splitlines()
    assert "NAME bert_tiny" in lines and "FAMILY bert" in lines and "PRECISION float32" in lines
    assert [line for line in lines if line[:1].isupper() and " " in line][4:] == [
        "CONFIG 1_Pooling/config.json",
        "CONFIG config.json",
        "CONFIG tokenizer.json",
        "MODEL model.safetensors",
        "DOC README.md",
    ]
    output = tmp_path / "Generated"
    assert run("modelfile", "generate", model, "-o", output).exit_code == 0
    assert output.read_text() == result.stdout
    refused = run("modelfile", "generate", model, "-o", output)
    assert refused.exit_code == 1 and "exists: use --force" in refused.stderr
    assert run("modelfile", "generate", model, "-o", output, "--force").exit_code == 0
    # The generated Modelfile builds.
    assert run("build", "-t", REF, "-f", output, "--store", tmp_path / "s", model).exit_code == 0


def test_modelfile_generate_errors(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "README.md").write_text("hi")
    result = run("modelfile", "generate", tmp_path / "docs")
    assert result.exit_code == 1
    assert "no weight files found for 'docs'" in result.stderr
    missing = run("modelfile", "generate", tmp_path / "nowhere")
    assert missing.exit_code == 1 and "is not a directory" in missing.stderr


def test_tag_and_ls(model: Path, store: Path) -> None:
    digest = build(model, store)
    assert run("tag", REF, "localhost:5000/models/bert:latest", "--store", store).exit_code == 0
    listed = run("ls", "--store", store)
    assert listed.stdout.splitlines() == [
        f"{REF} {digest}",
        f"localhost:5000/models/bert:latest {digest}",
    ]
    missing = run("tag", "localhost:5000/models/none:v1", "x/y:z", "--store", store)
    assert missing.exit_code == 1 and "localhost:5000/models/none:v1 is not in the store" in (
        missing.stderr
    )
    not_a_store = run("ls", "--store", model)
    assert not_a_store.exit_code == 1 and "is not an OCI image layout" in not_a_store.stderr


def test_retagging_replaces_the_entry(model: Path, store: Path) -> None:
    first = build(model, store)
    (model / "README.md").write_text("new docs\n")
    second = build(model, store)
    assert second != first
    assert [entry[1]["digest"] for entry in OciLayout.open(store).tags()] == [second]


# -- LayoutSource ------------------------------------------------------------------------


def test_layout_source_reads_a_built_layout(model: Path, tmp_path: Path) -> None:
    layout_dir = tmp_path / "layout"
    result = run("build", "-t", f"oci:{layout_dir}:v1", model)
    assert result.exit_code == 0, result.output
    name, digest = result.stdout.split()
    assert name == "v1"
    weights = (model / "model.safetensors").read_bytes()
    weight_digest = "sha256:" + hashlib.sha256(weights).hexdigest()

    async def main() -> None:
        source = LayoutSource(layout_dir)
        assert source.name == f"oci:{layout_dir}"
        by_tag = await source.get_manifest("v1")
        by_digest = await source.get_manifest(digest)
        assert by_tag == by_digest
        assert by_tag.digest == digest and by_tag.media_type == OCI_MANIFEST
        manifest = json.loads(by_tag.data)
        config = await source.get_blob(manifest["config"]["digest"], 1 << 20)
        assert json.loads(config)["descriptor"]["name"] == "bert-tiny"
        assert await source.read_range(weight_digest, 100, 50) == weights[100:150]
        assert await source.read_range(weight_digest, 0, len(weights)) == weights
        assert await source.read_range(weight_digest, len(weights) - 10, 50) == weights[-10:]
        assert await source.read_range(weight_digest, len(weights) + 5, 10) == b""
        async with source.stream_blob(weight_digest) as chunks:
            assert b"".join([chunk async for chunk in chunks]) == weights
        with pytest.raises(ManifestError, match="more than the 10 allowed"):
            await source.get_blob(weight_digest, 10)
        with pytest.raises(NotFoundError, match="no manifest tagged 'v2'"):
            await source.get_manifest("v2")
        with pytest.raises(NotFoundError, match="is not in"):
            await source.read_range("sha256:" + "0" * 64, 0, 1)
        with pytest.raises(ManifestError, match="is not sha256: followed by 64"):
            await source.read_range("sha256:../../../etc/passwd", 0, 1)

    trio.run(main)


def test_layout_source_checks_digests_and_layouts(model: Path, tmp_path: Path) -> None:
    layout_dir = tmp_path / "layout"
    assert run("build", "-t", f"oci:{layout_dir}", model).exit_code == 0  # tag: latest
    layout = OciLayout.open(layout_dir)
    descriptor = layout.resolve("latest")
    assert descriptor is not None
    manifest = json.loads(layout.blob_path(descriptor["digest"]).read_bytes())
    config_path = layout.blob_path(manifest["config"]["digest"])
    config_path.write_bytes(config_path.read_bytes().replace(b"bert-tiny", b"bert-evil"))

    async def main() -> None:
        source = LayoutSource(layout_dir)
        with pytest.raises(IntegrityError, match="does not match its digest"):
            await source.get_blob(manifest["config"]["digest"], 1 << 20)

    trio.run(main)
    with pytest.raises(NotFoundError, match="is not an OCI image layout"):
        LayoutSource(model)
