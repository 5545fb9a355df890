"""Training throughput on many molecules: budget batching and prefetching against fixed-size batches.

The default model trains on the QM9 set (``make_data.py --qm9``) with each
loader variant for the same number of steps, in one process after another;
the figures are those of the second validation window (compilation
excluded): structures/s, the fraction of padded node and edge slots that
hold real atoms and edges, and the fraction of wall time the loop waited
for its next batch. Fixed batches hold 16 molecules padded for the 16
largest; budget batches hold 16 molecules of mean size (in atoms and edges)
per step, packed.

``--loaders`` instead times the loaders alone (no training), side by side
with nequix's (PyPI ``nequix``: an ASE database read by worker processes,
``jraph.dynamically_batch`` to 1.1 times 16 mean molecules): one shuffled
epoch of the QM9 training frames from the same ASE database, every batch
padded, with neighbour lists; the medians of 3 epochs. Run::

    python experiments/loader_benchmark.py            # experiments/results/loader_benchmark.json
    python experiments/loader_benchmark.py --loaders  # experiments/results/loader_benchmark_loaders.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

VARIANTS = {
    "fixed, in memory, no prefetch": ["train.batching=fixed", "data.lazy=false", "train.prefetch=0"],
    "fixed, in memory, prefetch 2": ["train.batching=fixed", "data.lazy=false", "train.prefetch=2"],
    "budget, in memory, no prefetch": ["train.batching=budget", "data.lazy=false", "train.prefetch=0"],
    "budget, in memory, prefetch 2": ["train.batching=budget", "data.lazy=false", "train.prefetch=2"],
    "budget, lazy (cache 1024), prefetch 2": ["train.batching=budget", "data.lazy=true", "data.cache_size=1024",
                                               "train.prefetch=2"],
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("data/qm9"))
    parser.add_argument("--steps", type=int, default=300, help="steps per variant (two windows)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "loader_benchmark.json")
    parser.add_argument("--loaders", action="store_true", help="time the loaders alone, beside nequix's")
    args = parser.parse_args(argv)
    if args.loaders:
        return loaders(args)

    from equijax import config as config_lib, training

    data = args.data.resolve()
    rows = []
    for name, overrides in VARIANTS.items():
        cfg = config_lib.load(HERE.parent / "equijax/configs/qm9.yaml", [
            f"data.train=[{data / 'qm9_train.xyz.gz'}]", f"data.valid=[{data / 'qm9_valid.xyz.gz'}]",
            "data.test=null", f"train.max_steps={args.steps}", f"train.eval_every={args.steps // 2}", *overrides])
        with tempfile.TemporaryDirectory() as out:
            t0 = time.time()
            training.fit(cfg, out, resume=False, progress=False, log=lambda *a: None)
            lines = [json.loads(l) for l in open(Path(out) / "metrics.jsonl")]
        speed = lines[-1]["throughput"]
        rows.append({"variant": name, **speed, "wall_s": time.time() - t0})
        print(f"{name:40s} {speed['structures_per_s']:6.1f} structures/s  {speed['ms_per_step']:6.1f} ms/step  "
              f"fill: nodes {100 * speed['node_fill']:.0f}%, edges {100 * speed['edge_fill']:.0f}%  "
              f"data wait {100 * speed['data_wait_fraction']:.1f}%", flush=True)
    args.out.write_text(json.dumps({"steps": args.steps, "data": str(args.data), "machine": training.machine_info(),
                                    "rows": rows}, indent=1) + "\n")
    base = rows[0]["structures_per_s"]
    print("\n| loader | structures/s | vs fixed | node / edge slots real | waited for data |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['structures_per_s']:.1f} | {r['structures_per_s'] / base:.2f}× | "
              f"{100 * r['node_fill']:.0f}% / {100 * r['edge_fill']:.0f}% | {100 * r['data_wait_fraction']:.1f}% |")


def _nequix_dataset(nequix_data, db_path, species):
    """nequix's AseDBDataset, opened as its constructor would with ASE < 3.29.

    nequix 0.4.5 passes ``readonly=True`` to ``ase.db.connect`` and reads
    ``db.ids``, neither of which ASE 3.29 has; only the opening is redone
    here, its reading (``_get_graph_dict``) and loader are nequix's own.
    """
    import ase.db
    import numpy as np

    ds = nequix_data.AseDBDataset.__new__(nequix_data.AseDBDataset)
    nequix_data.Dataset.__init__(ds, backend="jax")
    ds.atomic_indices = nequix_data.atomic_numbers_to_indices(species)
    ds.file_path, ds.cutoff = Path(db_path), 5.0
    ds.dbs = [ase.db.connect(str(db_path), use_lock_file=False)]
    ds.db_ids = [[row.id for row in db.select()] for db in ds.dbs]
    ds.id_cumulative = np.cumsum([len(ids) for ids in ds.db_ids])
    return ds


def loaders(args):
    """Structures/s and padding of one epoch, loader alone: equijax (lazy db and extxyz) and nequix."""
    import ase.db
    import jraph
    import numpy as np

    from equijax import data as data_lib, io, loader, training

    data = args.data.resolve()
    db_path = data / "qm9_train.db"
    if not db_path.exists():  # the same frames as an ASE database, which both loaders read
        import ase.io
        import gzip
        import io as io_lib

        with gzip.open(data / "qm9_train.xyz.gz", "rt") as f:
            frames = ase.io.read(io_lib.StringIO(f.read()), index=":", format="extxyz")
        with ase.db.connect(db_path.with_suffix(".tmp.db")) as db:
            for a in frames:
                db.write(a)
        db_path.with_suffix(".tmp.db").rename(db_path)
    species = [1, 6, 7, 8, 9]
    rows, repeats = [], 3

    def equijax_epochs(name, source_fn):
        t = time.perf_counter()
        ds = data_lib.Dataset(source_fn(), 5.0, 16, species, budget="auto")
        index_s = time.perf_counter() - t
        times, fill = [], None
        for epoch in range(repeats):
            ds.structures = source_fn()  # a cold cache every epoch
            plan = ds.plan(shuffle=True, seed=epoch)
            t = time.perf_counter()
            for _ in loader.Prefetcher(plan, ds.build, depth=2):
                pass
            times.append(time.perf_counter() - t)
            pads = np.sum([ds.padding(step) for step in plan], axis=0)
            fill = (pads[0] / pads[1], pads[2] / pads[3])
        rows.append({"loader": name, "structures_per_s": len(ds) / float(np.median(times)), "index_pass_s": index_s,
                     "node_fill": fill[0], "edge_fill": fill[1], "batches": len(plan)})

    equijax_epochs("equijax, ASE db, lazy, budget, 1 thread",
                   lambda: loader.LazyFile(db_path, species, cache_size=1024))
    equijax_epochs("equijax, extxyz.gz, lazy, budget, 1 thread",
                   lambda: loader.LazyFile(data / "qm9_train.xyz.gz", species, cache_size=1024))
    try:
        from nequix import data as nequix_data
    except ImportError:
        print("nequix is not installed (pip install nequix): its loader is skipped")
    else:
        t = time.perf_counter()
        ds = _nequix_dataset(nequix_data, db_path, species)
        structures = io.read(db_path)
        n_atoms = np.array([len(s.positions) for s in structures])
        from equijax import graph as graph_lib

        n_edges = np.array([len(graph_lib.neighbours(s, 5.0)[0]) for s in structures])
        index_s = time.perf_counter() - t
        times = []
        for epoch in range(repeats):
            dl = nequix_data.DataLoader(ds, int(n_atoms.max()), int(n_edges.max()), float(n_atoms.mean()),
                                        float(n_edges.mean()), batch_size=16, shuffle=True, seed=epoch,
                                        num_workers=2)
            t = time.perf_counter()
            real_n = pad_n = real_e = pad_e = batches = 0
            for g in dl:
                mask = np.asarray(jraph.get_graph_padding_mask(g))
                real_n += int(np.sum(np.asarray(g.n_node)[mask]))
                real_e += int(np.sum(np.asarray(g.n_edge)[mask]))
                pad_n += len(g.nodes["positions"])
                pad_e += len(g.senders)
                batches += 1
            times.append(time.perf_counter() - t)
            for w in dl.workers:
                w.terminate()
        rows.append({"loader": "nequix 0.4.5 DataLoader, ASE db, 2 worker processes",
                     "structures_per_s": len(ds) / float(np.median(times)), "index_pass_s": index_s,
                     "node_fill": real_n / pad_n, "edge_fill": real_e / pad_e, "batches": batches})
    out = args.out.with_name(args.out.stem + "_loaders.json")
    out.write_text(json.dumps({"data": str(args.data), "frames": 7200, "repeats": repeats,
                               "machine": training.machine_info(), "rows": rows}, indent=1) + "\n")
    print("| loader (one epoch, no training) | structures/s | node / edge slots real | batches | index pass |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['loader']} | {r['structures_per_s']:.0f} | {100 * r['node_fill']:.0f}% / "
              f"{100 * r['edge_fill']:.0f}% | {r['batches']} | {r['index_pass_s']:.1f} s |")


if __name__ == "__main__":
    main()
