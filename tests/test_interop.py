"""Artifacts modelfs did not build: pushed by another client (oras-py) in modctl's layouts, raw
and one-member tar, and as a plain ORAS push with only titles; and OCI layouts on disk mounted
with ``oci:PATH:TAG`` / ``oci:PATH@sha256:...``, no registry. Each mounts and reads identically.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import oras.client  # type: ignore[import-untyped]
import pytest
from mounting import modelfs, mounted, unmount
from registry_tools import Registry
from safetensors.numpy import save_file

from modelfs.modelpack import (
    ANNOTATION_FILEPATH,
    ANNOTATION_METADATA,
    ANNOTATION_MODELFILE,
    ANNOTATION_UNTESTED,
    MODEL_CONFIG,
    layer_media_type,
)

MODELFILE = """NAME tiny-bert
ARCH transformer
FAMILY bert
CONFIG config.json
CONFIG tokenizer.json
CONFIG 1_Pooling/config.json
MODEL model.safetensors
CODE code/*.py
DOC README.md
"""
# modctl's kind for each file of the model below, in modctl's layer order.
KINDS = {
    "1_Pooling/config.json": "weight.config",
    "config.json": "weight.config",
    "tokenizer.json": "weight.config",
    "model.safetensors": "weight",
    "code/modeling.py": "code",
    "README.md": "doc",
}
MTIME = "2025-03-04T05:06:07Z"
MTIME_SECONDS = 1741064767


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small Hugging Face style model: nested config, code, a 6 MiB safetensors file."""
    root = tmp_path_factory.mktemp("interop") / "tiny-bert"
    (root / "1_Pooling").mkdir(parents=True)
    (root / "code").mkdir()
    rng = np.random.default_rng(11)
    save_file(
        {f"layer.{i}.weight": rng.standard_normal((384, 1024), dtype=np.float32) for i in range(4)},
        str(root / "model.safetensors"),
    )
    (root / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 384}))
    (root / "tokenizer.json").write_text(json.dumps({"vocab": {f"w{i}": i for i in range(500)}}))
    (root / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    (root / "code" / "modeling.py").write_text("class TinyBert:\n    pass\n")
    (root / "README.md").write_text("# tiny-bert\n")
    return root


def read_tree(root: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def one_member_tar(name: str, data: bytes) -> bytes:
    """modctl's older layer form: a tar holding the one file under its relative path."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as archive:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o644, MTIME_SECONDS
        archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


def modelpack_config(layer_count: int) -> dict[str, object]:
    # modctl writes the layer digests as diffIds; modelfs does not read them, so placeholders
    # of the right count stand in for them here.
    return {
        "descriptor": {"name": "tiny-bert", "family": "bert", "createdAt": MTIME},
        "config": {"architecture": "transformer"},
        "modelfs": {"type": "layers", "diffIds": [f"sha256:{i:064x}" for i in range(layer_count)]},
    }


def oras_push(host: str, target: str, files: list[str], annotations: dict[str, object], work: Path,
              config: Path | None = None) -> None:  # fmt: skip
    """Push with oras-py, as its users do: files (path:mediatype), an annotations file."""
    annotation_file = work / "annotations.json"
    annotation_file.write_text(json.dumps(annotations))
    client = oras.client.OrasClient(hostname=host, insecure=True)
    response = client.push(
        target=target,
        files=files,
        annotation_file=str(annotation_file),
        manifest_config=f"{config}:{MODEL_CONFIG}" if config else None,
        disable_path_validation=True,
        quiet=True,
    )
    assert response.status_code == 201, response.text


@pytest.fixture
def mnt(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "mnt"
    path.mkdir()
    yield path
    unmount(path)


@pytest.mark.parametrize("layer_format", ["raw", "tar", "tar+gzip"])
def test_oras_push_in_modctl_layout(
    registry: Registry, model_dir: Path, tmp_path: Path, mnt: Path, layer_format: str
) -> None:
    """Each file one layer, with modctl's media types and annotations; oras-py adds titles."""
    work = tmp_path / "push"
    work.mkdir()
    files, annotations = [], {}
    for index, (name, kind) in enumerate(KINDS.items()):
        data = (model_dir / name).read_bytes()
        if layer_format == "raw":
            blob = model_dir / name  # oras-py titles it by its base name: the filepath wins
        else:
            blob = work / f"layer-{index}.{layer_format}"
            archive = one_member_tar(name, data)
            # compressed: the mount shows the file from its annotations, fetched on first read
            blob.write_bytes(gzip.compress(archive) if layer_format == "tar+gzip" else archive)
        files.append(f"{blob}:{layer_media_type(kind, layer_format)}")
        metadata = {"name": Path(name).name, "mode": 0o644, "uid": 0, "gid": 0,
                    "size": len(data), "mtime": MTIME, "typeflag": 0}  # fmt: skip
        annotations[str(blob)] = {
            ANNOTATION_FILEPATH: name,
            ANNOTATION_METADATA: json.dumps(metadata),
            ANNOTATION_UNTESTED: "false",
        }
    annotations["$manifest"] = {ANNOTATION_MODELFILE: MODELFILE}
    config = work / "config.json"
    config.write_text(json.dumps(modelpack_config(len(files))))
    repository = f"interop/modctl-{layer_format.replace('+', '-')}-{uuid.uuid4().hex[:8]}"
    oras_push(registry.host, f"{registry.host}/{repository}:v1", files, annotations, work, config)

    with mounted(f"{registry.host}/{repository}:v1", mnt, tmp_path / "cache"):
        assert read_tree(mnt) == read_tree(model_dir)
        weights = (mnt / "model.safetensors").stat()
        assert weights.st_mtime == MTIME_SECONDS
        assert weights.st_mode & 0o777 == 0o444


def test_plain_oras_push_with_titles_only(
    registry: Registry, model_dir: Path, tmp_path: Path, mnt: Path
) -> None:
    """What ``oras push`` of a model directory gives: top-level files titled by name, and a
    subdirectory as one tar+gzip layer titled by the directory's name; no ModelPack types."""
    work = tmp_path / "push"
    work.mkdir()
    files = [str(path) for path in sorted(model_dir.iterdir())]
    repository = f"interop/plain-{uuid.uuid4().hex[:8]}"
    oras_push(registry.host, f"{registry.host}/{repository}:v1", files, {}, work)

    with mounted(f"{registry.host}/{repository}:v1", mnt, tmp_path / "cache"):
        assert read_tree(mnt) == read_tree(model_dir)


@pytest.fixture(scope="module")
def layout(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """An OCI layout holding a raw build (tag raw) and a tar build (tag tar): (path, digests)."""
    root = tmp_path_factory.mktemp("layout")
    modelfile = root / "Modelfile"
    modelfile.write_text(MODELFILE)
    store = root / "oci"
    digests = []
    for tag, flags in (("raw", ()), ("tar", ("--tar",))):
        built = modelfs("build", "-t", f"oci:{store}:{tag}", "-f", str(modelfile), *flags,
                        str(model_dir))  # fmt: skip
        assert built.returncode == 0, built.stderr
        digests.append(built.stdout.split()[-1])
    return store, digests[0], digests[1]


@pytest.mark.parametrize(
    "selector",
    [":raw", ":tar", "@raw-digest", "@tar-digest"],
)
def test_mount_oci_layout_without_registry(
    layout: tuple[Path, str, str], model_dir: Path, tmp_path: Path, mnt: Path, selector: str
) -> None:
    store, raw_digest, tar_digest = layout
    selector = selector.replace("raw-digest", raw_digest).replace("tar-digest", tar_digest)
    with mounted(f"oci:{store}{selector}", mnt, tmp_path / "cache"):
        assert read_tree(mnt) == read_tree(model_dir)


def test_mount_oci_layout_errors(layout: tuple[Path, str, str], tmp_path: Path, mnt: Path) -> None:
    store, _, _ = layout
    for reference, message in [
        (f"oci:{store}:missing", "missing"),
        (f"oci:{tmp_path / 'nowhere'}:v1", "nowhere"),
        (f"oci:{store}@sha256:{'0' * 64}", "0" * 64),
    ]:
        result = modelfs("mount", reference, str(mnt), "--cache-dir", str(tmp_path / "cache"))
        assert result.returncode == 1, result
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], result.stderr
        assert not os.path.ismount(mnt)
