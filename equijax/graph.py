"""Graphs of atoms: neighbour search, batching and padding.

A batch of structures is one :class:`jraph.GraphsTuple` whose arrays have
static, padded sizes. The contract, field by field (``n_node``, ``n_edge`` and
``n_graph`` below are the *padded* sizes)::

    nodes["positions"]       (n_node, 3)  float  Cartesian positions, Å
    nodes["atomic_numbers"]  (n_node,)    int32  Z; 0 on padding nodes
    nodes["mask"]            (n_node,)    bool   True on real atoms
    edges["shifts"]          (n_edge, 3)  float  integer cell shifts S
    edges["mask"]            (n_edge,)    bool   True on real edges
    senders, receivers       (n_edge,)    int32  node indices
    globals["cell"]          (n_graph, 3, 3)     lattice vectors as rows, Å
                                                  (zeros when not periodic)
    globals["mask"]          (n_graph,)   bool   True on real graphs
    n_node, n_edge           (n_graph,)   int32  per-graph counts

Optional labels, present when every structure of the batch has them::

    nodes["forces"]          (n_node, 3)      eV/Å
    globals["energy"]        (n_graph,)       eV
    globals["stress"]        (n_graph, 3, 3)  eV/Å³ (ASE sign convention)
    globals["dipole"]        (n_graph, 3)     e·Å
    nodes["dipole_derivative"] (n_node, 3, 3) e: [a, i, c] = dμ_c / dx_ai
    nodes["hessian"]         (n_node, 3, W, 3) eV/Å²: the atom's rows of its
                             own structure's Hessian; column j is the j-th atom
                             of that structure (zeros from its atom count to
                             the width W, :func:`build_graph`'s hessian_width)

A data set where only some structures carry ``hessian`` or
``dipole_derivative`` labels (force data mixed with Hessian data) builds
them as ``partial_labels``: the field is always there, zero where a
structure has no label, and ``globals["<key>_mask"]`` (n_graph,) bool says
which graphs have one.

Optional bookkeeping, set by :meth:`equijax.data.Dataset.batch`::

    globals["index"]         (n_graph,)   int32  the structure's position in its
                                                 data set (-1 on padding); seeds
                                                 per-structure random numbers

An edge ``e`` carries a message from its sender ``j`` to its receiver ``i``;
its vector is ``r_j - r_i + S_e @ cell`` (see :func:`edge_vectors`). Every
neighbour within the cutoff is listed, periodic images included, in both
directions.

Padding rules. Real graphs come first, then at least one padding graph, which
owns every padding node and padding edge; padding edges join the first padding
node to itself, padding nodes sit at the origin, and every padded field is
zero. Models must use the explicit masks, never "the last graph is padding":
:func:`build_graph` always appends padding, but a stack of padded batches
(for ``vmap``) or a user's own graphs need not follow that.

Padded sizes: one policy per situation, each bounding compilations.

* A batch built alone (``build_graph`` without ``pad_to``) is padded on the
  **joint ladder** of :func:`joint_sizes`: one rung sets the node, edge and
  graph counts together, so a loop of ``build_graph`` + ``jit`` over a
  stream of varied structures compiles a few programs per doubling of size
  (the 40 molecules, batches and metal cells of 3–60 atoms in
  ``tests/test_graph.py``: 6). ``pad_to="bucket"`` rounds each count on its
  own ladder (:func:`pad_sizes`: less padding, but the combinations multiply:
  22 shapes for that stream). ``pad_to="tight"``: one padding node, edge and
  graph.
* Code that sees a stream and cares about padding too (the ASE calculator,
  ``equijax evaluate``) keeps a **grow-only capacity**
  (:func:`grow_capacity`): one padded shape, with 25% headroom, that grows at
  least twofold in the dimension that overflows and never shrinks (3 shapes
  for that stream).
* Training data sets pad every batch to room for their largest shard: one shape.

:func:`stack_graphs` needs graphs of one padded size: build them with one
``pad_to`` (e.g. the largest of their :func:`padded_sizes`).
"""

