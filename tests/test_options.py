"""The model options that published NequIP-family models need (equijax.models.NequIPConfig), in any model.

Each option (SE(3) irreps, per-layer irreps of different multiplicities, a
linear self-connection, no residual, SiLU gates, e3nn (PyTorch)'s activation
constants, the XPLOR envelope, trained Bessel frequencies, a linear readout,
per-layer neighbour divisors) keeps the physics: rotation equivariance at
depth 3 on a chiral molecule and a periodic cell (with inversion, except for
SE(3)), forces, stress and Hessians equal to finite differences, smoothness
at the cutoff. SE(3) means what it says: a mirror image gets another energy.
The grouped message passing (input irreps of different multiplicities)
equals the uniform one where both apply.
"""

import e3nn_jax as e3nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase import Atoms

import equijax
from equijax import graph as G
from equijax import layers, physics, testing
from structures import copper, methanol

SEVENNET = dict(se3=True, irreps=("8x0e+4x1e+2x2e", "8x0e+4x1e+2x2e", "8x0e"), channels=8,
                self_connection="linear", resnet=False, gate="silu", activation_normalization="e3nn-torch",
                cutoff_function="xplor", cutoff_on=3.0, radial_frequencies="trained", readout="linear",
                avg_num_neighbours=(7.0, 8.0, 9.0), message_normalization="mean")
# the same options with parity (O(3)): both parities of l = 1, multiplicities differing
O3 = {**SEVENNET, "se3": False, "irreps": ("8x0e+2x0o+4x1o+4x1e+2x2e",) * 2 + ("8x0e",)}


@pytest.fixture(scope="module", params=["se3", "o3"])
def optioned(request, small_config):
    cfg = small_config.replace(**(SEVENNET if request.param == "se3" else O3))
    model = equijax.nequip(cfg)
    params = model.init(jax.random.PRNGKey(2))
    # trained frequencies away from n π / c, so that a test would see them ignored
    params["radial_frequencies"] = params["radial_frequencies"] * jnp.linspace(0.9, 1.1, cfg.n_radial)
    return request.param, cfg, model, params


def test_rotations_and_for_o3_inversion(optioned):
    kind, cfg, model, params = optioned
    atoms = methanol(0)  # rattled: chiral
    errs = testing.equivariance_errors(model.energy, params, atoms, cfg.cutoff, hessian=False, reflect=kind == "o3")
    assert max(errs.values()) < 1e-10, errs
    errs = testing.equivariance_errors(model.energy, params, copper(), cfg.cutoff, reflect=kind == "o3")
    assert set(errs) == {"energy", "forces", "stress", "hessian"} and max(errs.values()) < 1e-10, errs
    if kind == "se3":  # no parity: the mirror image of a chiral molecule is another molecule
        errs = testing.equivariance_errors(model.energy, params, atoms, cfg.cutoff, hessian=False, reflect=True)
        assert errs["energy"] > 1e-6, errs


def test_forces_stress_hessian_are_derivatives(optioned):
    _, cfg, model, params = optioned
    atoms = copper(1)
    g = G.build_graph([atoms], cfg.cutoff, species=cfg.species, dtype=np.float64)
    n = len(atoms)
    pos = np.asarray(g.nodes["positions"], float)
    energy = jax.jit(lambda p: model.energy(params, physics.with_positions(g, p))[0])
    efs = jax.jit(physics.energy_forces_stress(model.energy))(params, g)
    np.testing.assert_allclose(efs.forces[:n], -testing.central_difference(energy, pos)[:n], atol=1e-7)
    hvp = jax.jit(physics.hessian_vector_product(model.energy))
    v = np.zeros_like(pos)
    v[0, 2], v[1, 0] = 1.0, -0.5
    forces = jax.jit(lambda p: physics.energy_and_forces(model.energy)(params, physics.with_positions(g, p))[1])
    fd = -(np.asarray(forces(pos + 1e-5 * v)) - np.asarray(forces(pos - 1e-5 * v))) / 2e-5
    np.testing.assert_allclose(np.asarray(hvp(params, g, v))[:n], fd[:n], atol=1e-6)

    def deformed(eps):  # cell and atoms deformed by ASE
        a = atoms.copy()
        a.set_cell(atoms.cell.array @ (np.eye(3) + eps), scale_atoms=True)
        return float(jax.jit(model.energy)(params, G.build_graph([a], cfg.cutoff, species=cfg.species,
                                                                  dtype=np.float64, pad_to=G.padded_sizes(g)))[0])

    eps = np.zeros((3, 3))
    eps[0, 1] = eps[1, 0] = 0.5e-5
    fd = (deformed(eps) - deformed(-eps)) / 2e-5 / atoms.get_volume()  # a symmetric strain of size 1e-5 in (0, 1)
    np.testing.assert_allclose(efs.stress[0][0, 1], fd, atol=1e-8)


