"""Model files and checkpoints that cannot carry code, written atomically.

Two kinds of file, one format:

* a **checkpoint** (``checkpoint.npz`` in a run folder): everything needed to
  resume training exactly (params, EMA params, optimiser state, step,
  plateau counters, the validated run config);
* a **model file** (``model.npz``): what a user needs to evaluate a trained
  potential (model config, EMA params, data statistics, provenance), no
  optimiser state. The calculator, the CLI and :func:`equijax.load` read it.

The format is a zip of ``.npy`` arrays (``numpy.savez``) plus one member,
``__meta__``, holding UTF-8 JSON: the format name and version, plain
metadata, and the tree structure of every pytree with its array leaves named.
Reading uses ``numpy.load(allow_pickle=False)`` and ``json``: object arrays
are refused, only numeric dtypes are accepted, and nothing in the file is
ever unpickled or evaluated. Pickle checkpoints of equijax 0.1 are refused
with the one-off conversion command (``equijax convert OLD.pkl NEW.npz
--trust-pickle``), the only place a pickle is ever opened, and only when the
user vouches for the file.

Writes go to a temporary file in the same folder, are flushed to disk and
renamed over the target, so a kill at any moment leaves either the old or
the new file, never a partial one.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np

from equijax import kernels

CHECKPOINT = "equijax-checkpoint"
MODEL = "equijax-model"
VERSION = 2  # version 1 was the pickle format of equijax 0.1
META = "__meta__"
_ZIP_MAGIC = b"PK\x03\x04"
_NUMERIC_KINDS = "biufc"
CONVERT_HINT = ("if you trust this file, convert it once with: equijax convert {path} NEW.npz --trust-pickle "
                "(converting unpickles it, which can run code)")


class CheckpointError(ValueError):
    """A file that is not a readable equijax checkpoint or model file."""


_STATE = ("params", "ema_params", "best_params", "opt_state", "config", "plateau")  # what is not metadata


def _inference_params(content: dict):
    """The parameters to evaluate with: the EMA ones when the file has them."""
    ema = content.get("ema_params")
    return ema if ema is not None else content["params"]


# ------------------------------------------------------------ tree <-> JSON


def _encode(tree, arrays: dict):
    """A JSON-able description of ``tree``; its array leaves go into ``arrays``."""
    if isinstance(tree, dict):
        if not all(isinstance(k, str) for k in tree):
            raise TypeError("checkpoint dicts need string keys")
        return {"dict": {k: _encode(v, arrays) for k, v in tree.items()}}
    if isinstance(tree, (list, tuple)) and not hasattr(tree, "_fields"):
        return {"list" if isinstance(tree, list) else "tuple": [_encode(v, arrays) for v in tree]}
    if tree is None or isinstance(tree, (bool, str)):
        return {"value": tree}
    if isinstance(tree, (int, float)) and not isinstance(tree, bool):
        return {"value": tree}
    array = np.asarray(jax.device_get(tree))
    if array.dtype.kind not in _NUMERIC_KINDS:
        raise TypeError(f"cannot store an array of dtype {array.dtype} (numbers only)")
    name = f"a{len(arrays)}"
    arrays[name] = array
    return {"array": name}


def _decode(node, arrays, where="meta"):
    if not isinstance(node, dict) or len(node) != 1:
        raise CheckpointError(f"malformed tree node at {where}")
    (kind, value), = node.items()
    if kind == "dict" and isinstance(value, dict):
        return {k: _decode(v, arrays, f"{where}.{k}") for k, v in value.items()}
    if kind in ("list", "tuple") and isinstance(value, list):
        items = [_decode(v, arrays, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if kind == "list" else tuple(items)
    if kind == "value" and (value is None or isinstance(value, (bool, int, float, str))):
        return value
    if kind == "array" and isinstance(value, str):
        if value not in arrays:
            raise CheckpointError(f"array {value!r} named at {where} is missing (truncated file?)")
        return arrays[value]
    raise CheckpointError(f"malformed tree node {kind!r} at {where}")


# ------------------------------------------------------------------ writing


def _write(path, kind: str, content: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict = {}
    meta = {"format": kind, "version": VERSION, "tree": _encode(dict(content), arrays)}
    arrays[META] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def save(path, **content) -> Path:
    """Atomically write a training checkpoint.

    ``content``: pytrees (dicts with string keys, lists, tuples) of arrays
    and plain JSON values (numbers, strings, booleans, ``None``).
    """
    return _write(path, CHECKPOINT, content)


def save_model(path, config: dict, params, **metadata) -> Path:
    """Atomically write a model file: ``config`` (``NequIPConfig.to_dict()``),
    parameters (the EMA ones, for a trained model) and plain metadata."""
    return _write(path, MODEL, {"config": config, "params": params, **metadata})


# ------------------------------------------------------------------ reading


def _read(path) -> tuple[str, dict]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:1] == b"\x80":  # the opcode that starts every pickle of protocol 2 and newer
        raise CheckpointError(f"{path} is a pickle (equijax 0.1 checkpoint format), which could run code "
                              f"when loaded and is refused; " + CONVERT_HINT.format(path=path))
    if head != _ZIP_MAGIC:
        raise CheckpointError(f"{path}: not an equijax checkpoint or model file")
    try:
        with np.load(path, allow_pickle=False) as z:
            names = list(z.files)
            if META not in names:
                raise CheckpointError(f"{path}: not an equijax checkpoint or model file (no {META})")
            arrays = {}
            for name in names:
                a = z[name]
                if a.dtype.kind not in _NUMERIC_KINDS:
                    raise CheckpointError(f"{path}: array {name!r} has dtype {a.dtype}; only numbers are allowed")
                arrays[name] = a
    except CheckpointError:
        raise
    except ValueError as err:  # object arrays (allow_pickle=False), bad headers
        raise CheckpointError(f"{path}: refused ({err})") from err
    except (zipfile.BadZipFile, EOFError, OSError, KeyError) as err:
        raise CheckpointError(f"{path}: not a readable equijax file, truncated or corrupt "
                              f"({type(err).__name__}: {err})") from err
    try:
        meta = json.loads(arrays.pop(META).tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable metadata ({err})") from err
    if not isinstance(meta, dict) or meta.get("format") not in (CHECKPOINT, MODEL):
        raise CheckpointError(f"{path}: not an equijax checkpoint or model file")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path}: format version {meta.get('version')!r}; this equijax reads version {VERSION}")
    content = _decode(meta.get("tree"), arrays)
    if not isinstance(content, dict):
        raise CheckpointError(f"{path}: malformed metadata")
    return meta["format"], content


def load(path) -> dict:
    """Read a training checkpoint written by :func:`save`.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError (a ``ValueError``): a pickle, a model file, an object
            array, a truncated or foreign file.
    """
    kind, content = _read(path)
    if kind != CHECKPOINT:
        raise CheckpointError(f"{path} is a model file (no optimiser state): it cannot resume training")
    return content


class Loaded(NamedTuple):
    """A potential read from disk: ``model, params, metadata = equijax.load(path)``."""

    model: object  # equijax.Potential
    params: dict
    metadata: dict  # everything else the file holds (run config, statistics, step, ...)


def load_model(path, backend: str | None = None) -> Loaded:
    """A potential from a model file or a checkpoint (its EMA parameters).

    ``backend`` (see :mod:`equijax.kernels`) replaces the one the file
    records; by default that one is kept where it can run here, else
    ``"auto"``. Parameters are the same for every backend.

    Raises:
        FileNotFoundError, CheckpointError: as :func:`load`.
    """
    from equijax.models import build

    _, content = _read(path)
    if "config" not in content or "params" not in content:
        raise CheckpointError(f"{path}: holds no model (config and params)")
    config = model_config(path, content["config"])
    if config.dtype == "float64" and not jax.config.jax_enable_x64:
        raise CheckpointError(f"{path} is a float64 model: enable float64 before loading it "
                              "(jax.config.update('jax_enable_x64', True); the equijax commands do it themselves)")
    if backend is None:
        backend = config.backend if kernels.available(config.backend) else "auto"
    model = build(config.replace(backend=backend))
    params = _inference_params(content)
    check_params(path, model, params)
    metadata = {k: v for k, v in content.items() if k not in _STATE}
    return Loaded(model, jax.tree_util.tree_map(jax.numpy.asarray, params), metadata)


def stored_dtype(path) -> str | None:
    """The ``dtype`` a model file or checkpoint's model config records, read from its metadata alone
    (no array is loaded); ``None`` when it cannot be told (the full load then says why)."""
    try:
        with zipfile.ZipFile(path) as z, z.open(META + ".npy") as f:
            meta = json.loads(np.lib.format.read_array(f, allow_pickle=False).tobytes().decode())
        return meta["tree"]["dict"]["config"]["dict"]["dtype"]["value"]
    except (OSError, KeyError, TypeError, ValueError, zipfile.BadZipFile):
        return None


def model_config(path, config: dict):
    """The model config a file records, type-checked (``NequIPConfig.from_dict``).

    Raises:
        CheckpointError: naming ``path`` and the bad key.
    """
    from equijax.models import NequIPConfig

    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: bad model config (not a mapping)")
    try:
        return NequIPConfig.from_dict(config)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: bad model config ({err})") from err


def check_params(path, model, params, what: str = "parameter") -> None:
    """Compare a file's parameter tree with the one its model makes: names, shapes, dtypes, finiteness.

    The model's own tree is ``jax.eval_shape`` of its ``init`` (nothing is
    computed). ``what`` names the tree in messages (``"EMA parameter"``).

    Raises:
        CheckpointError: one line naming ``path`` and the first parameter that differs.
    """
    expected = _leaves(jax.eval_shape(model.init, jax.random.PRNGKey(0)))
    given = _leaves(params)
    for name in expected:
        if name not in given:
            raise CheckpointError(f"{path}: {what} {name} is missing")
    for name, leaf in given.items():
        if name not in expected:
            raise CheckpointError(f"{path}: {what} {name} is not one this model has")
        array = np.asarray(leaf)
        want = expected[name]
        if array.shape != tuple(want.shape):
            raise CheckpointError(f"{path}: {what} {name} has shape {array.shape}, the model needs "
                                  f"{tuple(want.shape)}")
        wanted_dtype = np.dtype(model.config.dtype)
        if array.dtype != wanted_dtype:
            raise CheckpointError(f"{path}: {what} {name} is {array.dtype}, the model's config says "
                                  f"{model.config.dtype}")
        if not np.all(np.isfinite(array)):
            raise CheckpointError(f"{path}: {what} {name} holds NaN or infinite values")


def _leaves(tree) -> dict:
    """``{"layers[0].radial[1].w": leaf}`` for every leaf of a parameter tree."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(keys, simple=True, separator="."): leaf for keys, leaf in flat}


