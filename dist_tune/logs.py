"""Logging on every rank: records prefixed with "[rank N]", INFO on rank 0 and warnings elsewhere, and
warnings said once per process."""
from __future__ import annotations

import functools
import logging
from typing import Any

log = logging.getLogger("dist_tune")

_base_record_factory = logging.getLogRecordFactory()
_handler: logging.Handler | None = None


def rank_logging(rank: int) -> None:
    """Prefix every log record with "[rank N]" and log to stderr: INFO on rank 0, WARNING and above elsewhere."""
    global _handler

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = _base_record_factory(*args, **kwargs)
        record.msg = f"[rank {rank}] {record.msg}"
        return record

    logging.setLogRecordFactory(factory)
    root = logging.getLogger()
    if _handler is None:
        _handler = logging.StreamHandler()
        _handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(_handler)
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)


@functools.cache
def warn_once(msg: str) -> None:
    """Log `msg` as a warning the first time it is seen in this process."""
    log.warning(msg)
