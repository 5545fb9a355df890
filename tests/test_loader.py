"""Data at scale: budget batching, lazy reading, prefetching (``equijax.loader``).

Contract: a budget plan never puts more nodes, edges or graphs in a shard
than the budget, covers every structure exactly once per epoch and depends
only on (seed, epoch); one padded size serves a stream of varied molecules
(one compilation); a lazily read file larger than the cache gives the same
batches as the file read into memory; the prefetcher keeps order and hands
over the worker's errors; bad frames stop with the file and frame named; a
budget-batched, lazily read training run killed mid-epoch resumes exactly.
"""

import gzip

import jax
import numpy as np
import pytest

import equijax
from equijax import config as config_lib, data, io, loader, training

DATA = config_lib.PACKAGE / "data"
VARIED = ["qm9_train.xyz.gz"]


def varied():
    """QM9 molecules: 3 to 29 atoms, five elements."""
    return io.read_many([DATA / f for f in VARIED])


@pytest.mark.parametrize("n_shards", [1, 3])
def test_budget_plan_stays_within_budget_and_covers_every_structure_once(n_shards):
    rng = np.random.default_rng(0)
    n_atoms, n_edges = rng.integers(3, 40, 500), rng.integers(10, 900, 500)
    budget = loader.budget_for(n_atoms, n_edges, 8)
    plans = {}
    for seed in (0, 1):
        plan = loader.budget_plan(n_atoms, n_edges, budget, n_shards, shuffle=True, seed=seed)
        assert all(len(step) == n_shards for step in plan)
        shards = [p for step in plan for p in step]
        for p in shards:
            assert n_atoms[p].sum() <= budget.nodes and n_edges[p].sum() <= budget.edges and len(p) <= budget.graphs
        np.testing.assert_array_equal(np.sort(np.concatenate(shards)), np.arange(500))  # each exactly once
        plans[seed] = plan
    again = loader.budget_plan(n_atoms, n_edges, budget, n_shards, shuffle=True, seed=1)
    assert all(np.array_equal(a, b) for s, t in zip(plans[1], again) for a, b in zip(s, t))  # (seed, epoch) only
    assert not all(np.array_equal(a, b) for s, t in zip(plans[0], plans[1]) for a, b in zip(s, t))
    with pytest.raises(ValueError, match="exceeds the batch budget"):
        loader.pack(np.arange(3), np.array([3, 50, 3]), np.array([9, 9, 9]), loader.Budget(40, 100, 4))


def test_one_compilation_for_a_stream_of_varied_molecules_and_high_fill():
    structures = varied()
    model = equijax.nequip(equijax.NequIPConfig(species=(1, 6, 7, 8, 9), l_max=1, channels=4, n_layers=1,
                                                radial_hidden=(8,)))
    params = model.init(jax.random.PRNGKey(0))
    ds = data.Dataset(structures, model.config.cutoff, 8, model.config.species, budget="auto")
    traces = []

    @jax.jit
    def energy(params, graph):
        traces.append(1)
        return model.energy(params, graph).sum()

    real_n = pad_n = real_e = pad_e = 0
    for epoch in range(2):
        plan = ds.plan(shuffle=True, seed=epoch)
        for step in plan[:6]:
            g = jax.tree_util.tree_map(lambda x: x[0], ds.build(step))
            assert np.isfinite(float(energy(params, g)))
        for step in plan:
            a, b, c, d = ds.padding(step)
            real_n, pad_n, real_e, pad_e = real_n + a, pad_n + b, real_e + c, pad_e + d
    assert len(traces) == 1
    assert real_e / pad_e > 0.85 and real_n / pad_n > 0.8  # fixed batches of the same set: below 0.6


