"""What to scan and what a finding does: the scan policy, and the findings themselves. Pure.

Per format, an action: ``off`` (never scanned: no byte fetched for it), ``warn`` (logged and
shown, the file served), ``refuse-file`` (the file reads EIO, with a log line naming the
finding), ``refuse-model`` (every file of the format scanned before the mount is ready; a
finding refuses the mount). The default refuses a pickle that imports anything outside the
scanner's safe list and a malformed safetensors file, file by file, so the mount stays ready at
once.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import PurePosixPath

from modelfs.trust import TrustError

OFF, WARN, REFUSE_FILE, REFUSE_MODEL = "off", "warn", "refuse-file", "refuse-model"
ACTIONS = (OFF, WARN, REFUSE_FILE, REFUSE_MODEL)

PICKLE, SAFETENSORS = "pickle", "safetensors"
# Pickle-based checkpoints: torch's (zip-wrapped or legacy), and plain pickles.
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"})


@dataclass(frozen=True)
class ScanPolicy:
    pickle: str = REFUSE_FILE
    safetensors: str = REFUSE_FILE

    def action(self, kind: str) -> str:
        return str(getattr(self, kind))

    def as_text(self) -> str:
        return ",".join(f"{field.name}={self.action(field.name)}" for field in fields(self))

    @classmethod
    def parse(cls, text: str) -> ScanPolicy:
        """``pickle=refuse-model,safetensors=warn`` (formats not named keep their default)."""
        policy = cls()
        kinds = [field.name for field in fields(cls)]
        for part in filter(None, (piece.strip() for piece in text.split(","))):
            kind, _, action = part.partition("=")
            if kind not in kinds or action not in ACTIONS:
                raise TrustError(
                    f"scan policy {part!r}: give FORMAT=ACTION, FORMAT one of "
                    f"{', '.join(kinds)} and ACTION one of {', '.join(ACTIONS)}"
                )
            policy = replace(policy, **{kind: action})
        return policy


def file_kind(path: str) -> str | None:
    """The format a file's name says it is, if it is one scanned."""
    suffix = PurePosixPath(path).suffix.lower()
    if suffix == ".safetensors":
        return SAFETENSORS
    if suffix in PICKLE_SUFFIXES:
        return PICKLE
    return None


@dataclass(frozen=True)
class Finding:
    """Something wrong with a file, and what the policy does about it."""

    path: str
    kind: str
    message: str
    action: str

    def line(self) -> str:
        return f"{self.path}: {self.message} ({self.kind}={self.action})"

    def as_json(self) -> dict[str, str]:
        return {"path": self.path, "format": self.kind, "finding": self.message,
                "action": self.action}  # fmt: skip
