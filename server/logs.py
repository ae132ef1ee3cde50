"""Log lines for people (text) or log collectors (JSON), with a record's ``fields`` as structure.

Code logs structure with ``log.info("...", extra={"fields": {...}})``; text
lines append the fields as ``key=value``, JSON lines carry them as keys.

Messages and fields carry text that clients chose (layer names, error
details), so one record is always one line: control characters (newlines,
ANSI escapes) are escaped, every value is cut to a bounded length, and the
lines of a traceback are indented below their record.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime
from typing import Any

__all__ = ["FORMATS", "OUR_LOGGERS", "configure", "shorten"]

FORMATS = ("text", "json")
#: The loggers of this project: ``--log-level`` sets theirs; libraries' (asyncio, gRPC, numba) stay at INFO or
#: above unless ``--debug-libraries`` asks for their debug lines too.
OUR_LOGGERS = ("normserve", "normkernels")
#: Characters of one logged value (a message: four times as many); past it, the rest is counted, not shown.
VALUE_CHARACTERS = 512


def shorten(text: str, limit: int = VALUE_CHARACTERS) -> str:
    """``text`` cut to ``limit`` characters, saying how long it was."""
    return text if len(text) <= limit else f"{text[:limit]}...[{len(text)} characters]"


def _one_line(text: str, limit: int = VALUE_CHARACTERS) -> str:
    text = shorten(text, limit)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _text_value(value: Any) -> str:
    text = _one_line(str(value))
    return json.dumps(text) if (not text or any(c in text for c in ' "=')) else text


def _timestamp(record: logging.LogRecord) -> str:
    """ISO 8601 in local time with its UTC offset, to the millisecond: ``2026-12-02T01:02:03.456+00:00``."""
    return datetime.fromtimestamp(record.created).astimezone().isoformat(timespec="milliseconds")


class _TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 -- logging's
        return _timestamp(record)

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 -- logging's name
        record.message = _one_line(record.message, 4 * VALUE_CHARACTERS)
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        head, newline, rest = super().format(record).partition("\n")
        fields = getattr(record, "fields", None)
        if fields:
            head += " " + " ".join(f"{k}={_text_value(v)}" for k, v in fields.items())
        if rest:  # a traceback: indented, so no line of it reads as a record of its own
            rest = "\n".join("    | " + _one_line(line, 4 * VALUE_CHARACTERS) for line in rest.splitlines())
        return f"{head}{newline}{rest}"


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "message": shorten(record.getMessage(), 4 * VALUE_CHARACTERS),
            **{k: shorten(v) if isinstance(v, str) else v for k, v in getattr(record, "fields", {}).items()},
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class _FailedSend(logging.Filter):
    """gRPC's core fails a send when the peer has just gone (cancelled, deadline, connection lost), and gRPC
    logs that as an error with its own traceback (``ExecuteBatchError raised in core``), which says nothing
    about our code. Keep it as one warning line (the access log has the call's line too)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith("ExecuteBatchError raised in core"):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg, record.args = "%s (most often: the client was gone)", (record.getMessage(),)
            record.exc_info = record.exc_text = None
        return True


def configure(level: str, fmt: str = "text", debug_libraries: bool = False) -> None:
    """Send log lines to stderr in format ``fmt`` (text or json): this project's at ``level``, the libraries'
    at ``level`` too with ``debug_libraries``, else at INFO or above (their debug lines are their internals)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _TextFormatter())
    ours = logging.getLevelName(level.upper())
    libraries = ours if debug_libraries else max(ours, logging.INFO)
    logging.basicConfig(level=libraries, handlers=[handler], force=True)
    for name in OUR_LOGGERS:
        logging.getLogger(name).setLevel(ours)
    handler.addFilter(_FailedSend())  # on the handler, which configure() replaces: never added twice
