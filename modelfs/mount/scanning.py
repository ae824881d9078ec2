"""``modelfs scan``: what a mount's trust policy would say of a model, without mounting it.

The signature verdict, then every file the scan policy covers scanned as a mount would scan it
(through the fetcher and the node's cache, so the bytes are checked and kept), with what each
scan read and took.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any

from modelfs.artifact.tree import FileNode
from modelfs.cache import PieceCache
from modelfs.fetcher.index import IndexLookup
from modelfs.fetcher.manifests import resolve_manifest
from modelfs.fetcher.piece_fetcher import PieceFetcher
from modelfs.mount.model import load_model
from modelfs.mount.session import MountOptions, open_source
from modelfs.mount.trust import FileScans, check_signature, load_signature_policy, read_file
from modelfs.trust import TrustError
from modelfs.trust.scan_policy import OFF, REFUSE_FILE, REFUSE_MODEL, Finding


@dataclass
class ModelScan:
    reference: str
    digest: str
    signature: str  # the verdict: the key that verified it, or why it is refused
    signature_accepted: bool
    findings: list[Finding] = field(default_factory=list)
    files: list[dict[str, Any]] = field(default_factory=list)  # each scanned file and its cost

    @property
    def refused(self) -> bool:
        """Whether a mount would refuse the model or one of its files."""
        return not self.signature_accepted or any(
            finding.action in (REFUSE_FILE, REFUSE_MODEL) for finding in self.findings
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "digest": self.digest,
            "signature": {"accepted": self.signature_accepted, "verdict": self.signature},
            "findings": [finding.as_json() for finding in self.findings],
            "files": self.files,
        }


async def scan_model(options: MountOptions) -> ModelScan:
    policy = load_signature_policy(options.signature_policy)
    selector = options.reference.selector
    cache = PieceCache(options.cache_dir, options.cache_size)
    try:
        async with open_source(options) as source:
            fetcher = PieceFetcher(source, cache, index=IndexLookup(source, selector, cache))
            async with fetcher.writing():
                pinned = (await resolve_manifest(source, selector, cache)).digest
                try:
                    verdict = await check_signature(policy, options.reference, source, pinned)
                    result = ModelScan(str(options.reference), pinned, verdict.reason, True)
                except TrustError as error:
                    result = ModelScan(str(options.reference), pinned, str(error), False)
                model = await load_model(source, pinned, cache, fetcher)
                await fetcher.look_up_index(model.digest)
                scans = FileScans(options.scan, partial(read_file, fetcher))
                for node in model.tree.files():
                    if scans.action(node) != OFF:
                        await scans.findings_of(node)
                result.findings = scans.findings
                result.files = [
                    {"path": scan.path, "format": scan.kind, "findings": len(scan.problems),
                     "bytes_read": scan.bytes_read, "size": size_of(model.tree.files(), scan.path),
                     "seconds": round(scan.seconds, 4)}
                    for scan in scans.scans
                ]  # fmt: skip
                return result
    finally:
        cache.close()


def size_of(files: list[FileNode], path: str) -> int:
    return next(node.size for node in files if node.path == path)
