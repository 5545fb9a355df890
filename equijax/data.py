"""Data sets: statistics for the model, and padded batches for training.

A :class:`Dataset` holds labelled structures with their neighbour lists
(computed once), and cuts them into padded graphs of fixed sizes so that a
jitted train step compiles once (:meth:`Dataset.batches`).
"""

from __future__ import annotations

from typing import Iterator, NamedTuple, Sequence

import jax.numpy as jnp
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
    """:class:`Statistics` of labelled structures (``e0s``: see :func:`energy_shift`)."""
    species = tuple(sorted(set(species or np.concatenate([s.atomic_numbers for s in structures]).tolist())))
    counts = np.array([[np.sum(s.atomic_numbers == z) for z in species] for s in structures], float)
    energies = np.array([float(s.labels["energy"]) for s in structures])
    shift, warning = energy_shift(counts, energies, species, e0s)
    forces = np.concatenate([s.labels["forces"].ravel() for s in structures])
    force_rms = float(np.sqrt(np.mean(forces**2)))
    n_edges = sum(len(graph_lib.neighbours(s, cutoff)[0]) for s in structures[:200])
    n_atoms = sum(len(s.positions) for s in structures[:200])
    return Statistics(species, tuple(float(x) for x in shift), (force_rms,) * len(species),
                      n_edges / n_atoms, force_rms, warning)


class Dataset:
    """Labelled structures, neighbour lists, and fixed-size padded batches.

    Args:
        structures: labelled structures.
        cutoff: neighbour cutoff (Å).
        batch_size: structures per batch (per device shard: see ``n_shards``).
        species: allowed atomic numbers.
        n_shards: each batch is ``n_shards`` equally padded graphs stacked
            on a leading axis, one per device, for data-parallel training.

    ``pad_to`` (set at construction to room for the largest possible
    shard) and ``hessian_width`` (the largest structure with a Hessian
    label; ``None`` without any) may be raised afterwards,
    e.g. to the largest of several data sets, so that all of them share one
    compiled function. Batches carry ``globals["index"]``, each structure's
    position in ``structures``.
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
        # labels only some structures carry (Hessian data mixed with force data): always built, with masks
        self.partial_labels = tuple(key for key in ("hessian", "dipole_derivative")
                                    if any(key in (s.labels or {}) for s in self.structures))
        with_hessians = [n for n, s in zip(atoms, self.structures) if "hessian" in (s.labels or {})]
        self.hessian_width = int(max(with_hessians)) if with_hessians else None

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
            self._with_index(graph_lib.build_graph(
                [self.structures[i] for i in part] or [], self.cutoff, pad_to=self.pad_to, dtype=self.dtype,
                neighbour_lists=[self.neighbour_lists[i] for i in part], hessian_width=self.hessian_width,
                partial_labels=self.partial_labels), part)
            if len(part) else self._with_index(self._empty(), [])
            for part in shards
        ]
        return graph_lib.stack_graphs(graphs)

    def _with_index(self, g, part):
        index = np.full(self.pad_to[2], -1, np.int32)
        index[: len(part)] = part
        return g._replace(globals={**g.globals, "index": jnp.asarray(index)})

    def _empty(self):
        # an all-padding shard, for a last batch with fewer structures than shards
        g = graph_lib.build_graph([self.structures[0]], self.cutoff, pad_to=self.pad_to, dtype=self.dtype,
                                  neighbour_lists=[self.neighbour_lists[0]], hessian_width=self.hessian_width,
                                  partial_labels=self.partial_labels)
        g = g._replace(nodes={**g.nodes, "mask": g.nodes["mask"] & False},
                       edges={**g.edges, "mask": g.edges["mask"] & False},
                       globals={**g.globals, "mask": g.globals["mask"] & False})
        return g
