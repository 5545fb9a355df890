"""Training: loss goes down, exact resume after a kill, sharded == single device, no recompilation."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import optax
import pytest

import equijax
from equijax import config as config_lib, data, io, training

DATA = config_lib.PACKAGE / "data"


def tiny_config(tmp_path, **train):
    cfg = config_lib.load(None, [
        "data.train=[data/ethanol_train.xyz]", "data.test=[data/ethanol_test.xyz]", "data.max_train=16",
        "data.valid_fraction=0.2", "model.channels=4", "model.n_layers=1", "model.radial_hidden=[8]",
        "model.l_max=1", "train.batch_size=4", "train.max_steps=10", "train.eval_every=4", "train.warmup_steps=2",
    ])
    cfg["train"].update(train)
    return cfg


def test_a_few_steps_reduce_the_loss():
    structures = io.read(DATA / "ethanol_train.xyz", index=":8")
    stats = data.statistics(structures, 4.0)
    cfg = equijax.NequIPConfig(species=stats.species, cutoff=4.0, l_max=1, channels=8, n_layers=2,
                               radial_hidden=(16,), energy_shift=stats.energy_shift,
                               energy_scale=stats.energy_scale, avg_num_neighbours=stats.avg_num_neighbours)
    model = equijax.nequip(cfg)
    batch = data.Dataset(structures, cfg.cutoff, 8, cfg.species).batch(np.arange(8))
    opt = optax.adam(1e-2)
    weights = training.LossWeights(energy=1.0, forces=10.0, dipole=1.0)  # dipoles: GFN2-xTB labels
    step = jax.jit(training.train_step(model.energy, opt, weights, dipole_fn=model.dipole))
    state = training.init_state(model.init(jax.random.PRNGKey(0)), opt)
    losses, dipole = [], []
    for _ in range(15):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
        dipole.append(float(m["dipole_rmse"]))
    assert losses[-1] < 0.7 * losses[0], losses
    assert dipole[-1] < dipole[0], dipole
    assert step._cache_size() == 1


def test_no_recompilation_across_batches():
    structures = io.read(DATA / "aspirin_train.xyz", index=":12") + io.read(DATA / "ethanol_train.xyz", index=":12")
    cfg = equijax.NequIPConfig(species=(1, 6, 8), l_max=1, channels=4, n_layers=1, radial_hidden=(8,))
    model = equijax.nequip(cfg)
    ds = data.Dataset(structures, cfg.cutoff, 5, cfg.species)
    shapes = set()
    opt = optax.sgd(1e-4)
    step = jax.jit(training.train_step(model.energy, opt))
    state = training.init_state(model.init(jax.random.PRNGKey(0)), opt)
    for batch in ds.batches(shuffle=True, seed=3, drop_last=True):
        shapes.add(batch.senders.shape)
        state, _ = step(state, batch)
    assert len(shapes) == 1 and step._cache_size() == 1


class Killed(Exception):
    pass


def test_resume_after_a_kill_matches_an_uninterrupted_run(tmp_path):
    cfg = tiny_config(tmp_path)
    full = training.fit(cfg, tmp_path / "full", progress=False, log=lambda *a: None)

    def kill(step, state):
        if step == 7:  # after the checkpoint at step 4, before the one at 8
            raise Killed

    with pytest.raises(Killed):
        training.fit(cfg, tmp_path / "killed", progress=False, log=lambda *a: None, callback=kill)
    assert not list((tmp_path / "killed").glob("*.tmp"))  # no partial files left behind
    resumed = training.fit(cfg, tmp_path / "killed", progress=False, log=lambda *a: None)
    a = equijax.checkpoint.load(tmp_path / "full" / "checkpoint.pkl")
    b = equijax.checkpoint.load(tmp_path / "killed" / "checkpoint.pkl")
    assert int(a["step"]) == int(b["step"]) == 10
    for x, y in zip(jax.tree_util.tree_leaves(a["params"]), jax.tree_util.tree_leaves(b["params"])):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    assert resumed["test"]["forces_mae"] == pytest.approx(full["test"]["forces_mae"], rel=1e-4)
    lines = [json.loads(l) for l in open(tmp_path / "killed" / "metrics.jsonl")]
    assert [l["step"] for l in lines] == [4, 4, 8, 10] or [l["step"] for l in lines] == [4, 8, 10]


SHARDED = textwrap.dedent("""
    import json, sys, jax, numpy as np, optax
    import equijax
    from equijax import data, io, training, config as config_lib
    structures = io.read(config_lib.PACKAGE / "data" / "ethanol_train.xyz", index=":16")
    cfg = equijax.NequIPConfig(species=(1, 6, 8), cutoff=4.0, l_max=1, channels=4, n_layers=1, radial_hidden=(8,))
    model = equijax.nequip(cfg)
    out = {}
    for n in (1, 4):
        mesh = training.data_mesh(jax.devices()[:n])
        ds = data.Dataset(structures, cfg.cutoff, 8, cfg.species, n_shards=n)
        opt = optax.adam(1e-2)
        step = jax.jit(training.train_step(model.energy, opt))
        state = training.replicate(training.init_state(model.init(jax.random.PRNGKey(0)), opt), mesh)
        losses = []
        for epoch in range(3):
            for batch in ds.batches(shuffle=True, seed=epoch):
                state, m = step(state, training.shard(batch, mesh))
                losses.append(float(m["loss"]))
        out[n] = losses
        out["devices_%d" % n] = len(state.params["embedding"].sharding.device_set)
    print(json.dumps(out))
