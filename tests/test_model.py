"""Physics of the NequIP potential: E(3) symmetry, padding, finite differences, smoothness.

Laws checked: the energy is invariant and forces, stress and Hessians are
equivariant under rotations *with inversion* (3-layer models, l_max = 2, on
chiral rattled molecules, each with a negative control that must fail),
translations and permutations; padding and batching change nothing; forces,
stress and Hessians are the derivatives of the energy (central differences
that share no code with the implementation); energies are extensive, smooth
at the cutoff, and unknown elements are never silently remapped.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase import Atoms

import equijax
from equijax import graph as G
from equijax import physics, testing
from structures import copper, methanol
import controls


def build(structures, cfg, **kw):
    return G.build_graph(structures, cfg.cutoff, species=cfg.species, dtype=np.float64, **kw)


@pytest.mark.parametrize("variant", [dict(), dict(parity=False), dict(l_max=0), dict(l_max=1)])
def test_equivariance_molecule(small_config, variant):
    cfg = small_config.replace(**variant)
    assert cfg.n_layers >= 3  # pseudoscalars reach the energy only from the third layer on
    model = equijax.nequip(cfg)
    params = model.init(jax.random.PRNGKey(3))
    atoms = methanol(0)  # rattled: chiral, so a mirror image is a different structure
    # Hessians: periodic test below, and vibrational frequencies of a chiral molecule (test_vibrations)
    errs = testing.equivariance_errors(model.energy, params, atoms, cfg.cutoff, hessian=False)
    assert max(errs.values()) < 1e-10, errs
    if not variant:  # negative controls: the same check must see a parity bug and a rotation bug
        broken = controls.parity_mislabelled(cfg)
        errs = testing.equivariance_errors(broken.energy, broken.init(jax.random.PRNGKey(3)), atoms, cfg.cutoff,
                                           hessian=False)
        assert errs["energy"] > 1e-6 and errs["forces"] > 1e-5, errs
        errs = testing.equivariance_errors(controls.rotation_broken(model.energy), params, atoms, cfg.cutoff,
                                           hessian=False)
        assert errs["energy"] > 1e-5, errs


def test_equivariance_periodic_stress_and_hessian(small_config, small_model):
    model, params = small_model
    errs = testing.equivariance_errors(model.energy, params, copper(), small_config.cutoff)
    assert set(errs) == {"energy", "forces", "stress", "hessian"}
    assert max(errs.values()) < 1e-10, errs
    errs = testing.equivariance_errors(controls.rotation_broken(model.energy), params, copper(), small_config.cutoff,
                                       hessian=False)
    assert errs["stress"] > 1e-6, errs


def test_translation_and_permutation(small_config, small_model):
    model, params = small_model
    atoms = methanol()
    ef = jax.jit(physics.energy_and_forces(model.energy))
    e0, f0 = ef(params, build([atoms], small_config))
    moved = atoms.copy()
    moved.positions += [10.0, -3.0, 0.5]
    e1, f1 = ef(params, build([moved], small_config))
    perm = np.random.default_rng(0).permutation(len(atoms))
    e2, f2 = ef(params, build([atoms[perm]], small_config))
    n = len(atoms)
    np.testing.assert_allclose(e1[0], e0[0], atol=1e-10)
    np.testing.assert_allclose(f1[:n], f0[:n], atol=1e-10)
    np.testing.assert_allclose(e2[0], e0[0], atol=1e-10)
    np.testing.assert_allclose(f2[:n], f0[:n][perm], atol=1e-10)


@pytest.fixture(scope="module")
def shallow(small_config):
    """Two layers, l_max = 1: enough for padding and batching identities, which do not depend on depth."""
    cfg = small_config.replace(n_layers=2, l_max=1)
    model = equijax.nequip(cfg)
    return cfg, model, model.init(jax.random.PRNGKey(1))


@pytest.mark.usefixtures("nan_checks")
def test_padding_and_batching_change_nothing(shallow):
    """Also: no NaN or inf anywhere in energies, forces or Hessians, padding included (checked by JAX)."""
    small_config, model, params = shallow
    a, b = methanol(0), copper(1)
    ef = jax.jit(physics.energy_and_forces(model.energy))
    hess = jax.jit(physics.hessian(model.energy))
    single_a, single_b = build([a], small_config), build([b], small_config)
    padded_a = build([a], small_config, pad_to=(40, 400, 5))
    batch = build([a, b], small_config)
    ea, fa = ef(params, single_a)
    eb, fb = ef(params, single_b)
    ep, fp = ef(params, padded_a)
    e2, f2 = ef(params, batch)
    na, nb = len(a), len(b)
    np.testing.assert_allclose(ep[0], ea[0], atol=1e-12)
    np.testing.assert_allclose(fp[:na], fa[:na], atol=1e-12)
    assert np.all(np.asarray(fp[na:]) == 0.0)  # padding atoms: exactly zero force
    np.testing.assert_allclose(e2[:2], [ea[0], eb[0]], atol=1e-12)
    np.testing.assert_allclose(f2[: na + nb], np.concatenate([fa[:na], fb[:nb]]), atol=1e-12)
    assert np.all(np.asarray(e2[2:]) == 0.0)
    h, hp = hess(params, single_a), hess(params, padded_a)
    np.testing.assert_allclose(hp[:na, :, :na], h[:na, :, :na], atol=1e-12)
    assert np.all(np.asarray(hp)[na:] == 0.0) and np.all(np.asarray(hp)[:, :, na:] == 0.0)
    hb = hess(params, batch)  # block diagonal, blocks equal to the single Hessians
    np.testing.assert_allclose(hb[:na, :, :na], h[:na, :, :na], atol=1e-12)
    assert np.all(np.abs(np.asarray(hb)[:na, :, na : na + nb]) == 0.0)


def test_vmap_over_stacked_graphs_and_chunked_hessian(shallow):
    small_config, model, params = shallow
    mols = [methanol(s) for s in range(3)]
    graphs = [build([m], small_config, pad_to=(12, 64, 2)) for m in mols]
    stacked = G.stack_graphs(graphs)
    dense = jax.jit(physics.hessian(model.energy))
    chunked = jax.jit(physics.hessian_chunked(model.energy, batch_size=5))
    energy = jax.jit(model.energy)
    hs = jax.jit(jax.vmap(physics.hessian(model.energy), in_axes=(None, 0)))(params, stacked)
    es = jax.jit(jax.vmap(model.energy, in_axes=(None, 0)))(params, stacked)
    for k, g in enumerate(graphs):
        np.testing.assert_allclose(hs[k], dense(params, g), atol=1e-12)
        np.testing.assert_allclose(es[k], energy(params, g), atol=1e-12)
        np.testing.assert_allclose(chunked(params, g), hs[k], atol=1e-12)


def test_forces_and_hessian_match_finite_differences(small_config, small_model):
    model, params = small_model
    atoms = methanol()
    g = build([atoms], small_config)
    n = len(atoms)
    pos = np.asarray(g.nodes["positions"])
    energy = jax.jit(lambda p: model.energy(params, physics.with_positions(g, p))[0])
    forces = jax.jit(lambda p: physics.energy_and_forces(model.energy)(params, physics.with_positions(g, p))[1])
    e, f = jax.jit(physics.energy_and_forces(model.energy))(params, g)
    fd_forces = -testing.central_difference(energy, pos)
    np.testing.assert_allclose(f[:n], fd_forces[:n], atol=1e-7)
    h = np.asarray(jax.jit(physics.hessian(model.energy))(params, g))
    fd_hess = -testing.central_difference(lambda p: forces(p)[:n], pos)[:n]  # (a, i, b, j)
    np.testing.assert_allclose(h[:n, :, :n], fd_hess, atol=1e-6)
    np.testing.assert_allclose(h, np.transpose(h, (2, 3, 0, 1)), atol=1e-12)
    np.testing.assert_allclose(np.asarray(f[:n]).sum(0), 0.0, atol=1e-12)


def test_stress_matches_finite_differences_of_the_cell(small_config, small_model):
    model, params = small_model
    atoms = copper()
    g0 = build([atoms], small_config)
    out = jax.jit(physics.energy_forces_stress(model.energy))(params, g0)
    energy = jax.jit(model.energy)

    def deformed(eps):  # cell and atoms deformed by ASE, not by physics.strain
        a = atoms.copy()
        a.set_cell(atoms.cell.array @ (np.eye(3) + eps), scale_atoms=True)
        return float(energy(params, build([a], small_config, pad_to=G.padded_sizes(g0)))[0])

    h = 1e-5
    fd = np.zeros((3, 3))
    for i in range(3):
        for j in range(i, 3):
            eps = np.zeros((3, 3))
            eps[i, j] = eps[j, i] = h / (1 if i == j else 2)  # a symmetric strain of size h in (i, j)
            fd[i, j] = fd[j, i] = (deformed(eps) - deformed(-eps)) / (2 * h)
    fd /= atoms.get_volume()
    np.testing.assert_allclose(out.stress[0], fd, atol=1e-8)
    np.testing.assert_allclose(out.virial[0], -out.stress[0] * atoms.get_volume(), atol=1e-12)


def test_batched_stress_equals_stress_of_each_structure(small_config, small_model):
    model, params = small_model
    stretched = copper(2)
    stretched.set_cell(stretched.cell.array * [[1.0], [1.05], [0.97]], scale_atoms=True)
    cells = [copper(0), copper(1, size=(1, 1, 2)), stretched]  # three different cells in one batch
    efs = jax.jit(physics.energy_forces_stress(model.energy))
    g = build(cells, small_config)
    batch = efs(params, g)
    for k, atoms in enumerate(cells):
        alone = efs(params, build([atoms], small_config, pad_to=G.padded_sizes(g)))
        np.testing.assert_allclose(batch.stress[k], alone.stress[0], atol=1e-12)
        np.testing.assert_allclose(batch.energy[k], alone.energy[0], atol=1e-10)
    assert np.abs(np.asarray(batch.stress[0]) - np.asarray(batch.stress[1])).max() > 1e-4  # they differ


def test_supercell_is_extensive_and_wrapping_changes_nothing(small_config, small_model):
    model, params = small_model
    cell = copper()
    energy = jax.jit(model.energy)
    e1 = energy(params, build([cell], small_config))[0]
    e8 = energy(params, build([cell * (2, 2, 2)], small_config))[0]
    np.testing.assert_allclose(e8, 8 * e1, rtol=1e-10)
    shifted = cell.copy()
    shifted.positions += shifted.cell.array.sum(0) * 0.73  # move atoms outside the cell
    wrapped = shifted.copy()
    wrapped.wrap()
    ef = jax.jit(physics.energy_forces_stress(model.energy))
    a, b = ef(params, build([shifted], small_config)), ef(params, build([wrapped], small_config))
    np.testing.assert_allclose(a.energy[0], e1, rtol=1e-10)
    np.testing.assert_allclose(b.energy[0], e1, rtol=1e-10)
    np.testing.assert_allclose(a.forces, b.forces, atol=1e-10)
    np.testing.assert_allclose(a.stress, b.stress, atol=1e-10)


def test_smooth_at_the_cutoff(small_config, small_model):
    model, params = small_model
    rc = small_config.cutoff
    ef = jax.jit(physics.energy_and_forces(model.energy))
    out = []
    for d in (rc - 1e-4, rc - 1e-6, rc + 1e-6):
        atoms = Atoms("CO", positions=[[0, 0, 0], [0, 0, d]])
        e, f = ef(params, build([atoms], small_config, pad_to=(8, 8, 2)))
        out.append((float(e[0]), np.asarray(f[:2])))
    assert abs(out[1][0] - out[2][0]) < 1e-12  # energy continuous
    assert np.abs(out[1][1] - out[2][1]).max() < 1e-10  # forces continuous
    assert np.abs(out[0][1] - out[2][1]).max() < 1e-6
    r = jnp.linspace(rc, rc + 2, 5)
    assert np.all(np.asarray(equijax.layers.radial_basis(r, 6, rc)) == 0.0)


def test_no_recompilation_for_same_padded_shapes(small_config, small_model):
    model, params = small_model
    ef = jax.jit(physics.energy_and_forces(model.energy))
    g1 = build([methanol(0), methanol(1)], small_config)
    g2 = build([methanol(2), methanol(3)], small_config, pad_to=G.padded_sizes(g1))
    ef(params, g1)
    n = ef._cache_size()
    ef(params, g2)
    assert ef._cache_size() == n == 1


def test_unknown_elements_are_never_remapped(small_config, small_model):
    model, params = small_model
    uranium = Atoms("HU", positions=[[0, 0, 0], [0, 0, 1.5]])
    with pytest.raises(ValueError, match="unknown"):
        build([uranium], small_config)  # with the model's species
    g = G.build_graph([uranium], small_config.cutoff, dtype=np.float64)  # without: U is an element
    with pytest.raises(ValueError, match=r"atomic numbers \[92\] are unknown to this model"):
        model.energy(params, g)  # eagerly: a clear error
    with jax.debug_nans(False):  # NaN is the expected answer here
        e = np.asarray(jax.jit(model.energy)(params, g))  # compiled: NaN, never another element's energy
        nitrogen = Atoms("HN", positions=[[0, 0, 0], [0, 0, 1.1]])  # N would have been clipped to H or O
        e_n = np.asarray(jax.jit(model.energy)(params, G.build_graph([nitrogen], 3.5, dtype=np.float64)))
    assert np.isnan(e[0]) and e[1] == 0.0  # the padding graph stays zero
    assert np.isnan(e_n[0])
    with pytest.raises(ValueError, match="not elements"):
        G.build_graph([Atoms(numbers=[1, 0], positions=[[0, 0, 0], [0, 0, 1.5]])], 3.5)
    from equijax.calculator import EquijaxCalculator

    uranium.calc = EquijaxCalculator(model=model, params=params)
    with pytest.raises(ValueError, match="unknown"):
        uranium.get_potential_energy()


@pytest.mark.parametrize("irreps_in", ["8x0e", "8x0e+8x0o+8x1e+8x1o+8x2e+8x2o"])
def test_mixing_of_summed_messages_keeps_the_parameter_layout(irreps_in):
    """The interaction's output mixing (grouped by irrep for speed) is the generic equivariant linear
    map of the same weights on the same numbers, so model files trained before it evaluate as trained."""
    import e3nn_jax as e3nn
    from equijax import layers

    plan = layers.conv_plan(irreps_in, "8x0e+8x0o+8x1e+8x1o+8x2e+8x2o", "1x0e+1x1o+1x2e", 8, 3, 8, (16,))
    params = layers.conv_init(jax.random.PRNGKey(1), plan, jnp.float64)["linear_out"]
    x = jax.random.normal(jax.random.PRNGKey(2), (5, plan.irreps_tp.dim, 8), jnp.float64)  # (n, path components, C)
    generic = layers.linear(params, e3nn.IrrepsArray(plan.irreps_tp, jnp.swapaxes(x, 1, 2)).axis_to_mul(),
                            plan.irreps_pre_gate)
    grouped = layers.linear_paths(params, plan, x)
    assert grouped.irreps == generic.irreps
    np.testing.assert_allclose(grouped.array, generic.array, rtol=1e-12, atol=1e-12)