from __future__ import annotations

from typing import Iterable, NamedTuple, Sequence

import jax.numpy as jnp
import jraph
import numpy as np
import vesin

#: Atoms closer than this (Å) are rejected as overlapping.
MIN_DISTANCE = 0.1


class Structure(NamedTuple):
    """One structure as plain arrays (what :func:`build_graph` consumes).

    Attributes:
        positions: (n_atom, 3) Cartesian positions in Å.
        atomic_numbers: (n_atom,) integers.
        cell: (3, 3) lattice vectors as rows in Å, or ``None``.
        pbc: (3,) bools.
        labels: dict of optional labels: ``energy`` (eV), ``forces``
            (n_atom, 3, eV/Å), ``stress`` (3, 3, eV/Å³), ``dipole`` (3, e·Å).
    """

    positions: np.ndarray
    atomic_numbers: np.ndarray
    cell: np.ndarray | None = None
    pbc: np.ndarray = np.zeros(3, bool)
    labels: dict | None = None


def from_ase(atoms, with_labels: bool = False) -> Structure:
    """An ASE ``Atoms`` as a :class:`Structure`.

    With ``with_labels``, the energy, forces, stress and dipole stored on the
    attached calculator (``atoms.calc.results``) or in ``atoms.info`` /
    ``atoms.arrays`` become labels.
    """
    labels = {}
    if with_labels:
        results = dict(getattr(atoms.calc, "results", {}) or {})
        for key in ("energy", "stress", "dipole"):
            value = results.get(key, atoms.info.get(key))
            if value is not None:
                labels[key] = np.asarray(value, float)
        forces = results.get("forces", atoms.arrays.get("forces"))
        if forces is not None:
            labels["forces"] = np.asarray(forces, float)
        if "hessian" in atoms.arrays:  # extxyz stores it as (N, 3N): rows (atom, xyz), columns (atom', xyz')
            n = len(atoms)
            hessian = np.asarray(atoms.arrays["hessian"], float)
            if hessian.size != 9 * n * n:
                raise ValueError(f"a Hessian label of {n} atoms has {hessian.size} values, not 9N² = {9 * n * n}")
            labels["hessian"] = hessian.reshape(n, 3, n, 3)
        if "dipole_derivative" in atoms.arrays:  # (N, 9): [a, 3 i + c] = dμ_c / dx_ai
            labels["dipole_derivative"] = np.asarray(atoms.arrays["dipole_derivative"], float).reshape(-1, 3, 3)
        if "stress" in labels and labels["stress"].shape == (6,):
            from ase.stress import voigt_6_to_full_3x3_stress

            labels["stress"] = voigt_6_to_full_3x3_stress(labels["stress"])
    pbc = np.asarray(atoms.pbc, bool)
    return Structure(
        positions=np.asarray(atoms.positions, float),
        atomic_numbers=np.asarray(atoms.numbers, np.int32),
        cell=np.asarray(atoms.cell.array, float) if pbc.any() else None,
        pbc=pbc,
        labels=labels,
    )


def _as_structure(s) -> Structure:
    if isinstance(s, Structure):
        return s
    if hasattr(s, "get_positions") and hasattr(s, "numbers"):
        return from_ase(s, with_labels=False)
    raise TypeError(f"expected an ase.Atoms or equijax.graph.Structure, got {type(s)!r}")


