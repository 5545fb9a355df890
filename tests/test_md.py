"""Molecular dynamics in JAX: neighbour list, energy adapter, integrators, driver, CLI.

The dynamics tests simulate a small model trained on the bundled GFN2-xTB
ethanol frames (equijax/data/ethanol_md_model.npz, made by
experiments/make_md_test_model.sh): drift and thermostat checks mean
little on a random potential surface.
"""

from pathlib import Path

import ase.io
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase import units
from ase.build import bulk, molecule

import equijax
from equijax import graph as graph_lib, md, physics, vibrations
from equijax.md import neighbours as nl, potential

MODEL = Path(equijax.__file__).parent / "data" / "ethanol_md_model.npz"
ETHANOL = Path(equijax.__file__).parent / "data" / "ethanol_test.xyz"


def host_pairs(atoms, cutoff):
    """{(i, j, rounded vector)} from vesin, the reference."""
    i, j, s = graph_lib.neighbours(graph_lib.from_ase(atoms), cutoff)
    vec = atoms.positions[j] - atoms.positions[i] + s @ atoms.cell.array
    return sorted((int(a), int(b), *np.round(v, 8)) for a, b, v in zip(i, j, vec))


def device_pairs(nbrs, atoms, cutoff, periodic):
    r, s, vec, real = nl.as_pairs(nbrs, jnp.asarray(atoms.positions), jnp.asarray(atoms.cell.array) if periodic else None,
                                  cutoff)
    return sorted((int(a), int(b), *np.round(np.asarray(v), 8)) for a, b, v, k in zip(r, s, vec, real) if k)


def random_structures():
    rng = np.random.default_rng(0)
    # a triclinic cell shorter than the cutoff in one direction (an atom sees its own images),
    # positions partly outside the cell; a cell shorter than twice the cutoff; a molecule
    small = bulk("Cu", "fcc", a=3.6)
    small.positions += rng.normal(0, 0.1, small.positions.shape) + [4.0, -7.0, 1.0]
    tri = bulk("Cu", "fcc", a=3.6, cubic=True) * (1, 2, 1)
    tri.set_cell(tri.cell.array + [[0.0, 0.0, 0.0], [1.1, 0.0, 0.0], [0.4, -0.7, 0.0]], scale_atoms=True)
    tri.positions += rng.normal(0, 0.15, tri.positions.shape)
    mol = molecule("CH3CH2OH")
    mol.positions += rng.normal(0, 0.1, mol.positions.shape)
    return [(small, True), (tri, True), (mol, False)]


@pytest.mark.parametrize("index", range(3))
def test_neighbour_list_equals_vesin_and_stays_exact_within_the_skin(index):
    atoms, periodic = random_structures()[index]
    cutoff = 3.5
    cell = atoms.cell.array if periodic else None
    spec, nbrs = nl.allocate(jnp.asarray(atoms.positions), cutoff, cell, periodic, skin=0.6)
    assert device_pairs(nbrs, atoms, cutoff, periodic) == host_pairs(atoms, cutoff)
    # move every atom by up to a quarter of the skin: no rebuild, and the list is still exact
    moved = atoms.copy()
    step = np.random.default_rng(index).normal(size=atoms.positions.shape)
    moved.positions += 0.15 * step / np.linalg.norm(step, axis=1, keepdims=True)
    update = jax.jit(nl.update, static_argnums=0)
    after = update(spec, nbrs, jnp.asarray(moved.positions), jnp.asarray(cell) if periodic else None)
    assert int(after.builds) == 1
    assert device_pairs(after, moved, cutoff, periodic) == host_pairs(moved, cutoff)
    # further: a rebuild, exact again; a list with too little room says so
    moved.positions += 0.4 * step / np.linalg.norm(step, axis=1, keepdims=True)
    after = update(spec, after, jnp.asarray(moved.positions), jnp.asarray(cell) if periodic else None)
    assert int(after.builds) == 2 and not bool(after.overflow)
    assert device_pairs(after, moved, cutoff, periodic) == host_pairs(moved, cutoff)
    found = sum(1 for _ in host_pairs(moved, spec.radius))
    cramped = nl.Spec(spec.cutoff, spec.skin, found - 1, spec.images, spec.periodic)
    build = jax.jit(nl.build, static_argnums=0)
    assert bool(build(cramped, jnp.asarray(moved.positions), jnp.asarray(cell) if periodic else None).overflow)


