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
(``jax.lax.map``: same numbers; on CPU vmapped per-edge tensors of K members
are transposed and copied more than they are computed on, measured by
``experiments/ensemble_study.py``). ``"auto"``
picks ``map`` on CPU and ``vmap`` on GPU/TPU.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

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
