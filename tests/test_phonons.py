"""Phonons from the autodiff supercell Hessian against ASE's finite-difference Phonons."""

import os

import jax
import numpy as np
from ase.build import bulk
from ase.phonons import Phonons

import equijax
from equijax import phonons, physics
from equijax.calculator import EquijaxCalculator
from structures import methanol


def test_partial_hessian_equals_dense_columns():
    cfg = equijax.NequIPConfig(species=(1, 6, 8), cutoff=3.5, l_max=1, channels=4, n_layers=1,
                               radial_hidden=(8,), dtype="float64")
    model = equijax.nequip(cfg)
    params = model.init(jax.random.PRNGKey(0))
    g = equijax.build_graph([methanol()], cfg.cutoff, dtype=np.float64)
    dense = jax.jit(physics.hessian(model.energy))(params, g)
    cols = jax.jit(physics.hessian_columns(model.energy, (1, 4), batch_size=4))(params, g)
    np.testing.assert_allclose(cols, np.asarray(dense)[:, :, [1, 4], :], atol=1e-12)


def test_phonons_match_ase_finite_differences(tmp_path):
    cfg = equijax.NequIPConfig(species=(29,), cutoff=3.0, l_max=1, channels=4, n_layers=1, radial_hidden=(8,),
                               dtype="float64")
    model = equijax.nequip(cfg)
    params = model.init(jax.random.PRNGKey(4))
    prim = bulk("Cu", "fcc", a=3.6)
    fc = phonons.force_constants(model, params, prim, size=(3, 3, 3))
    kpts = np.array([[0, 0, 0], [0.5, 0, 0.5], [0.5, 0.5, 0.5], [0.2, 0.1, 0.0]])
    ours = phonons.frequencies(fc, kpts)
    np.testing.assert_allclose(ours[0], 0.0, atol=1e-3)  # acoustic modes at Γ (exact translation invariance)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        ph = Phonons(prim, EquijaxCalculator(model=model, params=params), supercell=(3, 3, 3), delta=1e-3)
        ph.run()
        ph.read(acoustic=False)
        ref = ph.band_structure(kpts) / 1.239842e-4  # eV -> cm⁻¹, imaginary as negative
    finally:
        os.chdir(cwd)
    np.testing.assert_allclose(np.sort(ours, axis=1), np.sort(ref.real, axis=1), atol=0.5)
    bs = phonons.band_structure(fc, "GXWKGLUWLK", npoints=20)
    assert bs.energies.shape == (1, 20, 3)
