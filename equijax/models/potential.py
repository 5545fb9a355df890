"""The potential interface: a NamedTuple of pure functions, and what every architecture shares.

A :class:`Potential` is a NamedTuple of pure functions, in the manner of
``optax.GradientTransformation``::

    model = equijax.nequip(NequIPConfig(species=(1, 6, 8)))
    params = model.init(jax.random.PRNGKey(0))          # jitted, no data needed
    energies = model.energy(params, graph)                # (n_graph,) eV
    atomic = model.atomic_energies(params, graph)         # (n_node,) eV, 0 on padding

Forces, stress and Hessians are *not* part of the model: they are derived
from ``energy`` by :mod:`equijax.physics`. A model never knows how it is
trained (:mod:`equijax.training`).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import jraph
import numpy as np

from equijax import graph as graph_lib


class Potential(NamedTuple):
    """A potential as pure functions (see the module docstring).

    Attributes:
        init: ``(key) -> params``.
        atomic_energies: ``(params, graph) -> (n_node,)`` eV, zero on padding.
        energy: ``(params, graph) -> (n_graph,)`` eV, zero on padding graphs.
        config: the hyperparameters.
        charges: ``(params, graph) -> (n_node,)`` atomic charges (e) from a
            second readout of the same features, shifted so that each graph
            carries its total charge (``globals["charge"]``, default 0).
        dipole: ``(params, graph) -> (n_graph, 3)`` e·Å, ``Σ_i q_i r_i``
            (origin-independent for neutral molecules; not for crystals).
        member: for a committee (:func:`equijax.ensemble.committee`), the
            potential of one member; ``None`` for a single potential.
    """

    init: Callable
    atomic_energies: Callable
    energy: Callable
    config: object  # the architecture's hyperparameters (e.g. NequIPConfig)
    charges: Optional[Callable] = None
    dipole: Optional[Callable] = None
    member: Optional["Potential"] = None


def species_index(species: tuple, atomic_numbers: jax.Array) -> jax.Array:
    """(n_node,) Z -> index into ``species``; -1 for every other Z (padding's 0 included).

    Nothing is clipped or remapped: an element the model does not know gets
    -1, and :func:`nequip`'s energies are NaN for it (and a ``ValueError``
    when called outside ``jit``), never another element's energy.
    """
    table = np.full(max(max(species), 118) + 1, -1, np.int32)
    table[list(species)] = np.arange(len(species))
    z = jnp.asarray(atomic_numbers)
    inside = (z >= 0) & (z < len(table))
    return jnp.where(inside, jnp.asarray(table)[jnp.clip(z, 0, len(table) - 1)], -1)


def check_species(species: tuple, graph: jraph.GraphsTuple) -> None:
    """Raise ``ValueError`` for real atoms of elements outside ``species``.

    Runs on concrete arrays only; under ``jit``/``vmap`` it does nothing
    (there the energy of such a graph is NaN instead).
    """
    try:
        z = np.asarray(graph.nodes["atomic_numbers"])
        mask = np.asarray(graph.nodes["mask"])
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return
    unknown = sorted(set(z[mask].tolist()) - set(species))
    if unknown:
        raise ValueError(f"atomic numbers {unknown} are unknown to this model, which knows {list(species)}")


def total_energy(atomic: jax.Array, graph: jraph.GraphsTuple) -> jax.Array:
    """Sum (n_node,) atomic energies into (n_graph,) graph energies."""
    n_graph = graph.n_node.shape[0]
    return jax.ops.segment_sum(atomic, graph_lib.node_graph_index(graph), num_segments=n_graph)