def test_md_energy_forces_stress_equal_the_model_on_its_own_graph_also_through_jax_md(trained):
    """In a periodic box of two ethanols, against the model on equijax's own graph: the MD force
    function on the in-JAX list (with a skin: pairs beyond the cutoff must not count), and the
    jax-md adapter on jax-md's own neighbour list (fractional coordinates, box as columns)."""
    model, params = trained["float64"]
    atoms = periodic_ethanol()
    atoms.set_cell(np.diag([8.5, 8.6, 8.7]), scale_atoms=True)  # jax-md's minimum image: box >= 2 cutoffs
    ref = jax.jit(physics.energy_forces_stress(model.energy))(
        params, equijax.build_graph([atoms], model.config.cutoff, species=model.config.species, dtype=np.float64))
    cell = jnp.asarray(atoms.cell.array)
    _, nbrs = nl.allocate(jnp.asarray(atoms.positions), model.config.cutoff, cell, True, skin=0.5)
    out = jax.jit(lambda r, nb, c: potential.force_fn(model, params, atoms.numbers)(r, nb, c))(
        jnp.asarray(atoms.positions), nbrs, cell)
    np.testing.assert_allclose(out.energy, ref.energy[0], rtol=1e-12)
    np.testing.assert_allclose(out.forces, ref.forces[: len(atoms)], atol=1e-11)
    np.testing.assert_allclose(out.stress, ref.stress[0], atol=1e-11)

    partition = pytest.importorskip("jax_md.partition")
    space = pytest.importorskip("jax_md.space")
    box = jnp.asarray(atoms.cell.array.T)  # jax-md: lattice vectors as columns
    frac = jnp.asarray(atoms.get_scaled_positions())
    displacement, _ = space.periodic_general(box, fractional_coordinates=True)
    neighbor_fn = partition.neighbor_list(displacement, box, model.config.cutoff, format=partition.Sparse,
                                          fractional_coordinates=True)
    energy = potential.jax_md_energy_fn(model, params, atoms.numbers, periodic=True)
    e, grad_frac = jax.jit(jax.value_and_grad(lambda r, nb: energy(r, neighbor=nb, box=box)))(
        frac, neighbor_fn.allocate(frac))
    np.testing.assert_allclose(e, ref.energy[0], rtol=1e-12)
    forces = -grad_frac @ np.linalg.inv(atoms.cell.array).T  # chain rule: frac = r @ inv(cell)
    np.testing.assert_allclose(forces, ref.forces[: len(atoms)], atol=1e-10)


def periodic_ethanol():
    """Two ethanol molecules in a 7.5 Å triclinic box: shorter than twice the 4 Å cutoff."""
    a, b = ethanol(0), ethanol(40)
    b.positions += [3.8, 3.2, 2.9]
    atoms = a + b
    atoms.cell = [[7.5, 0, 0], [0.8, 7.5, 0], [0.3, -0.4, 7.5]]
    atoms.pbc = True
    return atoms


@pytest.fixture(scope="module")
def trained():
    model, params, _ = equijax.load(MODEL)
    model64, params64 = vibrations.float64_model(model, params)
    return {"float32": (model, params), "float64": (model64, params64)}


def ethanol(k=0):
    return ase.io.read(ETHANOL, index=k)


def test_nve_conserves_energy(trained):
    """Velocity Verlet at 0.25 fs, 2000 steps (0.5 ps) from 300 K: the total energy's range
    stays below 2e-4 eV per atom (float32: tested through the command line below)."""
    model, params = trained["float64"]
    bound = 2e-4
    result = md.simulate(model, params, ethanol(), ensemble="nve", temperature=300, timestep=0.25, steps=2000,
                         interval=50, progress=False)
    total = result.frames.conserved[:, 0]
    assert np.ptp(total) / 9 < bound
    assert np.ptp(result.frames.potential[:, 0]) > 20 * np.ptp(total)  # and the atoms did move


