"""The outbox of one run: a queue of records and the background thread that sends it, with backoff.

The caller's thread only appends (to memory and to the spool); all network I/O happens on the outbox
thread, so a slow or dead tracking server never blocks a training step. A failed attempt keeps its records
queued and schedules the next one after 1, 2, 4 ... s (capped at ``max_backoff_s``).
"""

from __future__ import annotations

import logging
import threading
import time

from mlflow.tracking import MlflowClient

from medsup.tracking.batching import (
    BATCHED_KINDS,
    Item,
    next_chunk,
    send_artifact,
    send_chunk,
    send_end,
    surely_not_sent,
)
from medsup.tracking.spool import Spool
from medsup.tracking.uri import short_error

log = logging.getLogger(__name__)

THREAD_PREFIX = "medsup-mlflow-"
FINISH_MAX_BACKOFF_S = 5.0  # while draining at the end, notice a server that came back within seconds


class _QuietRetries(logging.Filter):
    """Drop urllib3's per-retry WARNINGs raised on outbox threads: during an outage every attempt would
    print one; the outbox logs the outage once and its end once. Other threads' records pass untouched."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.threadName or "").startswith(THREAD_PREFIX)


def _install_retry_filter() -> None:
    urllib3_log = logging.getLogger("urllib3.connectionpool")
    if not any(isinstance(f, _QuietRetries) for f in urllib3_log.filters):
        urllib3_log.addFilter(_QuietRetries())


class Outbox:
    """Queued records of one run and the daemon thread sending them. Thread-safe.

    Args:
        client: the run's store.
        run_id: the run the records belong to.
        spool: where records are written before they are queued, and acked once settled.
        flush_interval_s: the longest a record waits while the store is up.
        flush_points: queued records that trigger a send before the interval ends.
        max_backoff_s: the longest wait between attempts while the store is down.
        max_buffered: records kept in memory; beyond it records are only spooled (``overflow``).
    """

    def __init__(self, client: MlflowClient, run_id: str, spool: Spool, *, flush_interval_s: float,
                 flush_points: int, max_backoff_s: float, max_buffered: int) -> None:
        self.client, self.run_id, self.spool = client, run_id, spool
        self._flush_interval = flush_interval_s
        self._flush_points = flush_points
        self._max_backoff = max_backoff_s
        self._max_buffered = max_buffered
        self._cond = threading.Condition()
        self._pending: list[Item] = []
        self.overflow = 0  # records only in the spool (memory cap hit)
        self._next_id = 0
        self._failures = 0  # consecutive failed attempts: the backoff exponent
        self._failed_attempts = 0  # all failed attempts: lets flush() notice one
        self._down_since: float | None = None
        self._next_try = 0.0
        self._last_attempt = time.monotonic()
        self._force = False
        self._finishing = False
        self._stop = False
        _install_retry_filter()
        self._thread = threading.Thread(target=self._worker, name=f"{THREAD_PREFIX}{run_id[:8]}", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        """Records not yet settled: queued in memory, or only spooled past the memory cap."""
        with self._cond:
            return len(self._pending) + self.overflow

    @property
    def down(self) -> bool:
        """True while the last attempt failed (the store is unreachable or erroring)."""
        with self._cond:
            return self._down_since is not None

    def put(self, items: list[Item], cap: bool = True) -> None:
        """Number, spool and queue ``items``; returns at once. ``cap=False`` always keeps them in memory."""
        if not items:
            return
        with self._cond:
            for item in items:
                item.id = self._next_id
                self._next_id += 1
            self.spool.write(items)  # before sending: a crash from here on loses nothing
            if cap and len(self._pending) >= self._max_buffered:
                if not self.overflow:
                    log.warning("more than %d MLflow records queued; further ones are kept only in %s",
                                self._max_buffered, self.spool.path)
                self.overflow += len(items)
                return
            self._pending.extend(items)
            if len(self._pending) >= self._flush_points:
                self._cond.notify_all()

    def flush(self, timeout_s: float | None = None) -> bool:
        """Send now, skipping any backoff wait, until the queue is empty, an attempt fails, or the timeout."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            failed_before = self._failed_attempts
            self._force, self._next_try = True, 0.0
            self._cond.notify_all()
            while self._pending and self._failed_attempts == failed_before and self._thread.is_alive():
                wait = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
                if wait <= 0:
                    break
                self._cond.wait(wait)
            return not self._pending and not self.overflow

    def drain(self, timeout_s: float) -> int:
        """Keep sending (backoff capped at 5 s) for up to ``timeout_s``, then stop the thread.

        Returns:
            The records left in memory (``overflow`` not included).
        """
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._finishing, self._force, self._next_try = True, True, 0.0
            self._cond.notify_all()
            while self._pending and time.monotonic() < deadline and self._thread.is_alive():
                self._cond.wait(min(1.0, max(0.0, deadline - time.monotonic())))
            left = len(self._pending)
            self._stop = True
            self._cond.notify_all()
        # an attempt in flight may last up to MLflow's HTTP timeout; the thread is a daemon, do not wait it out
        self._thread.join(timeout=2.0)
        return left

    # ----------------------------------------------------------------------------------- the thread

    def _worker(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._due(time.monotonic()):
                    self._cond.wait(self._sleep_time())
                if self._stop:
                    return
                work = self._next_work()
                self._last_attempt = time.monotonic()
            error = self._attempt(work)
            with self._cond:
                if error is None:
                    self._on_success()
                    done = {i.id for i in work}
                    self._pending = [i for i in self._pending if i.id not in done]
                else:
                    self._on_failure(work, error)
                if not self._pending or error is not None:
                    self._force = False
                self._cond.notify_all()

    def _due(self, now: float) -> bool:
        if not self._pending or now < self._next_try:
            return False
        return (self._force or self._finishing or len(self._pending) >= self._flush_points
                or now - self._last_attempt >= self._flush_interval)

    def _sleep_time(self) -> float:
        if not self._pending:
            return 1.0
        until = max(self._next_try, self._last_attempt + self._flush_interval) - time.monotonic()
        return min(1.0, max(0.01, until))

    def _next_work(self) -> list[Item]:
        """What the next attempt sends: a log_batch chunk, else one artifact, else the run's end."""
        batched = [i for i in self._pending if i.kind in BATCHED_KINDS]
        if batched:
            return next_chunk(batched)
        artifacts = [i for i in self._pending if i.kind == "artifact"]
        return artifacts[:1] or self._pending[:1]

    def _attempt(self, work: list[Item]) -> BaseException | None:
        """Send ``work``; every item in it is settled unless an exception is returned."""
        try:
            if work[0].kind in BATCHED_KINDS:
                sent, skipped = send_chunk(self.client, self.run_id, work,
                                           check_existing=any(i.uncertain for i in work))
                self.spool.ack([*sent, *skipped])
            else:
                (send_artifact if work[0].kind == "artifact" else send_end)(self.client, self.run_id, work[0])
                self.spool.ack([work[0].id])
        except Exception as err:
            return err
        return None

    def _on_success(self) -> None:
        if self._down_since is not None:
            log.warning("MLflow store answers again after %.0f s; sending %d queued record(s) of run %s",
                        time.monotonic() - self._down_since, len(self._pending), self.run_id)
        self._down_since = None
        self._failures = 0
        self._next_try = 0.0

    def _on_failure(self, work: list[Item], error: BaseException) -> None:
        if not surely_not_sent(error):
            for item in work:  # it may have been stored: check the store before sending again
                item.uncertain = True
        self._failures += 1
        self._failed_attempts += 1
        cap = min(self._max_backoff, FINISH_MAX_BACKOFF_S) if self._finishing else self._max_backoff
        delay = min(cap, 2.0 ** min(self._failures - 1, 16))
        self._next_try = time.monotonic() + delay
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning("MLflow store unreachable (%s); training continues, %d record(s) of run %s kept in "
                        "memory and in %s, retrying with backoff", short_error(error), len(self._pending),
                        self.run_id, self.spool.path)
        else:
            log.debug("MLflow store still unreachable (%s); next try in %.0f s", short_error(error), delay)


