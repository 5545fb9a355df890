"""Training: the loss goes down, a kill loses nothing, devices don't change the numbers.

Contracts: resuming after a kill (mid-epoch, or in the middle of a
checkpoint write) reproduces the uninterrupted run bit for bit and leaves no
partial file; losses are global sums over all shards, so 4 uneven shards of
mixed molecules give the single-device numbers; fixed padded shapes compile
once; bad files are clear errors.
"""

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
from equijax import checkpoint, config as config_lib, data, io, training

DATA = config_lib.PACKAGE / "data"


def tiny_config(tmp_path, **train):
    cfg = config_lib.load(None, [
        "data.train=[data/ethanol_train.xyz]", "data.test=null", "data.max_train=16",
        "data.valid_fraction=0.2", "model.channels=4", "model.n_layers=1", "model.radial_hidden=[8]",
        "model.l_max=1", "train.batch_size=4", "train.max_steps=10", "train.eval_every=4", "train.warmup_steps=2",
    ])
    cfg["train"].update(train)
    return cfg


@pytest.mark.usefixtures("nan_checks")
def test_a_few_steps_reduce_the_loss():
    """Also: no NaN or inf in a padded batch's loss, gradients or update (checked by JAX)."""
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


def assert_same_run(a_dir, b_dir):
    """Bitwise equal final checkpoints and model files, and the same metrics."""
    a, b = checkpoint.load(a_dir / "checkpoint.npz"), checkpoint.load(b_dir / "checkpoint.npz")
    np.testing.assert_array_equal(a["step"], b["step"])  # one per member for ensembles
    for key in ("params", "ema_params", "opt_state"):
        leaves_a, leaves_b = jax.tree_util.tree_leaves(a[key]), jax.tree_util.tree_leaves(b[key])
        assert len(leaves_a) == len(leaves_b)
        for x, y in zip(leaves_a, leaves_b):
            np.testing.assert_array_equal(x, y)
    for x, y in zip(jax.tree_util.tree_leaves(equijax.load(a_dir / "model.npz").params),
                    jax.tree_util.tree_leaves(equijax.load(b_dir / "model.npz").params)):
        np.testing.assert_array_equal(x, y)
    strip = lambda path: [{k: v for k, v in json.loads(l).items() if k not in ("time_s", "throughput")} for l in open(path)]  # timings differ
    assert strip(a_dir / "metrics.jsonl") == strip(b_dir / "metrics.jsonl")  # no line lost, none twice


QUIET = dict(progress=False, log=lambda *a: None)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """A tiny run without a kill: 16 frames, batches of 4 (4 steps an epoch), checkpoints at 3, 6, 9, 10."""
    folder = tmp_path_factory.mktemp("full") / "run"
    cfg = tiny_config(None, eval_every=3)
    training.fit(cfg, folder, **QUIET)
    return cfg, folder


def test_resume_after_a_kill_mid_epoch_is_bitwise_exact(tmp_path, uninterrupted):
    cfg, full = uninterrupted
    quiet = QUIET
    seen = []

    def kill(step, state):
        seen.append(step)
        if step == 7:  # the last checkpoint is step 6: resuming skips 2 batches of epoch 1
            raise Killed

    with pytest.raises(Killed):
        training.fit(cfg, tmp_path / "killed", callback=kill, **quiet)
    assert int(checkpoint.load(tmp_path / "killed" / "checkpoint.npz")["step"]) == 6
    resumed_steps = []
    training.fit(cfg, tmp_path / "killed", callback=lambda step, state: resumed_steps.append(step), **quiet)
    assert resumed_steps[0] == 7  # mid-epoch: step 6 is 1.5 epochs in
    assert_same_run(full, tmp_path / "killed")


