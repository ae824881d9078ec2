"""Where models are, in pure terms: node names and labels, label selectors, what a node holds
of a model, and the node labels that tell Kubernetes's scheduler so.

Names and labels follow Kubernetes's syntax, so a node service can go by its Kubernetes node
name and labels, and a selector written for ``kubectl get nodes -l`` reads the same here.
Selectors are equality-based only: ``key=value``, ``key==value``, ``key!=value``, ``key`` (has
the label) and ``!key`` (has it not), joined by commas; the set forms (``in``, ``notin``) are
refused with a message that says so.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

MAX_LABELS = 64
MODEL_LABEL_PREFIX = "modelfs.io/model-"
SHORT_DIGEST = 12  # hex digits of a model's digest in its node label
# A DNS subdomain (RFC 1123), as Kubernetes node names are.
_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*", re.A)
_LABEL_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?", re.A)


def node_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a node service, or None."""
    if len(name) > 253 or not _SUBDOMAIN.fullmatch(name):
        return (
            f"node name {name[:80]!r} is not a DNS subdomain (lowercase letters, digits, '-' "
            "and '.', at most 253), as Kubernetes node names are"
        )
    return None


def label_problem(key: str, value: str) -> str | None:
    """Why ``key=value`` is not a valid label (Kubernetes syntax), or None."""
    prefix, slash, name = key.rpartition("/")
    if slash and (not prefix or len(prefix) > 253 or not _SUBDOMAIN.fullmatch(prefix)):
        return f"label {key[:80]!r}: its prefix is not a DNS subdomain"
    if len(name) > 63 or not _LABEL_NAME.fullmatch(name):
        return f"label {key[:80]!r}: the name after the prefix must be 1-63 of [A-Za-z0-9-_.]"
    if value and (len(value) > 63 or not _LABEL_NAME.fullmatch(value)):
        return f"label {key[:80]!r}: value {value[:80]!r} must be at most 63 of [A-Za-z0-9-_.]"
    return None


def labels_problem(labels: Mapping[str, str]) -> str | None:
    if len(labels) > MAX_LABELS:
        return f"at most {MAX_LABELS} labels, not {len(labels)}"
    return next((p for k, v in labels.items() if (p := label_problem(k, v)) is not None), None)


@dataclass(frozen=True)
class Requirement:
    key: str
    value: str | None  # None: only whether the label is there
    equal: bool  # key=value / key; False: key!=value / !key

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.value is None:
            return (self.key in labels) == self.equal
        # As Kubernetes: key!=value also matches a node without the label.
        return (labels.get(self.key) == self.value) == self.equal


@dataclass(frozen=True)
class Selector:
    requirements: tuple[Requirement, ...]

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(requirement.matches(labels) for requirement in self.requirements)


def parse_selector(text: str) -> Selector:
    """A label selector; ValueError with a one-line message for anything it cannot take."""
    requirements = []
    for part in (part.strip() for part in text.split(",")):
        if not part:
            raise ValueError(f"label selector {text!r} has an empty requirement")
        if " in " in part or " notin " in part or "(" in part:
            raise ValueError(
                f"label selector {text!r}: set-based requirements (in, notin) are not supported;"
                " use key=value, key!=value, key or !key, joined by commas"
            )
        key, value, equal = _requirement(part)
        if (problem := label_problem(key, value or "")) is not None:
            raise ValueError(f"label selector {text!r}: {problem}")
        requirements.append(Requirement(key, value, equal))
    return Selector(tuple(requirements))


def _requirement(part: str) -> tuple[str, str | None, bool]:
    for operator, equal in (("!=", False), ("==", True), ("=", True)):
        key, found, value = part.partition(operator)
        if found:
            return key.strip(), value.strip(), equal
    if part.startswith("!"):
        return part[1:].strip(), None, False
    return part, None, True


@dataclass(frozen=True)
class Holding:
    """What a node holds of one model (its manifest digest), and the names it knows it by."""

    digest: str
    present_bytes: int
    total_bytes: int
    references: tuple[str, ...] = ()

    @property
    def percent(self) -> int:
        """Whole percent held, rounded down: 100 only when every byte is there."""
        if self.total_bytes <= 0:
            return 100
        return self.present_bytes * 100 // self.total_bytes


def model_label(digest: str) -> str:
    """The node label that carries how much of model ``digest`` a node holds."""
    return MODEL_LABEL_PREFIX + digest.removeprefix("sha256:")[:SHORT_DIGEST]


def model_labels(holdings: list[Holding]) -> dict[str, str]:
    """The node labels for what a node holds: ``modelfs.io/model-<short digest>=<percent>``,
    for the models it holds any of."""
    return {model_label(h.digest): str(h.percent) for h in holdings if h.present_bytes > 0}


def label_patch(current: Mapping[str, str], wanted: Mapping[str, str]) -> dict[str, str | None]:
    """The change that turns a node's model labels into ``wanted`` (a JSON merge patch:
    None removes a label); labels other than modelfs's model labels are left alone."""
    patch: dict[str, str | None] = {
        key: None for key in current if key.startswith(MODEL_LABEL_PREFIX) and key not in wanted
    }
    patch.update({key: value for key, value in wanted.items() if current.get(key) != value})
    return patch
