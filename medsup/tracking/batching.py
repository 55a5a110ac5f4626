"""Pending tracking items, MLflow's limits, and sending them: shared by the live tracker and spool replay.

An :class:`Item` is one metric point, param, tag, artifact upload or run termination, with an id unique
within its spool file. Sending settles items: sent, found already present in the store, or dropped because
the store refused them for good (a bad key, a changed param). Transient failures (server down, timeouts,
5xx) raise, and the caller keeps the items for a later attempt.
"""

from __future__ import annotations

import logging
import math
import posixpath
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

# MLflow's log_batch limits (mlflow/utils/validation.py); the request-size cap is kept well under its 1 MB.
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_ENTITIES_PER_BATCH = 1000
MAX_BATCH_BYTES = 700_000
MAX_KEY_LENGTH = 250
MAX_PARAM_LENGTH = 6000
MAX_TAG_LENGTH = 8000
TRUNCATION_MARK = "...[truncated]"

# Errors that retrying cannot fix: the store understood the request and refused it.
PERMANENT_ERRORS = frozenset({
    "INVALID_PARAMETER_VALUE", "BAD_REQUEST", "MALFORMED_REQUEST", "INVALID_STATE",
    "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS", "INVALID_STATE_TRANSITION",
})
# Text of errors raised before a request left this machine; anything else may have reached the store.
_NOT_SENT_MARKERS = ("Failed to establish a new connection", "Connection refused", "NewConnectionError")

BATCHED_KINDS = ("metric", "param", "tag")


@dataclass
class Item:
    """One pending record, as stored in the spool (``to_record``/``from_record`` round-trip)."""

    id: int
    kind: str  # metric | param | tag | artifact | end
    key: str = ""
    value: Any = None  # float for metrics, str for params/tags, status for end
    step: int = 0
    timestamp: int = 0  # ms since epoch: metric time or run end time
    path: str = ""  # artifact: local file or directory
    artifact_path: str | None = None
    # True once an attempt failed in a way that may have reached the store: check before re-sending
    uncertain: bool = field(default=False, compare=False)

    def to_record(self) -> dict[str, Any]:
        rec: dict[str, Any] = {"type": self.kind, "id": self.id}
        if self.kind == "metric":
            rec.update(key=self.key, value=self.value, step=self.step, timestamp=self.timestamp)
        elif self.kind in ("param", "tag"):
            rec.update(key=self.key, value=self.value)
        elif self.kind == "artifact":
            rec.update(path=self.path, artifact_path=self.artifact_path)
        elif self.kind == "end":
            rec.update(status=self.value, timestamp=self.timestamp)
        return rec

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> Item:
        kind = rec["type"]
        value = rec.get("status") if kind == "end" else rec.get("value")
        return cls(id=int(rec["id"]), kind=kind, key=rec.get("key", ""), value=value,
                   step=int(rec.get("step", 0)), timestamp=int(rec.get("timestamp", 0)),
                   path=rec.get("path", ""), artifact_path=rec.get("artifact_path"))

    def size(self) -> int:
        """Rough JSON size in a log_batch request."""
        return len(self.key) + len(str(self.value)) + 64


_BAD_KEY_CHARS = re.compile(r"[^\w./\- ]")


def sanitize_key(key: object) -> str:
    """A key MLflow accepts: alphanumerics, ``_ - . /`` and spaces, a normalised relative path, <= 250 chars.

    Colons are replaced too although MLflow allows them on POSIX: a Windows server refuses them.
    """
    text = _BAD_KEY_CHARS.sub("_", str(key)).strip()
    parts = [p for p in text.split("/") if p not in ("", ".", "..")]
    text = "/".join(parts) or "_"
    if posixpath.normpath(text) != text:
        text = text.replace("/", "_")
    return text[:MAX_KEY_LENGTH]


def truncate(value: str, limit: int) -> str:
    """Cut ``value`` to ``limit`` characters, ending with a visible mark when cut."""
    return value if len(value) <= limit else value[: limit - len(TRUNCATION_MARK)] + TRUNCATION_MARK


def same_value(stored: float, logged: float) -> bool:
    """Does a stored point hold ``logged``? NaN equals NaN; MLflow stores +-inf as +-float max."""
    if math.isnan(stored) or math.isnan(logged):
        return math.isnan(stored) and math.isnan(logged)
    return stored == max(-sys.float_info.max, min(sys.float_info.max, logged))


def is_permanent(err: BaseException) -> bool:
    """True when the store refused the request itself, so a retry would fail the same way."""
    return isinstance(err, MlflowException) and err.error_code in PERMANENT_ERRORS


def surely_not_sent(err: BaseException) -> bool:
    """True when the request failed before reaching the server (connection refused): no need to check."""
    text = str(err)
    return any(marker in text for marker in _NOT_SENT_MARKERS)


