"""Ensembles (committees) of potentials: K parameter sets stacked on a leading axis.

A committee is K members of one architecture whose parameters are stacked
on a leading axis of every leaf, shape ``(K, ...)``. Because a potential is
a pure function of ``(params, graph)``, a committee is again a potential:
:func:`committee` turns a member into one whose energy is the mean of the
members' energies, so forces, stress, Hessians, MD and vibrational
analysis of the committee are the exact derivatives of one conservative
energy and every tool that takes ``(model, params)`` runs it unchanged::

    model = equijax.nequip(NequIPConfig(..., members=4))   # a committee of 4
    params = model.init(key)                               # leaves (4, ...)
    model.energy(params, graph)                            # (n_graph,) committee mean
    spread = ensemble.predict(model, params, graph)        # per-member energies, forces, stress
    ensemble.force_spread(spread.forces)                   # (n_node,) eV/Å: how much the members disagree

Training K members is :func:`over_members` of one training step: the same
function mapped over stacked parameters, optimiser states and EMAs (each
member initialised from its own key), in one compiled program
(:mod:`equijax.training`). ``"vmap"`` evaluates the
members side by side (``jax.vmap``: one wide program, what accelerators
want); ``"map"`` evaluates them one after another inside the same program
(``jax.lax.map``: same numbers, and on a 2-core CPU the faster one, because
vmapped per-edge tensors of K members are transposed and copied more than
they are computed on; see ``experiments/ensemble_study.py``). ``"auto"``
picks ``map`` on CPU and ``vmap`` on GPU/TPU.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from equijax import physics

STRATEGIES = ("auto", "vmap", "map")


def resolve_strategy(strategy: str = "auto") -> str:
    """``"vmap"`` or ``"map"``; ``"auto"`` is ``map`` on CPU, ``vmap`` elsewhere."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown ensemble strategy {strategy!r}: use one of {', '.join(STRATEGIES)}")
    if strategy == "auto":
        return "map" if jax.default_backend() == "cpu" else "vmap"
    return strategy


def over_members(fn, strategy: str = "auto"):
    """``fn(member_tree, *shared) -> out`` as ``(stacked_tree, *shared) -> stacked out``.

    The first argument carries the member axis (leading, size K) on every
    leaf; the others are shared by all members. ``strategy``: see the module
    docstring. Both strategies give the same numbers.
    """
    how = resolve_strategy(strategy)
    if how == "vmap":
        return lambda stacked, *shared: jax.vmap(fn, in_axes=(0,) + (None,) * len(shared))(stacked, *shared)
    return lambda stacked, *shared: jax.lax.map(lambda member: fn(member, *shared), stacked)


def size(params) -> int:
    """K, the length of the leading member axis of stacked parameters."""
    return int(jax.tree_util.tree_leaves(params)[0].shape[0])


def stack(trees):
    """Stack K pytrees of the same structure into one with a leading member axis."""
    trees = list(trees)
    if not trees:
        raise ValueError("an ensemble needs at least one member")
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def member(tree, k: int):
    """Member ``k`` of stacked parameters (or states)."""
    return jax.tree_util.tree_map(lambda x: x[k], tree)


def committee(member_model, k: int, strategy: str = "auto"):
    """The committee of ``k`` members of ``member_model`` as a :class:`equijax.Potential`.

    ``init(key)`` draws member ``i`` from ``fold_in(key, i)``; ``energy``,
    ``atomic_energies``, ``charges`` and ``dipole`` take stacked parameters
    ``(K, ...)`` and return the members' mean, so every derivative (forces,
    stress, Hessian) is that of the mean energy. ``model.member`` is the
    single-member potential and ``model.config.members`` is ``k``.
    """
    if k < 1:
        raise ValueError(f"an ensemble needs at least one member, got {k}")

    def mean_of(fn):
        if fn is None:
            return None
        mapped = over_members(fn, strategy)
        return lambda params, graph: jnp.mean(mapped(params, graph), axis=0)

    def init(key):
        return jax.vmap(lambda i: member_model.init(jax.random.fold_in(key, i)))(jnp.arange(k))

    return member_model._replace(
        init=init, atomic_energies=mean_of(member_model.atomic_energies), energy=mean_of(member_model.energy),
        charges=mean_of(member_model.charges), dipole=mean_of(member_model.dipole),
        config=member_model.config.replace(members=k), member=member_model)


