"""What a model takes from its training data: per-element energy shifts, scales, neighbour counts."""

from __future__ import annotations

from typing import NamedTuple, Sequence

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
