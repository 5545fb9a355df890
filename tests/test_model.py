"""Physics of the NequIP potential: symmetry, padding, finite differences, smoothness."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase import Atoms

import equijax
from equijax import graph as G
from equijax import physics, testing
from structures import copper, methanol


def build(structures, cfg, **kw):
    return G.build_graph(structures, cfg.cutoff, species=cfg.species, dtype=np.float64, **kw)


@pytest.mark.parametrize("variant", [dict(), dict(parity=False), dict(l_max=0), dict(l_max=1)])
def test_equivariance_molecule(small_config, variant):
    cfg = small_config.replace(**variant)
    model = equijax.nequip(cfg)
    params = model.init(jax.random.PRNGKey(3))
    for seed in range(2):
        errs = testing.equivariance_errors(model.energy, params, methanol(seed), cfg.cutoff,
                                           key=jax.random.PRNGKey(seed), hessian=not variant)
        assert max(errs.values()) < 1e-10, errs


def test_equivariance_periodic_stress_and_hessian(small_config, small_model):
    model, params = small_model
    errs = testing.equivariance_errors(model.energy, params, copper(), small_config.cutoff)
    assert set(errs) == {"energy", "forces", "stress", "hessian"}
    assert max(errs.values()) < 1e-10, errs


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


def test_padding_and_batching_change_nothing(small_config, small_model):
    model, params = small_model
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


def test_vmap_over_stacked_graphs_and_chunked_hessian(small_config, small_model):
    model, params = small_model
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


def _central_difference(f, x, h=1e-5):
    x = np.array(x, float)
    grad = np.zeros(x.shape + np.shape(f(x)))
    for idx in np.ndindex(x.shape):
        d = np.zeros_like(x)
        d[idx] = h
        grad[idx] = (np.asarray(f(x + d)) - np.asarray(f(x - d))) / (2 * h)
    return grad


def test_forces_and_hessian_match_finite_differences(small_config, small_model):
    model, params = small_model
    atoms = methanol()
    g = build([atoms], small_config)
    n = len(atoms)
    pos = np.asarray(g.nodes["positions"])
    energy = jax.jit(lambda p: model.energy(params, physics.with_positions(g, p))[0])
    forces = jax.jit(lambda p: physics.energy_and_forces(model.energy)(params, physics.with_positions(g, p))[1])
    e, f = jax.jit(physics.energy_and_forces(model.energy))(params, g)
    fd_forces = -_central_difference(energy, pos)
    np.testing.assert_allclose(f[:n], fd_forces[:n], atol=1e-7)
    h = np.asarray(jax.jit(physics.hessian(model.energy))(params, g))
    fd_hess = -_central_difference(lambda p: forces(p)[:n], pos)[:n]  # (a, i, b, j)
    np.testing.assert_allclose(h[:n, :, :n], fd_hess, atol=1e-6)
    np.testing.assert_allclose(h, np.transpose(h, (2, 3, 0, 1)), atol=1e-12)
    np.testing.assert_allclose(np.asarray(f[:n]).sum(0), 0.0, atol=1e-12)


def test_stress_matches_finite_differences_of_strain(small_config, small_model):
    model, params = small_model
    atoms = copper()
    g = build([atoms], small_config)
    out = jax.jit(physics.energy_forces_stress(model.energy))(params, g)
    energy = jax.jit(lambda eps: model.energy(params, physics.strain(g, jnp.asarray(eps)[None].repeat(2, 0)))[0])
    fd = _central_difference(energy, np.zeros((3, 3)), h=1e-6) / atoms.get_volume()
    fd = 0.5 * (fd + fd.T)
    np.testing.assert_allclose(out.stress[0], fd, atol=1e-8)
    # and against ASE's own numerical stress through a calculator-like wrapper
    np.testing.assert_allclose(out.virial[0], -out.stress[0] * atoms.get_volume(), atol=1e-12)


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


def test_unknown_species_at_model_level(small_config, small_model):
    model, params = small_model
    with pytest.raises(ValueError, match="unknown"):
        build([Atoms("HU", positions=[[0, 0, 0], [0, 0, 1.5]])], small_config)
