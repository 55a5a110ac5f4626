"""``medsup figures``: draw a run's figures again, or the overlay / deep-supervision panel of one case.

Registered in :mod:`medsup.cli` with ``app.command("figures")(figures_command)``. torch, matplotlib and
the image readers are imported inside the command, so ``medsup --help`` stays instant.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from medsup.cli_common import fail

if TYPE_CHECKING:
    import torch


def figures_command(
    run: Annotated[Path | None, typer.Option("--run", help="Run folder: redraw its curves (history.json).")] = None,
    cases: Annotated[bool, typer.Option("--cases", help="With --run: also the overlays and deep-supervision panel "
                                        "(re-predicts the best/worst validation case with checkpoints/last.pt).")]
    = False,
    image: Annotated[Path | None, typer.Option("--image", help="CT image (any readable format).")] = None,
    ref: Annotated[Path | None, typer.Option("--ref", help="Reference label on the image's grid.")] = None,
    pred: Annotated[Path | None, typer.Option("--pred", help="Predicted label on the image's grid.")] = None,
    task: Annotated[str | None, typer.Option("--task", "-t", help="Task of --ref/--pred (labels, window).")] = None,
    model: Annotated[Path | None, typer.Option("--model", "-m", help="Bundle folder or checkpoint: draw the "
                                               "deep-supervision panel of --image.")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output folder (default RUN/figures, else "
                                             "./figures).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda (for --cases and --model).")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout.")] = False,
) -> None:
    """Figures as PNG: training curves and gradient norms of a run (--run), CT overlays with reference and
    prediction of one case (--image --ref --pred --task), every decoder head of a model (--model --image)."""
    if run is None and image is None:
        fail("give --run RUN_DIR, or --image with --ref/--pred (overlay) or --model (deep-supervision panel)")
    if image is not None and pred is None and model is None:
        fail("--image needs --pred (with --ref and --task) for an overlay, or --model for the deep-supervision panel")
    if pred is not None and (ref is None or task is None or image is None):
        fail("an overlay needs --image, --ref, --pred and --task")
    if cases and run is None:
        fail("--cases goes with --run")
    out_dir = out or (run / "figures" if run is not None else Path("figures"))
    written: list[Path] = []
    try:
        if run is not None:
            written += _run_figures(run, out_dir, cases, device)
        if image is not None and pred is not None and ref is not None and task is not None:
            written.append(_overlay(image, ref, pred, task, out_dir))
        if image is not None and model is not None:
            written.append(_ds_panel(model, image, ref, out_dir, device))
    except (FileNotFoundError, ValueError) as err:  # ImageReadError and BundleError are ValueErrors
        fail(str(err), code=1)
    if as_json:
        typer.echo(json.dumps({"written": [str(p) for p in written]}, indent=2))
    else:
        for path in written:
            typer.echo(f"wrote {path}")
    if not written:
        fail("no figure was drawn (see the warnings above)", code=1)


def _device(name: str) -> torch.device:
    from medsup.device import resolve_device

    return resolve_device(name)


def _run_figures(run: Path, out_dir: Path, cases: bool, device: str) -> list[Path]:
    from medsup.evaluation.figures import curve_figures
    from medsup.evaluation.history import read_history, read_validation

    history = read_history(run)
    if not cases:
        return curve_figures(out_dir, history)  # matplotlib only: no torch
    from medsup.evaluation.run_figures import run_figures
    from medsup.inference.bundle import load_bundle

    # the final network, as at the end of training (the bundle in model/ holds the best epoch's weights)
    bundle = load_bundle(run / "checkpoints" / "last.pt")
    dev = _device(device)
    rows = [r for r in read_validation(run) if r.get("label") and Path(r["label"]).is_file()
            and Path(r["image"]).is_file()]
    if not rows:
        raise FileNotFoundError(f"{run}: the validation cases' files in validation.json are no longer there")
    return run_figures(out_dir, history, model=bundle.network(dev), cfg=bundle.cfg, plan=bundle.plan, cases=rows,
                       device=dev)


def _overlay(image: Path, ref: Path, pred: Path, task: str, out_dir: Path) -> Path:
    from medsup.data.files import strip_suffix
    from medsup.evaluation.overlays import overlay_files
    from medsup.tasks import get_task

    t = get_task(task)
    return overlay_files(image, ref, pred, out_dir / f"{strip_suffix(image)}_overlay.png", labels=t.labels,
                         lesion_classes=t.lesion_classes, organ_classes=t.organ_classes, window=t.window)


def _ds_panel(model: Path, image: Path, ref: Path | None, out_dir: Path, device: str) -> Path:
    from medsup.data.files import strip_suffix
    from medsup.evaluation.run_figures import ds_panel_files

    return ds_panel_files(model, image, out_dir / f"{strip_suffix(image)}_deep_supervision.png", reference=ref,
                          device=_device(device))
