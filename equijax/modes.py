"""Normal-mode algebra: one home for vibrational analysis, phonons and the Hessian loss.

A Hessian ``H`` (eV/Å²) of one structure is mass-weighted,
``M^-1/2 H M^-1/2``, its rigid-body motions (translations, and rotations of
a molecule) are projected out, and its eigenpairs ``(λ, u)`` are the normal
modes: ``λ`` in eV/Å²/amu, the harmonic wavenumber ``ω = C·sign(λ)·√|λ|``
with ``C =`` :data:`WAVENUMBER`.

The per-structure functions take ``xp`` (``numpy`` on the host, as
:mod:`equijax.vibrations` does; ``jax.numpy`` inside a compiled step, as the
Hessian loss does, ``vmap``-ed over the structures of a batch), so both
paths run the same algebra. :func:`label_modes` and the bases after it act
on a batch's Hessian labels in the graph layout of ``nodes["hessian"]``
(:mod:`equijax.graph`): an atom's rows ``(3, W, 3)`` of its own structure's
Hessian, column ``j`` the structure's ``j``-th atom.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from ase import units

from equijax import graph as graph_lib

#: wavenumber (cm⁻¹) of a mass-weighted Hessian eigenvalue of 1 eV/Å²/amu: ω = C·√λ
WAVENUMBER = float(np.sqrt(units._e / units._amu) * 1e10 / (2 * np.pi * units._c * 100))
#: soft modes below this wavenumber (cm⁻¹) weigh as if they were at it: no division by near-zero eigenvalues
MODE_FLOOR_CM = 100.0
#: (D/Å)²/amu -> km/mol, the conversion ASE's Infrared uses
KM_PER_MOL = 42.255
#: e·Å in Debye
E_ANGSTROM_IN_DEBYE = 1.0 / 0.20819434


def to_wavenumber(lam, xp=np):
    """Wavenumbers (cm⁻¹) of mass-weighted eigenvalues ``lam`` (eV/Å²/amu); imaginary ones negative."""
    return xp.sign(lam) * xp.sqrt(xp.abs(lam)) * WAVENUMBER


def rigid_body_basis(positions, masses, periodic: bool = False, valid=None, xp=np):
    """(3N, 6) orthonormal mass-weighted rigid-body motions of one structure.

    Columns: three translations, and for a molecule three rotations about
    the centre of mass. Motions that do not exist have zero columns: the
    rotations of a crystal (``periodic``), the dependent rotation of a
    linear molecule (found from the singular values). ``valid`` (N,) marks
    real atoms; padding rows are zero. ``positions`` (N, 3) Å, ``masses``
    (N,) amu. The number of rigid-body modes is the number of nonzero
    columns (6, 5 or 3).
    """
    n = positions.shape[0]
    valid = xp.ones(n, bool) if valid is None else valid
    m = xp.where(valid, masses, 0.0)
    centre = (m[:, None] * positions).sum(0) / xp.maximum(m.sum(), 1e-12)
    r = xp.where(valid[:, None], positions - centre, 0.0)
    eye = xp.eye(3, dtype=positions.dtype)
    trans = xp.broadcast_to(eye, (n, 3, 3))  # [atom, xyz, which]
    rot = xp.cross(r[:, None, :], eye[None, :, :]).swapaxes(1, 2)  # r × e_a: [atom, xyz, a]
    if periodic:
        rot = rot * 0.0
    vectors = (xp.concatenate([trans, rot], axis=2) * xp.sqrt(m)[:, None, None]).reshape(3 * n, 6)
    u, s, _ = xp.linalg.svd(vectors, full_matrices=False)
    return u * (s > 1e-6 * xp.maximum(s[0], 1e-12))[None, :]


def n_rigid(basis, xp=np):
    """The number of rigid-body modes of a :func:`rigid_body_basis`."""
    return (xp.abs(basis).sum(0) > 0).sum()


def mass_weighted(hessian, masses, valid=None, xp=np):
    """``M^-1/2 H M^-1/2`` of a (3N, 3N) Hessian (eV/Å² -> eV/Å²/amu); zero on padding rows and columns."""
    w = 1.0 if valid is None else xp.repeat(valid, 3).astype(hessian.dtype)
    scale = w / xp.repeat(xp.sqrt(masses), 3)  # padding: any positive mass, zeroed by w
    return hessian * scale[:, None] * scale[None, :]


def project_rigid(hessian, positions, masses, periodic: bool = False, valid=None, xp=np):
    """``(projected (3N, 3N) Cartesian Hessian, rigid-body basis)``: rigid-body motions removed in
    mass-weighted coordinates and the result symmetrised."""
    basis = rigid_body_basis(positions, masses, periodic, valid, xp)
    p = xp.eye(hessian.shape[0], dtype=hessian.dtype) - basis @ basis.T
    mw = p @ mass_weighted(hessian, masses, valid, xp) @ p
    mw = 0.5 * (mw + mw.T)
    s = xp.repeat(xp.sqrt(masses), 3)
    return mw * s[:, None] * s[None, :], basis


def normal_modes(hessian, positions, masses, periodic: bool = False, valid=None, xp=np):
    """The normal modes of one structure: ``(lam (3N,), vectors (3N, 3N), vibration (3N,) bool)``.

    Eigenpairs of the mass-weighted Hessian with rigid-body motions
    projected out (:func:`project_rigid`): ``lam`` eV/Å²/amu, ``vectors``
    mass-weighted orthonormal columns. Rigid-body and padding directions
    are told apart from vibrations by where their vectors live, not by the
    size of ``lam``; vibrations come first, in ascending order
    (``vibration`` marks them). Translations and rotations of a molecule are
    not counted as vibrations: a molecule of N atoms has ``3N - 6`` (or 5).
    """
    basis = rigid_body_basis(positions, masses, periodic, valid, xp)
    p = xp.eye(hessian.shape[0], dtype=hessian.dtype) - basis @ basis.T
    mw = p @ mass_weighted(hessian, masses, valid, xp) @ p
    lam, vectors = xp.linalg.eigh(0.5 * (mw + mw.T))
    spurious = ((basis.T @ vectors) ** 2).sum(0)  # weight in the rigid-body motions
    if valid is not None:  # and on padding
        spurious = spurious + ((~xp.repeat(valid, 3))[:, None] * vectors**2).sum(0)
    vibration = spurious < 0.5
    order = xp.argsort(xp.where(vibration, lam, xp.finfo(lam.dtype).max))  # no inf: tests trap them
    return lam[order], vectors[:, order], vibration[order]


# --------------------------------------------------------------- Hessian labels of a batch (JAX)


def rows_times(rows, graph, v):
    """(k, n_node, 3): each structure's matrix, stored as its atoms' rows ``rows`` (n_node, 3, W, 3), times ``v``
    (k, n_node, 3)."""
    n, width = rows.shape[0], rows.shape[2]
    graph_of_node = graph_lib.node_graph_index(graph)
    first = (jnp.cumsum(graph.n_node) - graph.n_node)[graph_of_node]
    columns = first[:, None] + jnp.arange(width)[None, :]  # (n_node, W) global node index of column j
    valid = jnp.arange(width)[None, :] < graph.n_node[graph_of_node][:, None]
    vj = jnp.where(valid[None, :, :, None], v[:, jnp.clip(columns, 0, n - 1)], 0.0)  # (k, n_node, W, 3)
    return jnp.einsum("iajb,kijb->kia", rows, vj)


def modes_times(basis, graph, r):
    """(k, n_graph, W, 3) ``T^T r`` per structure, for ``r`` (k, n_node, 3) and a basis ``T`` in the rows layout."""
    per_node = jnp.einsum("iajb,kia->ikjb", basis, r)
    return jax.ops.segment_sum(per_node, graph_lib.node_graph_index(graph), graph.n_node.shape[0]).swapaxes(0, 1)


def label_modes(graph, floor_cm: float = MODE_FLOOR_CM):
    """The labelled Hessians' normal modes: ``(rows, lam)``.

    ``rows`` (n_node, 3, W, 3): per structure (the layout of
    ``nodes["hessian"]``; rows Cartesian coordinates, columns modes, real
    modes first) ``M^-1/2 U`` of the mass-weighted reference Hessian
    ``M^-1/2 H M^-1/2 = U Λ U^T`` with translations and rotations projected
    out (:func:`normal_modes`); zero on their columns, on structures without
    a label and on padding. ``lam`` (n_node, 1, W, 3): the node's
    structure's ``|λ|`` (eV/Å²/amu), raised to at least ``(floor_cm / C)²``.
    Labels only: no gradient flows through the eigensolver.
    """
    from ase.data import atomic_masses

    h = graph.nodes["hessian"]
    n, width = h.shape[0], h.shape[2]
    n_graph = graph.n_node.shape[0]
    first = jnp.cumsum(graph.n_node) - graph.n_node
    slot = jnp.clip(first[:, None] + jnp.arange(width)[None, :], 0, n - 1)  # (n_graph, W) node of each atom slot
    valid = (jnp.arange(width)[None, :] < graph.n_node[:, None]) & graph.nodes["mask"][slot]
    dtype = h.dtype
    mass = jnp.where(valid, jnp.asarray(atomic_masses, dtype)[graph.nodes["atomic_numbers"][slot]], 1.0)
    dense = h[slot].reshape(n_graph, 3 * width, 3 * width)
    solve = functools.partial(normal_modes, periodic=False, xp=jnp)
    lam, modes, vibration = jax.vmap(lambda hh, r, m, v: solve(hh, r, m, valid=v))(
        dense, graph.nodes["positions"][slot], mass, valid)
    modes = modes * vibration[:, None, :]  # real modes first: column (j, b) exists only for j < n
    lam = jnp.maximum(jnp.abs(lam), (floor_cm / WAVENUMBER) ** 2)
    w = jnp.repeat(valid, 3, axis=1).astype(dtype)
    basis = modes / jnp.repeat(jnp.sqrt(mass), 3, axis=1)[:, :, None] * w[:, :, None]  # (n_graph, 3W, 3W modes)
    labelled = graph.globals.get("hessian_mask", graph.globals["mask"])
    graph_of_node = graph_lib.node_graph_index(graph)
    local = jnp.clip(jnp.arange(n) - first[graph_of_node], 0, width - 1)
    rows = basis.reshape(n_graph, width, 3, width, 3)[graph_of_node, local]  # (n_node, 3, W, 3)
    keep = graph.nodes["mask"] & labelled[graph_of_node]
    rows = jnp.where(keep[:, None, None, None], rows, 0.0)
    return jax.lax.stop_gradient(rows), jax.lax.stop_gradient(lam.reshape(n_graph, 1, width, 3)[graph_of_node])


def frequency_basis(graph, floor_cm: float = MODE_FLOOR_CM, modes=None):
    """(n_node, 3, W, 3) ``T``: the labelled Hessians' normal modes, scaled so that errors read in cm⁻¹.

    Per structure (the layout of ``nodes["hessian"]``; rows are Cartesian
    coordinates, columns modes), ``T = sqrt(C/2) M^-1/2 U |Λ|^-1/4`` from the
    mass-weighted reference Hessian ``M^-1/2 H M^-1/2 = U Λ U^T`` with
    translations and rotations projected out (their columns are zero), ``C``
    = :data:`WAVENUMBER` and ``|λ|`` raised to at least ``(floor_cm / C)²``
    (:func:`label_modes`; pass its result as ``modes`` to solve once for
    several bases). For a model Hessian ``H + δH``, ``(T^T δH T)_ii`` is
    then, to first order, the error of mode i's harmonic frequency in cm⁻¹
    (``δω = C δλ / 2√λ``), and the off-diagonal entries measure how the
    modes mix. A loss on ``T^T δH T z`` weighs every mode by what it does to
    its frequency: soft torsions, which an unweighted ``H v`` loss leaves to
    the stiff stretches, count as much as they move the spectrum.
    """
    rows, lam = label_modes(graph, floor_cm) if modes is None else modes
    return rows * jnp.sqrt(WAVENUMBER / 2) * lam**-0.25


def displacement_basis(graph, floor_cm: float = MODE_FLOOR_CM, modes=None):
    """(n_node, 3, W, 3) ``B = M^-1/2 U |Λ|^-1/2`` (:func:`label_modes`): ``B B^T = H⁺``, the inverse Hessian.

    ``B B^T δF`` is the Newton step of a force error ``δF``: how far (Å) it
    moves the minimum, to first order. Soft modes, where a small force error
    puts the minimum somewhere else (a torsion), weigh most.
    """
    rows, lam = label_modes(graph, floor_cm) if modes is None else modes
    return rows * lam**-0.5


def newton_step(graph, df, floor_cm: float = MODE_FLOOR_CM, modes=None):
    """(n_node, 3) ``H⁺ δF`` per Hessian-labelled structure (Å): where the force error ``df`` (n_node, 3) moves
    the minimum, to first order; zero elsewhere."""
    basis = displacement_basis(graph, floor_cm, modes)
    c = modes_times(basis, graph, df[None])[0]  # (n_graph, W, 3): B^T δF, mode (j, b) of each structure
    graph_of_node = graph_lib.node_graph_index(graph)
    first = jnp.cumsum(graph.n_node) - graph.n_node
    local = jnp.clip(jnp.arange(df.shape[0]) - first[graph_of_node], 0, basis.shape[2] - 1)
    return rows_times(basis, graph, c[graph_of_node, local][None])[0]
