"""Data sets: statistics for the model, and padded batches for training.

A :class:`Dataset` holds labelled structures (in memory with their neighbour
lists, or a lazy source read from disk) and cuts them into padded graphs of
one static size so that a jitted train step compiles once
(:meth:`Dataset.batches`): a fixed number of structures per step, or as
many as a node/edge budget holds (:mod:`equijax.loader`).
"""

from __future__ import annotations

from typing import Iterator, NamedTuple, Sequence

import numpy as np

from equijax import graph as graph_lib
from equijax.graph import Structure


class Statistics(NamedTuple):
    """What the model takes from the training data.

    Attributes:
        species: sorted atomic numbers present.
        energy_shift: per-species energy (eV), see :func:`energy_shift`.
        energy_scale: per-species scale of atomic energies (eV), the RMS force
            component times 1 Å, the same for every species (NequIP's choice).
        avg_num_neighbours: mean neighbours per atom within the cutoff.
        force_rms: RMS force component, eV/Å (the zero-force baseline's RMSE).
        warning: a message when the compositions do not determine the
            shift (a rank-deficient fit), else ``None``.
    """

    species: tuple
    energy_shift: tuple
    energy_scale: tuple
    avg_num_neighbours: float
    force_rms: float
    warning: str | None = None


def energy_shift(counts: np.ndarray, energies: np.ndarray, species: Sequence[int], e0s: dict | None = None):
    """Per-species energy shift, and a note when the data cannot fix it.

    Without isolated-atom energies: least squares of ``E ≈ counts @ shift``.
    With them (``e0s``): ``shift = E0 + b``, where ``b`` are the smallest
    (minimum-norm) per-element binding energies that fit the training
    energies relative to isolated atoms, ``E - counts @ E0 ≈ counts @ b``.
    Both are the same when the compositions determine every shift; when
    they do not (two molecules of three elements), the undetermined part
    stays at the isolated atoms instead of at zero, which is what makes
    energies transfer to other compositions.

    Args:
        counts: (n_frame, n_species) atoms of each species per frame.
        energies: (n_frame,) total energies, eV.
        e0s: isolated-atom energies ``{Z: eV}`` of the reference method, or
            ``None``.

    Returns:
        ``(shift (n_species,), note or None)``.

    Raises:
        ValueError: an element of ``species`` has no isolated-atom energy.
    """
    rank = np.linalg.matrix_rank(counts)
    if e0s is not None:
        missing = [z for z in species if z not in e0s]
        if missing:
            raise ValueError(f"no isolated-atom energy (data.e0s) for atomic numbers {missing}")
        e0 = np.array([e0s[z] for z in species])
        binding = np.linalg.lstsq(counts, energies - counts @ e0, rcond=None)[0]
        note = None if rank == len(species) else (
            f"the training compositions determine only {rank} of the {len(species)} per-element energies; "
            "the rest is anchored at the isolated atoms (energies of other compositions are extrapolated)")
        return e0 + binding, note
    shift = np.linalg.lstsq(counts, energies, rcond=None)[0]
    if rank < len(species):
        return shift, (f"warning: the training compositions determine only {rank} of the {len(species)} "
                       "per-element energy shifts: the least-squares shift is arbitrary and energies will not "
                       "transfer to other compositions; give isolated-atom energies (data.e0s)")
    return shift, None


