"""One structured line per event, tagged with the process's name and pid: plain or JSON."""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime

_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


def _fields(record: logging.LogRecord) -> dict[str, object]:
    return {key: value for key, value in record.__dict__.items() if key not in _STANDARD}


class PlainFormatter(logging.Formatter):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def format(self, record: logging.LogRecord) -> str:
        moment = datetime.fromtimestamp(record.created, UTC).strftime("%H:%M:%S.%f")[:-3]
        extra = " ".join(f"{key}={value}" for key, value in _fields(record).items())
        line = f"{moment} {record.levelname:<7} {self.name}[{os.getpid()}] {record.getMessage()}"
        if extra:
            line += f" {extra}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            **_fields(record),  # the fields below win over an `extra` of the same name
            "time": datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "level": record.levelname.lower(),
            "child": self.name,
            "pid": os.getpid(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(name: str, log_format: str = "plain", level: str | None = None) -> None:
    """Log to stderr as `name`; `BITNEXUS_LOG_FORMAT` / `BITNEXUS_LOG_LEVEL` pass the choice to children."""
    log_format = os.environ.get("BITNEXUS_LOG_FORMAT", log_format)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(name) if log_format == "json" else PlainFormatter(name))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level or os.environ.get("BITNEXUS_LOG_LEVEL", "INFO"))
