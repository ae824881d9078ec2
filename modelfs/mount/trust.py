"""Trust at mount time: the signature policy checked before the mount is ready, and files
scanned before their first byte is served (modelfs.trust holds the rules; this is where they
meet a mount's source, fetcher and tree).

Both are a mount's settings (``MountOptions.signature_policy`` and ``scan``), so every way of
making a mount (``modelfs mount``, the daemon, the snapshotter, the CSI driver) applies them.
Nothing about trust is kept in the cache: the policy is read, and signatures are looked up and
verified, at every mount; a scan is run again by each mount process that serves the file.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from modelfs.artifact.tree import FileNode, Tree
from modelfs.fetcher.piece_fetcher import PieceFetcher
from modelfs.fs.fuse import OpenFile
from modelfs.reference import LayoutReference, Reference
from modelfs.sources.interface import BlobSource
from modelfs.trust import TrustError
from modelfs.trust.policy import ACCEPT_ALL, SignaturePolicy, Verdict, evaluate, parse_policy
from modelfs.trust.scan import FileScan, scan_file
from modelfs.trust.scan_policy import OFF, REFUSE_FILE, REFUSE_MODEL, Finding, ScanPolicy, file_kind
from modelfs.trust.signatures import find_signatures

log = logging.getLogger(__name__)

# The node's signature policy, when a mount names none (as /etc/containers/policy.json is
# containers'): every front door reads the same file.
DEFAULT_SIGNATURE_POLICY = Path("/etc/modelfs/policy.json")

ReadFile = Callable[[FileNode, int, int], Awaitable[bytes]]


def load_signature_policy(path: Path | None) -> SignaturePolicy:
    """The policy in ``path``; None: the node's (``DEFAULT_SIGNATURE_POLICY``) if it has one,
    else every model is accepted unsigned."""
    if path is None:
        if not DEFAULT_SIGNATURE_POLICY.exists():
            return ACCEPT_ALL
        path = DEFAULT_SIGNATURE_POLICY
    return parse_policy(_read(path, "signature policy"), str(path), _read_key)


def _read(path: Path, what: str) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not text"
        raise TrustError(f"cannot read the {what} {path}: {reason}") from None


def _read_key(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise TrustError(f"cannot read the public key {path}: {error.strerror}") from None


async def check_signature(
    policy: SignaturePolicy, reference: Reference | LayoutReference, source: BlobSource, digest: str
) -> Verdict:
    """The policy's verdict on manifest ``digest``; a refusal raises TrustError, one line naming
    the reference and the rule. Costs the signature lookups only when the rule needs them."""
    rule = policy.rule_for(reference)
    found = await find_signatures(source, digest) if rule.needs_signatures else []
    verdict = evaluate(rule, reference, digest, found)
    if not verdict.accepted:
        raise TrustError(f"refusing {reference} ({digest}): {verdict.reason}")
    log.info("%s (%s): %s", reference, digest, verdict.reason)
    return verdict


async def read_file(fetcher: PieceFetcher, node: FileNode, offset: int, length: int) -> bytes:
    """Bytes of a file for its scan, through the fetcher, checked: with --serve-unverified, a
    blob without a piece index is checked whole first, so a verdict is never reached on bytes
    that then fail their digest (altered to look harmless)."""
    await node.locate()
    if fetcher.serve_unverified:
        await fetcher.check_whole(node.blob)
    return bytes(await fetcher.read_file(node, offset, length))


class FileScans:
    """The findings of each file the scan policy covers, scanned once, on its first read (or
    before the mount is ready, for ``refuse-model``)."""

    def __init__(self, policy: ScanPolicy, read: ReadFile) -> None:
        self.policy = policy
        self._read = read
        self._locks: dict[int, trio.Lock] = {}
        self._done: dict[int, list[Finding]] = {}
        self.findings: list[Finding] = []
        self.scans: list[FileScan] = []

    def action(self, node: FileNode) -> str:
        kind = file_kind(node.path)
        return OFF if kind is None else self.policy.action(kind)

    async def findings_of(self, node: FileNode) -> list[Finding]:
        """The file's findings; scanned now if not yet (a failed read is not remembered)."""
        if node.inode in self._done:
            return self._done[node.inode]
        async with self._locks.setdefault(node.inode, trio.Lock()):
            if node.inode not in self._done:
                self._done[node.inode] = await self._scan(node)
        return self._done[node.inode]

    async def _scan(self, node: FileNode) -> list[Finding]:
        kind, action = file_kind(node.path), self.action(node)
        if kind is None or action == OFF:
            return []

        async def read(offset: int, length: int) -> bytes:
            return await self._read(node, offset, length)

        scan = await scan_file(node.path, kind, node.size, read)
        self.scans.append(scan)
        findings = [Finding(node.path, kind, problem, action) for problem in scan.problems]
        for finding in findings:
            log.warning("scan: %s", finding.line())
        log.info(
            "scan: %s (%s): %d findings, %d bytes read, %.3f s",
            node.path, kind, len(findings), scan.bytes_read, scan.seconds,
        )  # fmt: skip
        self.findings += findings
        return findings

    async def refuse_model(self, reference: Reference | LayoutReference, tree: Tree) -> None:
        """Scan the files whose format's action is ``refuse-model`` now; a finding refuses the
        model (TrustError, one line)."""
        for node in tree.files():
            if self.action(node) == REFUSE_MODEL:
                findings = await self.findings_of(node)
                if findings:
                    raise TrustError(f"refusing {reference}: {findings[0].line()}")

    def guard(self, opened: OpenFile) -> OpenFile:
        """``opened``, its reads held until the file's scan is done (files the policy covers)."""
        return opened if self.action(opened.node) == OFF else ScannedFile(opened, self)


class ScannedFile:
    """An open file whose first read waits for its scan; a refused file's reads fail (EIO)."""

    def __init__(self, inner: OpenFile, scans: FileScans) -> None:
        self.node = inner.node
        self.keep_cache = inner.keep_cache
        self._inner = inner
        self._scans = scans

    async def read(self, offset: int, size: int) -> bytes | memoryview:
        for finding in await self._scans.findings_of(self.node):
            if finding.action in (REFUSE_FILE, REFUSE_MODEL):
                raise TrustError(f"refused by the scan policy: {finding.message}")
        return await self._inner.read(offset, size)
