"""Data sets: statistics for the model, and padded batches for training.

A :class:`Dataset` holds labelled structures with their neighbour lists
(computed once), and cuts them into padded graphs of fixed sizes so that a
jitted train step compiles once (:meth:`Dataset.batches`).
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
        energy_shift: per-species energy (eV), least squares of
            ``E ≈ Σ_atoms shift[Z]`` over the frames.
        energy_scale: per-species scale of atomic energies (eV), the RMS force
            component times 1 Å, the same for every species (NequIP's choice).
        avg_num_neighbours: mean neighbours per atom within the cutoff.
        force_rms: RMS force component, eV/Å (the zero-force baseline's RMSE).
    """

    species: tuple
    energy_shift: tuple
    energy_scale: tuple
    avg_num_neighbours: float
    force_rms: float


def statistics(structures: Sequence[Structure], cutoff: float, species: Sequence[int] | None = None) -> Statistics:
    species = tuple(sorted(set(species or np.concatenate([s.atomic_numbers for s in structures]).tolist())))
    counts = np.array([[np.sum(s.atomic_numbers == z) for z in species] for s in structures], float)
    energies = np.array([float(s.labels["energy"]) for s in structures])
    shift = np.linalg.lstsq(counts, energies, rcond=None)[0]
    forces = np.concatenate([s.labels["forces"].ravel() for s in structures])
    force_rms = float(np.sqrt(np.mean(forces**2)))
    n_edges = sum(len(graph_lib.neighbours(s, cutoff)[0]) for s in structures[:200])
    n_atoms = sum(len(s.positions) for s in structures[:200])
    return Statistics(species, tuple(float(x) for x in shift), (force_rms,) * len(species),
                      n_edges / n_atoms, force_rms)


class Dataset:
    """Labelled structures, neighbour lists, and fixed-size padded batches.

    Args:
        structures: labelled structures.
        cutoff: neighbour cutoff (Å).
        batch_size: structures per batch (per device shard: see ``n_shards``).
        species: allowed atomic numbers.
        n_shards: each batch is ``n_shards`` equally padded graphs stacked
            on a leading axis, one per device, for data-parallel training.
    """

    def __init__(self, structures: Sequence[Structure], cutoff: float, batch_size: int,
                 species: Sequence[int] | None = None, n_shards: int = 1, dtype=np.float32):
        self.structures = list(structures)
        self.cutoff = cutoff
        self.batch_size = batch_size
        self.n_shards = n_shards
        self.dtype = dtype
        for s in self.structures:
            graph_lib.check_structure(s, species)
        self.neighbour_lists = [graph_lib.neighbours(s, cutoff) for s in self.structures]
        atoms = np.array([len(s.positions) for s in self.structures])
        edges = np.array([len(n[0]) for n in self.neighbour_lists])
        per_shard = -(-batch_size // n_shards)
        # room for the largest possible shard: one compilation for the whole run
        self.pad_to = graph_lib.pad_sizes(int(np.sort(atoms)[-per_shard:].sum()),
                                          int(np.sort(edges)[-per_shard:].sum()), per_shard)

    def __len__(self):
        return len(self.structures)

    def num_batches(self, drop_last: bool = False) -> int:
        n = len(self.structures)
        return n // self.batch_size if drop_last else -(-n // self.batch_size)

    def batches(self, shuffle: bool = False, seed: int = 0, drop_last: bool = False) -> Iterator:
        """Yield stacked padded graphs ``(n_shards, ...)``, each of ``self.pad_to`` sizes."""
        order = np.random.default_rng(seed).permutation(len(self)) if shuffle else np.arange(len(self))
        for b in range(self.num_batches(drop_last)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield self.batch(idx)

    def batch(self, idx):
        shards = np.array_split(np.asarray(idx), self.n_shards)
        graphs = [
            graph_lib.build_graph([self.structures[i] for i in part] or [], self.cutoff, pad_to=self.pad_to,
                                  dtype=self.dtype, neighbour_lists=[self.neighbour_lists[i] for i in part])
            if len(part) else self._empty()
            for part in shards
        ]
        return graph_lib.stack_graphs(graphs)

    def _empty(self):
        # an all-padding shard, for a last batch with fewer structures than shards
        g = graph_lib.build_graph([self.structures[0]], self.cutoff, pad_to=self.pad_to, dtype=self.dtype,
                                  neighbour_lists=[self.neighbour_lists[0]])
        g = g._replace(nodes={**g.nodes, "mask": g.nodes["mask"] & False},
                       edges={**g.edges, "mask": g.edges["mask"] & False},
                       globals={**g.globals, "mask": g.globals["mask"] & False})
        return g
