"""What every ``medsup`` command module shares: the error exit and the ``--json`` printer.

A module of its own so that the sub-command modules (:mod:`medsup.cli_ablation`, :mod:`medsup.cli_evaluate`, ...)
use them without importing :mod:`medsup.cli`, which imports them.
"""

from __future__ import annotations

import json
from typing import Any, NoReturn

import typer

from medsup.data.files import finite_or_none


def fail(message: str, code: int = 2) -> NoReturn:
    """``error: MESSAGE`` on stderr, then exit with ``code`` (2: bad usage or input, as typer's own errors)."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def emit(payload: Any) -> None:
    """``payload`` as strict JSON on stdout (the only thing ``--json`` prints there): NaN and infinities, such as
    the Dice of a class absent from both maps, become ``null``, which every JSON reader accepts."""
    typer.echo(json.dumps(finite_or_none(payload), indent=2, sort_keys=False, default=str, allow_nan=False))
