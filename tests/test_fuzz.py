"""Every parser of untrusted bytes, fuzzed briefly (issue 22): a clean ModelfsError or the
protocol's error answer, never another exception or a hang. ``scripts/fuzz`` runs the same
targets for minutes (robustness/parsers.py)."""

from __future__ import annotations

import json

import pytest

from modelfs.artifact.tree import plan_layers
from modelfs.errors import ManifestError
from modelfs.fetcher.index import parse_index
from modelfs.modelpack import (
    ANNOTATION_FILEPATH,
    ANNOTATION_METADATA,
    MODEL_ARTIFACT_TYPE,
    OCI_MANIFEST,
    layer_media_type,
)
from modelfs.sources.interface import FetchedManifest
from modelfs.sources.registry import manifest_media_type, registry_message
from robustness.fuzz import SUITE, run
from robustness.parsers import TARGETS, Target


@pytest.mark.parametrize("target", TARGETS, ids=[target.name for target in TARGETS])
def test_parser_fuzzed(target: Target) -> None:
    assert run(target, SUITE) > 0


# -- what the fuzzer found, each kept as an ordinary test ------------------------------------

DEEP = "[" * 100_000 + "]" * 100_000


def test_a_metadata_annotation_nested_past_the_recursion_limit_is_refused_in_one_line() -> None:
    layer = {
        "mediaType": layer_media_type("weight", "tar+gzip"),
        "digest": "sha256:" + "ab" * 32,
        "size": 10,
        "annotations": {ANNOTATION_FILEPATH: "w.bin", ANNOTATION_METADATA: DEEP},
    }
    with pytest.raises(ManifestError, match="file metadata annotation is not valid JSON"):
        plan_layers({"schemaVersion": 2, "artifactType": MODEL_ARTIFACT_TYPE, "layers": [layer]})


def test_registry_bodies_nested_past_the_recursion_limit_are_no_message() -> None:
    assert registry_message(DEEP.encode()) == ""
    assert manifest_media_type(None, DEEP.encode()) == OCI_MANIFEST


def test_a_piece_index_with_blobs_null_is_malformed() -> None:
    manifest = FetchedManifest("sha256:" + "ab" * 32, OCI_MANIFEST, b"{}")
    document = {"manifest": manifest.digest, "pieceSize": 4 << 20, "blobs": None}
    with pytest.raises(ManifestError, match="is malformed"):
        parse_index(json.dumps(document).encode(), manifest)
