"""Small structures for the tests (built with ASE; no files needed)."""

import numpy as np
from ase import Atoms
from ase.build import bulk, molecule


def methanol(seed=0):
    """CH3OH, slightly distorted so that no symmetry hides an error."""
    atoms = molecule("CH3OH")
    atoms.rattle(0.05, seed=seed)
    return atoms


def copper(seed=0, size=(1, 1, 1)):
    """Triclinic-ish periodic Cu cell (2 atoms), rattled; 2.55 Å nearest neighbours."""
    atoms = bulk("Cu", "fcc", a=3.6, cubic=False) * (1, 1, 2)
    atoms.set_cell(atoms.cell.array + np.array([[0, 0.1, 0], [0.05, 0, 0], [0, 0, 0.1]]), scale_atoms=True)
    atoms.rattle(0.05, seed=seed)
    return atoms * size


def varied_stream(n=40, seed=0):
    """40 structures of 3-60 atoms: single molecules, small batches of molecules, Cu cells."""
    rng = np.random.default_rng(seed)
    names = ["CH4", "H2O", "C2H6", "CH3CH2OH", "C6H6", "CH3COOH", "H2CO", "CH3OH", "C2H4", "CH3CHO", "C4H4O"]
    stream = []
    for k in range(n):
        kind = k % 4
        if kind == 0:
            atoms = molecule(names[k % len(names)])
        elif kind in (1, 3):  # several molecules side by side, one structure
            atoms = molecule(names[0])
            for j, name in enumerate(rng.choice(names, 2 if kind == 1 else 5)):
                other = molecule(name)
                other.positions += [8.0 * (j + 1), 0.0, 0.0]
                atoms += other
        else:
            atoms = bulk("Cu", "fcc", a=3.6, cubic=True) * ((1, 1, 1), (2, 1, 1), (2, 2, 1), (2, 2, 2))[k // 4 % 4]
            atoms.rattle(0.02, seed=k)
        stream.append(atoms)
    return [stream[i] for i in rng.permutation(n)]
