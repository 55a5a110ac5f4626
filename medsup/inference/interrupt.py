"""SIGTERM during batch inference cleans up the way Ctrl-C does.

Python's default action for SIGTERM (what ``kill``, ``timeout``, Slurm and Kubernetes send) ends the process
at once: no ``finally`` runs, so the temp file of an output being written stays in OUT. While a batch runs,
SIGTERM instead raises ``SystemExit(143)``: :func:`~medsup.data.io.atomic_path` removes the temp file, the report
keeps every finished case (it is rewritten after each), and the exit status is still 143 (128 + SIGTERM), what
a shell reports for a process SIGTERM ended. ``--resume`` then does the remaining cases. Ctrl-C (SIGINT) already
raises ``KeyboardInterrupt`` (``medsup infer`` exits 130).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from types import FrameType

log = logging.getLogger(__name__)


@contextlib.contextmanager
def sigterm_exits_cleanly() -> Iterator[None]:
    """Within the block, SIGTERM raises ``SystemExit(143)`` in the main thread; the old handler comes back after.

    Does nothing off the main thread (only it may set handlers) or when someone else already handles SIGTERM
    (e.g. a model server around the MLflow pyfunc): their handler stays.
    """
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def stop(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
        log.error("SIGTERM: stopping; finished cases are kept, --resume does the rest")
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
