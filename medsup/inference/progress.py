"""Terminal progress for batch inference: one bar over the cases, one over the current case's tiles."""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class RichBatchProgress:
    """A :class:`medsup.inference.batch.BatchProgress` drawn with rich on stderr; a no-op when ``disable``."""

    def __init__(self, disable: bool = False) -> None:
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TimeRemainingColumn(), transient=True, disable=disable)
        self.overall = self.bar.add_task("cases", total=None)
        self.case = self.bar.add_task("", total=None, visible=False)

    def __enter__(self) -> RichBatchProgress:
        self.bar.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        self.bar.stop()

    def cases(self, total: int) -> None:
        self.bar.update(self.overall, total=total)

    def case_started(self, path: Path) -> None:
        self.bar.reset(self.case, total=None, description=f"  {path.name}: tiles", visible=True)

    def tiles(self, done: int, total: int) -> None:
        self.bar.update(self.case, completed=done, total=total)

    def case_finished(self, entry: dict[str, Any]) -> None:
        self.bar.update(self.case, visible=False)
        self.bar.update(self.overall, advance=1, description=f"cases (last: {Path(entry['input']).name}: "
                                                             f"{entry['status']})")
