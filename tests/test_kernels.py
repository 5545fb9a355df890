"""Message-passing backends (equijax.kernels): every backend gives the reference numbers.

On CPU cuEquivariance runs its pure-JAX fallback, which evaluates the same
segmented polynomial (our Clebsch-Gordan blocks, our path order) that its
CUDA kernel runs on GPU; agreement to ~1e-12 in float64 pins the descriptor,
so a wrong coefficient, path order or layout fails here without a GPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import equijax
from equijax import checkpoint, config as config_lib, kernels, physics, testing
from equijax import graph as G
from structures import copper, methanol

pytest.importorskip("cuequivariance_jax")


def _models(cfg):
    return {b: equijax.nequip(cfg.replace(backend=b)) for b in ("jax", "cuequivariance")}


def test_backends_give_the_same_energies_forces_stress_hessians_and_gradients(small_config):
    # two layers hold both kinds of interaction (scalar input, then every irrep in and out);
    # the pure-JAX fallback of cuEquivariance compiles slowly, so the third is left to the next test
    models = _models(small_config.replace(n_layers=2))
    params = models["jax"].init(jax.random.PRNGKey(5))
    same = jax.tree_util.tree_map(lambda a, b: bool(jnp.all(a == b)), params,
                                  models["cuequivariance"].init(jax.random.PRNGKey(5)))
    assert all(jax.tree_util.tree_leaves(same))  # parameters do not depend on the backend

    mixed = G.build_graph([methanol(1), copper(2)], small_config.cutoff, species=small_config.species,
                          dtype=np.float64)
    mol = G.build_graph([methanol(3)], small_config.cutoff, species=small_config.species, dtype=np.float64)
    v = jax.random.normal(jax.random.PRNGKey(0), mol.nodes["positions"].shape, jnp.float64)
    out = {}
    for name, model in models.items():
        def loss(p, model=model):  # the training gradient: energy and force terms
            r = physics.energy_and_forces(model.energy)(p, mixed)
            return jnp.sum(r[0] ** 2) + jnp.sum(r[1] ** 2)

        def everything(p, model=model, loss=loss):  # one program per backend: one trace and compilation
            efs = physics.energy_forces_stress(model.energy)(p, mixed)
            # second derivatives both ways: forward over reverse (H·v, how Hessians are computed) and
            # reverse over reverse (the force loss's gradient)
            return {"energy": efs.energy, "forces": efs.forces, "stress": efs.stress,
                    "hvp": physics.hessian_vector_product(model.energy)(p, mol, v), "grad": jax.grad(loss)(p)}

        out[name] = jax.jit(everything)(params)
    ref, cue = out["jax"], out["cuequivariance"]
    assert float(jnp.max(jnp.abs(ref["forces"]))) > 1e-3  # a model that does something
    for key in ref:
        for a, b in zip(jax.tree_util.tree_leaves(ref[key]), jax.tree_util.tree_leaves(cue[key])):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-10, atol=1e-11, err_msg=key)


def test_cuequivariance_backend_is_equivariant_and_conservative(small_config):
    model = equijax.nequip(small_config.replace(backend="cuequivariance"))
    params = model.init(jax.random.PRNGKey(3))
    ef = jax.jit(physics.energy_and_forces(model.energy))  # compiled once: every graph below has one padding
    # chiral molecule, 3 layers: a parity error would show (stress and Hessians equal the
    # reference's, above, whose equivariance test_model checks)
    atoms = methanol(0)
    n = len(atoms)
    g = G.build_graph([atoms], small_config.cutoff, species=small_config.species, dtype=np.float64)
    rot = testing.random_orthogonal(jax.random.PRNGKey(1), reflect=True)
    moved = testing.transform(atoms, rot, np.array([0.3, -1.1, 2.7]))
    g_moved = G.build_graph([moved], small_config.cutoff, species=small_config.species, dtype=np.float64,
                            pad_to=G.padded_sizes(g))
    (e, f), (e_moved, f_moved) = ef(params, g), ef(params, g_moved)
    assert abs(float(e_moved[0] - e[0])) < 1e-10
    np.testing.assert_allclose(np.asarray(f_moved[:n]), np.asarray(f[:n]) @ rot.T, atol=1e-10)

    pos = np.asarray(g.nodes["positions"])
    h = 1e-5
    for a, i in [(0, 0), (1, 2), (4, 1)]:
        d = np.zeros_like(pos)
        d[a, i] = h
        up, down = (float(ef(params, physics.with_positions(g, pos + s * d))[0][0]) for s in (1, -1))
        assert abs(-(up - down) / (2 * h) - float(f[a, i])) < 1e-7, (a, i)


def test_a_model_file_runs_with_either_backend(tmp_path, small_config):
    model = equijax.nequip(small_config.replace(backend="jax", n_layers=1))
    params = model.init(jax.random.PRNGKey(7))
    path = checkpoint.save_model(tmp_path / "model.npz", model.config.to_dict(), params)
    g = G.build_graph([methanol(5)], small_config.cutoff, species=small_config.species, dtype=np.float64)
    energies = {}  # each file is read with the backend asked for, or its own
    for backend in (None, "jax", "cuequivariance"):
        loaded = checkpoint.load_model(path, backend)
        assert loaded.model.config.backend == (backend or "jax")
        energies[backend] = float(jax.jit(loaded.model.energy)(loaded.params, g)[0])
    assert energies[None] == energies["jax"]
    assert abs(energies["cuequivariance"] - energies["jax"]) < 1e-11


def test_backend_choice():
    assert kernels.resolve("auto") == ("cuequivariance" if kernels.has_gpu_kernels() else "jax")
    with pytest.raises(ValueError, match="backend must be"):
        kernels.resolve("cuda")
    with pytest.raises(config_lib.ConfigError, match="backend"):
        config_lib.load(None, ["model.backend=cuda"])


def test_compile_cache_location_follows_the_environment(monkeypatch, tmp_path):
    from equijax import compile_cache

    import subprocess
    import sys

    suite_cache = jax.config.jax_compilation_cache_dir  # set aside while enable() is checked
    jax.config.update("jax_compilation_cache_dir", None)
    monkeypatch.setenv("EQUIJAX_CACHE_DIR", "off")
    try:
        assert compile_cache.default_dir() is None and compile_cache.enable() is None
    finally:
        jax.config.update("jax_compilation_cache_dir", suite_cache)
    monkeypatch.delenv("EQUIJAX_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.default_dir() == tmp_path / "xdg" / "equijax" / "xla"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert compile_cache.default_dir() == tmp_path / "home" / ".cache" / "equijax" / "xla"
    # importing equijax switches nothing on (a fresh process: this one runs the suite's cache)
    out = subprocess.run([sys.executable, "-c", "import equijax, equijax.calculator, jax; "
                          "print(jax.config.jax_compilation_cache_dir)"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None", out.stdout
