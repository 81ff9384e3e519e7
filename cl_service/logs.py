"""Logging set-up: readable lines for people, or one JSON object per line for log collectors (`log_format`)."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """`{"time", "level", "logger", "message", ...}`: extra fields passed with `extra=` are kept; exceptions are
    included as text under "exception"."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
            "thread": record.threadName,
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def configure(level: str, fmt: str) -> None:
    """Root logging at `level`, as text or JSON lines on stderr (replacing handlers set before)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def log_failure(logger: logging.Logger, message: str, exc: BaseException) -> None:
    """`message` with the traceback; one line when the store's database cannot be reached (a loop that polls the
    store says so at every turn while a PostgreSQL server restarts, and its traceback tells nothing new)."""
    from replay_store.db import is_unreachable, short_reason

    if is_unreachable(exc):
        logger.warning("%s: the store's database cannot be reached (%s)", message, short_reason(exc))
    else:
        logger.error(message, exc_info=exc)
