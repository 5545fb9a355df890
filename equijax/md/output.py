"""A simulation's files: trajectories (extxyz, one per replica), the log (CSV), the restart state, a plot.

Kill-safe by construction: a chunk's frames are formatted in memory and
appended to each file with one ``write``, then flushed to disk; only then
is ``md_state.npz`` (written atomically, :mod:`equijax.checkpoint`) updated
with the state to continue from and each file's committed length. So a kill
at any moment leaves every file ending on a complete frame, except in the
instant of an append itself, where a partial tail can remain; that tail lies
past the committed length, and :func:`read_trajectory` and ``equijax md
--resume`` (which truncates the files to their committed lengths first)
never see it.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from ase import Atoms

from equijax import checkpoint

LOG_COLUMNS = ("replica", "step", "time_fs", "potential_eV", "kinetic_eV", "total_eV", "conserved_eV",
               "temperature_K", "pressure_GPa", "volume_A3", "fmax_eV_A", "force_spread_eV_A")
STATE_NAME = "md_state.npz"
_write = os.write  # the one system call an append makes (tests tear it in the middle)
LOG_NAME = "md_log.csv"


def trajectory_names(n_replicas: int) -> list[str]:
    return ["trajectory.extxyz"] if n_replicas == 1 else [f"trajectory_{k:03d}.extxyz" for k in range(n_replicas)]


def _append(path: Path, text: str) -> int:
    """Append ``text`` in one write and flush it to disk; the file's new length."""
    data = text.encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:  # a regular file takes it whole unless the process is being killed
            view = view[_write(fd, view):]
        os.fsync(fd)
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


class Writer:
    """Trajectories, log, restart state and plot of a run, written as chunks of frames arrive.

    Args:
        folder: the run folder.
        atoms_list: one starting structure per replica (species, cell, pbc of the frames).
        ensemble: written into ``summary.json``.
        resume: the content of ``md_state.npz`` to continue from (files
            truncated to its committed lengths), or ``None`` to start anew.
    """

    def __init__(self, folder, atoms_list: Sequence[Atoms], ensemble: str, resume: dict | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.atoms = [a.copy() for a in atoms_list]
        self.ensemble = ensemble
        self.paths = [self.folder / n for n in trajectory_names(len(atoms_list))] + [self.folder / LOG_NAME]
        self.notes: list = list(resume["notes"]) if resume else []
        if resume is None:
            for p in self.paths[:-1]:
                p.write_text("")
            self.paths[-1].write_text(",".join(LOG_COLUMNS) + "\n")
        else:
            for p, n in zip(self.paths, resume["lengths"]):
                with open(p, "r+b") as f:  # drop what a kill left past the last committed chunk
                    f.truncate(int(n))
        self.lengths = [p.stat().st_size for p in self.paths]

    def note(self, text):
        self.notes.append(text)

    def append(self, frames, timestep: float) -> None:
        """Append ``frames`` (an ``equijax.md.Frames``, axes (frame, replica)) to every trajectory and the log."""
        texts = [io.StringIO() for _ in self.atoms]
        rows = []
        for f in range(len(frames.step)):
            for k, atoms in enumerate(self.atoms):
                _write_frame(texts[k], atoms, frames, f, k, timestep)
                rows.append(_log_row(frames, f, k, timestep, bool(np.all(atoms.pbc))))
        log = "".join(",".join(f"{x:.10g}" if isinstance(x, float) else str(x) for x in row) + "\n" for row in rows)
        self.lengths = [_append(p, t) for p, t in zip(self.paths, [t.getvalue() for t in texts] + [log])]

    def commit(self, state: dict) -> None:
        """Record ``state`` (what a resume continues from) with every file's length, atomically."""
        self._state = state
        checkpoint.save(self.folder / STATE_NAME, **state, lengths=list(self.lengths), notes=list(self.notes))

    def _stop(self, reason: str) -> None:
        """Commit the good frames of the chunk that stopped the run, and mark it not resumable."""
        state = getattr(self, "_state", None) or {"done": 0, "replicas": len(self.atoms)}
        checkpoint.save(self.folder / STATE_NAME, **state, lengths=list(self.lengths), notes=list(self.notes),
                        stopped=reason)

    def close(self, result=None, stopped: str | None = None):
        """``summary.json`` and the plot of the whole log."""
        summary = {"ensemble": self.ensemble, "replicas": len(self.atoms), "notes": self.notes,
                   "files": [p.name for p in self.paths] + ["md.png", STATE_NAME]}
        if result is not None:
            summary.update(steps_per_second=result.steps_per_second, ns_per_day=result.ns_per_day,
                           rate_includes_compile=result.compile_included,
                           neighbour_reallocations=result.reallocations, neighbour_capacity=result.capacity,
                           wall_seconds=result.seconds)
        if stopped is not None:
            summary["stopped"] = stopped
            self._stop(stopped)
        (self.folder / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        lines = self.paths[-1].read_text().splitlines()[1:]
        if lines:
            from equijax import plots

            rows = np.array([[float(x) for x in line.split(",")] for line in lines])
            plots.md_log(rows, self.folder / "md.png", title=f"{self.ensemble}, {len(self.atoms)} replica(s)")


def _write_frame(handle, atoms: Atoms, frames, f: int, k: int, timestep: float) -> None:
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write

    n = len(atoms)
    a = atoms.copy()
    a.positions = frames.positions[f, k, :n]
    a.set_momenta(frames.momenta[f, k, :n])
    if np.all(a.pbc):
        a.cell = frames.cell[f, k]
    a.info["step"] = int(frames.step[f, k])
    a.info["time_fs"] = float(frames.step[f, k] * timestep)
    a.calc = SinglePointCalculator(a, energy=float(frames.potential[f, k]), forces=frames.forces[f, k, :n])
    write(handle, a, format="extxyz")


def _log_row(frames, f: int, k: int, timestep: float, periodic: bool) -> tuple:
    return (k, int(frames.step[f, k]), float(frames.step[f, k] * timestep), float(frames.potential[f, k]),
            float(frames.kinetic[f, k]), float(frames.potential[f, k] + frames.kinetic[f, k]),
            float(frames.conserved[f, k]), float(frames.temperature[f, k]), float(frames.pressure[f, k]),
            float(abs(np.linalg.det(frames.cell[f, k]))) if periodic else float("nan"),
            float(frames.fmax[f, k]), float(frames.force_spread[f, k]))


def read_state(folder) -> dict:
    """The restart state of a run folder (``md_state.npz``).

    Raises:
        FileNotFoundError: the folder has none (nothing to resume).
        CheckpointError: a damaged file.
    """
    path = Path(folder) / STATE_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file: {folder} holds no run to resume (no chunk finished)")
    return checkpoint.load(path)


def read_trajectory(path, index=":"):
    """The complete frames of a trajectory written by :class:`Writer` (``ase.io.read`` semantics of ``index``).

    Frames past the length its folder's ``md_state.npz`` committed (a tail a
    kill left in the middle of an append) are not read.
    """
    import ase.io

    path = Path(path)
    text = path.read_bytes()
    if (path.parent / STATE_NAME).exists():
        state = checkpoint.load(path.parent / STATE_NAME)
        names = trajectory_names(int(state["replicas"]))
        if path.name in names:
            text = text[: int(state["lengths"][names.index(path.name)])]
    return ase.io.read(io.StringIO(text.decode()), index=index, format="extxyz")
