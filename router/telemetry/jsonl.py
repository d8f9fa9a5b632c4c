"""JSON lines written off the event loop: the prompt log's file and the access log.

The loop only queues a record; a listener thread formats nothing and writes each line to
a size-rotated file (``FileSink``), or to standard error when there is no file.
"""

from __future__ import annotations

import logging
import logging.handlers
import queue
import sys

import orjson

from kvroute.router.telemetry.config import FileSink


class JsonLines:
    def __init__(self, sink: FileSink | None, name: str):
        handler: logging.Handler
        if sink is not None:
            handler = logging.handlers.RotatingFileHandler(sink.path, maxBytes=sink.max_bytes,
                                                           backupCount=sink.backups, encoding="utf-8")
        else:
            handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        self._name = name
        self._queue: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
        self._listener: logging.handlers.QueueListener | None = logging.handlers.QueueListener(self._queue, handler)
        self._listener.start()

    def write(self, record: dict) -> None:
        """Queue one line (never blocks the loop)."""
        line = orjson.dumps(record).decode()
        self._queue.put(logging.LogRecord(self._name, logging.INFO, "", 0, line, None, None))

    def close(self) -> None:
        """Write out what is queued and close the file (blocks: run it off the loop)."""
        if self._listener is not None:
            self._listener.stop()
            for handler in self._listener.handlers:
                handler.close()
            self._listener = None
