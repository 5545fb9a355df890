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
