"""Training checkpoints: everything needed to resume, written atomically, loadable with ``weights_only=True``.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts only (no pickled objects), so loading
never runs code from the file: a pickle bomb is refused by ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medsup.data.files import atomic_path

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message names the file."""


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) RNG states, in weights_only-safe types."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": _listify(random.getstate()),
        "numpy": [kind, torch.from_numpy(np.asarray(keys).copy()), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    random.setstate(_tuplify(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _listify(value: Any) -> Any:
    return [_listify(v) for v in value] if isinstance(value, tuple | list) else value


def _tuplify(value: Any) -> Any:
    return tuple(_tuplify(v) for v in value) if isinstance(value, list) else value


def save_checkpoint(path: Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` to ``path`` atomically (temp file + rename): a kill never leaves half a checkpoint."""
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    log.debug("checkpoint written: %s", path)
    return path


def load_checkpoint(path: Path | str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``.

    Raises:
        CheckpointError: missing, truncated, not a torch file, or holding objects other than plain data.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt" if (path / "last.pt").is_file() else path / "checkpoints" / "last.pt"
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        raise CheckpointError(f"{path}: not a loadable medsup checkpoint ({type(err).__name__}: "
                              f"{str(err).splitlines()[0][:300]})") from None
    if not isinstance(payload, dict) or "model" not in payload:
        raise CheckpointError(f"{path}: not a medsup checkpoint (no model weights)")
    return payload