def export_model(checkpoint_path, model_path) -> Path:
    """Write the small model file (config, EMA params, metadata) of a checkpoint."""
    content = load(checkpoint_path)
    extra = {k: v for k, v in content.items() if k not in _STATE}
    return save_model(model_path, content["config"], _inference_params(content), **extra)


def convert_pickle(old_path, new_path, trust_pickle: bool = False) -> Path:
    """Convert an equijax 0.1 pickle checkpoint to this format (one-off).

    Unpickling can run arbitrary code, so this refuses unless the caller
    states that the file is trusted (``trust_pickle=True``,
    ``equijax convert --trust-pickle``).
    """
    if not trust_pickle:
        raise CheckpointError(f"converting {old_path} unpickles it, which can run code: pass --trust-pickle "
                              "(trust_pickle=True) only for files you made yourself or otherwise trust")
    import pickle

    with open(old_path, "rb") as f:
        payload = pickle.load(f)  # the user vouched for this file
    if not isinstance(payload, dict) or payload.get("format") != "equijax-checkpoint-1":
        raise CheckpointError(f"{old_path}: not an equijax 0.1 checkpoint")
    payload = {k: v for k, v in payload.items() if k != "format"}
    payload["config"] = {"message_normalization": "mean", **payload["config"]}  # equijax 0.1 divided by N
    if "opt_state" in payload:
        return save(new_path, **payload)
    extra = {k: v for k, v in payload.items() if k not in _STATE}
    return save_model(new_path, payload["config"], _inference_params(payload), **extra)
