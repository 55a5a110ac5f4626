"""Training speed of a real ``medsup train`` run: this tree against an older revision, side by side.

    .venv/bin/medsup synth --task liver --cases 4 --out /tmp/liver_synth
    .venv/bin/python bench/train_quick.py --data /tmp/liver_synth --baseline-rev 87c4b3d --epochs 4 --repeats 3

The issue's CPU target: "the quick liver preset trains faster than before this issue". Each repeat trains
the baseline revision (a detached ``git worktree``, run with its own code: ``python -m medsup`` from its
folder) and this tree one after the other, in alternating order, with the same data, preset, seed and
overrides (registration off; validation off unless ``--validate``), each a fresh process as a user runs it.
Every epoch but the first (which fills the preprocessing cache) is read from the log line
``epoch i/n: ..., X s``. Prints the median seconds per iteration of each tree, the samples/s, and the ratio
baseline / current (> 1: this tree trains faster), with the spread over repeats, each process's whole
wall time (start-up, caching, the untimed first epoch, the validations with ``--validate``, and the end
included) and, with ``--validate``, the median seconds of one validation (``val.seconds`` of its history).
``--current-set`` adds overrides for this tree only (to compare one setting against the baseline).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("bench.train_quick")
REPO = Path(__file__).resolve().parents[1]
EPOCH_LINE = re.compile(r"epoch (\d+)/(\d+): .*, ([\d.]+) s$")


def train_seconds(tree: Path, args: argparse.Namespace, extra: list[str], out: Path
                  ) -> tuple[list[float], float, list[float]]:
    """Seconds of each epoch after the first, of the whole process, and of each validation, from one
    ``medsup train`` run of the code in ``tree``."""
    # validation off unless --validate: then the preset's own val_every (and the validation at the end)
    validation = [] if args.validate else [f"train.val_every={args.epochs + 1}"]
    overrides = [f"train.epochs={args.epochs}", f"train.iterations_per_epoch={args.iterations}", *validation,
                 "tracking.register_best=false", *args.set, *extra]
    cmd = [sys.executable, "-m", "medsup", "train", "--task", args.task, "--data", str(args.data.resolve()),
           "--preset", args.preset, "--output", str(out), "--tracking-uri", f"sqlite:///{out.parent / 'mlflow.db'}"]
    for kv in overrides:
        cmd += ["--set", kv]
    env = {**os.environ, "PYTHONPATH": str(tree), "MLFLOW_DISABLE_TELEMETRY": "true"}
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, encoding="utf-8", errors="replace",
                          timeout=args.timeout)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{tree}: medsup train failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    epochs = [(int(m.group(1)), float(m.group(3))) for line in proc.stderr.splitlines()
              if (m := EPOCH_LINE.search(line.strip()))]
    if len(epochs) != args.epochs:
        raise RuntimeError(f"{tree}: expected {args.epochs} epoch lines, found {len(epochs)}:\n{proc.stderr[-3000:]}")
    history = json.loads((out / "history.json").read_text(encoding="utf-8"))
    validations = [float(row["val.seconds"]) for row in history if "val.seconds" in row]
    return [seconds for epoch, seconds in epochs if epoch > 1], wall, validations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a labelled dataset (e.g. `medsup synth` output)")
    parser.add_argument("--baseline-rev", default="87c4b3d", help="git revision to compare against (default: the "
                        "last commit before the performance issue)")
    parser.add_argument("--task", default="liver")
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--epochs", type=int, default=4, help="per run; the first is not timed")
    parser.add_argument("--iterations", type=int, default=20, help="iterations per epoch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--validate", action="store_true", help="validate as the preset does (its val_every); "
                        "the process wall then holds the validations (the epoch times never do)")
    parser.add_argument("--set", action="append", default=[], help="override for both trees (repeatable)")
    parser.add_argument("--current-set", action="append", default=[], help="override for this tree only")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per training run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    batch = None
    with tempfile.TemporaryDirectory(prefix="medsup-bench-train-") as tmp:
        base_tree = Path(tmp) / "baseline"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(base_tree),
                        args.baseline_rev], check=True)
        try:
            per_it: dict[str, list[float]] = {"baseline": [], "current": []}
            walls: dict[str, list[float]] = {"baseline": [], "current": []}
            vals: dict[str, list[float]] = {"baseline": [], "current": []}
            for repeat in range(args.repeats):
                order = ["baseline", "current"] if repeat % 2 == 0 else ["current", "baseline"]
                for name in order:
                    tree, extra = (base_tree, []) if name == "baseline" else (REPO, args.current_set)
                    out = Path(tmp) / f"{name}{repeat}" / "run"
                    seconds, wall, validations = train_seconds(tree, args, extra, out)
                    per_it[name].append(statistics.median(seconds) / args.iterations)
                    walls[name].append(wall)
                    vals[name] += validations
                    log.info("repeat %d %s: %s s per epoch", repeat, name, ", ".join(f"{s:.1f}" for s in seconds))
                    if batch is None:
                        batch = _batch_size(out)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(base_tree)], check=False)
    ratios = [b / c for b, c in zip(per_it["baseline"], per_it["current"], strict=True)]
    log.info("\n%s preset, task %s, %d x %d iterations per run (first epoch untimed), %d repeats, batch %s",
             args.preset, args.task, args.epochs, args.iterations, args.repeats, batch)
    log.info("| tree | s/iteration (median) | samples/s | per repeat | process wall s (median) | "
             "s per validation (median of n) |")
    log.info("|---|---|---|---|---|---|")
    for name, rev in (("baseline", args.baseline_rev), ("current", "this tree")):
        med = statistics.median(per_it[name])
        samples = f"{(batch or 0) / med:.2f}" if batch else "-"
        val = f"{statistics.median(vals[name]):.2f} ({len(vals[name])})" if vals[name] else "-"
        log.info("| %s (%s) | %.3f | %s | %s | %.1f | %s |", name, rev, med, samples,
                 ", ".join(f"{x:.3f}" for x in per_it[name]), statistics.median(walls[name]), val)
    log.info("\nbaseline / current: median %.2fx (repeats: %s)", statistics.median(ratios),
             ", ".join(f"{r:.2f}" for r in ratios))
    wall_ratios = [b / c for b, c in zip(walls["baseline"], walls["current"], strict=True)]
    log.info("baseline / current process wall: median %.2fx (repeats: %s)", statistics.median(wall_ratios),
             ", ".join(f"{r:.2f}" for r in wall_ratios))
    if vals["baseline"] and vals["current"]:
        log.info("baseline / current validation: median %.2fx", statistics.median(vals["baseline"])
                 / statistics.median(vals["current"]))


def _batch_size(out: Path) -> int | None:
    """The batch size the run planned (plan.json in its output folder)."""
    try:
        return int(json.loads((out / "plan.json").read_text(encoding="utf-8"))["batch_size"])
    except (OSError, KeyError, ValueError):
        return None


if __name__ == "__main__":
    main()
