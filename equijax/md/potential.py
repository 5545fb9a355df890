"""An equijax model as the energy function of a simulation.

Two adapters, both pure and jittable:

* :func:`energy_fn` reads equijax's in-JAX neighbour list
  (:mod:`equijax.md.neighbours`): ``energy(positions, nbrs, cell) -> eV``,
  and :func:`force_fn` adds forces and stress by one reverse pass
  (:func:`equijax.physics.energy_forces_stress` on the list's graph).
* :func:`jax_md_energy_fn` reads jax-md's own neighbour lists
  (``partition.neighbor_list(..., format=partition.Sparse)``), in free space
  or a ``space.periodic_general`` box with fractional coordinates, so that
  jax-md's integrators and minimisers run an equijax model as they are.

Both build the model's padded graph (see :mod:`equijax.graph`) inside the
traced function: atoms ``0..n-1`` form graph 0, one padding node ``n``
forms graph 1, and every pair, real or padding, belongs to graph 0 (padding
pairs loop on node ``n``, masked). A pair is real when it lies within the
model's cutoff now, so a list built with a skin gives the same energy as
an exact one.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import jraph

from equijax import physics
from equijax.md import neighbours as nl


def graph_of(numbers, positions, cell, receivers, senders, shifts, pair_mask) -> jraph.GraphsTuple:
    """The model's graph for ``n`` atoms and ``c`` pairs (jittable).

    Args:
        numbers: (n,) atomic numbers, 0 on padding atoms (of a padded replica).
        positions: (n, 3) Å.
        cell: (3, 3) lattice vectors as rows (zeros when not periodic), Å.
        receivers: (c,) atom indices; ``n`` on padding pairs.
        senders: (c,) atom indices; ``n`` on padding pairs.
        shifts: (c, 3) integer cell shifts.
        pair_mask: (c,) bool, real pairs within the cutoff.
    """
    n, dtype = positions.shape[0], positions.dtype
    c = receivers.shape[0]
    return jraph.GraphsTuple(
        nodes={
            "positions": jnp.concatenate([positions, jnp.zeros((1, 3), dtype)]),
            "atomic_numbers": jnp.concatenate([numbers, jnp.zeros(1, numbers.dtype)]).astype(jnp.int32),
            "mask": jnp.concatenate([numbers > 0, jnp.zeros(1, bool)]),
        },
        edges={"shifts": shifts.astype(dtype), "mask": pair_mask},
        senders=senders.astype(jnp.int32),
        receivers=receivers.astype(jnp.int32),
        globals={"cell": jnp.stack([cell, jnp.zeros_like(cell)]).astype(dtype), "mask": jnp.array([True, False])},
        n_node=jnp.array([n, 1], jnp.int32),
        n_edge=jnp.array([c, 0], jnp.int32),
    )


def _graph(numbers, positions, nbrs: nl.NeighbourList, cell, cutoff) -> jraph.GraphsTuple:
    periodic = cell is not None
    cell = cell if periodic else jnp.zeros((3, 3), positions.dtype)
    receivers, senders, _, real = nl.as_pairs(nbrs, positions, cell if periodic else None, cutoff)
    shifts = nbrs.shifts if periodic else jnp.zeros_like(nbrs.shifts)
    return graph_of(numbers, positions, cell, receivers, senders, shifts, real)


def energy_fn(model, params, numbers):
    """``energy(positions (n, 3), nbrs, cell (3, 3) or None) -> ()`` eV, from an equijax list."""
    numbers = jnp.asarray(numbers, jnp.int32)

    def energy(positions, nbrs: nl.NeighbourList, cell=None):
        return model.energy(params, _graph(numbers, positions, nbrs, cell, model.config.cutoff))[0]

    return energy


class ForcesStress(NamedTuple):
    energy: jax.Array  # () eV
    forces: jax.Array  # (n, 3) eV/Å
    stress: jax.Array  # (3, 3) eV/Å³, ASE sign convention; zeros when not periodic


def force_fn(model, params, numbers):
    """``(positions, nbrs, cell or None) -> ForcesStress``: :func:`equijax.physics.energy_forces_stress`
    (one reverse pass) on the graph of the list, cast to the positions' precision."""
    numbers = jnp.asarray(numbers, jnp.int32)
    efs = physics.energy_forces_stress(model.energy)

    def fn(positions, nbrs, cell=None):
        n, dtype = positions.shape[0], positions.dtype  # the state's precision, whatever the model sums in
        out = efs(params, _graph(numbers, positions, nbrs, cell, model.config.cutoff))
        return ForcesStress(out.energy[0].astype(dtype), out.forces[:n].astype(dtype), out.stress[0].astype(dtype))

    return fn


