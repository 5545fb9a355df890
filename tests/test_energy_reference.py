"""Per-element energy references: isolated atoms make energies transfer to other compositions.

Contract: the shipped isolated-atom energies are the reference method's own;
the energy shift is anchored at them and fits the training compositions; a
composition matrix that cannot determine the shift is reported; a model
trained on ethanol + aspirin (two compositions of H, C, O) predicts
malonaldehyde (a third composition, same method) within tens of meV/atom,
not the electronvolts of an unanchored least-squares shift.
"""

import json

import jax
import numpy as np
import pytest

import equijax
from equijax import config as config_lib, data, io, training

DATA = config_lib.PACKAGE / "data"
SPECIES = (1, 6, 8)


def compositions(structures):
    counts = np.array([[np.sum(s.atomic_numbers == z) for z in SPECIES] for s in structures], float)
    return counts, np.array([float(s.labels["energy"]) for s in structures])


def per_atom_error(structures, shift):
    counts, energies = compositions(structures)
    return np.abs((counts @ shift - energies) / counts.sum(1)).mean()


def test_shipped_isolated_atom_energies_are_gfn2_xtb():
    tblite = pytest.importorskip("tblite.ase")
    from ase import Atoms

    content = json.loads((DATA / "e0s_gfn2-xtb.json").read_text())
    assert content["units"] == "eV" and set(content["energies"]) == {"H", "C", "N", "O", "F"}
    for symbol in ("H", "O"):
        atom = Atoms(symbol, positions=[[0.0, 0.0, 0.0]])
        atom.calc = tblite.TBLite(method="GFN2-xTB", verbosity=0)
        assert content["energies"][symbol] == pytest.approx(atom.get_potential_energy(), abs=1e-6)
    assert config_lib.read_e0s(DATA / "e0s_emt.json") == {29: 3.51, 28: 4.44}


def test_shift_is_anchored_at_isolated_atoms_and_rank_deficiency_is_reported():
    train = io.read(DATA / "ethanol_train.xyz", index="::10") + io.read(DATA / "aspirin_train.xyz", index="::10")
    malon = io.read(DATA / "malonaldehyde_test.xyz")
    e0s = config_lib.read_e0s(config_lib.data_paths("data/e0s_gfn2-xtb.json")[0])
    counts, energies = compositions(train)
    anchored, note = data.energy_shift(counts, energies, SPECIES, e0s)
    assert "determine only 2 of the 3" in note
    plain, warning = data.energy_shift(counts, energies, SPECIES)
    assert warning.startswith("warning:") and "data.e0s" in warning
    # both fit the training energies equally well ...
    assert per_atom_error(train, anchored) == pytest.approx(per_atom_error(train, plain), abs=1e-6)
    assert per_atom_error(train, anchored) < 0.02
    # ... but only the anchored shift transfers (the plain one is off by electronvolts per atom)
    assert per_atom_error(malon, plain) > 1.0
    assert per_atom_error(malon, anchored) < 0.1
    # with a third composition the data determine everything: both agree
    full_counts, full_energies = compositions(train + malon)
    a, note = data.energy_shift(full_counts, full_energies, SPECIES, e0s)
    b, warning = data.energy_shift(full_counts, full_energies, SPECIES)
    assert note is None and warning is None
    np.testing.assert_allclose(a, b, atol=1e-6)
    with pytest.raises(ValueError, match="no isolated-atom energy"):
        data.energy_shift(counts, energies, SPECIES, {1: -10.0})


def test_a_trained_model_transfers_to_an_unseen_composition(tmp_path):
    cfg = config_lib.load(None, [
        "data.max_train=400", "data.test=[data/ethanol_test.xyz, data/aspirin_test.xyz]",
        "model.channels=8", "model.n_layers=2", "model.radial_hidden=[16]", "model.l_max=1",
        "train.max_steps=300", "train.eval_every=100", "train.batch_size=8", "train.warmup_steps=20"])
    result = training.fit(cfg, tmp_path / "run", progress=False, log=lambda *a: None)
    model, params, _ = equijax.load(tmp_path / "run" / "model.npz")
    malon = io.read(DATA / "malonaldehyde_test.xyz", species=model.config.species)
    ds = data.Dataset(malon, model.config.cutoff, 16, model.config.species)
    transfer = training.evaluate(model.energy, params, ds)["energy_mae"]  # meV/atom
    in_distribution = result["test"]["energy_mae"]
    print(f"energy MAE: {in_distribution:.1f} meV/atom on the trained molecules, "
          f"{transfer:.1f} meV/atom on malonaldehyde")
    assert in_distribution < 80.0
    # the same order as in distribution (an unanchored least-squares shift alone is off by ~4900 meV/atom)
    assert transfer < min(100.0, 3 * in_distribution)


def test_training_starts_from_the_reference_energies():
    cfg = equijax.NequIPConfig(species=SPECIES, cutoff=4.0, l_max=1, channels=4, n_layers=1, radial_hidden=(8,),
                               energy_shift=(-13.0, -50.0, -105.0))
    model = equijax.nequip(cfg)
    params = training.initial_params(model, jax.random.PRNGKey(0))
    frames = io.read(DATA / "ethanol_test.xyz", index=":2") + io.read(DATA / "aspirin_test.xyz", index=":1")
    counts, _ = compositions(frames)
    energies = model.energy(params, equijax.build_graph(frames, cfg.cutoff, species=SPECIES))[:3]
    np.testing.assert_allclose(energies, counts @ np.array(cfg.energy_shift), rtol=1e-6)
    assert abs(float(model.energy(model.init(jax.random.PRNGKey(0)), equijax.build_graph(frames[:1], 4.0))[0])
               - counts[0] @ np.array(cfg.energy_shift)) > 1e-3  # model.init itself is random