def test_smooth_at_the_cutoff_with_the_xplor_switch(optioned):
    _, cfg, model, params = optioned
    rc = cfg.cutoff
    ef = jax.jit(physics.energy_and_forces(model.energy))
    out = []
    for d in (rc - 1e-8, rc + 1e-8):  # XPLOR's slope vanishes linearly at the cutoff (NequIP's faster)
        atoms = Atoms("CO", positions=[[0, 0, 0], [0, 0, d]])
        e, f = ef(params, G.build_graph([atoms], rc, species=cfg.species, dtype=np.float64, pad_to=(8, 8, 2)))
        out.append((float(e[0]), np.asarray(f[:2])))
    assert abs(out[0][0] - out[1][0]) < 1e-12 and np.abs(out[0][1] - out[1][1]).max() < 1e-8
    r = jnp.array([1.0, 2.9, 3.2, 3.49, 3.6])  # the switch: 1 below cutoff_on, then down to 0 at the cutoff
    switch = np.asarray(layers.radial_basis(r, 4, rc, envelope="xplor", cutoff_on=3.0) / e3nn.bessel(r, 4, rc))[:, 0]
    np.testing.assert_allclose(switch[:2], 1.0, rtol=1e-12)
    assert 0 < switch[3] < switch[2] < 1 and switch[4] == 0.0


def test_grouped_message_passing_equals_the_uniform_one():
    irreps_in = e3nn.Irreps("4x0e+4x1o+4x2e")
    plan = layers.conv_plan(irreps_in, "4x0e+4x1o+4x2e", "0e+1o+2e", 4, 3, 6, (8,))
    grouped = layers._grouped_plan(irreps_in, "4x0e+4x1o+4x2e", e3nn.Irreps("0e+1o+2e"), 3, 6, (8,))
    assert not plan.groups and len(grouped.groups) == 3 and grouped.radial_sizes == plan.radial_sizes
    params = layers.conv_init(jax.random.PRNGKey(0), plan, jnp.float64)
    rng = np.random.default_rng(0)
    n_node, n_edge = 5, 12
    h = e3nn.IrrepsArray(irreps_in, jnp.asarray(rng.standard_normal((n_node, irreps_in.dim))))
    vectors = jnp.asarray(rng.standard_normal((n_edge, 3)))
    senders, receivers = jnp.asarray(rng.integers(0, n_node, n_edge)), jnp.asarray(rng.integers(0, n_node, n_edge))
    edges = layers.embed_edges(vectors, jnp.ones(n_edge, bool), senders, receivers, n_node, l_max=2, n_radial=6,
                               cutoff=4.0)
    species = jnp.asarray(rng.integers(0, 3, n_node))
    a = layers.conv(params, plan, h, species, edges, 3.0)
    b = layers.conv(params, grouped, h, species, edges, 3.0)
    assert a.irreps == b.irreps
    np.testing.assert_allclose(np.asarray(b.array), np.asarray(a.array), rtol=1e-12, atol=1e-12)
