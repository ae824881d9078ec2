"""Docker-style references: ``host[:port]/repo[:tag][@sha256:hex]`` and ``oci:PATH[:TAG]``.

Pure parsing, no I/O. The rules follow the distribution reference grammar: the first path
component is a registry host when it has a dot, a colon or is ``localhost``; otherwise the
reference is on Docker Hub (``docker.io/library/...`` for one-component names).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from modelfs.errors import BadReferenceError

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPO_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DIGEST_RE = re.compile(r"^sha256:[a-f0-9]{64}$")
_HOST_RE = re.compile(r"^(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:]+\])(?::[0-9]{1,5})?$")


@dataclass(frozen=True)
class Reference:
    """A parsed registry reference. ``tag`` and ``digest`` may both be set (digest wins)."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def api_host(self) -> str:
        """The host the registry API is served from (Docker Hub's differs from its name)."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def selector(self) -> str:
        """What goes after ``/manifests/``: the digest if pinned, else the tag."""
        return self.digest or self.tag or "latest"

    def pinned(self, digest: str) -> Reference:
        return Reference(self.registry, self.repository, self.tag, digest)

    def __str__(self) -> str:
        text = f"{self.registry}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


@dataclass(frozen=True)
class LayoutReference:
    """An OCI image layout directory on disk, ``oci:PATH[:TAG]`` (tag defaults to latest)."""

    path: str
    tag: str | None = None
    digest: str | None = None

    @property
    def selector(self) -> str:
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        text = f"oci:{self.path}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def _bad(text: str, why: str) -> BadReferenceError:
    return BadReferenceError(
        f"invalid reference {text!r}: {why} (expected host[:port]/repo[:tag][@sha256:...])"
    )


def parse_reference(text: str) -> Reference:
    """Parse a registry reference; raise BadReferenceError naming what is wrong."""
    if not text or text != text.strip():
        raise _bad(text, "empty or surrounded by spaces")
    rest, digest = text, None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        if not _DIGEST_RE.match(digest):
            raise _bad(text, f"digest {digest!r} is not sha256: followed by 64 lowercase hex")
    tag = None
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        rest, tag = rest[:colon], rest[colon + 1 :]
        if not _TAG_RE.match(tag):
            raise _bad(text, f"tag {tag!r} has characters a tag cannot have")
    first, _, remainder = rest.partition("/")
    if remainder and (
        "." in first or ":" in first or first == "localhost" or first.startswith("[")
    ):
        registry, repository = first, remainder
        if not _HOST_RE.match(registry):
            raise _bad(text, f"registry host {registry!r} is malformed")
    else:
        registry, repository = DOCKER_HUB, rest
        if "/" not in repository:
            repository = f"library/{repository}"
    if not _REPO_RE.match(repository):
        raise _bad(text, f"repository {repository!r} must be lowercase path components")
    if tag is None and digest is None:
        tag = "latest"
    return Reference(registry, repository, tag, digest)


def parse_layout_reference(text: str) -> LayoutReference:
    """Parse ``oci:PATH[:TAG][@DIGEST]``; the tag is whatever follows the last colon."""
    if not text.startswith("oci:") or len(text) == len("oci:"):
        raise BadReferenceError(f"invalid layout reference {text!r}: expected oci:PATH[:TAG]")
    if "\0" in text:  # no path holds one: the OS refuses it, Python raises ValueError
        raise BadReferenceError(f"invalid layout reference {text!r}: it holds a NUL byte")
    rest, digest = text[len("oci:") :], None
    if "@" in rest:
        rest, digest = rest.rsplit("@", 1)
        if not _DIGEST_RE.match(digest):
            raise BadReferenceError(f"invalid layout reference {text!r}: bad digest {digest!r}")
    tag = None
    head, sep, tail = rest.rpartition(":")
    if sep and head and "/" not in tail:
        rest, tag = head, tail
        if not _TAG_RE.match(tag):
            raise BadReferenceError(f"invalid layout reference {text!r}: bad tag {tag!r}")
    return LayoutReference(rest, tag, digest)


def parse_any_reference(text: str) -> Reference | LayoutReference:
    return parse_layout_reference(text) if text.startswith("oci:") else parse_reference(text)
