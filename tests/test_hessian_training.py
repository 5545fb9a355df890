"""Training on Hessians: reference labels, the Hessian-vector-product loss, fine-tuning.

Contracts: the finite-difference reference Hessian is ASE's (``Vibrations``
through tblite); normal-mode samples have the harmonic thermal energy; the
loss is zero for a model labelled with its own Hessians and dipole
derivatives, blind to padding and to frames without Hessian labels, and its gradient is the finite difference of
its value; ``--init`` starts from the given model.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase import units
from ase.build import molecule

import equijax
from equijax import checkpoint, cli, config as config_lib, data, graph as graph_lib, io, physics, training, vibrations

DATA = config_lib.PACKAGE / "data"
WEIGHTS = training.LossWeights(energy=1.0, forces=10.0, dipole=1.0, hessian=0.5, dipole_derivative=2.0,
                               displacement=3.0)


@pytest.fixture(scope="module")
def frames():
    """Two ethanol frames and one aspirin frame: a batch of molecules of two sizes."""
    return (io.read(DATA / "ethanol_hessian_test.xyz.gz", index=":2", require=("hessian", "dipole_derivative"))
            + io.read(DATA / "aspirin_hessian_test.xyz.gz", index=":1", require=("hessian", "dipole_derivative")))


@pytest.fixture(scope="module")
def tiny():
    cfg = equijax.NequIPConfig(species=(1, 6, 8), cutoff=3.5, l_max=1, channels=4, n_layers=2, radial_hidden=(8,),
                               avg_num_neighbours=6.0, dtype="float64")
    model = equijax.nequip(cfg)
    params = model.init(jax.random.PRNGKey(3))
    # a non-zero charge head, so that dipole derivatives are not trivially zero
    params = jax.tree_util.tree_map(lambda x: x + 0.05 * jnp.sin(jnp.arange(x.size).reshape(x.shape)), params)
    return model, params


def _batch(structures, model, **sizes):
    ds = data.Dataset(structures, model.config.cutoff, len(structures), model.config.species, dtype=np.float64,
                      **sizes)
    return next(ds.batches())


def test_reference_hessian_is_ases_finite_difference_hessian(tmp_path):
    from ase.vibrations import Vibrations
    from tblite.ase import TBLite

    atoms = molecule("H2O")
    atoms.calc = TBLite(method="GFN2-xTB", verbosity=0)
    h, dmu = vibrations.finite_difference_hessian(atoms, delta=0.01, dipole_derivative=True)
    vib = Vibrations(atoms, delta=0.01, nfree=2, name=str(tmp_path / "vib"))
    vib.run()
    # tblite starts each SCC from the last wavefunction: differences of ~1e-3 eV/Å² (diagonal: 1-50)
    np.testing.assert_allclose(h.reshape(9, 9), vib.get_vibrations().get_hessian_2d(), atol=5e-3)
    # the dipole derivative against a direct central difference of one coordinate
    moved = [atoms.copy() for _ in range(2)]
    for a, sign in zip(moved, (1, -1)):
        a.positions[1, 2] += sign * 0.01
        a.calc = TBLite(method="GFN2-xTB", verbosity=0)
    np.testing.assert_allclose(dmu[1, 2], (moved[0].get_dipole_moment() - moved[1].get_dipole_moment()) / 0.02,
                               atol=1e-3)
    # the labels survive a compressed extended XYZ file
    frame = atoms.copy()
    frame.calc = atoms.calc
    frame.get_forces()
    from ase.calculators.singlepoint import SinglePointCalculator

    frame.calc = SinglePointCalculator(frame, **{k: atoms.calc.results[k] for k in ("energy", "forces")})
    frame.arrays["hessian"] = h.reshape(3, 27)
    frame.arrays["dipole_derivative"] = dmu.reshape(3, 9)
    import ase.io

    ase.io.write(tmp_path / "w.xyz.gz", [frame], format="extxyz")
    back = io.read(tmp_path / "w.xyz.gz", require=("hessian", "dipole_derivative"))[0]
    np.testing.assert_allclose(back.labels["hessian"], h, atol=1e-7)
    np.testing.assert_allclose(back.labels["dipole_derivative"], dmu, atol=1e-7)


def test_normal_mode_samples_have_the_harmonic_thermal_energy(frames):
    import ase

    s = frames[0]
    atoms = ase.Atoms(numbers=s.atomic_numbers, positions=s.positions)
    h = s.labels["hessian"].reshape(27, 27)
    projected, n_rigid = vibrations.project_hessian(h, atoms)
    samples = vibrations.normal_mode_samples(atoms, h, 300.0, 4000, np.random.default_rng(0))
    dx = np.array([a.positions - atoms.positions for a in samples]).reshape(len(samples), -1)
    energy = 0.5 * np.einsum("si,ij,sj->s", dx, projected, dx)
    # equipartition: kT/2 for each of the 3N - 6 vibrations (4000 samples: ~1.5% standard error)
    assert np.mean(energy) == pytest.approx(0.5 * (27 - n_rigid) * units.kB * 300.0, rel=0.05)


@pytest.fixture(scope="module")
def own(frames, tiny):
    """The frames labelled with the model's own Hessians and dipole derivatives, from one batch of all three
    (its Hessian is block diagonal)."""
    model, params = tiny
    g = graph_lib.build_graph(frames, model.config.cutoff, dtype=np.float64)
    h = np.asarray(jax.jit(physics.hessian(model.energy))(params, g))
    mu = lambda x: model.dipole(params, physics.with_positions(g, x))
    dmu = np.asarray(jax.jit(jax.jacrev(mu))(g.nodes["positions"]))  # (n_graph, 3 μ, n_node, 3 xyz)
    out, start = [], 0
    for k, s in enumerate(frames):
        atoms = slice(start, start + len(s.positions))
        out.append(s._replace(labels={**s.labels, "hessian": h[atoms, :, atoms],
                                      "dipole_derivative": dmu[k, :, atoms].transpose(1, 2, 0)}))
        start = atoms.stop
    return out


@pytest.mark.parametrize("metric", training.HESSIAN_METRICS)
def test_loss_is_zero_on_the_models_own_hessians_and_blind_to_padding(frames, tiny, own, metric):
    model, params = tiny
    term = "hessian" if metric == "cartesian" else "frequency"
    loss = jax.jit(training.loss_fn(model.energy, WEIGHTS, model.dipole, hessian_directions_k=3,
                                    hessian_metric=metric))
    key = jax.random.PRNGKey(7)
    _, m = loss(params, _batch(own, model), key)
    assert float(m[term + "_rmse"]) < 1e-9 and float(m["dipole_derivative_rmse"]) < 1e-10

    # force data mixed in: a frame without Hessian labels adds nothing to the Hessian terms
    plain = io.read(DATA / "ethanol_train.xyz", index=":1")
    terms = training.Terms(dipole=True, hessian_directions=3, dipole_derivative=True, hessian_metric=metric)
    sums = jax.jit(training.evaluator(model.energy, terms, model.dipole))(params, _batch(own + plain, model))
    assert float(sums[term + "_sq"]) < 1e-18 and float(sums["dipole_derivative_sq"]) < 1e-18
    # counted: 3N coordinates (cartesian) or 3N - 6 modes (frequency) per labelled structure and direction
    per_frame = 0 if metric == "cartesian" else 6
    assert int(sums["n_" + term]) == 3 * sum(3 * len(s.positions) - per_frame for s in own)
    assert int(sums["n_dipole_derivative"]) == 3 * 3 * len(own) and int(sums["n_graphs"]) == len(own) + 1

    _, m_real = loss(params, _batch(frames, model), key)
    assert float(m_real[term + "_rmse"]) > 1.0 and float(m_real["dipole_derivative_rmse"]) > 1e-2
    # more padding (nodes, edges, graphs, Hessian columns) and garbage in the padding: the same numbers
    big = _batch(frames, model, pad_to=(128, 2048, 6), hessian_width=30)
    pad = ~np.asarray(big.nodes["mask"])[0]
    h = np.asarray(big.nodes["hessian"]).copy()
    h[0, pad] = 1e3
    h[0, :, :, 21:] = -1e3
    big = big._replace(nodes={**big.nodes, "hessian": jnp.asarray(h)})
    _, m_big = loss(params, big, key)
    for k in m_real:  # (the normal modes come from an eigensolver of a larger matrix: rounding)
        np.testing.assert_allclose(m_big[k], m_real[k], rtol=1e-12 if metric == "cartesian" else 1e-9, err_msg=k)


def test_frequency_metric_reads_as_harmonic_frequency_errors(frames):
    """``diag(T^T δH T)`` is the first-order change of the harmonic frequencies (cm⁻¹), modes paired by index."""
    import ase

    batch = graph_lib.build_graph(frames, 5.0, dtype=np.float64)
    basis = np.asarray(training.frequency_basis(batch, floor_cm=1.0))
    rng = np.random.default_rng(0)
    start = 0
    for s in frames:
        n = len(s.positions)
        t = basis[start : start + n, :, :n].reshape(3 * n, 3 * n)[:, : 3 * n - 6]  # real modes first
        start += n
        atoms = ase.Atoms(numbers=s.atomic_numbers, positions=s.positions)
        h = s.labels["hessian"].reshape(3 * n, 3 * n)
        noise = rng.standard_normal((3 * n, 3 * n)) * 1e-5  # small: near-degenerate pairs mix at second order
        dh = noise + noise.T

        def frequencies(hessian):  # an exact eigensolve of vibrations' own projection, ascending
            w = np.repeat(1.0 / np.sqrt(atoms.get_masses()), 3)
            lam = np.linalg.eigvalsh(vibrations.project_hessian(hessian, atoms)[0] * w[:, None] * w[None, :])
            lam = lam[np.argsort(np.abs(lam))][6:]  # drop the six rigid-body zeros
            return np.sort(np.sign(lam) * np.sqrt(np.abs(lam)) * training.WAVENUMBER)

        expected = frequencies(h + dh) - frequencies(h)
        np.testing.assert_allclose(2 * np.diag(t.T @ h @ t), frequencies(h), rtol=1e-6)  # δH = H: ω/2 each
        np.testing.assert_allclose(np.diag(t.T @ dh @ t), expected, atol=2e-3 * np.abs(expected).max())
        assert np.all(np.abs(expected) > 1e-6)


def test_newton_step_inverts_the_reference_hessian():
    """At a minimum, ``H⁺ (H dx)`` is ``dx`` without its rigid-body part; zero on unlabelled frames and padding."""
    import ase

    minimum = io.read(DATA / "ethanol_hessian_train.xyz.gz", index=":1", require=("hessian",))[0]
    plain = io.read(DATA / "ethanol_train.xyz", index=":1")[0]
    batch = data.Dataset([minimum, plain], 5.0, 2, dtype=np.float64).batch([0, 1])
    batch = jax.tree_util.tree_map(lambda x: x[0], batch)
    dx = np.random.default_rng(0).standard_normal((9, 3)) * 0.01
    df = np.zeros(batch.nodes["positions"].shape)
    df[:9] = (minimum.labels["hessian"].reshape(27, 27) @ dx.ravel()).reshape(9, 3)
    df[9:] = 1.0  # the force-only frame and padding: must not leak in
    step = np.asarray(training.newton_step(batch, jnp.asarray(df), floor_cm=1.0))
    atoms = ase.Atoms(numbers=minimum.atomic_numbers, positions=minimum.positions)
    rigid = vibrations.rigid_body_basis(atoms.positions, atoms.get_masses(), False)
    m = np.repeat(np.sqrt(atoms.get_masses()), 3)
    y = m * dx.ravel()
    expected = ((y - rigid @ (rigid.T @ y)) / m).reshape(9, 3)
    np.testing.assert_allclose(step[:9], expected, atol=3e-3 * np.abs(expected).max())  # FD Hessian: rigid residue
    assert np.all(step[9:] == 0.0)


@pytest.mark.parametrize("metric", training.HESSIAN_METRICS)
def test_loss_gradient_matches_finite_differences(frames, tiny, metric):
    model, params = tiny
    batch = _batch(frames, model)
    loss = jax.jit(lambda p: training.loss_fn(model.energy, WEIGHTS, model.dipole, 2, metric)(
        p, batch, jax.random.PRNGKey(1))[0])
    grads = jax.grad(loss)(params)
    leaves, tree = jax.tree_util.tree_flatten(params)
    rng = np.random.default_rng(0)
    direction = jax.tree_util.tree_unflatten(tree, [rng.standard_normal(x.shape) for x in leaves])
    analytic = sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree_util.tree_leaves(grads),
                                                          jax.tree_util.tree_leaves(direction)))
    eps = 1e-5
    shifted = [jax.tree_util.tree_map(lambda p, d: p + s * eps * d, params, direction) for s in (1, -1)]
    numeric = (float(loss(shifted[0])) - float(loss(shifted[1]))) / (2 * eps)
    assert analytic == pytest.approx(numeric, rel=1e-6)


def test_finetune_starts_from_the_given_model(tmp_path, capsys):
    first = tmp_path / "first"
    cli.main(["train", "data.train=[data/ethanol_train.xyz]", "data.test=null", "data.max_train=8",
              "model.channels=4", "model.n_layers=1", "model.radial_hidden=[8]", "train.max_steps=2",
              "train.eval_every=2", "train.batch_size=4", "--output", str(first), "--no-progress"])
    first = first / "model.npz"
    finetuned = tmp_path / "finetuned"
    # learning rate 0: the fine-tuned model must be the initial one, whatever the config's model section says
    cli.main(["train", str(config_lib.PACKAGE / "configs" / "hessian_finetune.yaml"), "--init",
              str(first), "data.train=[data/ethanol_hessian_test.xyz.gz]",
              "data.test=[data/ethanol_hessian_test.xyz.gz]", "data.max_train=6", "model.channels=8",
              "train.max_steps=2", "train.eval_every=2", "train.batch_size=4", "train.learning_rate=0.0",
              "--output", str(finetuned),
              "--no-progress"])
    text = capsys.readouterr().out
    assert "H·v" in text and "dμ/dx·v" in text
    before, after = checkpoint.load_model(first), checkpoint.load_model(finetuned / "model.npz")
    assert after[0].config == before[0].config
    for a, b in zip(jax.tree_util.tree_leaves(after[1]), jax.tree_util.tree_leaves(before[1])):
        np.testing.assert_allclose(a, b, rtol=1e-6)  # float32 EMA of a constant: rounding only
    result = json.loads((finetuned / "result.json").read_text())
    # 6 frames cannot fill a batch of 8: a clear error, not a loop that waits forever
    with pytest.raises(SystemExit):
        cli.main(["train", str(config_lib.PACKAGE / "configs" / "hessian_finetune.yaml"), "--init",
                  str(first), "data.train=[data/ethanol_hessian_test.xyz.gz]", "data.max_train=6",
                  "--output", str(tmp_path / "small"), "--no-progress"])
    assert "fewer than train.batch_size=8" in capsys.readouterr().err
    # the recipe measures the Hessian term in normal modes (cm⁻¹) and reports the minimum shift
    assert result["test"]["frequency_mae"] > 0 and result["test"]["dipole_derivative_mae"] > 0
    assert result["test"]["displacement_mae"] > 0
