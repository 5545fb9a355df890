"""Phonons of crystals from the autodiff Hessian of a supercell.

Only the columns of the atoms of one primitive cell are computed
(:func:`equijax.physics.hessian_columns`), which gives every force constant
of the crystal; the dynamical matrix at a wave vector q is their lattice
Fourier sum::

    D_ab(q) = Σ_j Φ(b_0, j) exp(i q·(R_j)) / sqrt(m_a m_b),   j in the supercell images of a

Frequencies come out in cm⁻¹ (imaginary ones negative), and ASE's band-path
tools make the band structure.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np
from ase import units

from equijax import graph as graph_lib, modes, physics

class ForceConstants(NamedTuple):
    primitive: object  # ase.Atoms
    supercell: object  # ase.Atoms, primitive * size
    size: tuple
    constants: np.ndarray  # (n_super, 3, n_prim, 3) eV/Å²: d²E/dr_j dr_{b0}
    image_of: np.ndarray  # (n_super,) index of the primitive atom each supercell atom images
    lattice_vectors: np.ndarray  # (n_super, 3) Å, R_j (supercell atom minus its primitive image)


def force_constants(model, params, primitive, size=(3, 3, 3), batch_size: int = 16) -> ForceConstants:
    """Force constants from the supercell ``primitive * size`` (atoms of cell 0 displaced)."""
    sup = primitive * tuple(size)
    n_prim = len(primitive)
    # ASE repeats cell by cell, so the first n_prim atoms are cell 0 and atom j images j % n_prim
    image_of = np.arange(len(sup)) % n_prim
    lattice = sup.positions - primitive.positions[image_of]
    g = graph_lib.build_graph([sup], model.config.cutoff, species=model.config.species,
                              dtype=np.dtype(model.config.dtype), pad_to="tight")
    cols = jax.jit(physics.hessian_columns(model.energy, tuple(range(n_prim)), batch_size))(params, g)
    return ForceConstants(primitive, sup, tuple(size), np.asarray(cols)[: len(sup)], image_of, lattice)


def dynamical_matrix(fc: ForceConstants, q_cartesian: np.ndarray) -> np.ndarray:
    """(3 n_prim, 3 n_prim) mass-weighted dynamical matrix at q (1/Å, Cartesian, with the 2π)."""
    n_prim = len(fc.primitive)
    masses = fc.primitive.get_masses()
    # minimum-image lattice vectors relative to the supercell, so that the sum is symmetric
    sup_cell = fc.supercell.cell.array
    frac = np.linalg.solve(sup_cell.T, (fc.supercell.positions[:, None, :] - fc.primitive.positions[None, :, :])
                           .reshape(-1, 3).T).T.reshape(len(fc.supercell), n_prim, 3)
    d = np.zeros((n_prim, 3, n_prim, 3), complex)
    for a in range(n_prim):
        members = np.nonzero(fc.image_of == a)[0]
        for b in range(n_prim):
            # vector from atom b of cell 0 to each image of a, wrapped into the supercell
            f = frac[members, b] - np.round(frac[members, b])
            r = f @ sup_cell - (fc.primitive.positions[a] - fc.primitive.positions[b])
            phase = np.exp(1j * (r @ q_cartesian))
            d[a, :, b, :] += np.einsum("j,jxy->xy", phase, fc.constants[members, :, b, :])
    d /= np.sqrt(np.repeat(masses, 3)[:, None] * np.repeat(masses, 3)[None, :]).reshape(n_prim, 3, n_prim, 3)
    d = d.reshape(3 * n_prim, 3 * n_prim)
    return 0.5 * (d + d.conj().T)


def frequencies(fc: ForceConstants, kpts_fractional) -> np.ndarray:
    """(n_k, 3 n_prim) phonon frequencies in cm⁻¹ at fractional reciprocal coordinates."""
    recip = 2 * np.pi * fc.primitive.cell.reciprocal().array  # rows b_i, with 2π
    out = []
    for k in np.atleast_2d(kpts_fractional):
        lam = np.linalg.eigvalsh(dynamical_matrix(fc, np.asarray(k) @ recip))
        out.append(modes.to_wavenumber(lam))
    return np.array(out)


def band_structure(fc: ForceConstants, path: str | None = None, npoints: int = 100):
    """``ase.spectrum.band_structure.BandStructure`` of the phonons (energies in meV)."""
    from ase.spectrum.band_structure import BandStructure

    bandpath = fc.primitive.cell.bandpath(path, npoints=npoints)
    freqs = frequencies(fc, bandpath.kpts)
    return BandStructure(bandpath, (freqs * units.invcm * 1000)[None])
