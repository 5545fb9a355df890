"""Vibrational analysis: autodiff vs finite differences, rigid-body projection, invariance.

Laws checked: harmonic frequencies from the autodiff Hessian equal ASE's
finite differences; rigid-body modes vanish after projection; frequencies
are invariant under rotation with inversion (3-layer model, chiral molecule,
with a parity-broken negative control); batched == one by one; the
symmetric stretch of CO2 is IR inactive; thermochemistry equals ASE's.
"""

import os

import jax
import numpy as np
import pytest
from ase import Atoms
from ase.build import molecule
from ase.vibrations import Vibrations

import equijax
from equijax import vibrations
from equijax.calculator import EquijaxCalculator
import controls


@pytest.fixture(scope="module")
def model_params():
    cfg = equijax.NequIPConfig(species=(1, 6, 8), cutoff=4.0, l_max=1, channels=4, n_layers=2,
                               radial_hidden=(8,), dtype="float64")
    model = equijax.nequip(cfg)
    return model, model.init(jax.random.PRNGKey(2))


def test_frequencies_match_ase_finite_differences(model_params, tmp_path):
    model, params = model_params
    atoms = molecule("CH3OH")
    atoms.rattle(0.02, seed=0)
    h = vibrations.hessian_2d(model, params, atoms)
    ours = np.sort(np.abs(np.real_if_close(vibrations.VibrationsData.from_2d(atoms, h).get_frequencies())))
    atoms.calc = EquijaxCalculator(model=model, params=params)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        vib = Vibrations(atoms, delta=1e-3, nfree=4)
        vib.run()
        fd = np.sort(np.abs(vib.get_vibrations().get_frequencies()))
    finally:
        os.chdir(cwd)
    np.testing.assert_allclose(ours, fd, atol=0.5)  # cm⁻¹


@pytest.mark.parametrize("name, n_rigid", [("CH3OH", 6), ("CO2", 5)])
def test_rigid_body_modes_vanish_after_projection(model_params, name, n_rigid):
    model, params = model_params
    atoms = molecule(name)
    result = vibrations.vibrate(model, params, atoms)
    assert result.n_rigid == n_rigid
    all_freqs = np.abs(result.vibrations.get_frequencies())
    assert np.sort(all_freqs)[:n_rigid].max() < 1e-3
    assert len(result.frequencies_cm) == 3 * len(atoms) - n_rigid


def test_frequencies_invariant_under_rotation_with_inversion(small_config, small_model):
    model, params = small_model  # 3 layers, l_max = 2, parity: the depth at which parity bugs show
    atoms = molecule("CH3OH")
    atoms.rattle(0.05, seed=3)  # chiral: its mirror image is another structure
    rotated = atoms.copy()
    rotated.rotate(73, (1, 2, 3), center="COM")
    rotated.positions = -rotated.positions  # and an inversion
    a = vibrations.vibrate(model, params, atoms).frequencies_cm
    b = vibrations.vibrate(model, params, rotated).frequencies_cm
    np.testing.assert_allclose(a, b, atol=1e-6)
    broken = controls.parity_mislabelled(small_config)  # negative control: the same check must fail
    p = broken.init(jax.random.PRNGKey(1))
    a = vibrations.vibrate(broken, p, atoms).frequencies_cm
    b = vibrations.vibrate(broken, p, rotated).frequencies_cm
    assert np.abs(a - b).max() > 1e-3


def test_chunked_equals_dense_and_thermo_matches_ase(model_params):
    model, params = model_params
    atoms = molecule("H2O")
    dense = vibrations.vibrate(model, params, atoms, relax=True, fmax=1e-4)
    chunked = vibrations.vibrate(model, params, dense.atoms, batch_size=4)
    np.testing.assert_allclose(dense.hessian, chunked.hessian, atol=1e-10)
    t = dense.thermo(300.0)
    positive = dense.frequencies_cm
    assert np.all(positive > 0)
    assert t["zpe"] == pytest.approx(0.5 * (positive * vibrations.units.invcm).sum(), rel=1e-12)
    from ase.thermochemistry import IdealGasThermo

    ref = IdealGasThermo(vib_energies=positive * vibrations.units.invcm, geometry="nonlinear",
                         potentialenergy=dense.atoms.get_potential_energy(), atoms=dense.atoms, symmetrynumber=1, spin=0)
    assert t["gibbs"] == pytest.approx(ref.get_gibbs_energy(300.0, 101325.0, verbose=False), rel=1e-10)


def test_dipole_head_and_ir_selection_rule(model_params):
    model, params = model_params
    atoms = molecule("CO2")
    g = equijax.build_graph([atoms], model.config.cutoff, dtype=np.float64)
    q = np.asarray(model.charges(params, g))[:3]
    assert abs(q.sum()) < 1e-12  # neutral by construction
    result = vibrations.vibrate(model, params, atoms, ir=True)
    freqs, modes = result.normal_modes()
    np.testing.assert_allclose(np.sort(np.abs(freqs)), np.sort(np.abs(result.frequencies_cm)), atol=1e-6)
    intensities = result.ir_intensities()
    # the symmetric stretch: both O move oppositely along the axis, C still
    axis = atoms.positions[2] - atoms.positions[1]
    axis /= np.linalg.norm(axis)
    sym = np.concatenate([np.zeros(3), -axis, axis]) / np.sqrt(2)  # order C, O, O
    overlap = np.abs(modes @ sym)
    k = int(np.argmax(overlap))
    assert overlap[k] > 0.99
    assert intensities[k] < 1e-10 * max(intensities.max(), 1e-30) or intensities[k] < 1e-12
    assert intensities.max() > 1e-6  # other modes are IR active


def test_batched_equals_one_by_one(model_params):
    model, params = model_params
    mols = [molecule("CH3OH"), molecule("H2O"), molecule("CO2")]
    mols[0].rattle(0.03, seed=1)
    many = vibrations.vibrate_many(model, params, mols, ir=True)
    for atoms, batched in zip(mols, many):
        single = vibrations.vibrate(model, params, atoms, ir=True)
        np.testing.assert_allclose(batched.hessian, single.hessian, atol=1e-10)
        np.testing.assert_allclose(batched.frequencies_cm, single.frequencies_cm, atol=1e-6)
        np.testing.assert_allclose(batched.ir_intensities(), single.ir_intensities(), atol=1e-8)
