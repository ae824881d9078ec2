"""Built-in prefetch hints: what a model loader reads first, as pure functions of the tree.

A loader (transformers, vLLM, sentence-transformers) reads the config and tokenizer files, then
opens each safetensors shard, parses its header (an 8-byte little-endian length, then that many
bytes of JSON), and only then reads tensors, shard by shard in the order the
``*.safetensors.index.json`` names them (sorted by file name, as those loaders iterate them).
Shards the index does not name (a ``consolidated.safetensors`` next to the shards) come last:
loaders skip them.

Everything here is pure: the tree, plus the bytes of the shard indexes (``index_files``) and of
each shard's 8-byte header prefix, in; an ordered list of (file, offset, length) out.
"""

from __future__ import annotations

import posixpath
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from fnmatch import fnmatch

from modelfs.artifact.tree import FileNode, Tree
from modelfs.pieces import pieces_covering
from modelfs.untrusted import loads_json

SAFETENSORS_PREFIX = 8
# safetensors itself refuses headers over 100 MB; a larger "length" means this is no header.
MAX_SAFETENSORS_HEADER = 100_000_000
# Config and tokenizer files are small; a huge file with such a name is not one to read first.
MAX_SMALL_FILE = 64 << 20

_CONFIG_PATTERNS = ("config.json", "*config*.json", "params.json", "modules.json", "*.index.json")
_TOKENIZER_PATTERNS = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "*.tiktoken",
    "chat_template.*",
)
_INDEX_SUFFIX = ".safetensors.index.json"


@dataclass(frozen=True)
class Hint:
    """Bytes [offset, offset+length) of ``file``, wanted soon."""

    file: FileNode
    offset: int
    length: int


def _rank(node: FileNode) -> int | None:
    """0 for a config file, 1 for a tokenizer file, None for any other."""
    name = posixpath.basename(node.path)
    if node.size > MAX_SMALL_FILE:
        return None
    if any(fnmatch(name, pattern) for pattern in _CONFIG_PATTERNS):
        return 0
    if any(fnmatch(name, pattern) for pattern in _TOKENIZER_PATTERNS):
        return 1
    return None


def small_files(tree: Tree) -> list[FileNode]:
    """Config files (the top-level ``config.json`` first), then tokenizer files."""
    ranked = [(rank, node) for node in tree.files() if (rank := _rank(node)) is not None]
    ranked.sort(key=lambda item: (item[0], item[1].path != "config.json", item[1].path))
    return [node for _, node in ranked]


def index_files(tree: Tree) -> list[FileNode]:
    """The ``*.safetensors.index.json`` files, whose bytes say the shards' order.

    Only located ones: reading a deferred file would fetch its whole layer, which only its own
    first read (or ``--prefetch all``) may do.
    """
    return [
        node
        for node in tree.files()
        if node.located and node.path.endswith(_INDEX_SUFFIX) and node.size <= MAX_SMALL_FILE
    ]


def shards(tree: Tree, indexes: Mapping[str, bytes]) -> list[FileNode]:
    """Safetensors files in load order: those each index names, then the others by path."""
    by_path = {node.path: node for node in tree.files()}
    ordered: dict[str, FileNode] = {}
    for path in sorted(indexes):
        for name in sorted(_indexed_files(indexes[path])):
            node = by_path.get(posixpath.normpath(posixpath.join(posixpath.dirname(path), name)))
            if node is not None:
                ordered.setdefault(node.path, node)
    for node in sorted(by_path.values(), key=lambda node: node.path):
        if node.path.endswith(".safetensors"):
            ordered.setdefault(node.path, node)
    return [node for node in ordered.values() if node.located]  # see index_files


def _indexed_files(index: bytes) -> set[str]:
    """The shard names of an index's ``weight_map``; none if it is not such an index."""
    try:
        weight_map = loads_json(index).get("weight_map")
    except (ValueError, AttributeError):
        return set()
    if not isinstance(weight_map, dict):
        return set()
    return {name for name in weight_map.values() if isinstance(name, str)}


def startup_hints(tree: Tree, indexes: Mapping[str, bytes]) -> list[Hint]:
    """Config and tokenizer files whole, then each shard's header length prefix, in order."""
    hints = [Hint(node, 0, node.size) for node in small_files(tree) if node.size]
    hints += [
        Hint(node, 0, SAFETENSORS_PREFIX)
        for node in shards(tree, indexes)
        if node.size >= SAFETENSORS_PREFIX
    ]
    return hints


def header_hint(shard: FileNode, prefix: bytes) -> Hint | None:
    """The JSON header of a safetensors file from its 8-byte prefix; None if it is not one."""
    if len(prefix) != SAFETENSORS_PREFIX:
        return None
    (length,) = struct.unpack("<Q", prefix)
    if not 0 < length <= min(MAX_SAFETENSORS_HEADER, shard.size - SAFETENSORS_PREFIX):
        return None
    return Hint(shard, SAFETENSORS_PREFIX, length)


def whole_model(tree: Tree, indexes: Mapping[str, bytes]) -> list[Hint]:
    """Every file whole: small files, shards in load order, then the rest in tree order."""
    first = [*small_files(tree), *shards(tree, indexes)]
    seen = {node.path for node in first}
    rest = [node for node in tree.files() if node.path not in seen]
    return [Hint(node, 0, node.size) for node in [*first, *rest] if node.size]


def hinted_pieces(hints: list[Hint], piece_size: int) -> list[tuple[FileNode, int]]:
    """The pieces ``hints`` cover, each once, in the order first hinted (with a file in it).

    Deferred files not yet located have no pieces to fetch (see ``index_files``).
    """
    seen: set[tuple[str, int]] = set()
    pieces = []
    for hint in hints:
        if not hint.file.located:
            continue
        blob = hint.file.blob
        for index in pieces_covering(
            hint.file.offset + hint.offset, hint.length, blob.size, piece_size
        ):
            if (blob.digest, index) not in seen:
                seen.add((blob.digest, index))
                pieces.append((hint.file, index))
    return pieces
