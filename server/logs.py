"""Log lines for people (text) or log collectors (JSON), with a record's ``fields`` as structure.

Code logs structure with ``log.info("...", extra={"fields": {...}})``; text
lines append the fields as ``key=value``, JSON lines carry them as keys.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

__all__ = ["FORMATS", "configure"]

FORMATS = ("text", "json")


def _text_value(value: Any) -> str:
    text = str(value)
    return json.dumps(text) if (not text or any(c in text for c in ' "=')) else text


class _TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "fields", None)
        if not fields:
            return line
        head, newline, rest = line.partition("\n")  # keep a traceback below the fields
        pairs = " ".join(f"{k}={_text_value(v)}" for k, v in fields.items())
        return f"{head} {pairs}{newline}{rest}"


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(level: str, fmt: str = "text") -> None:
    """Send every log line to stderr at ``level`` in format ``fmt`` (text or json)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _TextFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