def test_langevin_reaches_the_target_temperature(trained):
    """8 replicas at 500 K: the mean kinetic temperature (equilibrated) lies within 4 standard
    errors of the target, the error estimated from the spread of the replicas' means."""
    model, params = trained["float64"]
    target = 500.0
    batch = md.simulate(model, params, ethanol(), ensemble="nvt-langevin", temperature=target, timestep=0.5,
                        steps=1200, interval=20, friction=0.05, replicas=8, seed=7, progress=False)
    temps = batch.frames.temperature[10:]  # (frame, replica), after 100 fs = 5 friction times
    per_replica = temps.mean(axis=0)
    standard_error = per_replica.std(ddof=1) / np.sqrt(len(per_replica))
    assert abs(per_replica.mean() - target) < 4 * standard_error, (per_replica.mean(), standard_error)
    assert np.ptp(per_replica) > 0  # replicas are independent


def test_different_molecules_by_padding_and_nose_hoover_conserves_its_extended_energy(trained):
    model, params = trained["float64"]
    meoh = molecule("CH3OH")
    kw = dict(ensemble="nvt-nose-hoover", temperature=400, timestep=0.25, steps=600, interval=30, tau=20,
              progress=False)
    both = md.simulate(model, params, [ethanol(), meoh], seed=1, **kw)
    alone = md.simulate(model, params, meoh, seed=2, **kw)
    np.testing.assert_allclose(alone.frames.positions[:, 0], both.frames.positions[:, 1, :6], atol=1e-9)
    np.testing.assert_array_equal(both.frames.positions[:, 1, 6:], 0.0)  # padding atoms stay put
    conserved = both.frames.conserved
    assert np.all(np.ptp(conserved, axis=0) < 2e-3)
    assert np.all(np.ptp(both.frames.kinetic, axis=0) > 10 * np.ptp(conserved, axis=0))  # the thermostat acts


def test_overflow_is_recovered_without_losing_a_step(trained, tmp_path):
    """A list with room for exactly the pairs of the first frame (two ethanols in a small periodic
    box) overflows as the atoms move:
    the chunk is replayed on a larger list, and the trajectory equals a run that never overflowed."""
    model, params = trained["float64"]
    start = periodic_ethanol()
    exact = nl.count_pairs(start.positions, model.config.cutoff + nl.choose_skin(model.config.cutoff),
                           start.cell.array, True)
    kw = dict(ensemble="nvt-langevin", temperature=600, timestep=0.5, steps=200, interval=10, seed=3,
              progress=False)
    cramped = md.simulate(model, params, start, capacity=exact, output=tmp_path, **kw)
    assert cramped.reallocations >= 1 and cramped.capacity > exact
    ample = md.simulate(model, params, start, capacity=cramped.capacity, **kw)
    assert ample.reallocations == 0
    np.testing.assert_allclose(cramped.frames.positions, ample.frames.positions, atol=1e-10)
    frames = ase.io.read(tmp_path / "trajectory.extxyz", index=":")
    assert len(frames) == 20 and [f.info["step"] for f in frames] == list(range(10, 201, 10))
    np.testing.assert_allclose(frames[-1].positions, ample.frames.positions[-1, 0], atol=1e-8)


def test_a_blow_up_stops_with_a_clear_error_and_keeps_the_good_frames(trained, tmp_path):
    """2 fs steps at 3000 K tear ethanol apart: the run stops at the first bad frame,
    names the cause and step, and the trajectory holds every frame before it."""
    model, params = trained["float64"]
    with jax.debug_nans(False), jax.debug_infs(False):
        with pytest.raises(md.MDError, match=r"(NaN|temperature|flew apart).* at step (\d+)") as err:
            md.simulate(model, params, ethanol(), ensemble="nve", temperature=3000, timestep=2.0, steps=400,
                        interval=5, progress=False, output=tmp_path)
    stopped_at = int(err.value.args[0].split(" at step ")[1].split(";")[0])
    frames = ase.io.read(tmp_path / "trajectory.extxyz", index=":")
    assert len(frames) == stopped_at // 5 - 1 and frames[-1].info["step"] == stopped_at - 5
    assert all(np.isfinite(f.positions).all() for f in frames)
    assert "stopped" in (tmp_path / "summary.json").read_text()
    assert len(md.read_trajectory(tmp_path / "trajectory.extxyz")) == len(frames)  # the good frames are committed
    with pytest.raises(ValueError, match="no physical state to resume"):
        md.simulate(model, params, ethanol(), ensemble="nve", temperature=3000, timestep=2.0, steps=400,
                    interval=5, progress=False, output=tmp_path, resume=True)