""")


def test_sharded_training_matches_single_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["devices_4"] == 4
    np.testing.assert_allclose(out["4"], out["1"], rtol=1e-4)
    assert out["1"][-1] < out["1"][0]


@pytest.mark.parametrize("content, message", [
    ("3\nProperties=species:S:1:pos:R:3 energy=1.0\nH 0 0 0\nH 0 0 1\n", "truncated|malformed"),
    ("2\nProperties=species:S:1:pos:R:3:forces:R:3 energy=1.0\nH 0 0 0 0 0 0\nH 0 0 x 0 0 0\n", "malformed"),
    ("2\nProperties=species:S:1:pos:R:3:forces:R:3\nH 0 0 0 0 0 0\nH 0 0 1 0 0 0\n", "no energy"),
    ("2\nProperties=species:S:1:pos:R:3:forces:R:3 energy=nan\nH 0 0 0 0 0 0\nH 0 0 1 0 0 0\n", "NaN"),
    ("2\nProperties=species:S:1:pos:R:3:forces:R:3 energy=1.0\nH 0 0 0 0 0 0\nXe 0 0 1 0 0 0\n", "unknown"),
])
def test_bad_files_get_clear_errors(tmp_path, content, message):
    path = tmp_path / "bad.xyz"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        io.read(path, species=(1, 6, 8))


def test_npz_reader_and_missing_key(tmp_path):
    frames = io.read(DATA / "ethanol_train.xyz", index=":3")
    good = tmp_path / "good.npz"
    np.savez(good, nuclear_charges=frames[0].atomic_numbers, coords=np.stack([f.positions for f in frames]),
             energies=np.array([float(f.labels["energy"]) for f in frames]),
             forces=np.stack([f.labels["forces"] for f in frames]))
    back = io.read(good)
    np.testing.assert_allclose(back[2].labels["forces"], frames[2].labels["forces"])
    bad = tmp_path / "bad.npz"
    np.savez(bad, nuclear_charges=frames[0].atomic_numbers, coords=np.stack([f.positions for f in frames]))
    with pytest.raises(ValueError, match="missing key"):
        io.read(bad)
    with pytest.raises(FileNotFoundError):
        io.read(tmp_path / "nope.xyz")


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = equijax.checkpoint.save(tmp_path / "c.pkl", step=3, params={"w": np.ones(3)})
    data_bytes = path.read_bytes()
    path.write_bytes(data_bytes[: len(data_bytes) // 2])
    with pytest.raises(ValueError, match="not a readable"):
        equijax.checkpoint.load(path)
