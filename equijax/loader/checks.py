"""Checks of labelled frames before training: what a diverged or mislabelled calculation looks like.

Reading already refuses what no model can use (non-finite positions or
labels, unknown elements, overlapping atoms: :func:`equijax.io.check_frame`).
These checks find frames that are readable but implausible:

* a force component larger than ``max_force`` (eV/Å);
* two atoms closer than ``min_distance`` (Å);
* an energy per atom far from the rest of the set: after a per-element
  linear fit of the energies (least squares, refitted without the frames it
  flags), the residual per atom lies more than ``energy_mads`` median
  absolute deviations from the median residual.

:func:`check` applies them to a data set and, as ``data.bad_frames`` says,
stops with the file, the frame and the value, warns, or leaves the frames
out (and lists them).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import vesin

from equijax.config import default

POLICIES = ("error", "warn", "skip")
#: residual spreads below this (eV/atom) are treated as this: a set of near-identical energies flags nothing
MAD_FLOOR = 1e-3


class Limits(NamedTuple):
    """What counts as implausible (the ``data`` section's keys of the same names)."""

    max_force: float = default("data.max_force")
    min_distance: float = default("data.min_distance")
    energy_mads: float = default("data.energy_outlier_mads")


class Problem(NamedTuple):
    index: int  # position in the data set
    where: str  # "file: frame k"
    reason: str  # what is wrong, with the value


def frame_problems(s, limits: Limits) -> list[str]:
    """What is implausible in one labelled structure (``[]``: nothing)."""
    out = []
    forces = (s.labels or {}).get("forces")
    if forces is not None and np.size(forces) and np.max(np.abs(forces)) > limits.max_force:
        atom = int(np.argmax(np.abs(forces).max(axis=-1)))
        out.append(f"force component {float(np.max(np.abs(forces))):.4g} eV/Å on atom {atom} is beyond "
                   f"data.max_force={limits.max_force:g} eV/Å")
    closest = _closest_pair(s, limits.min_distance)
    if closest is not None:
        out.append(f"atoms {closest[0]} and {closest[1]} are {closest[2]:.3g} Å apart, closer than "
                   f"data.min_distance={limits.min_distance:g} Å")
    return out


def _closest_pair(s, radius: float):
    """``(i, j, distance)`` of the closest pair within ``radius`` (Å), periodic images included, or ``None``."""
    pbc = np.asarray(s.pbc, bool)
    if len(s.positions) < 2 and not pbc.any():
        return None
    cell = np.asarray(s.cell, float) if pbc.any() else np.zeros((3, 3))
    i, j, d = vesin.NeighborList(cutoff=float(radius), full_list=False).compute(
        np.asarray(s.positions, float), cell, pbc if pbc.any() else False, "ijd")
    if not len(d):
        return None
    k = int(np.argmin(d))
    return int(i[k]), int(j[k]), float(d[k])


def energy_outliers(counts: np.ndarray, energies: np.ndarray, limits: Limits) -> dict:
    """``{frame: reason}`` for energies per atom that lie far from the set's (see the module docstring).

    Args:
        counts: (n_frame, n_species) atoms of each species per frame.
        energies: (n_frame,) total energies, eV.
    """
    n_atoms = counts.sum(1)
    flagged: dict = {}
    for _ in range(3):  # refit without what was flagged: one absurd frame must not hide another
        keep = np.array([k not in flagged for k in range(len(energies))])
        if keep.sum() < 2:
            break
        shift = np.linalg.lstsq(counts[keep], energies[keep], rcond=None)[0]
        residual = (energies - counts @ shift) / n_atoms
        centre = np.median(residual[keep])
        mad = max(float(np.median(np.abs(residual[keep] - centre))), MAD_FLOOR)
        far = np.abs(residual - centre) > limits.energy_mads * mad
        new = {int(k): (f"energy {energies[k]:.6g} eV is {abs(residual[k] - centre) / mad:.3g} median absolute "
                        f"deviations ({mad * 1000:.3g} meV/atom) from the set's energy per atom after a "
                        f"per-element fit (data.energy_outlier_mads={limits.energy_mads:g})")
               for k in np.nonzero(far & keep)[0]}
        if not new:
            break
        flagged.update(new)
    return flagged


def check(structures: Sequence, where, limits: Limits, policy: str = "error", log=print) -> tuple[list, list]:
    """Check every frame of ``structures``: ``(indices to train on, problems)``.

    Args:
        structures: labelled structures (a list or a lazy source: one pass).
        where: ``index -> "file: frame k"``, how messages name a frame.
        limits: the thresholds.
        policy: ``"error"``, ``"warn"`` or ``"skip"`` (``data.bad_frames``).
        log: where warnings and the list of skipped frames go.

    Raises:
        ValueError: with ``policy="error"``, naming the first bad frame and its value.
    """
    if policy not in POLICIES:
        raise ValueError(f"data.bad_frames must be one of {', '.join(POLICIES)}, got {policy!r}")
    problems, compositions, energies = [], [], []
    for k, s in enumerate(structures):
        problems += [Problem(k, where(k), reason) for reason in frame_problems(s, limits)]
        z, c = np.unique(s.atomic_numbers, return_counts=True)
        compositions.append(dict(zip(z.tolist(), c.tolist())))
        energies.append(float(s.labels["energy"]))
    species = sorted({z for c in compositions for z in c})
    counts = np.array([[c.get(z, 0) for z in species] for c in compositions], float)
    for k, reason in sorted(energy_outliers(counts, np.array(energies), limits).items()):
        problems.append(Problem(k, where(k), reason))
    problems.sort(key=lambda p: p.index)
    if problems and policy == "error":
        p = problems[0]
        raise ValueError(f"{p.where}: {p.reason} ({len(problems)} such frame(s) in all; data.bad_frames=skip "
                         "leaves them out, data.bad_frames=warn trains on them)")
    for p in problems[:10]:
        log(f"{'skipped' if policy == 'skip' else 'warning'}: {p.where}: {p.reason}")
    if len(problems) > 10:
        log(f"... and {len(problems) - 10} more such frame(s)")
    bad = {p.index for p in problems} if policy == "skip" else set()
    return [k for k in range(len(structures)) if k not in bad], problems
