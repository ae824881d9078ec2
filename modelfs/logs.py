"""Log output: plain lines, or one JSON object per line (``--log-format json``) for journald and
log shippers. A mount process puts its reference and pinned digest on every line it logs."""

from __future__ import annotations

import json
import logging
import os
import re
from datetime import UTC, datetime
from typing import Any

LOG_FORMATS = ("text", "json")
# Set by the CLI to the chosen format, so the processes the daemon (or a background mount)
# starts log the same way.
LOG_FORMAT_VARIABLE = "MODELFS_LOG_FORMAT"

# Control characters (C0, DEL, C1): a file name from a manifest may hold them.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")

# One process serves one mount: what it serves goes on each of its lines.
_context: dict[str, str | None] = {}


def set_log_context(**fields: str | None) -> None:
    _context.update(fields)


class ContextFilter(logging.Filter):
    """Copies the process's log context onto every record (``record.context``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.context = dict(_context)
        return True


def escape_controls(text: str) -> str:
    """``text`` with control characters as Python escapes (a newline as ``\\n``)."""
    return _CONTROL.sub(lambda found: repr(found[0])[1:-1], text)


class TextFormatter(logging.Formatter):
    """One record, one line: a newline in a message (a file name from a manifest) cannot forge
    another log line. A traceback below it stays as it is (it is the program's)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.message)
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
            **getattr(record, "context", {}),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


def configure_logging(level: int, log_format: str) -> None:
    handler = logging.StreamHandler()
    handler.addFilter(ContextFilter())
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("modelfs: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])
    os.environ[LOG_FORMAT_VARIABLE] = log_format
