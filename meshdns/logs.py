"""Log set-up: text or JSON lines, ISO 8601 timestamps with their zone, real fields.

A log call passes its data as ``extra={"fields": {...}}``: JSON lines carry each
field as a key of its own; text lines append them as ``key=value``. The message
stays readable on its own in both formats.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import Any

FIELDS = "fields"  # the LogRecord attribute that extra={"fields": {...}} sets
IN_MESSAGE = "fields_in_message"  # extra={..., IN_MESSAGE: True}: text lines need no k=v


def iso_time(created: float) -> str:
    """``2026-12-01T15:07:36.123+00:00``: local time with its UTC offset (RFC 3339)."""
    stamp = datetime.datetime.fromtimestamp(created).astimezone()
    return stamp.isoformat(timespec="milliseconds")


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, FIELDS, None)
    return fields if isinstance(fields, dict) else {}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, then the record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": iso_time(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record_fields(record).items():
            out.setdefault(key, value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    """``<ISO time> LEVEL logger: message key=value ...``"""

    def format(self, record: logging.LogRecord) -> str:
        line = (f"{iso_time(record.created)} {record.levelname} {record.name}: "
                f"{record.getMessage()}")
        fields = record_fields(record)
        if fields and not getattr(record, IN_MESSAGE, False):
            line += " " + " ".join(f"{k}={_text(v)}" for k, v in fields.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return json.dumps(text) if (not text or " " in text or '"' in text) else text


def setup_logging(level: str, fmt: str) -> None:
    """Route every logger to stderr in ``fmt`` ("text" or "json") at ``level``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
