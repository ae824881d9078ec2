"""Pure tests: Modelfile parsing and generation, the ModelPack config and its validator."""

from __future__ import annotations

import copy
import random
from typing import Any

import pytest

from modelfs.builder.config import ModelDescription, build_model_config, validate_model_config
from modelfs.builder.modelfile import (
    WEIGHT_SIZE_THRESHOLD,
    FileRule,
    ListedFile,
    ModelfileError,
    classify,
    generate_modelfile,
    is_skipped,
    model_name,
    parse_modelfile,
    pattern_for,
)
from modelfs.errors import ManifestError, ModelfsError
from modelfs.modelpack import ANNOTATION_UNTESTED

DIGEST = "sha256:" + "a" * 64

# -- parsing -----------------------------------------------------------------------------


def test_parse_values_rules_comments_and_case() -> None:
    text = (
        "# a comment\n"
        "\n"
        "NAME bert tiny\n"
        "  arch transformer  \n"
        "PRECISION\tfloat16\n"
        "CONFIG config.json\n"
        "model *.safetensors\n"
        "CODE --label=team=nlp --label=org.cncf.model.file.mediatype.untested=true run.py\n"
        "DOC docs/my notes.md\n"
        "DATASET data/*.parquet\n"
    )
    parsed = parse_modelfile(text)
    assert parsed.text == text
    assert dict(parsed.values) == {
        "NAME": "bert tiny",
        "ARCH": "transformer",
        "PRECISION": "float16",
    }
    assert parsed.rules == (
        FileRule("CONFIG", "config.json", 6),
        FileRule("MODEL", "*.safetensors", 7),
        FileRule(
            "CODE",
            "run.py",
            8,
            (("team", "nlp"), ("org.cncf.model.file.mediatype.untested", "true")),
        ),
        FileRule("DOC", "docs/my notes.md", 9),
        FileRule("DATASET", "data/*.parquet", 10),
    )
    assert [rule.kind for rule in parsed.rules] == [
        "weight.config",
        "weight",
        "code",
        "doc",
        "dataset",
    ]
    assert parsed.value("FAMILY") is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("NAME x\nFROM base\n", "Modelfile line 2: unknown directive 'FROM'; use one of NAME"),
        ("MODEL\n", "Modelfile line 1: MODEL needs a value"),
        ("NAME a\n\nNAME b\n", "Modelfile line 3: NAME already given on line 1; keep one"),
        ("CODE --exclude=x run.py\n", "Modelfile line 1: unknown flag '--exclude=x'"),
        ("CODE --label=a=b\n", "Modelfile line 1: CODE needs a file pattern"),
        (
            "DOC --label=org.cncf.model.filepath=x a.md\n",
            "label 'org.cncf.model.filepath' is set by modelfs",
        ),
        ("MODEL /etc/passwd\n", "pattern '/etc/passwd' must stay inside the model directory"),
        ("MODEL ../other/*.bin\n", "pattern '../other/*.bin' must stay inside"),
    ],
)
def test_parse_errors_name_the_line(text: str, message: str) -> None:
    with pytest.raises(ModelfileError) as caught:
        parse_modelfile(text)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)
    assert isinstance(caught.value, ModelfsError)


# -- classification and generation -------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "size", "expected"),
    [
        ("config.json", 10, ("CONFIG", False)),
        ("tokenizer.json", 10, ("CONFIG", False)),
        ("tokenizer.model", 10**6, ("CONFIG", False)),
        ("generation_config.yaml", 10, ("CONFIG", False)),
        ("model.meta", 10, ("CONFIG", False)),  # config wins over the weight pattern
        ("model-00001-of-00002.safetensors", 10, ("MODEL", False)),
        ("MODEL.SAFETENSORS", 10, ("MODEL", False)),
        ("pytorch_model.bin", 10, ("MODEL", False)),
        ("llama.Q4_0.gguf", 10, ("MODEL", False)),
        ("model.onnx", 10, ("MODEL", False)),
        ("ckpt.data-00000-of-00001", 10, ("MODEL", False)),
        ("modeling_bert.py", 10, ("CODE", False)),
        ("requirements.txt", 10, ("CODE", False)),  # code wins over the *.txt doc pattern
        ("Makefile", 10, ("CODE", False)),
        ("README.md", 10, ("DOC", False)),
        ("LICENSE", 10, ("DOC", False)),
        ("vocab.txt", 10, ("DOC", False)),
        ("diagram.PNG", 10, ("DOC", False)),
        ("weights.unknown", WEIGHT_SIZE_THRESHOLD + 1, ("MODEL", True)),
        ("weights.unknown", WEIGHT_SIZE_THRESHOLD, ("CODE", True)),
        ("NOTICE", 5, ("CODE", True)),
    ],
)
def test_classify(name: str, size: int, expected: tuple[str, bool]) -> None:
    assert classify(name, size) == expected


