"""Forces, stress and Hessians, derived from an energy function by autodiff.

Everything here transforms an ``energy_fn(params, graph) -> (n_graph,)``
(for instance ``model.energy``), the way ``jax.grad`` transforms a function;
nothing is an extra output head, so forces are conservative and every
derived quantity is exactly as equivariant as the energy.

Units follow ASE: energies in eV, forces in eV/Å, stress in eV/Å³ with ASE's
sign convention (``stress = (1/V) dE/dε``, positive under tension), Hessians
in eV/Å². Padding atoms get exactly zero forces and zero Hessian rows and
columns.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import jraph

from equijax import graph as graph_lib

EnergyFn = Callable[[object, jraph.GraphsTuple], jax.Array]


def with_positions(graph: jraph.GraphsTuple, positions: jax.Array) -> jraph.GraphsTuple:
    """The same graph with other (n_node, 3) positions."""
    return graph._replace(nodes={**graph.nodes, "positions": positions})


def _node_mask(graph, x):
    return jnp.where(graph.nodes["mask"][:, None], x, 0.0)


def energy_and_forces(energy_fn: EnergyFn):
    """``(params, graph) -> (energy (n_graph,), forces (n_node, 3))``."""

    def fn(params, graph):
        def total(positions):
            e = energy_fn(params, with_positions(graph, positions))
            return e.sum(), e

        grad, e = jax.grad(total, has_aux=True)(graph.nodes["positions"])
        return e, _node_mask(graph, -grad)

    return fn


class EnergyForcesStress(NamedTuple):
    energy: jax.Array  # (n_graph,) eV
    forces: jax.Array  # (n_node, 3) eV/Å
    stress: jax.Array  # (n_graph, 3, 3) eV/Å³; zero for non-periodic graphs
    virial: jax.Array  # (n_graph, 3, 3) eV, -dE/dε


def strain(graph: jraph.GraphsTuple, eps: jax.Array) -> jraph.GraphsTuple:
    """Apply a symmetric strain (n_graph, 3, 3) to positions and cell.

    ``r -> r (1 + ε)``, ``cell -> cell (1 + ε)`` (rows are vectors), with ε
    symmetrised first so that its derivative is the symmetric stress.
    """
    eps = 0.5 * (eps + jnp.swapaxes(eps, -1, -2))
    pos = graph.nodes["positions"]
    node_eps = eps[graph_lib.node_graph_index(graph)]
    pos = pos + jnp.einsum("ni,nij->nj", pos, node_eps.astype(pos.dtype))
    cell = graph.globals["cell"]
    cell = cell + jnp.einsum("gik,gkj->gij", cell, eps.astype(cell.dtype))
    return graph._replace(
        nodes={**graph.nodes, "positions": pos},
        globals={**graph.globals, "cell": cell},
    )


def volume(graph: jraph.GraphsTuple) -> jax.Array:
    """(n_graph,) cell volumes in Å³ (0 for non-periodic graphs)."""
    return jnp.abs(jnp.linalg.det(graph.globals["cell"]))


def energy_forces_stress(energy_fn: EnergyFn):
    """``(params, graph) -> EnergyForcesStress``, by one reverse pass."""

    def fn(params, graph):
        pos = graph.nodes["positions"]
        n_graph = graph.n_node.shape[0]

        def total(positions, eps):
            e = energy_fn(params, strain(with_positions(graph, positions), eps))
            return e.sum(), e

        eps = jnp.zeros((n_graph, 3, 3), pos.dtype)
        (g_pos, g_eps), e = jax.grad(total, argnums=(0, 1), has_aux=True)(pos, eps)
        vol = volume(graph)
        safe = jnp.where(vol > 0, vol, 1.0)
        stress = jnp.where((vol > 0)[:, None, None], g_eps / safe[:, None, None], 0.0)
        return EnergyForcesStress(e, _node_mask(graph, -g_pos), stress, -g_eps)

    return fn


def hessian(energy_fn: EnergyFn, mode: str = "reverse"):
    """``(params, graph) -> (n_node, 3, n_node, 3)`` dense Hessian, eV/Å².

    ``mode="reverse"``: reverse-over-reverse (``jax.jacrev`` of the forces),
    whose 3N backward passes share one forward pass (which route is faster
    depends on the backend and device: docs, results/performance). ``mode="forward"``:
    forward-over-reverse (``jax.jacfwd`` of the forces, as ``jax.hessian``),
    3N tangents pushed through one gradient. For a batch of several
    structures the result is block diagonal. Use it for small molecules,
    :func:`hessian_chunked` when memory is tight, and ``jax.vmap`` over a
    stack of padded graphs for many molecules at once.
    """
    if mode not in ("reverse", "forward"):
        raise ValueError(f"mode must be 'reverse' or 'forward', got {mode!r}")
    outer = jax.jacrev if mode == "reverse" else jax.jacfwd

    def fn(params, graph):
        def total(positions):
            return energy_fn(params, with_positions(graph, positions)).sum()

        h = outer(jax.grad(total))(graph.nodes["positions"])
        mask = graph.nodes["mask"]
        return jnp.where(mask[:, None, None, None] & mask[None, None, :, None], h, 0.0)

    return fn


def hessian_vector_product(energy_fn: EnergyFn):
    """``(params, graph, v (n_node, 3)) -> H v (n_node, 3)``, one forward-over-reverse pass."""

    def fn(params, graph, v):
        def grad(positions):
            return jax.grad(lambda p: energy_fn(params, with_positions(graph, p)).sum())(positions)

        return jax.jvp(grad, (graph.nodes["positions"],), (v,))[1]

    return fn


def energy_forces_hvp(energy_fn: EnergyFn):
    """``(params, graph, v (k, n_node, 3)) -> (energy (n_graph,), forces (n_node, 3), H v (k, n_node, 3))``.

    One forward and backward pass, linearised once (``jax.linearize`` of the
    gradient) and pushed along k tangents: the forces and k Hessian-vector
    products of a training step for the price of a few passes, no full
    Hessian. ``H v`` is zero on padding atoms.
    """

    def fn(params, graph, v):
        def grad(positions):
            def total(p):
                e = energy_fn(params, with_positions(graph, p))
                return e.sum(), e

            return jax.grad(total, has_aux=True)(positions)

        g, push, e = jax.linearize(grad, graph.nodes["positions"], has_aux=True)
        hv = jax.vmap(push)(v)
        return e, _node_mask(graph, -g), jnp.where(graph.nodes["mask"][None, :, None], hv, 0.0)

    return fn


def hessian_columns(energy_fn: EnergyFn, atoms, batch_size: int = 16):
    """Partial Hessian: the columns of the given atoms only, by Hessian-vector products.

    For a subset of atoms (the rest held fixed), or the force constants of
    one cell of a supercell (phonons). Cost and memory scale with
    ``len(atoms)``, not with the system size.

    Args:
        atoms: static sequence of node indices.

    Returns:
        ``(params, graph) -> (n_node, 3, len(atoms), 3)``: ``H[i, a, k, b] =
        d²E / dr_{i,a} dr_{atoms[k], b}``.
    """
    hvp = hessian_vector_product(energy_fn)
    atoms = jnp.asarray(atoms, jnp.int32)
    n_cols = 3 * atoms.shape[0]

    def fn(params, graph):
        pos = graph.nodes["positions"]
        flat = jnp.repeat(atoms * 3, 3) + jnp.tile(jnp.arange(3), atoms.shape[0])  # column -> flat index
        n_chunks = -(-n_cols // batch_size)
        cols = jnp.pad(flat, (0, n_chunks * batch_size - n_cols)).reshape(n_chunks, batch_size)

        def chunk(idx):
            basis = jax.nn.one_hot(idx, pos.size, dtype=pos.dtype).reshape(batch_size, *pos.shape)
            return jax.vmap(lambda v: hvp(params, graph, v))(basis)

        h = jax.lax.map(chunk, cols).reshape(n_chunks * batch_size, *pos.shape)[:n_cols]
        h = h.reshape(atoms.shape[0], 3, *pos.shape)
        h = jnp.transpose(h, (2, 3, 0, 1))
        return jnp.where(graph.nodes["mask"][:, None, None, None], h, 0.0)

    return fn


def hessian_chunked(energy_fn: EnergyFn, batch_size: int = 16):
    """Memory-bounded dense Hessian from batches of Hessian-vector products.

    Columns are computed ``batch_size`` at a time (``jax.lax.map`` over
    chunks, ``vmap`` inside one), so peak memory is that of ``batch_size``
    simultaneous forward-over-reverse passes, whatever the system size.

    Returns:
        ``(params, graph) -> (n_node, 3, n_node, 3)``, equal to :func:`hessian`.
    """
    hvp = hessian_vector_product(energy_fn)

    def fn(params, graph):
        pos = graph.nodes["positions"]
        n = pos.size
        n_chunks = -(-n // batch_size)
        cols = jnp.arange(n_chunks * batch_size).reshape(n_chunks, batch_size)

        def chunk(idx):
            basis = jax.nn.one_hot(idx, n, dtype=pos.dtype).reshape(batch_size, *pos.shape)
            return jax.vmap(lambda v: hvp(params, graph, v))(basis)

        h = jax.lax.map(chunk, cols).reshape(n_chunks * batch_size, *pos.shape)[:n]
        h = h.reshape(pos.shape + pos.shape)  # (col atom, col xyz, row atom, row xyz)
        h = jnp.transpose(h, (2, 3, 0, 1))
        mask = graph.nodes["mask"]
        return jnp.where(mask[:, None, None, None] & mask[None, None, :, None], h, 0.0)

    return fn
