"""The ModelPack config blob: build it, and check it against the model-spec config schema.

Pure. The schema (model-spec schema/config-schema.json) allows no keys beyond its own anywhere,
requires ``descriptor``, ``config`` and ``modelfs``, and requires ``modelfs.type`` = "layers"
with at least one diffId. ``validate_model_config`` checks all of that, plus the value types,
enums, patterns and date-times the schema declares.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from modelfs.errors import ManifestError

# A field's rule: a type name and its constraints. "object" rules list their fields.
Rule = dict[str, Any]


def _object(fields: dict[str, Rule], required: tuple[str, ...] = ()) -> Rule:
    return {"type": "object", "fields": fields, "required": required}


_STRING: Rule = {"type": "string"}
_STRINGS: Rule = {"type": "array", "items": _STRING}
_DATE_TIME: Rule = {"type": "string", "date_time": True}
_BOOL: Rule = {"type": "boolean"}
_COUNT: Rule = {"type": "integer", "minimum": 1}
_MODALITIES: Rule = {
    "type": "array",
    "items": {"type": "string", "enum": ("text", "image", "audio", "video", "embedding", "other")},
}

SCHEMA: Rule = _object(
    {
        "descriptor": _object(
            {
                "createdAt": _DATE_TIME,
                "authors": _STRINGS,
                "family": _STRING,
                "name": {"type": "string", "min_length": 1},
                "docURL": _STRING,
                "sourceURL": _STRING,
                "datasetsURL": _STRINGS,
                "version": _STRING,
                "revision": _STRING,
                "vendor": _STRING,
                "licenses": _STRINGS,
                "title": _STRING,
                "description": _STRING,
            }
        ),
        "config": _object(
            {
                "architecture": _STRING,
                "format": _STRING,
                "paramSize": _STRING,
                "precision": _STRING,
                "quantization": _STRING,
                "transformerConfig": _object(
                    {
                        "attentionType": {"type": "string", "enum": ("mha", "gqa", "mla")},
                        "mlpType": {"type": "string", "enum": ("dense", "moe")},
                        "numLayers": _COUNT,
                        "numAttentionHeads": _COUNT,
                        "numKVHeads": _COUNT,
                        "hiddenSize": _COUNT,
                        "intermediateSize": _COUNT,
                    }
                ),
                "capabilities": _object(
                    {
                        "inputTypes": _MODALITIES,
                        "outputTypes": _MODALITIES,
                        "knowledgeCutoff": _DATE_TIME,
                        "reasoning": _BOOL,
                        "toolUsage": _BOOL,
                        "reward": _BOOL,
                        "languages": {
                            "type": "array",
                            "items": {"type": "string", "pattern": r"[a-z]{2}"},
                        },
                    }
                ),
            }
        ),
        "modelfs": _object(
            {
                "type": {"type": "string", "enum": ("layers",)},
                "diffIds": {"type": "array", "items": _STRING, "min_items": 1},
            },
            required=("type", "diffIds"),
        ),
    },
    required=("descriptor", "config", "modelfs"),
)

_PYTHON_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "string": (str,),
    "array": (list,),
    "boolean": (bool,),
    "integer": (int,),
}
# RFC 3339 date-time: date, 'T', time, optional fraction, 'Z' or a numeric offset.
_RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?([Zz]|[+-]\d\d:\d\d)")


def validate_model_config(document: object) -> None:
    """Raise ManifestError naming the first place ``document`` breaks the config schema."""
    _check(document, SCHEMA, "config")


def _check(value: object, rule: Rule, where: str) -> None:
    kind = rule["type"]
    # bool is an int in Python; the schema's integers are not booleans.
    if not isinstance(value, _PYTHON_TYPES[kind]) or (kind == "integer" and type(value) is bool):
        raise ManifestError(
            f"model config: {where} must be {'an' if kind[0] in 'aio' else 'a'}"
            f" {kind}, not {type(value).__name__}"
        )
    if isinstance(value, dict):
        fields: dict[str, Rule] = rule["fields"]
        for key in rule["required"]:
            if key not in value:
                raise ManifestError(f"model config: {where} lacks the required key {key!r}")
        for key, item in value.items():
            if key not in fields:
                raise ManifestError(
                    f"model config: {where} has key {key!r}, which the schema does not allow"
                )
            _check(item, fields[key], f"{where}.{key}")
    elif isinstance(value, list):
        if len(value) < rule.get("min_items", 0):
            raise ManifestError(f"model config: {where} needs at least {rule['min_items']} item")
        for index, item in enumerate(value):
            _check(item, rule["items"], f"{where}[{index}]")
    elif isinstance(value, str):
        _check_string(value, rule, where)
    elif isinstance(value, int) and value < rule.get("minimum", value):
        raise ManifestError(f"model config: {where} must be at least {rule['minimum']}")


def _check_string(value: str, rule: Rule, where: str) -> None:
    if "enum" in rule and value not in rule["enum"]:
        raise ManifestError(f"model config: {where} is {value!r}; expected one of {rule['enum']}")
    if len(value) < rule.get("min_length", 0):
        raise ManifestError(f"model config: {where} must not be empty")
    if "pattern" in rule and not re.fullmatch(rule["pattern"], value):
        raise ManifestError(f"model config: {where} {value!r} does not match {rule['pattern']}")
    if rule.get("date_time") and not _is_rfc3339(value):
        raise ManifestError(f"model config: {where} {value!r} is not an RFC 3339 date-time")


def _is_rfc3339(text: str) -> bool:
    if not _RFC3339.fullmatch(text):
        return False
    try:
        datetime.fromisoformat(text.upper().replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class ModelDescription:
    """What the Modelfile says about the model (each value optional), and the creation time."""

    created_at: str
    name: str | None = None
    family: str | None = None
    architecture: str | None = None
    format: str | None = None
    param_size: str | None = None
    precision: str | None = None
    quantization: str | None = None


def build_model_config(description: ModelDescription, diff_ids: Sequence[str]) -> dict[str, Any]:
    """The config document: unset values are left out, as modctl does (Go's omitempty)."""
    descriptor = {
        "createdAt": description.created_at,
        "family": description.family,
        "name": description.name,
    }
    config = {
        "architecture": description.architecture,
        "format": description.format,
        "paramSize": description.param_size,
        "precision": description.precision,
        "quantization": description.quantization,
    }
    document = {
        "descriptor": {key: value for key, value in descriptor.items() if value},
        "config": {key: value for key, value in config.items() if value},
        "modelfs": {"type": "layers", "diffIds": list(diff_ids)},
    }
    validate_model_config(document)
    return document


def encode_json(document: object) -> bytes:
    """Compact JSON bytes: the same document always gives the same bytes (and digest)."""
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()