def next_chunk(items: Iterable[Item]) -> list[Item]:
    """The longest prefix of the batchable ``items`` that fits one log_batch call."""
    chunk: list[Item] = []
    counts = {"metric": 0, "param": 0, "tag": 0}
    size = 0
    seen_params: set[str] = set()
    for item in items:
        if item.kind not in counts:
            continue
        limit = MAX_METRICS_PER_BATCH if item.kind == "metric" else MAX_PARAMS_TAGS_PER_BATCH
        # log_batch refuses the same param key twice in one request
        duplicate = item.kind == "param" and item.key in seen_params
        if counts[item.kind] >= limit or len(chunk) >= MAX_ENTITIES_PER_BATCH or duplicate \
                or (chunk and size + item.size() > MAX_BATCH_BYTES):
            break
        counts[item.kind] += 1
        size += item.size()
        if item.kind == "param":
            seen_params.add(item.key)
        chunk.append(item)
    return chunk


def drop_present(client: MlflowClient, run_id: str, items: Sequence[Item]) -> tuple[list[Item], list[Item]]:
    """Split metric ``items`` into (to send, already in the store).

    A point counts as present when the store has the same (key, step, timestamp, value): log_batch would
    duplicate it. One history query per key, so use it only for items whose earlier send is in doubt.
    """
    keys = {i.key for i in items if i.kind == "metric"}
    history: dict[str, list[Metric]] = {k: client.get_metric_history(run_id, k) for k in keys}
    todo: list[Item] = []
    present: list[Item] = []
    for item in items:
        if item.kind == "metric" and any(
            m.step == item.step and m.timestamp == item.timestamp and same_value(m.value, item.value)
            for m in history[item.key]
        ):
            present.append(item)
        else:
            todo.append(item)
    return todo, present


def send_chunk(client: MlflowClient, run_id: str, chunk: Sequence[Item], *,
               check_existing: bool) -> tuple[list[int], list[int]]:
    """Send one log_batch-sized chunk; every item in it ends up settled.

    A refused chunk is bisected so that only the offending items are dropped, each with an ERROR log.

    Returns:
        ``(sent, skipped)`` ids: skipped were already in the store or refused for good.

    Raises:
        Exception: a transient failure; nothing in the chunk is settled.
    """
    if check_existing:
        todo, present = drop_present(client, run_id, chunk)
        if present:
            log.info("%d metric point(s) were already stored by an attempt that seemed to fail", len(present))
        skipped = [i.id for i in present]
    else:
        todo, skipped = list(chunk), []
    if not todo:
        return [], skipped
    try:
        client.log_batch(
            run_id,
            metrics=[Metric(i.key, float(i.value), i.timestamp, i.step) for i in todo if i.kind == "metric"],
            params=[Param(i.key, str(i.value)) for i in todo if i.kind == "param"],
            tags=[RunTag(i.key, str(i.value)) for i in todo if i.kind == "tag"],
            synchronous=True,
        )
    except Exception as err:
        if not is_permanent(err):
            raise
        if len(todo) == 1:
            item = todo[0]
            log.error("MLflow refused %s %r=%r for run %s, dropped: %s", item.kind, item.key,
                      item.value, run_id, err)
            return [], [*skipped, item.id]
        # a refused log_batch is one failed transaction, nothing applied: the halves need no check
        half = len(todo) // 2
        sent_a, skipped_a = send_chunk(client, run_id, todo[:half], check_existing=False)
        sent_b, skipped_b = send_chunk(client, run_id, todo[half:], check_existing=False)
        return [*sent_a, *sent_b], [*skipped, *skipped_a, *skipped_b]
    return [i.id for i in todo], skipped


def send_artifact(client: MlflowClient, run_id: str, item: Item) -> None:
    """Upload one file or directory. A vanished file is dropped with an ERROR (retrying cannot help).

    Raises:
        Exception: a transient failure.
    """
    path = Path(item.path)
    if not path.exists():
        log.error("artifact %s no longer exists; not uploaded to run %s", path, run_id)
        return
    try:
        client.log_artifact(run_id, str(path), item.artifact_path)
    except Exception as err:
        if not is_permanent(err):
            raise
        log.error("MLflow refused artifact %s for run %s, dropped: %s", path, run_id, err)


def send_end(client: MlflowClient, run_id: str, item: Item) -> None:
    """Terminate the run with the recorded status and end time.

    Raises:
        Exception: a transient failure.
    """
    try:
        client.set_terminated(run_id, status=str(item.value), end_time=item.timestamp or None)
    except Exception as err:
        if not is_permanent(err):
            raise
        log.error("MLflow refused to end run %s with status %s: %s", run_id, item.value, err)