def spread_fn(model, params, numbers):
    """``(positions, nbrs, cell or None) -> ()`` eV/Å: for a committee, the largest per-atom
    force spread of its members (:func:`equijax.ensemble.force_spread`); 0 for one model."""
    numbers = jnp.asarray(numbers, jnp.int32)
    if getattr(model, "member", None) is None:
        return lambda positions, nbrs, cell=None: jnp.zeros((), positions.dtype)
    from equijax import ensemble

    def fn(positions, nbrs, cell=None):
        g = _graph(numbers, positions, nbrs, cell, model.config.cutoff)
        spread = ensemble.force_spread(ensemble.predict(model, params, g).forces)
        return jnp.max(jnp.where(g.nodes["mask"], spread, 0.0)).astype(positions.dtype)

    return fn


def jax_md_energy_fn(model, params, numbers, periodic: bool = False):
    """An energy function with jax-md's signature: ``energy(R, neighbor=..., box=..., perturbation=None)``.

    Args:
        model: an equijax model.
        params: its parameters.
        numbers: (n,) atomic numbers of the atoms of ``R``.
        periodic: ``False`` for ``space.free()`` (``R`` in Å), ``True`` for
            ``space.periodic_general(box, fractional_coordinates=True)``:
            ``R`` fractional, ``box`` with lattice vectors as columns (jax-md's
            convention), minimum-image pairs (exact when the box is at least
            twice the cutoff across, as jax-md requires).

    The neighbour list must be jax-md's ``Sparse`` format (both directions of
    every pair); padding pairs carry index ``n``. ``perturbation`` (a scalar or
    a (3, 3) matrix multiplying ``box``) is what jax-md's NPT integrator
    differentiates for the pressure.
    """
    numbers = jnp.asarray(numbers, jnp.int32)
    cutoff = model.config.cutoff

    def energy(R, neighbor=None, box=None, perturbation=None, **unused):
        if neighbor is None:
            raise ValueError("pass neighbor=: a jax-md Sparse neighbour list")
        if getattr(neighbor, "format", None) is not None and neighbor.format.name != "Sparse":
            raise ValueError(f"jax-md neighbour lists must use format=partition.Sparse, not {neighbor.format.name}")
        n = R.shape[0]
        receivers, senders = neighbor.idx[0], neighbor.idx[1]
        real = receivers < n
        i, j = jnp.minimum(receivers, n - 1), jnp.minimum(senders, n - 1)
        if periodic:
            box = jnp.asarray(box, R.dtype)
            box = box * jnp.eye(3, dtype=R.dtype) if box.ndim < 2 else box
            if perturbation is not None:
                box = box * perturbation if jnp.ndim(perturbation) < 2 else perturbation @ box
            cell = box.T
            shifts = -jnp.round(R[j] - R[i])  # minimum image, as jax-md's displacement
            positions = R @ cell
        else:
            cell = jnp.zeros((3, 3), R.dtype)
            shifts = jnp.zeros((receivers.shape[0], 3), R.dtype)
            positions = R
        vectors = positions[j] - positions[i] + shifts @ cell
        real &= jnp.sum(vectors * vectors, axis=-1) < cutoff ** 2
        graph = graph_of(numbers, positions, cell, receivers, senders, shifts, real)
        return model.energy(params, graph)[0]

    return energy