def _same_tree(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("budget", [None, "auto"])
def test_lazy_reading_larger_than_the_cache_gives_the_same_batches(tmp_path, budget):
    text = (DATA / "ethanol_test.xyz").read_text() + gzip.open(DATA / "qm9_valid.xyz.gz", "rt").read()
    path = tmp_path / "mixed.xyz.gz"
    with gzip.open(path, "wt") as f:
        f.write(text)
    in_memory = io.read(path)
    lazy = loader.open_files([path], cache_size=7)
    assert len(lazy) == len(in_memory) > 7
    kept = loader.subset(lazy, np.arange(0, len(lazy), 2))  # a lazy view, as the validation split is
    a = data.Dataset(loader.subset(in_memory, np.arange(0, len(lazy), 2)), 5.0, 6, n_shards=2, budget=budget)
    b = data.Dataset(kept, 5.0, 6, n_shards=2, budget=budget)
    assert a.pad_to == b.pad_to and b.lazy and not a.lazy
    for x, y in zip(a.batches(shuffle=True, seed=4), b.batches(shuffle=True, seed=4)):
        _same_tree(x, y)
    assert len(lazy._cache) <= 7


def test_prefetcher_keeps_order_raises_worker_errors_and_stops_early():
    seen = []
    out = list(loader.Prefetcher(range(20), lambda i: seen.append(i) or i * i, depth=3))
    assert out == [i * i for i in range(20)]
    assert list(loader.Prefetcher(range(5), lambda i: -i, depth=0)) == [0, -1, -2, -3, -4]

    def bad(i):
        if i == 4:
            raise ValueError("frame 4 is broken")
        return i

    with pytest.raises(ValueError, match="frame 4 is broken"):
        list(loader.Prefetcher(range(10), bad))
    made = []
    p = loader.Prefetcher(range(1000), lambda i: made.append(i) or i, depth=2)
    for i in p:
        if i == 3:
            break
    p.close()
    import time

    time.sleep(0.3)
    assert len(made) < 10  # the worker stopped instead of reading the whole data set


@pytest.mark.parametrize("content, message", [
    ("3\nProperties=species:S:1:pos:R:3:forces:R:3 energy=-1.0\nH 0 0 0 0 0 0\nH 0 0 1 0 0 0\n", "frame 0: truncated"),
    ("1\nProperties=species:S:1:pos:R:3:forces:R:3 energy=-1.0\nH 0 0 0 0 0 0\nfoo\n", "frame 1: expected an atom count"),
    ("1\nProperties=species:S:1:pos:R:3:forces:R:3 energy=-1.0\nXx 0 0 0 0 0 0\n", "frame 0"),
    ("1\nProperties=species:S:1:pos:R:3:forces:R:3\nH 0 0 0 0 0 0\n", "frame 0 has no energy label"),
])
def test_bad_frames_name_the_file_and_the_frame(tmp_path, content, message):
    path = tmp_path / "bad.xyz"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as err:
        source = loader.open_files([path])
        [source[i] for i in range(len(source))]
    assert "bad.xyz" in str(err.value)
    truncated = tmp_path / "cut.xyz.gz"
    truncated.write_bytes(gzip.compress((DATA / "ethanol_test.xyz").read_bytes())[:5000])
    with pytest.raises(ValueError, match="cut.xyz.gz"):
        loader.open_files([truncated])


def test_budget_batched_lazy_run_resumes_exactly_after_a_kill(tmp_path):
    from test_training import Killed, QUIET, assert_same_run, tiny_config

    # epochs of 6, 7, 7 steps: the checkpoint at step 15 is 2 steps into epoch 2 (not 3, as equal epochs would say)
    cfg = tiny_config(None, eval_every=5, batching="budget", batch_size=3, max_steps=18)
    cfg["data"].update(train=[str(DATA / "qm9_train.xyz.gz")], lazy=True, cache_size=5, max_train=15)
    training.fit(cfg, tmp_path / "full", **QUIET)

    def kill(step, state):
        if step == 17:
            raise Killed

    with pytest.raises(Killed):
        training.fit(cfg, tmp_path / "killed", callback=kill, **QUIET)
    training.fit(cfg, tmp_path / "killed", **QUIET)
    assert_same_run(tmp_path / "full", tmp_path / "killed")
    speed = [__import__("json").loads(l)["throughput"] for l in open(tmp_path / "full" / "metrics.jsonl")]
    assert all(0.5 < s["edge_fill"] <= 1 and 0 <= s["data_wait_fraction"] < 1 for s in speed), speed  # 3 a shard
