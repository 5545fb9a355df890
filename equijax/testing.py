"""Helpers to check the physics of any potential (used by our tests and notebooks).

Each helper takes an ``energy_fn(params, graph) -> (n_graph,)``, parameters,
and structures, and returns the largest deviation it found, so a researcher
who writes a new layer can check it in one line::

    errs = equijax.testing.equivariance_errors(model.energy, params, atoms, cutoff)
    assert max(errs.values()) < 1e-9
"""

from __future__ import annotations

import contextlib

import e3nn_jax as e3nn
import jax
import jax.numpy as jnp
import numpy as np

from equijax import graph as graph_lib
from equijax import physics


def random_orthogonal(key, reflect: bool = True) -> np.ndarray:
    """A random 3×3 rotation, composed with the inversion when ``reflect``."""
    r = np.asarray(e3nn.rand_matrix(key, (), dtype=jnp.float64))
    return -r if reflect else r


def transform(structure, rotation: np.ndarray, translation=np.zeros(3)) -> graph_lib.Structure:
    """Rotate (rows times ``rotation``ᵀ) and translate a structure, cell included."""
    s = graph_lib._as_structure(structure)
    pos = s.positions @ rotation.T + translation
    cell = None if s.cell is None else s.cell @ rotation.T
    return s._replace(positions=pos, cell=cell)


def central_difference(f, x, h: float = 1e-5) -> np.ndarray:
    """``d f / d x`` by central differences, ``x.shape + f(x).shape``: a reference that shares no code with autodiff."""
    x = np.array(x, float)
    grad = np.zeros(x.shape + np.shape(f(x)))
    for idx in np.ndindex(x.shape):
        d = np.zeros_like(x)
        d[idx] = h
        grad[idx] = (np.asarray(f(x + d)) - np.asarray(f(x - d))) / (2 * h)
    return grad


def equivariance_errors(energy_fn, params, structure, cutoff, key=jax.random.PRNGKey(0),
                        hessian: bool = True, dtype=np.float64, reflect: bool = True) -> dict:
    """Largest deviations under a random rotation with inversion (without, if not ``reflect``) plus a translation.

    Returns:
        ``{"energy", "forces", "stress", "hessian"}`` absolute errors of
        ``E(Rx) - E(x)``, ``F(Rx) - R F(x)``, ``σ(Rx) - R σ Rᵀ`` (periodic
        only) and ``H(Rx) - R H Rᵀ`` (per atom pair).
    """
    rot = random_orthogonal(key, reflect)
    shift = np.array([0.3, -1.1, 2.7])
    s0 = graph_lib._as_structure(structure)
    s1 = transform(s0, rot, shift if not np.any(s0.pbc) else np.zeros(3))
    g0 = graph_lib.build_graph([s0], cutoff, dtype=dtype)
    g1 = graph_lib.build_graph([s1], cutoff, pad_to=graph_lib.padded_sizes(g0), dtype=dtype)
    efs = jax.jit(physics.energy_forces_stress(energy_fn))
    a, b = efs(params, g0), efs(params, g1)
    n = len(s0.positions)
    errs = {
        "energy": float(jnp.abs(a.energy - b.energy).max()),
        "forces": float(np.abs(np.asarray(b.forces[:n]) - np.asarray(a.forces[:n]) @ rot.T).max()),
    }
    if np.any(s0.pbc):
        errs["stress"] = float(np.abs(np.asarray(b.stress[0]) - rot @ np.asarray(a.stress[0]) @ rot.T).max())
    if hessian:
        hess = jax.jit(physics.hessian(energy_fn))
        ha, hb = np.asarray(hess(params, g0))[:n, :, :n], np.asarray(hess(params, g1))[:n, :, :n]
        rotated = np.einsum("ji,aibk,lk->ajbl", rot, ha, rot)
        errs["hessian"] = float(np.abs(hb - rotated).max())
    return errs



#: the JAX event of one program lowered for XLA: compiled, or loaded from the persistent cache
_LOWERED = "/jax/core/compile/jaxpr_to_mlir_module_duration"


@contextlib.contextmanager
def count_compilations(fn=None):
    """Count compilations inside the block::

        energy = jax.jit(model.energy)
        with equijax.testing.count_compilations(energy) as compiled:
            for atoms in stream:
                energy(params, equijax.build_graph(atoms, cutoff))
        assert compiled() <= 6

    With a jitted ``fn``: the programs it added (one per new input shape).
    Without: every program JAX lowered in the block, the small ones of
    array conversions and ``jnp`` calls outside any ``jit`` included. A
    program counts whether XLA compiles it or the persistent compilation
    cache supplies it; a call that reuses a compiled program does not count.
    """
    if fn is not None:
        before = fn._cache_size()
        yield lambda: fn._cache_size() - before
        return
    count = [0]

    def listener(event, duration, **kwargs):
        if event == _LOWERED:
            count[0] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield lambda: count[0]
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
