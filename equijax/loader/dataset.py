"""Data sets: labelled structures cut into padded batches of one static size.

A :class:`Dataset` holds labelled structures (in memory with their neighbour
lists, or a lazy source read from disk) and cuts them into padded graphs of
one static size so that a jitted train step compiles once
(:meth:`Dataset.batches`): a fixed number of structures per step, or as
many as a node/edge budget holds (:mod:`equijax.loader.batching`).
"""

from __future__ import annotations

import copy
from typing import Iterator, Sequence

import numpy as np

from equijax import graph as graph_lib
from equijax.graph import Structure
from equijax.loader import batching


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
        pad_to: ``(n_node, n_edge, n_graph)`` to pad every shard to at
            least (e.g. the largest of several data sets, so that all of them
            share one compiled function); default: what these data need.
        hessian_width: the width ``W`` of ``nodes["hessian"]`` rows, at
            least the largest structure with a Hessian label; default that
            (``None`` without any).
        partial_labels: labels that only some structures carry (built for
            every structure, with masks), added to those these data have.

    The sizes are fixed at construction; :meth:`with_sizes` gives a copy
    with larger ones that shares the structures and neighbour lists.
    Batches carry ``globals["index"]``, each structure's position in
    ``structures``.
    """

    def __init__(self, structures: Sequence[Structure], cutoff: float, batch_size: int,
                 species: Sequence[int] | None = None, n_shards: int = 1, dtype=np.float32, budget=None, *,
                 pad_to=None, hessian_width: int | None = None, partial_labels: Sequence[str] = ()):
        self.structures = structures if not isinstance(structures, (tuple, Iterator)) else list(structures)
        self.cutoff = cutoff
        self.batch_size = batch_size
        self.n_shards = n_shards
        self.dtype = dtype
        self.lazy = not isinstance(self.structures, list)
        self.neighbour_lists = None if self.lazy else []
        atoms, edges, labels, width = [], [], set(), hessian_width or 0
        for s in self.structures:  # one pass: checks, sizes, label keys
            graph_lib.check_structure(s, species)
            nl = graph_lib.neighbours(s, cutoff)
            if not self.lazy:
                self.neighbour_lists.append(nl)
            atoms.append(len(s.positions))
            edges.append(len(nl[0]))
            labels.update((s.labels or {}).keys())
            if "hessian" in (s.labels or {}):
                width = max(width, len(s.positions))
        self.n_atoms, self.n_edges = np.array(atoms, np.int64), np.array(edges, np.int64)
        if budget is not None:  # "auto", or a Budget whose None fields are sized from the data
            auto = batching.budget_for(self.n_atoms, self.n_edges, -(-batch_size // n_shards))
            given = (None, None, None) if budget == "auto" else budget
            budget = batching.Budget(*(a if g is None else g for g, a in zip(given, auto)))
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
        self.hessian_width = width or None
        self._raise_sizes(pad_to, None, partial_labels)

    def _raise_sizes(self, pad_to=None, hessian_width=None, partial_labels=()):
        if pad_to is not None:
            self.pad_to = tuple(max(int(a), int(b)) for a, b in zip(self.pad_to, pad_to))
        if hessian_width:
            self.hessian_width = max(self.hessian_width or 0, int(hessian_width))
        self.partial_labels = tuple(key for key in ("hessian", "dipole_derivative")
                                    if key in self.partial_labels or key in partial_labels)

    def with_sizes(self, pad_to=None, hessian_width: int | None = None, partial_labels: Sequence[str] = ()):
        """A copy padded to at least ``pad_to``, ``hessian_width`` and ``partial_labels`` (see the class),
        sharing this one's structures and neighbour lists."""
        out = copy.copy(self)
        out._raise_sizes(pad_to, hessian_width, partial_labels)
        return out

    def __len__(self):
        return len(self.structures)

    def plan(self, shuffle: bool = False, seed: int = 0, drop_last: bool = False) -> list:
        """The steps of one epoch: lists of ``n_shards`` index arrays (:mod:`equijax.loader.batching`).

        With a budget every structure comes once and ``drop_last`` is moot.
        """
        if self.budget is not None:
            return batching.budget_plan(self.n_atoms, self.n_edges, self.budget, self.n_shards, shuffle, seed)
        return batching.fixed_plan(len(self), self.batch_size, self.n_shards, shuffle, seed, drop_last)

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

    def build(self, shards):
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
