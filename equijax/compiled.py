"""One set of jitted functions per model: energy, forces, stress, Hessians and committee predictions.

The calculator, vibrational analysis, phonons and evaluation take their
compiled functions from :func:`compiled`, so every tool that works on the
same model shares one compilation per padded shape (``jax.jit`` keeps one
program per shape; this keeps one ``jit`` per model).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax

from equijax import physics


class Compiled(NamedTuple):
    """Jitted functions of one potential.

    Attributes:
        energy_forces_stress: :func:`equijax.physics.energy_forces_stress` of one graph.
        hessian: the dense Hessian (``hessian_batch_size`` None) or the chunked one.
        members: committees: :func:`equijax.ensemble.predict` (every member's prediction); else ``None``.
        dipole_derivative: ``(params, graph) -> (3, n_node, 3)`` ``dμ_c/dx_ai`` of the first graph (e), or
            ``None`` without a dipole head.
        stacked: the same functions ``vmap``-ed over a stack of padded graphs (leading axis), for data sets'
            batches and many molecules at once: a :class:`Stacked`.
    """

    energy_forces_stress: object
    hessian: object
    members: object = None
    dipole_derivative: object = None
    stacked: object = None


class Stacked(NamedTuple):
    energy_forces_stress: object
    hessian: object
    dipole_derivative: object = None


@functools.lru_cache(maxsize=16)
def compiled(model, hessian_batch_size=None) -> Compiled:
    """Jitted functions of ``model``, shared by every calculator and analysis of it,
    so that a new calculator on the same model compiles nothing again."""
    efs = physics.energy_forces_stress(model.energy)
    hess = physics.hessian(model.energy) if hessian_batch_size is None else \
        physics.hessian_chunked(model.energy, hessian_batch_size)
    members = None
    if model.member is not None:
        from equijax import ensemble

        members = jax.jit(lambda params, graph: ensemble.predict(model, params, graph))
    dmu = None if model.dipole is None else functools.partial(_dipole_derivative, model.dipole)

    def stacked(fn):
        return None if fn is None else jax.jit(jax.vmap(fn, in_axes=(None, 0)))

    return Compiled(jax.jit(efs), jax.jit(hess), members, None if dmu is None else jax.jit(dmu),
                    Stacked(stacked(efs), stacked(physics.hessian(model.energy)), stacked(dmu)))


def _dipole_derivative(dipole_fn, params, graph):
    """(3, n_node, 3) ``dμ_c/dx_ai`` of the first graph's dipole (e·Å per Å = e)."""
    def mu(positions):
        return dipole_fn(params, physics.with_positions(graph, positions))[0]

    return jax.jacrev(mu)(graph.nodes["positions"])