def statistics(structures: Sequence[Structure], cutoff: float, species: Sequence[int] | None = None,
               e0s: dict | None = None) -> Statistics:
    """:class:`Statistics` of labelled structures (``e0s``: see :func:`energy_shift`).

    One pass, memory independent of the number of frames beyond a count
    row and an energy per frame (``structures`` may be a lazy source).
    """
    compositions, energies, sum_f2, n_f = [], [], 0.0, 0
    for s in structures:
        z, c = np.unique(s.atomic_numbers, return_counts=True)
        compositions.append(dict(zip(z.tolist(), c.tolist())))
        energies.append(float(s.labels["energy"]))
        sum_f2 += float(np.sum(np.square(s.labels["forces"])))
        n_f += s.labels["forces"].size
    species = tuple(sorted(set(species or [z for c in compositions for z in c])))
    counts = np.array([[c.get(z, 0) for z in species] for c in compositions], float)
    shift, warning = energy_shift(counts, np.array(energies), species, e0s)
    force_rms = float(np.sqrt(sum_f2 / n_f))
    sample = [structures[i] for i in range(min(200, len(structures)))]
    n_edges = sum(len(graph_lib.neighbours(s, cutoff)[0]) for s in sample)
    n_atoms = sum(len(s.positions) for s in sample)
    return Statistics(species, tuple(float(x) for x in shift), (force_rms,) * len(species),
                      n_edges / n_atoms, force_rms, warning)


def _to_jax(tree):
    import jax

    return jax.tree_util.tree_map(jax.numpy.asarray, tree)