@pytest.mark.parametrize(
    ("name", "skipped"),
    [
        (".git", True),
        (".gitattributes", True),
        ("__pycache__", True),
        ("x.pyc", True),
        ("Modelfile", True),
        ("model.safetensors", False),
        ("config.json", False),
    ],
)
def test_is_skipped(name: str, skipped: bool) -> None:
    assert is_skipped(name) is skipped


def test_model_name() -> None:
    assert model_name("bert-base.uncased") == "bert_base_uncased"
    assert model_name("--x--") == "x"
    assert model_name("...") == "unnamed_model"


LISTING = [
    ListedFile("model.safetensors", 4096),
    ListedFile("config.json", 80),
    ListedFile("tokenizer.json", 2),
    ListedFile("README.md", 5),
    ListedFile("1_Pooling/config.json", 2),
    ListedFile("modeling.py", 100),
    ListedFile("blob.unknown", WEIGHT_SIZE_THRESHOLD + 1),
    ListedFile("notes.unknown", 3),
]
HF_CONFIG = {"model_type": "bert", "torch_dtype": "float32", "transformers_version": "4.40.0"}


def test_generate_content() -> None:
    text = generate_modelfile("bert_tiny", LISTING, HF_CONFIG)
    untested = f"--label={ANNOTATION_UNTESTED}=true"
    assert text.splitlines()[1:] == [
        "",
        "NAME bert_tiny",
        "ARCH transformer",
        "FAMILY bert",
        "PRECISION float32",
        "",
        "# Configuration",
        "CONFIG 1_Pooling/config.json",
        "CONFIG config.json",
        "CONFIG tokenizer.json",
        "",
        "# Weights",
        f"MODEL {untested} blob.unknown",
        "MODEL model.safetensors",
        "",
        "# Code",
        "CODE modeling.py",
        f"CODE {untested} notes.unknown",
        "",
        "# Docs",
        "DOC README.md",
    ]


def test_generate_is_deterministic_and_parses_back() -> None:
    shuffled = LISTING[:]
    random.Random(7).shuffle(shuffled)
    text = generate_modelfile("bert_tiny", LISTING, HF_CONFIG)
    assert generate_modelfile("bert_tiny", shuffled, HF_CONFIG) == text
    parsed = parse_modelfile(text)
    assert parsed.value("FAMILY") == "bert"
    assert sorted(rule.pattern for rule in parsed.rules) == sorted(f.path for f in LISTING)
    labelled = {rule.pattern: rule.labels for rule in parsed.rules if rule.labels}
    assert labelled == {
        "blob.unknown": ((ANNOTATION_UNTESTED, "true"),),
        "notes.unknown": ((ANNOTATION_UNTESTED, "true"),),
    }


def test_generate_reads_newer_dtype_key_and_ignores_non_strings() -> None:
    text = generate_modelfile("m", LISTING, {"dtype": "bfloat16", "model_type": 3})
    assert "PRECISION bfloat16" in text
    assert "FAMILY" not in text and "ARCH" not in text


def test_generate_without_weights_is_an_error() -> None:
    with pytest.raises(ModelfileError, match="no weight files found for 'docs'"):
        generate_modelfile("docs", [ListedFile("README.md", 5)], {})


