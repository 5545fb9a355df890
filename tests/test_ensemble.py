"""Ensembles: K members in one step equal K single steps, and their spread is honest.

Contracts: the mapped step (vmap or lax.map) gives each member exactly what
its own single-model step gives, and freezes members that stopped; a
committee's energy is the members' mean, so its forces are the mean forces;
K identical members have zero spread; an ensemble run resumes exactly after
a kill and its members differ; bad sizes are clear errors; MD can stop where
the members disagree.
"""

import json

import ase.io
import jax
import numpy as np
import pytest

import equijax
from equijax import config as config_lib, ensemble, io, physics, training, vibrations
from equijax.calculator import EquijaxCalculator

from test_training import QUIET, Killed, assert_same_run, tiny_config

DATA = config_lib.PACKAGE / "data"


@pytest.fixture(scope="module")
def batches():
    structures = io.read(DATA / "ethanol_train.xyz", index=":8")
    cfg = equijax.NequIPConfig(species=(1, 6, 8), cutoff=4.0, l_max=1, channels=4, n_layers=1, radial_hidden=(8,),
                               avg_num_neighbours=6.0, dtype="float64")
    ds = equijax.data.Dataset(structures, cfg.cutoff, 4, cfg.species, dtype=np.float64)
    return cfg, list(ds.batches(shuffle=True, seed=0))


@pytest.mark.parametrize("strategy", ["vmap", "map"])
def test_an_ensemble_step_equals_single_steps_and_freezes_stopped_members(batches, strategy):
    cfg, bs = batches
    model = equijax.nequip(cfg)
    opt = training.optimizer(1e-2, 2, 10)
    step = training.train_step(model.energy, opt)
    singles = [training.init_state(training.initial_params(model, jax.random.PRNGKey(k)), opt) for k in range(3)]
    stacked = ensemble.stack(singles)
    mapped = jax.jit(training.ensemble_train_step(step, strategy))
    single = jax.jit(step)
    active = np.array([True, False, True])  # member 1 stopped early
    for b in bs:
        stacked, metrics = mapped(stacked, b, active)
        singles = [single(s, b)[0] if a else s for s, a in zip(singles, active)]
    assert metrics["loss"].shape == (3,)
    for k in range(3):
        for x, y in zip(jax.tree_util.tree_leaves(ensemble.member(stacked, k)), jax.tree_util.tree_leaves(singles[k])):
            np.testing.assert_allclose(x, y, rtol=1e-9, atol=1e-12)
    assert int(stacked.step[1]) == 0 and int(stacked.step[0]) == len(bs)


def test_a_committee_is_the_mean_and_identical_members_have_no_spread(batches, tmp_path):
    cfg, _ = batches
    committee = equijax.nequip(cfg.replace(members=3))
    params = committee.init(jax.random.PRNGKey(0))
    assert ensemble.size(params) == 3 and committee.config.members == 3
    atoms = ase.io.read(DATA / "ethanol_test.xyz", index=0)
    atoms.calc = EquijaxCalculator(model=committee, params=params)
    forces = atoms.get_forces()
    r = dict(atoms.calc.results)
    members = []
    for k in range(3):  # every member on its own (one compilation: the calculators share it)
        single = atoms.copy()
        single.calc = EquijaxCalculator(model=committee.member, params=ensemble.member(params, k))
        members.append((single.get_potential_energy(), single.get_forces()))
    np.testing.assert_allclose(r["energy_members"], [e for e, _ in members], rtol=1e-12)
    np.testing.assert_allclose(r["energy"], np.mean(r["energy_members"]), rtol=1e-12)
    np.testing.assert_allclose(forces, np.mean([f for _, f in members], 0), atol=1e-12)
    spread = np.sqrt(((np.array([f for _, f in members]) - forces) ** 2).sum(-1).mean(0))
    np.testing.assert_allclose(r["forces_std"], spread, rtol=1e-9)
    assert r["energy_std"] > 0 and r["forces_std"].shape == (len(atoms),) and np.all(r["forces_std"] > 0)
    # the committee's own energy (what MD, relaxations and Hessians differentiate): forces = mean forces
    graph = equijax.build_graph([atoms], cfg.cutoff, species=cfg.species, dtype=np.float64)
    efs = physics.energy_forces_stress(committee.energy)(params, graph)
    np.testing.assert_allclose(efs.forces[: len(atoms)], forces, atol=1e-12)

    ase.io.write(tmp_path / "with_spread.extxyz", atoms)  # the extra results are valid for ASE's writers
    assert ase.io.read(tmp_path / "with_spread.extxyz").get_potential_energy() == pytest.approx(r["energy"])

    atoms.calc = EquijaxCalculator(model=committee, params=ensemble.stack([ensemble.member(params, 0)] * 3))
    np.testing.assert_allclose(atoms.get_forces(), members[0][1], atol=1e-12)
    assert atoms.calc.results["energy_std"] == 0.0
    np.testing.assert_array_equal(atoms.calc.results["forces_std"], np.zeros(len(atoms)))