def check_structure(s: Structure, species: Sequence[int] | None = None) -> None:
    """Raises ``ValueError`` with a clear message for input no model can use.

    Checks: empty structure, NaN or infinite positions or cell, atomic
    numbers that are no element, elements outside ``species`` (when given),
    a degenerate periodic cell, NaN labels. Overlapping atoms are caught by
    :func:`neighbours`.
    """
    pos = np.asarray(s.positions)
    if pos.ndim != 2 or pos.shape[1] != 3:
        raise ValueError(f"positions must have shape (n_atom, 3), got {pos.shape}")
    if len(pos) == 0:
        raise ValueError("empty structure: it has no atoms")
    if len(s.atomic_numbers) != len(pos):
        raise ValueError(
            f"{len(s.atomic_numbers)} atomic numbers for {len(pos)} positions"
        )
    if not np.all(np.isfinite(pos)):
        bad = np.nonzero(~np.isfinite(pos).all(axis=1))[0]
        raise ValueError(f"positions are NaN or infinite for atoms {bad[:10].tolist()}")
    z = np.asarray(s.atomic_numbers)
    if np.any((z < 1) | (z > 118)):
        raise ValueError(f"atomic numbers {sorted(set(z[(z < 1) | (z > 118)].tolist()))} are not elements "
                         "(1-118; 0 marks padding)")
    if species is not None:
        unknown = sorted(set(np.asarray(s.atomic_numbers).tolist()) - set(species))
        if unknown:
            from ase.data import chemical_symbols

            names = [chemical_symbols[z] if 0 < z < len(chemical_symbols) else str(z) for z in unknown]
            raise ValueError(
                f"elements {names} are unknown to this model, which knows "
                f"{[chemical_symbols[z] for z in species]}"
            )
    if np.any(s.pbc):
        cell = np.asarray(s.cell, float)
        if not np.all(np.isfinite(cell)):
            raise ValueError("cell is NaN or infinite")
        if abs(np.linalg.det(cell)) < 1e-6:
            raise ValueError("periodic structure with a degenerate (zero-volume) cell")
    for key, value in (s.labels or {}).items():
        if not np.all(np.isfinite(value)):
            raise ValueError(f"label {key!r} contains NaN or infinite values")


def neighbours(s: Structure, cutoff: float):
    """All ordered pairs within ``cutoff``: O(N) cell-list search by vesin.

    Returns:
        ``(receivers, senders, shifts)`` of shapes (n_edge,), (n_edge,),
        (n_edge, 3); the edge vector is ``r[s] - r[r] + shifts @ cell``.

    Raises:
        ValueError: two atoms closer than :data:`MIN_DISTANCE`.
    """
    pbc = np.asarray(s.pbc, bool)
    pos = np.asarray(s.positions, float)
    if pbc.any():
        cell = np.asarray(s.cell, float)
    else:
        cell = np.zeros((3, 3))
    nl = vesin.NeighborList(cutoff=float(cutoff), full_list=True)
    i, j, shifts, d = nl.compute(pos, cell, pbc if pbc.any() else False, "ijSd")
    if len(d) and d.min() < MIN_DISTANCE:
        k = int(np.argmin(d))
        raise ValueError(
            f"atoms {int(i[k])} and {int(j[k])} overlap: they are {d[k]:.3g} Å apart "
            f"(minimum {MIN_DISTANCE} Å)"
        )
    return i.astype(np.int32), j.astype(np.int32), shifts.astype(np.int32)


def bucket(n: int, minimum: int = 8) -> int:
    """The smallest padded size ``>= n`` on the ladder 2^k, 1.5·2^k.

    At most 50% padding (n = 2^k + 1 pads to 1.5·2^k), and sizes spanning a
    factor 2 compile at most three times.
    """
    n = max(int(n), minimum)
    power = 1 << (n - 1).bit_length()  # smallest power of two >= n
    three_quarters = 3 * power // 4
    return three_quarters if three_quarters >= n and power >= 4 else power


def pad_sizes(n_node: int, n_edge: int, n_graph: int) -> tuple[int, int, int]:
    """Bucketed ``(n_node, n_edge, n_graph)`` with room for the padding graph."""
    return bucket(n_node + 1), bucket(n_edge + 1), bucket(n_graph + 1, minimum=2)


#: edges per node of the joint ladder's edge capacities (molecules, dense solids, very dense ones)
EDGE_DENSITIES = (8, 32, 128)