def test_generate_refuses_unwritable_names() -> None:
    with pytest.raises(ModelfileError, match="cannot be written in a Modelfile"):
        generate_modelfile("m", [ListedFile("a\nb.bin", 1)], {})


def test_pattern_for_escapes_wildcards_and_dashes() -> None:
    assert pattern_for("w[1]*?.bin") == "w[[]1][*][?].bin"
    assert pattern_for("-v.bin") == "./-v.bin"
    assert pattern_for("sub/model.bin") == "sub/model.bin"


# -- config ------------------------------------------------------------------------------


def _valid_config() -> dict[str, Any]:
    description = ModelDescription(
        created_at="2025-03-15T14:30:00Z",
        name="bert",
        family="bert",
        architecture="transformer",
        param_size="110M",
        precision="float32",
    )
    return build_model_config(description, [DIGEST])


def test_build_model_config_leaves_out_unset_values() -> None:
    assert _valid_config() == {
        "descriptor": {"createdAt": "2025-03-15T14:30:00Z", "family": "bert", "name": "bert"},
        "config": {"architecture": "transformer", "paramSize": "110M", "precision": "float32"},
        "modelfs": {"type": "layers", "diffIds": [DIGEST]},
    }


def test_full_schema_document_validates() -> None:
    document = _valid_config()
    document["descriptor"].update(
        authors=["a"], licenses=["MIT"], datasetsURL=["https://x"], title="t", version="1"
    )
    document["config"]["transformerConfig"] = {
        "attentionType": "gqa",
        "mlpType": "moe",
        "numLayers": 2,
        "numKVHeads": 1,
    }
    document["config"]["capabilities"] = {
        "inputTypes": ["text", "image"],
        "outputTypes": ["embedding"],
        "knowledgeCutoff": "2024-01-01T00:00:00+02:00",
        "reasoning": True,
        "languages": ["en", "de"],
    }
    validate_model_config(document)


def _edit(path: str, value: object) -> dict[str, Any]:
    document = copy.deepcopy(_valid_config())
    *parents, last = path.split(".")
    target = document
    for key in parents:
        target = target.setdefault(key, {})
    if value is _DELETE:
        del target[last]
    else:
        target[last] = value
    return document


_DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("extra", 1, "config has key 'extra', which the schema does not allow"),
        ("descriptor.license", "MIT", "config.descriptor has key 'license'"),
        ("config.capabilities.vision", True, "config.config.capabilities has key 'vision'"),
        ("modelfs", _DELETE, "config lacks the required key 'modelfs'"),
        ("modelfs.diffIds", _DELETE, "config.modelfs lacks the required key 'diffIds'"),
        ("modelfs.diffIds", [], "config.modelfs.diffIds needs at least 1 item"),
        ("modelfs.diffIds", [3], "config.modelfs.diffIds[0] must be a string, not int"),
        ("modelfs.type", "layer", "config.modelfs.type is 'layer'; expected one of"),
        ("descriptor.name", "", "config.descriptor.name must not be empty"),
        ("descriptor.authors", "me", "config.descriptor.authors must be an array, not str"),
        ("descriptor.createdAt", "yesterday", "is not an RFC 3339 date-time"),
        ("descriptor.createdAt", "2025-02-30T00:00:00Z", "is not an RFC 3339 date-time"),
        ("config.transformerConfig.numLayers", 0, "numLayers must be at least 1"),
        ("config.transformerConfig.numLayers", True, "numLayers must be an integer, not bool"),
        ("config.capabilities.languages", ["eng"], "languages[0] 'eng' does not match"),
        ("config.capabilities.inputTypes", ["smell"], "inputTypes[0] is 'smell'"),
        ("config", [], "config.config must be an object, not list"),
    ],
)
def test_validator_rejects(path: str, value: object, message: str) -> None:
    with pytest.raises(ManifestError) as caught:
        validate_model_config(_edit(path, value))
    assert message in str(caught.value)


def test_build_model_config_refuses_an_empty_layer_list() -> None:
    with pytest.raises(ManifestError, match="diffIds needs at least 1 item"):
        build_model_config(ModelDescription(created_at="2025-01-01T00:00:00Z"), [])