class Prediction(NamedTuple):
    """Every member's prediction: leading axis K.

    Attributes:
        energy: (K, n_graph) eV.
        forces: (K, n_node, 3) eV/Å.
        stress: (K, n_graph, 3, 3) eV/Å³ (zero for non-periodic graphs).
    """

    energy: jax.Array
    forces: jax.Array
    stress: jax.Array


def predict(model, params, graph, strategy: str = "auto") -> Prediction:
    """Energies, forces and stress of every member of a committee (jit it).

    ``model`` is a committee (:func:`committee`) and ``params`` its stacked
    parameters. The committee's own prediction is the mean over axis 0 (the
    same as ``physics.energy_forces_stress(model.energy)``), its spread the
    standard deviation (:func:`force_spread`).
    """
    if getattr(model, "member", None) is None:
        raise ValueError("predict needs a committee (NequIPConfig.members > 1, or ensemble.committee)")
    derive = physics.energy_forces_stress(model.member.energy)
    out = over_members(derive, strategy)(params, graph)
    return Prediction(out.energy, out.forces, out.stress)


def variance(x, axis: int = 0):
    """Population variance over members, ``sum_ij (x_i - x_j)² / (2 K²)``.

    The same number as ``var`` up to rounding, but computed from pairwise
    differences, so K identical members give exactly zero (a mean-based
    variance leaves ~1e-17 of rounding).
    """
    x = jnp.moveaxis(jnp.asarray(x), axis, 0)
    d = x[:, None] - x[None, :]
    return jnp.sum(d * d, axis=(0, 1)) / (2 * x.shape[0] ** 2)


def force_spread(forces) -> jax.Array:
    """(K, n_node, 3) member forces -> (n_node,) per-atom spread, eV/Å.

    ``sqrt(sum_xyz var_K(F_ixyz))``: the root-mean-square distance of the
    members' force vectors from their mean (population variance,
    :func:`variance`: K identical members give exactly zero).
    """
    return jnp.sqrt(jnp.sum(variance(forces), axis=-1))


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


def plot_calibration(calibrations: dict, path, title: str = "calibration") -> None:
    """RMS force error against mean spread per spread decile, one line per data set (PNG).

    ``calibrations``: ``{label: calibration dict}`` (:func:`calibration`).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    lo, hi = np.inf, 0.0
    for label, cal in calibrations.items():
        x = [1000 * b["spread"] for b in cal["bins"]]
        y = [1000 * b["rms_error"] for b in cal["bins"]]
        ax.plot(x, y, "o-", label=f"{label}, ρ={cal['spearman']:.2f}")
        lo, hi = min(lo, *x, *y), max(hi, *x, *y)
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="error = spread")
    ax.set(xscale="log", yscale="log", xlabel="force spread of the members, decile mean (meV/Å)",
           ylabel="RMS force error in the decile (meV/Å)", title=title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def memory_needed(compiled) -> int | None:
    """Bytes a compiled step holds at its peak (arguments, outputs, temporaries), if XLA says."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001: not every backend reports it
        return None
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)


def memory_available(device=None) -> int | None:
    """Bytes free on ``device`` (an accelerator's limit, or the host's available memory)."""
    device = device or jax.devices()[0]
    if device.platform != "cpu":
        try:
            stats = device.memory_stats() or {}
            return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
        except Exception:  # noqa: BLE001
            return None
    try:
        with open("/proc/meminfo") as f:
            info = {l.split(":")[0]: l.split()[1] for l in f}
        return int(info["MemAvailable"]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def check_memory(compiled, members: int, device=None, what: str = "train.ensemble") -> None:
    """Raise a clear error when a compiled K-member step cannot fit in memory.

    Raises:
        MemoryError: with the need, the room and the largest K that fits.
    """
    need, room = memory_needed(compiled), memory_available(device)
    if need is None or room is None or need <= room:
        return
    per_member = need / members
    fits = int(room // per_member)
    raise MemoryError(f"{what}={members} needs about {need / 2**30:.1f} GiB per step and the device has "
                      f"{room / 2**30:.1f} GiB free: use {what}={max(fits, 1)} or fewer, or a smaller batch")


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
