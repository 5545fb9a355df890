"""Calibration of a committee: does its spread rank and size its actual errors?

:func:`errors` runs a committee over a labelled data set and pairs every
atom's force spread with its force error (and every structure's energy
spread with its energy error); :func:`calibration` and :func:`summary` turn
those into a rank correlation, a binned curve (for
:func:`equijax.plots.calibration`), the share of large errors the spread
catches, and the factor that turns the spread into an error bar.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import numpy as np

from equijax.ensemble import force_spread, predict, variance


class Errors(NamedTuple):
    """Per-atom and per-structure spreads and errors of a committee on labelled data.

    Attributes:
        force_spread: (n_atom,) eV/Å, :func:`force_spread`.
        force_error: (n_atom,) eV/Å, ``|mean_K F - F_ref|``.
        energy_spread: (n_frame,) eV/atom, std over members of the energy per atom.
        energy_error: (n_frame,) eV/atom, ``|mean_K E - E_ref| / n_atoms``.
    """

    force_spread: np.ndarray
    force_error: np.ndarray
    energy_spread: np.ndarray
    energy_error: np.ndarray


def errors(model, params, dataset, strategy: str = "auto") -> Errors:
    """:class:`Errors` of a committee over every structure of an :class:`equijax.data.Dataset`."""
    fn = _predict_shards(model, strategy)
    out = {name: [] for name in Errors._fields}
    for batch in dataset.batches():
        pred = jax.device_get(fn(params, batch))
        g = jax.device_get(batch)
        for s in range(g.n_node.shape[0]):
            nm, gm = g.nodes["mask"][s], g.globals["mask"][s]
            forces = pred.forces[s][:, nm]  # (K, n_atom, 3)
            out["force_spread"].append(np.asarray(force_spread(forces)))
            out["force_error"].append(np.linalg.norm(forces.mean(0) - g.nodes["forces"][s][nm], axis=-1))
            n = g.n_node[s][gm]
            energy = pred.energy[s][:, gm]
            out["energy_spread"].append(np.sqrt(np.asarray(variance(energy))) / n)
            out["energy_error"].append(np.abs(energy.mean(0) - g.globals["energy"][s][gm]) / n)
    return Errors(*(np.concatenate(out[name]).astype(float) for name in Errors._fields))


@functools.lru_cache(maxsize=8)
def _predict_shards(model, strategy: str):
    """Jitted :func:`predict` over the shard axis of stacked batches, compiled once per model."""
    return jax.jit(jax.vmap(lambda p, g: predict(model, p, g, strategy), in_axes=(None, 0)))


def summary(e: Errors) -> dict:
    """:func:`calibration` of the force spreads, plus the energies' Spearman ρ and the
    mean per-atom force spread and error (meV/Å)."""
    out = calibration(e.force_spread, e.force_error)
    out["energy_spearman"] = spearman(e.energy_spread, e.energy_error) if len(e.energy_error) > 2 else float("nan")
    out["mean_force_spread_meV_A"] = 1000 * float(e.force_spread.mean())
    out["mean_force_error_meV_A"] = 1000 * float(e.force_error.mean())
    return out


def force_calibration(model, params, dataset, strategy: str = "auto") -> dict:
    """:func:`summary` of a committee's :func:`errors` on ``dataset``."""
    return summary(errors(model, params, dataset, strategy))


def spearman(x, y) -> float:
    """Spearman rank correlation of two 1-D arrays (average ranks for ties)."""
    from scipy.stats import spearmanr

    return float(spearmanr(np.asarray(x), np.asarray(y)).statistic)


def calibration(spread, error, bins: int = 10, quantile: float = 0.9) -> dict:
    """How well a predicted spread ranks and sizes the actual errors.

    Args:
        spread: (n,) predicted per-atom force spreads (eV/Å).
        error: (n,) actual per-atom force errors ``|F_pred - F_ref|`` (eV/Å).
        bins: spread bins of equal counts for the calibration curve.
        quantile: errors above this quantile of ``error`` count as large; the
            threshold on the spread flags the same number of atoms.

    Returns:
        dict: ``spearman``; ``bins`` (mean spread and RMS error per bin);
        ``large_error`` and ``threshold`` (eV/Å); ``caught`` (fraction of
        large errors whose spread is above the threshold, 1 - quantile for a
        spread that knows nothing); ``scale``, ``sqrt(mean(error²) /
        mean(spread²))``: the factor that turns the spread into an RMS error
        bar on these data (fit it on held-out data, apply it elsewhere).
    """
    spread, error = np.asarray(spread, float), np.asarray(error, float)
    order = np.argsort(spread)
    groups = np.array_split(order, bins)
    large = np.quantile(error, quantile)
    threshold = np.quantile(spread, quantile)
    is_large = error > large
    return {
        "spearman": spearman(spread, error),
        "bins": [{"spread": float(spread[g].mean()), "rms_error": float(np.sqrt((error[g] ** 2).mean())),
                  "n": int(len(g))} for g in groups if len(g)],
        "large_error": float(large), "threshold": float(threshold),
        "caught": float((spread[is_large] > threshold).mean()) if is_large.any() else float("nan"),
        "quantile": quantile, "n": int(len(error)),
        "scale": float(np.sqrt((error**2).mean() / max((spread**2).mean(), 1e-300))),
    }