def test_an_ensemble_run_resumes_exactly_and_its_members_differ(tmp_path):
    # a learning rate high enough that validation errors jump about: at the checkpoint of step 8 member 1
    # has not improved since step 6, and after the kill at 9 member 2 improves (step 10), so model.npz is
    # written again and must still hold member 1's parameters of step 6, which only model.npz remembers
    cfg = tiny_config(None, ensemble=3, eval_every=2, max_steps=10, learning_rate=0.6)
    training.fit(cfg, tmp_path / "full", **QUIET)
    valid = np.array([[m["forces_rmse"] + m["energy_rmse"] for m in json.loads(line)["valid_members"]]
                      for line in open(tmp_path / "full" / "metrics.jsonl")])  # (evaluation, member)
    assert valid[3, 1] > valid[:3, 1].min() and valid[4, 2] < valid[:4, 2].min()  # the premise of this test

    def kill(step, state):
        if step == 9:
            raise Killed

    with pytest.raises(Killed):
        training.fit(cfg, tmp_path / "killed", callback=kill, **QUIET)
    training.fit(cfg, tmp_path / "killed", **QUIET)
    assert_same_run(tmp_path / "full", tmp_path / "killed")

    model, params, meta = equijax.load(tmp_path / "full" / "model.npz")
    assert model.config.members == 3 and len(meta["valid"]) == 3
    emb = np.asarray(params["embedding"])
    assert emb.shape[0] == 3 and not np.allclose(emb[0], emb[1])  # different initialisations
    with pytest.raises(config_lib.ConfigError, match="ensemble of 3"):  # a resume cannot change K, even if asked
        training.fit({**cfg, "train": {**cfg["train"], "ensemble": 2}}, tmp_path / "full", accept_changes=True,
                     **QUIET)


def test_bad_ensemble_sizes_are_clear_errors(tmp_path, capsys):
    with pytest.raises(config_lib.ConfigError, match="train.ensemble must be at least 1"):
        config_lib.load(None, ["train.ensemble=0"])
    with pytest.raises(MemoryError, match=r"train.ensemble=1000000000 needs .* use train.ensemble="):
        training.fit(tiny_config(None, ensemble=10**9), tmp_path / "huge", **QUIET)
    with pytest.raises(ValueError, match="at least one member"):
        ensemble.committee(equijax.nequip(equijax.NequIPConfig()), 0)
    from equijax import cli

    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "train.ensemble=1000000000", "data.train=[data/ethanol_train.xyz]", "data.max_train=8",
                  "--output", str(tmp_path / "cli")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "use train.ensemble=" in err


def test_mode_matching_follows_eigenvectors_not_order():
    rng = np.random.default_rng(0)
    modes = np.linalg.qr(rng.normal(size=(6, 6)))[0].T
    perm = np.array([2, 0, 1, 5, 3, 4])
    noisy = modes[perm] * np.array([1, -1, 1, -1, 1, 1])[:, None] + 1e-3 * rng.normal(size=(6, 6))
    index, overlap = vibrations.match_modes(modes, noisy)
    np.testing.assert_array_equal(perm[index], np.arange(6))
    assert np.all(overlap > 0.99)


def test_md_stops_where_the_members_disagree(tmp_path):
    from equijax import md

    model, params, _ = equijax.load(DATA / "ethanol_md_model.npz")
    committee = equijax.nequip(model.config.replace(members=2))
    # a second member: the same model with its readout perturbed, so the members disagree a little
    other = jax.tree_util.tree_map(lambda x: x, params)
    other["readout"] = jax.tree_util.tree_map(lambda x: x * 1.05, params["readout"])
    stacked = ensemble.stack([params, other])
    atoms = ase.io.read(DATA / "ethanol_test.xyz", index=0)
    run = lambda **kw: md.simulate(committee, stacked, atoms, steps=40, interval=10, chunk_frames=2,  # noqa: E731
                                   output=tmp_path / "md", progress=False, **kw)
    result = run(max_force_spread=10.0)  # far above: runs to the end, and logs the spread
    spread = result.frames.force_spread
    assert spread.shape == (4, 1) and np.all(spread > 0) and np.all(spread < 10.0)
    assert "force_spread_eV_A" in (tmp_path / "md" / "md_log.csv").read_text().splitlines()[0]
    threshold = float(np.median(spread))
    with pytest.raises(md.MDError, match="force spread"):
        run(max_force_spread=threshold * 0.999)
    with pytest.warns(UserWarning, match="force spread"):
        run(max_force_spread=threshold * 0.999, on_spread="warn")
    with pytest.raises(ValueError, match="committee"):
        md.simulate(model, params, atoms, steps=10, max_force_spread=1.0, progress=False)


def test_committee_cli_reports_calibration_and_frequency_spread(batches, tmp_path, capsys):
    from equijax import checkpoint, cli

    cfg, _ = batches  # a tiny committee: the CLI paths matter here, not the numbers
    cfg = cfg.replace(members=2, dtype="float32")
    path = checkpoint.save_model(tmp_path / "committee.npz", cfg.to_dict(),
                                 equijax.nequip(cfg).init(jax.random.PRNGKey(0)))
    frames = tmp_path / "frames.xyz"
    ase.io.write(frames, ase.io.read(DATA / "ethanol_test.xyz", index=":12"))
    cli.main(["evaluate", str(path), str(frames), "--output", str(tmp_path / "eval")])
    out = capsys.readouterr().out
    assert "committee of 2 members" in out and "Spearman" in out
    assert (tmp_path / "eval" / "calibration.png").exists()
    row = json.loads((tmp_path / "eval" / "metrics.json").read_text())[0]
    assert -1 <= row["calibration"]["spearman"] <= 1 and row["calibration"]["mean_force_spread_meV_A"] > 0

    cli.main(["vibrate", str(path), str(DATA / "ethanol_test.xyz"), "--output", str(tmp_path / "vib")])
    out = capsys.readouterr().out
    assert "spread (std) of 2 committee members" in out
    members = np.loadtxt(tmp_path / "vib" / "frequencies_members_cm.txt")
    freqs = np.loadtxt(tmp_path / "vib" / "frequencies_cm.txt")
    assert members.shape == (21, 2) and np.all(np.std(members, 1) > 0)
    assert np.median(np.abs(members.mean(1) - freqs) / (np.abs(freqs) + 50)) < 0.5  # paired with the right modes