def joint_sizes(n_node: int, n_edge: int, n_graph: int, minimum: int = 16) -> tuple[int, int, int]:
    """Padded ``(n_node, n_edge, n_graph)`` on the joint ladder, room for the padding graph included.

    One rung ``k`` sets all three counts: ``N = minimum · 2^k`` nodes,
    ``N · d`` edges with ``d`` of :data:`EDGE_DENSITIES`, and ``max(2, N/4)``
    graphs; the smallest ``(k, d)`` that holds the batch. Because the counts
    move together, a stream of varied structures compiles at most three
    programs per doubling of its size (where rounding each count on its own,
    :func:`pad_sizes`, multiplies the combinations); the price is more
    padding (edges up to about 4x, nodes 2x).
    """
    need = (int(n_node) + 1, int(n_edge) + 1, int(n_graph) + 1)
    nodes = minimum
    while True:
        for density in EDGE_DENSITIES:
            sizes = (nodes, nodes * density, max(2, nodes // 4))
            if all(n <= c for n, c in zip(need, sizes)):
                return sizes
        nodes *= 2


def grow_capacity(capacity, real, growth: float = 2.0, headroom: float = 1.25,
                  minimum=(16, 256, 2)) -> tuple[int, int, int]:
    """Grow-only padded sizes for a stream of batches (see the module docstring).

    Args:
        capacity: the current ``(n_node, n_edge, n_graph)``, or ``None``.
        real: ``(nodes, edges, graphs)`` of the next batch, padding excluded.
        growth: least factor by which an overflowing dimension grows.
        headroom: room left above the first (or overflowing) batch.
        minimum: smallest capacity of each dimension.

    Returns:
        ``capacity`` itself if the batch fits (with its padding graph),
        else a larger capacity on the :func:`bucket` ladder; never smaller.
    """
    need = [int(r) + 1 for r in real]  # + the padding graph, node and edge
    if capacity is None:
        return tuple(bucket(int(np.ceil(n * headroom)), minimum=m) for n, m in zip(need, minimum))
    if all(n <= c for n, c in zip(need, capacity)):
        return tuple(capacity)
    return tuple(c if n <= c else bucket(int(max(np.ceil(n * headroom), c * growth)), minimum=1)
                 for n, c in zip(need, capacity))


def build_graph(
    structures: Iterable,
    cutoff: float,
    species: Sequence[int] | None = None,
    pad_to: tuple[int, int, int] | None = None,
    dtype=np.float32,
    neighbour_lists: Sequence | None = None,
    hessian_width: int | None = None,
    partial_labels: Sequence[str] = (),
    as_numpy: bool = False,
) -> jraph.GraphsTuple:
    """Batch structures into one padded :class:`jraph.GraphsTuple`.

    Args:
        structures: ``ase.Atoms`` or :class:`Structure` objects (one alone is
            accepted too).
        cutoff: neighbour cutoff radius in Å.
        species: atomic numbers the model knows; others raise ``ValueError``.
        pad_to: ``(n_node, n_edge, n_graph)``; by default the joint ladder
            of :func:`joint_sizes` (few compilations over a varied stream);
            ``"bucket"``: each count on its own ladder (:func:`pad_sizes`,
            less padding, more shapes); ``"tight"``: exactly one padding
            node, edge and graph (for one-off work such as a Hessian, where
            a bucket would only waste columns).
        dtype: float dtype of positions, shifts, cell and labels.
        neighbour_lists: precomputed :func:`neighbours` of each structure
            (structures already checked), to batch a data set repeatedly.
        hessian_width: columns of ``nodes["hessian"]`` (atoms), at least the
            largest structure; default: the largest structure of the batch.
        partial_labels: of ``"hessian"``, ``"dipole_derivative"``: build
            the field even where some or all structures lack the label,
            with a ``globals["<key>_mask"]`` of the graphs that have it
            (one pytree for every batch of a mixed data set).
        as_numpy: leave the fields as NumPy arrays (a loader that stacks
            many graphs and moves them to the device once; a JAX array
            operation would queue behind the running step).

    Raises:
        ValueError: bad input (see :func:`check_structure`, :func:`neighbours`)
            or a ``pad_to`` too small to hold the batch plus one padding graph.
    """
    if isinstance(structures, Structure) or hasattr(structures, "get_positions"):
        structures = [structures]
    structures = [_as_structure(s) for s in structures]
    if not structures:
        raise ValueError("no structures to build a graph from")

    if neighbour_lists is None:
        parts = []
        for s in structures:
            check_structure(s, species)
            parts.append(neighbours(s, cutoff))
    else:
        parts = list(neighbour_lists)

    n_atoms = np.array([len(s.positions) for s in structures])
    n_edges = np.array([len(p[0]) for p in parts])
    real = (int(n_atoms.sum()), int(n_edges.sum()), len(structures))
    if pad_to is None:
        sizes = joint_sizes(*real)
    elif isinstance(pad_to, str) and pad_to in ("tight", "bucket"):
        sizes = (real[0] + 1, real[1] + 1, real[2] + 1) if pad_to == "tight" else pad_sizes(*real)
    elif isinstance(pad_to, str):
        raise ValueError(f"pad_to must be sizes, 'tight' or 'bucket', got {pad_to!r}")
    else:
        sizes = tuple(pad_to)
    if sizes[0] < real[0] + 1 or sizes[1] < real[1] + 1 or sizes[2] < real[2] + 1:
        raise ValueError(
            f"padded sizes {sizes} cannot hold {real} (nodes, edges, graphs) plus one "
            "padding graph; raise the capacity"
        )
    n_node, n_edge, n_graph = sizes

    offsets = np.concatenate([[0], np.cumsum(n_atoms)[:-1]])
    pad_node = real[0]  # first padding node; padding edges loop on it
    receivers = np.full(n_edge, pad_node, np.int32)
    senders = np.full(n_edge, pad_node, np.int32)
    shifts = np.zeros((n_edge, 3), dtype)
    receivers[: real[1]] = np.concatenate([p[0] + o for p, o in zip(parts, offsets)])
    senders[: real[1]] = np.concatenate([p[1] + o for p, o in zip(parts, offsets)])
    shifts[: real[1]] = np.concatenate([p[2] for p in parts])

    positions = np.zeros((n_node, 3), dtype)
    positions[: real[0]] = np.concatenate([s.positions for s in structures])
    numbers = np.zeros(n_node, np.int32)
    numbers[: real[0]] = np.concatenate([s.atomic_numbers for s in structures])
    cell = np.zeros((n_graph, 3, 3), dtype)
    for g, s in enumerate(structures):
        if np.any(s.pbc):
            cell[g] = s.cell

    count_node = np.zeros(n_graph, np.int32)
    count_edge = np.zeros(n_graph, np.int32)
    count_node[: real[2]] = n_atoms
    count_edge[: real[2]] = n_edges
    count_node[real[2]] = n_node - real[0]
    count_edge[real[2]] = n_edge - real[1]

    nodes = {
        "positions": positions,
        "atomic_numbers": numbers,
        "mask": np.arange(n_node) < real[0],
    }
    edges = {"shifts": shifts, "mask": np.arange(n_edge) < real[1]}
    globals_ = {"cell": cell, "mask": np.arange(n_graph) < real[2]}

    labels = [s.labels or {} for s in structures]
    if all("forces" in l for l in labels):
        forces = np.zeros((n_node, 3), dtype)
        forces[: real[0]] = np.concatenate([l["forces"] for l in labels])
        nodes["forces"] = forces
    for key in partial_labels:
        globals_[key + "_mask"] = np.array([key in l for l in labels] + [False] * (n_graph - real[2]))
    if all("dipole_derivative" in l for l in labels) or "dipole_derivative" in partial_labels:
        value = np.zeros((n_node, 3, 3), dtype)
        for l, o, n in zip(labels, offsets, n_atoms):
            if "dipole_derivative" in l:
                value[o : o + n] = l["dipole_derivative"]
        nodes["dipole_derivative"] = value
    for key, shape in (("energy", ()), ("stress", (3, 3)), ("dipole", (3,))):
        if all(key in l for l in labels):
            value = np.zeros((n_graph,) + shape, dtype)
            value[: real[2]] = np.stack([np.reshape(l[key], shape) for l in labels])
            globals_[key] = value
    if all("hessian" in l for l in labels) or "hessian" in partial_labels:
        width = int(n_atoms.max()) if hessian_width is None else hessian_width
        labelled = [n for l, n in zip(labels, n_atoms) if "hessian" in l]
        if labelled and width < max(labelled):
            raise ValueError(f"hessian_width {width} is smaller than a structure of {max(labelled)} atoms")
        hessian = np.zeros((n_node, 3, width, 3), dtype)
        for l, o, n in zip(labels, offsets, n_atoms):
            if "hessian" in l:
                hessian[o : o + n, :, :n] = l["hessian"]
        nodes["hessian"] = hessian

    array = np.asarray if as_numpy else jnp.asarray
    to_jax = lambda tree: {k: array(v) for k, v in tree.items()}
    return jraph.GraphsTuple(
        nodes=to_jax(nodes),
        edges=to_jax(edges),
        senders=array(senders),
        receivers=array(receivers),
        globals=to_jax(globals_),
        n_node=array(count_node),
        n_edge=array(count_edge),
    )


def padded_sizes(graph: jraph.GraphsTuple) -> tuple[int, int, int]:
    """``(n_node, n_edge, n_graph)`` of a padded graph: pass as ``pad_to`` to match it."""
    return graph.nodes["mask"].shape[0], graph.senders.shape[0], graph.n_node.shape[0]


def stack_graphs(graphs: Sequence[jraph.GraphsTuple], as_numpy: bool = False) -> jraph.GraphsTuple:
    """Stack equally padded graphs along a new leading axis (for ``vmap``).

    Raises:
        ValueError: graphs of different padded sizes (build them with one ``pad_to``).
    """
    import jax

    sizes = {padded_sizes(g) for g in graphs}
    if len(sizes) > 1:
        raise ValueError(f"graphs of different padded sizes {sorted(sizes)} cannot be stacked: build them "
                         "with one pad_to, e.g. the largest of their padded_sizes")

    return jax.tree_util.tree_map(lambda *xs: (np.stack if as_numpy else jnp.stack)(xs), *graphs)


def node_graph_index(graph: jraph.GraphsTuple):
    """(n_node,) index of the graph that owns each node."""
    n_graph = graph.n_node.shape[0]
    return jnp.repeat(
        jnp.arange(n_graph), graph.n_node, total_repeat_length=graph.nodes["mask"].shape[0]
    )


def edge_graph_index(graph: jraph.GraphsTuple):
    """(n_edge,) index of the graph that owns each edge."""
    n_graph = graph.n_edge.shape[0]
    return jnp.repeat(
        jnp.arange(n_graph), graph.n_edge, total_repeat_length=graph.senders.shape[0]
    )


def edge_vectors(graph: jraph.GraphsTuple, positions=None, cell=None):
    """(n_edge, 3) vectors ``r_sender - r_receiver + S @ cell``, in Å.

    ``positions`` (n_node, 3) and ``cell`` (n_graph, 3, 3) default to the
    graph's own; pass them to differentiate with respect to them.
    """
    positions = graph.nodes["positions"] if positions is None else positions
    cell = graph.globals["cell"] if cell is None else cell
    edge_cell = cell[edge_graph_index(graph)]
    offset = jnp.einsum("ei,eij->ej", graph.edges["shifts"].astype(positions.dtype), edge_cell)
    return positions[graph.senders] - positions[graph.receivers] + offset


def num_neighbours(graph: jraph.GraphsTuple) -> float:
    """Average number of neighbours per real atom (host side)."""
    return float(np.asarray(graph.edges["mask"]).sum() / max(np.asarray(graph.nodes["mask"]).sum(), 1))


__all__ = [
    "Structure",
    "from_ase",
    "check_structure",
    "neighbours",
    "bucket",
    "pad_sizes",
    "joint_sizes",
    "grow_capacity",
    "build_graph",
    "padded_sizes",
    "stack_graphs",
    "node_graph_index",
    "edge_graph_index",
    "edge_vectors",
    "num_neighbours",
]
