"""Checkpoints: written atomically, read back exactly.

A checkpoint is one file holding the model config, params, EMA params,
optimiser state, step, data statistics and any extra host state (plateau
counters, RNG seed). It is written to a temporary file in the same folder,
flushed to disk and renamed over the old one, so a kill at any moment leaves
either the old or the new checkpoint, never a partial file.

The format is a pickle of NumPy arrays and plain containers: load only
checkpoints you trust.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path

import jax
import numpy as np

FORMAT = "equijax-checkpoint-1"


def save(path, **content) -> Path:
    """Atomically write ``content`` (pytrees and plain values) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, **jax.device_get(content)}  # arrays to NumPy, the rest as is
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            pickle.dump(payload, f, protocol=pickle.HIGHEST_PROTOCOL)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load(path) -> dict:
    """Read a checkpoint written by :func:`save`.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not an equijax checkpoint, or truncated.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        with open(path, "rb") as f:
            payload = pickle.load(f)
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as err:
        raise ValueError(f"{path}: not a readable equijax checkpoint ({err})") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path}: not an equijax checkpoint")
    return payload


def load_model(path):
    """``(model, params, payload)`` from a checkpoint: EMA params when present."""
    from equijax.models import NequIPConfig, nequip

    payload = load(path)
    model = nequip(NequIPConfig.from_dict(payload["config"]))
    params = payload.get("ema_params", payload["params"])
    return model, jax.tree_util.tree_map(lambda x: jax.numpy.asarray(x), params), payload
