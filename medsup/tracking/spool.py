"""The local spool: a JSONL write-ahead log of everything a tracker logs, and its replay.

Every metric point, param, tag, artifact and the run's end is appended (and flushed to the OS) BEFORE it is
sent, and an ``ack`` line is appended once the store confirmed it. A tracker that loses its server, or a
process that dies, therefore leaves a file from which exactly the unconfirmed records can be re-sent::

    {"type": "header", "version": 1, "run_id": "...", "uri": "...", "experiment": "...", "created": 1.7e9}
    {"type": "metric", "id": 7, "key": "loss", "value": 0.31, "step": 3, "timestamp": 1732500000123}
    {"type": "ack", "ids": [1, 2, 3, 7]}

Replay: ``python -m medsup.tracking replay SPOOL.jsonl [--uri URI]`` or :func:`replay_spool`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

from mlflow.tracking import MlflowClient

from medsup.tracking.batching import (
    BATCHED_KINDS,
    Item,
    is_permanent,
    next_chunk,
    send_artifact,
    send_chunk,
    send_end,
)
from medsup.tracking.uri import TrackingUnavailable, prepare_store

log = logging.getLogger(__name__)

SPOOL_VERSION = 1
SPOOL_PREFIX = "mlflow-spool-"


class Spool:
    """Append-only spool file of one tracker session. Thread-safe.

    A spool that cannot be written (disk full, read-only) logs one ERROR and goes quiet: losing the
    safety net must not stop training.
    """

    def __init__(self, path: Path, header: dict[str, Any] | None) -> None:
        """Open ``path`` for appending; write a header line unless ``header`` is None (an existing spool)."""
        self.path = path
        self._lock = threading.Lock()
        self._file: IO[str] | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("a", encoding="utf-8")
        except OSError as err:
            log.error("cannot open the tracking spool %s (%s); logging continues without it", path, err)
            return
        if header is not None:
            self._append([{"type": "header", "version": SPOOL_VERSION, "created": time.time(), **header}])

    @classmethod
    def for_run(cls, spool_dir: Path, run_id: str, header: dict[str, Any]) -> Spool:
        """A new spool file ``spool_dir/mlflow-spool-<run_id>-<ms>.jsonl`` (one per session of a run)."""
        name = f"{SPOOL_PREFIX}{run_id}-{time.time_ns() // 1_000_000}.jsonl"
        return cls(Path(spool_dir) / name, {"run_id": run_id, **header})

    def write(self, items: Iterable[Item]) -> None:
        """Record items before they are sent."""
        self._append([i.to_record() for i in items])

    def ack(self, ids: Iterable[int]) -> None:
        """Record that the store has these items (sent, already present, or refused for good)."""
        ids = list(ids)
        if ids:
            self._append([{"type": "ack", "ids": ids}])

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def remove(self) -> None:
        """Close and delete the file (everything in it was confirmed)."""
        self.close()
        self.path.unlink(missing_ok=True)

    def _append(self, records: list[dict[str, Any]]) -> None:
        with self._lock:
            if self._file is None:
                return
            try:
                # allow_nan: a NaN loss is worth keeping; json.loads reads NaN/Infinity back
                self._file.write("".join(json.dumps(r) + "\n" for r in records))
                # flush to the OS, not fsync: survives a process crash (the case that matters) at no cost
                self._file.flush()
            except OSError as err:
                log.error("cannot write the tracking spool %s (%s); logging continues without it", self.path, err)
                self._file = None


def read_spool(path: Path) -> tuple[dict[str, Any], list[Item]]:
    """The header and the unconfirmed items of a spool file, in logged order.

    A torn last line (the process died mid-write) is skipped with a warning.

    Raises:
        ValueError: not a medsup spool file.
    """
    header: dict[str, Any] = {}
    items: dict[int, Item] = {}
    acked: set[int] = set()
    with Path(path).open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                kind = rec["type"]
                if kind == "header":
                    header = header or rec
                elif kind == "ack":
                    acked.update(int(i) for i in rec["ids"])
                else:
                    item = Item.from_record(rec)
                    items[item.id] = item
            except (ValueError, KeyError, TypeError) as err:
                log.warning("%s:%d: unreadable spool line skipped (%s)", path, lineno, err)
    if not header.get("run_id"):
        raise ValueError(f"{path}: not a medsup tracking spool (no header with a run_id)")
    return header, [item for item_id, item in items.items() if item_id not in acked]


def spool_files(spool_dir: Path, run_id: str) -> list[Path]:
    """Spool files left in ``spool_dir`` by earlier sessions of ``run_id``, oldest first."""
    return sorted(Path(spool_dir).glob(f"{SPOOL_PREFIX}{run_id}-*.jsonl"))


def replay_spool(spool_file: Path, uri: str) -> int:
    """Re-send the unconfirmed records of a spool file to the run it names, in the store at ``uri``.

    Metric points, params and tags go first, then artifacts (from their original local paths), then the
    run's end status if the session got that far. Each confirmed batch is acked in the file as it goes,
    so an interrupted replay resumes where it stopped and a second replay sends nothing. Metric points
    are also checked against the store's history first, so a point whose ack was lost is not duplicated.

    Returns:
        The number of metric points sent.

    Raises:
        TrackingUnavailable: the store does not answer (progress so far is kept).
        ValueError: a file-store URI, not a spool file, or the run does not exist at ``uri``.
    """
    spool_file = Path(spool_file)
    header, items = read_spool(spool_file)
    run_id = str(header["run_id"])
    if not items:
        log.info("%s: nothing left to replay for run %s", spool_file, run_id)
        return 0
    prepare_store(uri)
    client = MlflowClient(tracking_uri=uri)
    try:
        client.get_run(run_id)
    except Exception as err:
        if is_permanent(err):
            raise ValueError(f"run {run_id} from {spool_file} does not exist at {uri}: {err}") from err
        raise TrackingUnavailable(f"{uri}: cannot reach the store to replay {spool_file}: {err}") from err

    spool = Spool(spool_file, header=None)  # acks go to the same file
    sent_points = 0
    try:
        batched = [i for i in items if i.kind in BATCHED_KINDS]
        while batched:
            chunk = next_chunk(batched)
            sent, skipped = send_chunk(client, run_id, chunk, check_existing=True)
            spool.ack([*sent, *skipped])
            sent_ids = set(sent)
            sent_points += sum(1 for i in chunk if i.kind == "metric" and i.id in sent_ids)
            batched = batched[len(chunk):]
        for item in items:
            if item.kind == "artifact":
                send_artifact(client, run_id, item)
                spool.ack([item.id])
        for item in items:
            if item.kind == "end":
                send_end(client, run_id, item)
                spool.ack([item.id])
    except Exception as err:
        raise TrackingUnavailable(f"{uri}: replay of {spool_file} stopped, rerun it later: {err}") from err
    finally:
        spool.close()
    log.info("replayed %s into run %s at %s: %d metric point(s) sent", spool_file, run_id, uri, sent_points)
    return sent_points