def test_a_kill_in_the_middle_of_a_checkpoint_write_loses_nothing(tmp_path, monkeypatch, uninterrupted):
    cfg, full = uninterrupted
    quiet = QUIET
    real_savez, writes, partial = np.savez, [], []

    def dying_savez(f, **arrays):
        writes.append(b"opt_state" in arrays["__meta__"].tobytes())  # a checkpoint, not a model file
        if sum(writes) == 2:  # the second checkpoint, at step 6
            real_savez(f, **arrays)
            f.truncate(f.tell() // 2)  # half of it is on disk ...
            partial.extend((tmp_path / "killed").glob("*.tmp"))
            raise Killed  # ... when the process dies
        return real_savez(f, **arrays)

    monkeypatch.setattr(checkpoint.np, "savez", dying_savez)
    with pytest.raises(Killed):
        training.fit(cfg, tmp_path / "killed", **quiet)
    monkeypatch.undo()
    assert partial and not list((tmp_path / "killed").glob("*.tmp"))  # a partial file existed, then went
    assert int(checkpoint.load(tmp_path / "killed" / "checkpoint.npz")["step"]) == 3  # the previous one
    # a hard kill (SIGKILL) cannot clean up: its partial file is left behind
    (tmp_path / "killed" / "checkpoint.npz.x1y2.tmp").write_bytes(b"PK\x03\x04 partial")
    training.fit(cfg, tmp_path / "killed", **quiet)
    assert not list((tmp_path / "killed").glob("*.tmp"))
    assert_same_run(full, tmp_path / "killed")


SHARDED = textwrap.dedent("""
    import json, sys, jax, numpy as np, optax
    jax.config.update("jax_enable_x64", True)
    import equijax
    from equijax import data, io, training, config as config_lib
    folder = config_lib.PACKAGE / "data"
    # ethanol (9 atoms) and aspirin (21) mixed: shards of different sizes and atom counts
    structures = io.read(folder / "ethanol_train.xyz", index=":9") + io.read(folder / "aspirin_train.xyz", index=":5")
    cfg = equijax.NequIPConfig(species=(1, 6, 8), cutoff=4.0, l_max=1, channels=4, n_layers=1, radial_hidden=(8,),
                               dtype="float64")
    model = equijax.nequip(cfg)
    out = {}
    with_h = (io.read(folder / "ethanol_hessian_test.xyz.gz", index=":5", require=("hessian",))
              + io.read(folder / "aspirin_hessian_test.xyz.gz", index=":2", require=("hessian",)))
    hessian_set = {n: data.Dataset(with_h, cfg.cutoff, 4, cfg.species, n_shards=n, dtype=np.float64) for n in (1, 4)}
    for n in (1, 4):
        mesh = training.data_mesh(jax.devices()[:n])
        ds = data.Dataset(structures, cfg.cutoff, 7, cfg.species, n_shards=n, dtype=np.float64)
        opt = optax.adam(1e-2)
        step = jax.jit(training.train_step(model.energy, opt, training.LossWeights(1.0, 10.0)))
        state = training.replicate(training.init_state(model.init(jax.random.PRNGKey(0)), opt), mesh)
        losses, shards = [], []
        for epoch in range(2):
            for batch in ds.batches(shuffle=True, seed=epoch):
                shards.append(np.asarray(batch.nodes["mask"]).sum(1).tolist())
                state, m = step(state, training.shard(batch, mesh))
                losses.append(float(m["loss"]))
        out[n] = losses
        out["shard_atoms_%d" % n] = shards
        out["params_%d" % n] = [np.asarray(x).ravel()[:20].tolist() for x in jax.tree_util.tree_leaves(state.params)]
        out["devices_%d" % n] = len(state.params["embedding"].sharding.device_set)
        # an ensemble of 2 (lax.map over members) on the same mesh: members replicated, data sharded
        step2 = jax.jit(training.ensemble_train_step(training.train_step(model.energy, opt), "map"))
        states = training.replicate(equijax.ensemble.stack(
            [training.init_state(model.init(jax.random.PRNGKey(k)), opt) for k in range(2)]), mesh)
        out["ensemble_%d" % n] = []
        for batch in ds.batches(shuffle=True, seed=0):
            states, m = step2(states, training.shard(batch, mesh), np.ones(2, bool))
            out["ensemble_%d" % n].append(np.asarray(m["loss"]).tolist())
        # the Hessian-vector-product term: its random directions follow the structures, not the shards
        step_h = jax.jit(training.train_step(model.energy, opt, training.LossWeights(1.0, 10.0, hessian=0.1), 0.99,
                                             None, 2, seed=5))
        state = training.replicate(training.init_state(model.init(jax.random.PRNGKey(0)), opt), mesh)
        out["hessian_%d" % n] = []
        for batch in hessian_set[n].batches(shuffle=True, seed=0):
            state, m = step_h(state, training.shard(batch, mesh))
            out["hessian_%d" % n].append([float(m["loss"]), float(m["hessian_rmse"])])
    print(json.dumps(out))
""")


def test_sharded_training_matches_single_device_on_uneven_shards():
    env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["devices_4"] == 4
    assert any(len(set(s)) > 1 for s in out["shard_atoms_4"])  # shards of different atom counts
    np.testing.assert_allclose(out["4"], out["1"], rtol=1e-10)
    np.testing.assert_allclose(out["ensemble_4"], out["ensemble_1"], rtol=1e-10)
    np.testing.assert_allclose(out["hessian_4"], out["hessian_1"], rtol=1e-10)
    for a, b in zip(out["params_4"], out["params_1"]):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


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