def test_npt_changes_the_volume_with_the_pressure(trained):
    """Stochastic cell rescaling under 20 GPa shrinks the box (the stress itself is checked
    against the model's above)."""
    model, params = trained["float64"]
    atoms = periodic_ethanol()
    kw = dict(ensemble="npt", temperature=300, timestep=0.5, steps=100, interval=50, tau_p=50,
              compressibility=1e-5, progress=False)
    low = md.simulate(model, params, atoms, pressure=0.0, **kw)
    high = md.simulate(model, params, atoms, pressure=20.0, **kw)
    volume = lambda r: abs(np.linalg.det(r.frames.cell[-1, 0]))
    assert volume(high) < 0.99 * volume(low)
    # the logged pressure is the virial pressure of the carried state: 2 KE / 3V - tr(stress) / 3
    state = jax.tree_util.tree_map(lambda x: np.asarray(x[0]), high.state)
    kinetic = 0.5 * np.sum(state.momenta ** 2 / state.mass[:, None])
    v = abs(np.linalg.det(state.cell))
    expected = (2 * kinetic / (3 * v) - np.trace(state.stress) / 3) / units.GPa
    np.testing.assert_allclose(high.frames.pressure[-1, 0], expected, rtol=1e-10)
    assert abs(np.trace(state.stress)) > 0


def test_fire_takes_the_steps_of_ase_fire(trained):
    """40 FIRE steps in JAX land where ``ase.optimize.FIRE`` (same rules and defaults) lands."""
    from ase.optimize import FIRE

    from equijax.calculator import EquijaxCalculator

    model, params = trained["float64"]
    start = ethanol()
    result = md.simulate(model, params, start, ensemble="nve", minimize=True, fmax=0.0, minimize_steps=40,
                         steps=0, progress=False)
    atoms = start.copy()
    atoms.calc = EquijaxCalculator(model=model, params=params)
    energy_before = atoms.get_potential_energy()
    FIRE(atoms, logfile=None).run(fmax=0.0, steps=40)
    np.testing.assert_allclose(np.asarray(result.state.positions[0]), atoms.positions, atol=1e-8)
    assert atoms.get_potential_energy() < energy_before - 0.1  # it did go downhill


def test_md_command_runs_float32_nve_and_writes_a_readable_trajectory_log_and_plot(tmp_path, capsys):
    """``equijax md`` as a user runs it: the shipped float32 model, NVE at 0.25 fs for 2000 steps
    from 300 K, 2 replicas; the total energy in the log stays within 2e-3 eV/atom (float32 rounding)."""
    from equijax import cli

    cli.main(["md", str(MODEL), str(ETHANOL), "--ensemble", "nve", "--steps", "2000", "--interval", "50",
              "--timestep", "0.25", "--replicas", "2", "--output", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    assert "steps/s" in out and "ns/day" in out
    for k in range(2):
        frames = ase.io.read(tmp_path / f"trajectory_{k:03d}.extxyz", index=":")
        assert len(frames) == 40 and frames[0].get_potential_energy() < 0 and frames[0].get_forces().shape == (9, 3)
    log = np.genfromtxt(tmp_path / "md_log.csv", delimiter=",", names=True)
    assert len(log) == 80 and np.all(log["temperature_K"] > 0)
    for k in range(2):
        total = log["total_eV"][log["replica"] == k]
        assert np.ptp(total) / 9 < 2e-3
        assert np.ptp(log["potential_eV"][log["replica"] == k]) > 20 * np.ptp(total)
    assert (tmp_path / "md.png").stat().st_size > 10_000
    with pytest.raises(SystemExit) as stop:
        cli.main(["md", str(MODEL), str(ETHANOL), "--steps", "45", "--interval", "10"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1
