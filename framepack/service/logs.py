"""Structured logs: one JSON object per line, to stderr and a rotating file.

Every record carries the time, level, component (server, worker name), pid
and message; a record about a job carries ``job``. Pass fields with
``log.info("claimed", extra={"job": job_id, "attempt": 2})``.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import sys
import time
from pathlib import Path

LOGGER = "framepack.service"
_STANDARD = set(vars(logging.LogRecord("x", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


class JsonLines(logging.Formatter):
    def __init__(self, component: str) -> None:
        super().__init__()
        self.component = component

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(), "component": self.component, "pid": os.getpid(),
            "msg": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def setup_logging(component: str, log_dir: Path | None, level: int = logging.INFO) -> logging.Logger:
    log = logging.getLogger(LOGGER)
    log.setLevel(level)
    log.propagate = False
    for handler in list(log.handlers):
        log.removeHandler(handler)
    formatter = JsonLines(component)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_dir is not None:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in component)
        handlers.append(logging.handlers.RotatingFileHandler(Path(log_dir) / f"{safe}.log", maxBytes=10 << 20,
                                                             backupCount=5, encoding="utf-8"))
    for handler in handlers:
        handler.setFormatter(formatter)
        log.addHandler(handler)
    return log


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER)
