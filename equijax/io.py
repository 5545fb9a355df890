"""Reading labelled structures: extended XYZ, rMD17-style NPZ, ASE databases.

Every reader returns a list of :class:`equijax.graph.Structure` with labels
in eV, Å, eV/Å, eV/Å³ and e·Å, and raises ``ValueError`` naming the file and
the problem for a truncated or malformed file, a missing key, unknown
elements or NaN labels.
"""

from __future__ import annotations

import bz2
import gzip
import io as io_lib
import lzma
from pathlib import Path
from typing import Sequence

import numpy as np

from equijax.graph import Structure, check_structure, from_ase

#: readers of the compressed files an extended XYZ may come in
OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}

#: keys of the rMD17 NPZ layout, and their units there
NPZ_KEYS = ("nuclear_charges", "coords", "energies", "forces")


def read(path, index: str = ":", species: Sequence[int] | None = None,
         energy_unit: float = 1.0, require=("energy", "forces")) -> list[Structure]:
    """Read labelled structures from ``path`` (format from the extension).

    Args:
        path: ``.xyz``/``.extxyz`` (ASE extended XYZ, also ``.gz``, ``.bz2``
            or ``.xz`` compressed), ``.npz`` (rMD17 layout:
            ``nuclear_charges`` (n_atom,), ``coords`` (n_frame, n_atom, 3) Å,
            ``energies`` (n_frame,), ``forces`` (n_frame, n_atom, 3)), or
            ``.db`` (ASE database).
        index: ASE-style frame selection, e.g. ``":"`` or ``"::10"``.
        species: allowed atomic numbers (others raise).
        energy_unit: factor from the file's energy unit to eV (NPZ only;
            rMD17 is in kcal/mol: pass ``ase.units.kcal / ase.units.mol``).
        require: labels every frame must carry.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a truncated or malformed file, a missing label or key,
            unknown elements, NaN or infinite values.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix in (".gz", ".bz2", ".xz") and Path(path.stem).suffix.lower() in (".xyz", ".extxyz"):
        suffix = Path(path.stem).suffix.lower()  # compressed extended XYZ: ASE decompresses as it reads
    try:
        if suffix == ".npz":
            structures = _read_npz(path, index, energy_unit)
        elif suffix in (".xyz", ".extxyz", ".db", ".json", ".traj"):
            import ase.io

            if path.suffix.lower() in OPENERS:
                # ASE seeks back and forth in the file, and every seek in a compressed stream decompresses
                # from the start (quadratic: minutes for 7000 frames): decompress once, into memory
                with OPENERS[path.suffix.lower()](path, "rt") as f:
                    frames = ase.io.read(io_lib.StringIO(f.read()), index=index, format="extxyz")
            else:
                frames = ase.io.read(path, index=index)
            structures = [from_ase(a, with_labels=True) for a in frames]
        else:
            raise ValueError(f"unknown file type {suffix!r}; use .xyz/.extxyz, .npz or .db")
    except ValueError as err:
        if str(err).startswith(str(path)):
            raise
        raise ValueError(f"{path}: malformed or truncated file ({err})") from err
    except (IndexError, KeyError, StopIteration, EOFError, OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: malformed or truncated file ({type(err).__name__}: {err})") from err
    if not structures:
        raise ValueError(f"{path}: no frames")
    for k, s in enumerate(structures):
        check_frame(s, path, k, species, require)
    return structures


def check_frame(s: Structure, path, k: int, species=None, require=("energy", "forces")) -> None:
    """Raise ``ValueError`` naming ``path`` and frame ``k`` for a missing label or a bad structure."""
    missing = [key for key in require if key not in (s.labels or {})]
    if missing:
        raise ValueError(f"{path}: frame {k} has no {', '.join(missing)} label")
    try:
        check_structure(s, species)
    except ValueError as err:
        raise ValueError(f"{path}: frame {k}: {err}") from err
    if "forces" in s.labels and s.labels["forces"].shape != s.positions.shape:
        raise ValueError(f"{path}: frame {k}: forces have shape {s.labels['forces'].shape}, "
                         f"positions {s.positions.shape}")


def _read_npz(path, index, energy_unit):
    data = np.load(path)
    missing = [k for k in NPZ_KEYS if k not in data.files]
    if missing:
        raise ValueError(f"{path}: missing key(s) {missing}; an rMD17 NPZ holds {list(NPZ_KEYS)}")
    z = np.asarray(data["nuclear_charges"], np.int32)
    coords, energies, forces = data["coords"], data["energies"], data["forces"]
    n = len(coords)
    if len(energies) != n or len(forces) != n or coords.shape[1:] != (len(z), 3) or forces.shape != coords.shape:
        raise ValueError(f"{path}: inconsistent shapes: nuclear_charges {z.shape}, coords {coords.shape}, "
                         f"energies {energies.shape}, forces {forces.shape}")
    frames = range(n)[_slice(index)]
    return [
        Structure(positions=np.asarray(coords[i], float), atomic_numbers=z,
                  labels={"energy": np.asarray(float(energies[i]) * energy_unit),
                          "forces": np.asarray(forces[i], float) * energy_unit})
        for i in frames
    ]


def _slice(index: str):
    if isinstance(index, int):
        return slice(index, index + 1)
    parts = [int(p) if p else None for p in str(index).split(":")]
    if len(parts) == 1:
        return slice(parts[0], parts[0] + 1)
    return slice(*parts)


def read_many(paths, **kwargs) -> list[Structure]:
    """Concatenate :func:`read` over several files."""
    out = []
    for p in [paths] if isinstance(paths, (str, Path)) else paths:
        out += read(p, **kwargs)
    return out