class Dataset:
    """Labelled structures, neighbour lists, and padded batches of one static size.

    Args:
        structures: labelled structures: a list (neighbour lists computed
            once and kept) or a lazy source (:mod:`equijax.loader`:
            structures and neighbour lists are made when a batch is built,
            and one pass at construction records sizes and checks frames).
        cutoff: neighbour cutoff (Å).
        batch_size: structures per batch (fixed batching), or the mean
            structures per shard a budget is sized for.
        species: allowed atomic numbers.
        n_shards: each batch is ``n_shards`` equally padded graphs stacked
            on a leading axis, one per device, for data-parallel training.
        budget: ``None``: ``batch_size`` structures per step, padded for
            the largest possible shard. A :class:`equijax.loader.Budget` or
            ``"auto"`` (:func:`equijax.loader.budget_for`; fields of a
            ``Budget`` left ``None`` are sized so too): every shard
            packed with structures up to that many nodes, edges and graphs,
            padded to the budget; every structure once per epoch.

    ``pad_to`` (set at construction) and ``hessian_width`` (the largest
    structure with a Hessian label; ``None`` without any) may be raised
    afterwards, e.g. to the largest of several data sets, so that all of
    them share one compiled function. Batches carry ``globals["index"]``,
    each structure's position in ``structures``.
    """

    def __init__(self, structures: Sequence[Structure], cutoff: float, batch_size: int,
                 species: Sequence[int] | None = None, n_shards: int = 1, dtype=np.float32, budget=None):
        from equijax import loader

        self.structures = structures if not isinstance(structures, (tuple, Iterator)) else list(structures)
        self.cutoff = cutoff
        self.batch_size = batch_size
        self.n_shards = n_shards
        self.dtype = dtype
        self.lazy = not isinstance(self.structures, list)
        self.neighbour_lists = None if self.lazy else []
        atoms, edges, labels, hessian_width = [], [], set(), 0
        for s in self.structures:  # one pass: checks, sizes, label keys
            graph_lib.check_structure(s, species)
            nl = graph_lib.neighbours(s, cutoff)
            if not self.lazy:
                self.neighbour_lists.append(nl)
            atoms.append(len(s.positions))
            edges.append(len(nl[0]))
            labels.update((s.labels or {}).keys())
            if "hessian" in (s.labels or {}):
                hessian_width = max(hessian_width, len(s.positions))
        self.n_atoms, self.n_edges = np.array(atoms, np.int64), np.array(edges, np.int64)
        if budget is not None:  # "auto", or a Budget whose None fields are sized from the data
            auto = loader.budget_for(self.n_atoms, self.n_edges, -(-batch_size // n_shards))
            given = (None, None, None) if budget == "auto" else budget
            budget = loader.Budget(*(a if g is None else g for g, a in zip(given, auto)))
        self.budget = budget
        if budget is not None:
            self.pad_to = (budget.nodes + 1, budget.edges + 1, budget.graphs + 1)
        else:
            per_shard = -(-batch_size // n_shards)
            # room for the largest possible shard: one compilation for the whole run
            self.pad_to = graph_lib.pad_sizes(int(np.sort(self.n_atoms)[-per_shard:].sum()),
                                              int(np.sort(self.n_edges)[-per_shard:].sum()), per_shard)
        # labels only some structures carry (Hessian data mixed with force data): always built, with masks
        self.partial_labels = tuple(key for key in ("hessian", "dipole_derivative") if key in labels)
        self.hessian_width = hessian_width or None

    def __len__(self):
        return len(self.structures)

    def plan(self, shuffle: bool = False, seed: int = 0, drop_last: bool = False) -> list:
        """The steps of one epoch: lists of ``n_shards`` index arrays (:mod:`equijax.loader.batching`).

        With a budget every structure comes once and ``drop_last`` is moot.
        """
        from equijax import loader

        if self.budget is not None:
            return loader.budget_plan(self.n_atoms, self.n_edges, self.budget, self.n_shards, shuffle, seed)
        return loader.fixed_plan(len(self), self.batch_size, self.n_shards, shuffle, seed, drop_last)

    def num_batches(self, drop_last: bool = False) -> int:
        if self.budget is not None:
            return len(self.plan())
        n = len(self.structures)
        return n // self.batch_size if drop_last else -(-n // self.batch_size)

    def batches(self, shuffle: bool = False, seed: int = 0, drop_last: bool = False) -> Iterator:
        """Yield stacked padded graphs ``(n_shards, ...)``, each of ``self.pad_to`` sizes (JAX arrays)."""
        for step in self.plan(shuffle, seed, drop_last):
            yield _to_jax(self.build(step))

    def batch(self, idx):
        """The stacked batch of the structures ``idx``, split evenly over the shards (JAX arrays)."""
        return _to_jax(self.build(np.array_split(np.asarray(idx), self.n_shards)))

    def build(self, shards) -> "jraph.GraphsTuple":
        """Stacked padded graphs ``(len(shards), ...)``: one per list of indices in ``shards`` (NumPy arrays)."""
        graphs = []
        for part in shards:
            part = np.asarray(part, np.int64)
            if not len(part):
                graphs.append(self._with_index(self._empty(), []))
                continue
            structures = [self.structures[int(i)] for i in part]
            nls = ([graph_lib.neighbours(s, self.cutoff) for s in structures] if self.lazy
                   else [self.neighbour_lists[int(i)] for i in part])
            graphs.append(self._with_index(graph_lib.build_graph(
                structures, self.cutoff, pad_to=self.pad_to, dtype=self.dtype, neighbour_lists=nls,
                hessian_width=self.hessian_width, partial_labels=self.partial_labels, as_numpy=True), part))
        # NumPy until here: the caller moves the whole batch to the devices in one transfer
        return graph_lib.stack_graphs(graphs, as_numpy=True)

    def padding(self, shards) -> tuple[int, int, int, int]:
        """``(real nodes, padded nodes, real edges, padded edges)`` of the step ``shards``."""
        nodes = sum(int(self.n_atoms[np.asarray(p, np.int64)].sum()) for p in shards)
        edges = sum(int(self.n_edges[np.asarray(p, np.int64)].sum()) for p in shards)
        return nodes, len(shards) * self.pad_to[0], edges, len(shards) * self.pad_to[1]

    def _with_index(self, g, part):
        index = np.full(self.pad_to[2], -1, np.int32)
        index[: len(part)] = part
        return g._replace(globals={**g.globals, "index": index})

    def _empty(self):
        # an all-padding shard, for a last batch with fewer structures than shards
        s = self.structures[0]
        nl = graph_lib.neighbours(s, self.cutoff) if self.lazy else self.neighbour_lists[0]
        g = graph_lib.build_graph([s], self.cutoff, pad_to=self.pad_to, dtype=self.dtype,
                                  neighbour_lists=[nl], hessian_width=self.hessian_width,
                                  partial_labels=self.partial_labels, as_numpy=True)
        g = g._replace(nodes={**g.nodes, "mask": g.nodes["mask"] & False},
                       edges={**g.edges, "mask": g.edges["mask"] & False},
                       globals={**g.globals, "mask": g.globals["mask"] & False})
        return g
