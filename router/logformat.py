"""The router's own log lines: text for people, or one JSON object a line for a log
pipeline (``kvroute --log-format json``), with the same fields on every line."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import orjson

FORMATS = ("text", "json")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class JsonFormatter(logging.Formatter):
    """``{"time", "level", "logger", "message"}``, plus ``proc`` (one of ``--procs N``) and
    ``exception`` (the traceback) when there is one."""

    def __init__(self, proc: int | None = None) -> None:
        super().__init__()
        self.proc = proc

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.proc is not None:
            line["proc"] = self.proc
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(line, default=str).decode()


def configure(level: str, fmt: str, proc: int | None = None) -> None:
    """Log to standard error at ``level`` in ``fmt`` (one of :data:`FORMATS`)."""
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter(proc))
    else:
        where = f" [proc {proc}]" if proc is not None else ""
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s{where} %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
