"""Studies on many molecules (QM9 geometries, GFN2-xTB labels; ``make_data.py --qm9``).

(a) ``curves``: generalisation to unseen molecules. Models trained on the
    frames of M training molecules (3 frames each), for several M and for
    l_max = 0 (invariant) and 1 (equivariant), are tested on held-out
    molecules (``qm9_test_molecules``) and on held-out frames of the very
    molecules they trained on (the fourth frame of each, ``qm9_test_frames``
    restricted to those M). Same steps, batch budget and schedule for all.
(b) ``cost``: the cost of equivariance. l_max = 0, 1, 2, 3 at the same
    channels, layers, data and steps: median step time, peak memory
    (resident set of the training process) and test errors.

Each point runs ``equijax.training.fit`` in its own process (so the peak
memory is that run's) and is kept in the output JSON; an interrupted study
continues where it stopped (``--force`` recomputes). Make the data first
(about 15 minutes on 2 cores)::

    python experiments/make_data.py --qm9 3000 --out data/qm9

then::

    python experiments/qm9_studies.py curves    # experiments/results/qm9_curves.{json,png}
    python experiments/qm9_studies.py cost      # experiments/results/qm9_cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _read(path):
    import gzip
    import io

    import ase.io

    with gzip.open(path, "rt") as f:  # ASE seeks in the file: slow in a gzip stream
        return ase.io.read(io.StringIO(f.read()), index=":", format="extxyz")


def _subsets(data: Path, n_molecules: int, work: Path):
    """Training frames of the first ``n_molecules`` training molecules, and their held-out frames."""
    import ase.io

    work.mkdir(parents=True, exist_ok=True)
    train = _read(data / "qm9_train.xyz.gz")
    rank = {a.info["mol_id"]: a.info["rank"] for a in train}
    ids = sorted(rank, key=rank.get)
    if n_molecules > len(ids):
        raise SystemExit(f"{data} has only {len(ids)} training molecules")
    keep = set(ids[:n_molecules])
    frames = _read(data / "qm9_test_frames.xyz.gz")
    paths = {"train": work / f"train_{n_molecules}.xyz", "test_frames": work / f"test_frames_{n_molecules}.xyz"}
    ase.io.write(paths["train"], [a for a in train if a.info["mol_id"] in keep], format="extxyz")
    ase.io.write(paths["test_frames"], [a for a in frames if a.info["mol_id"] in keep], format="extxyz")
    return paths


def run_point(point: dict) -> dict:
    """One training run and its test errors (runs in a child process)."""
    import resource

    import numpy as np

    from equijax import checkpoint, config as config_lib, data as data_lib, io, training

    cfg = config_lib.load(None, point["overrides"])
    result = training.fit(cfg, point["output"], resume=False, progress=False, log=lambda *a: None)
    model, params, _ = checkpoint.load_model(Path(point["output"]) / "model.npz")
    tests = {}
    for name, path in point["tests"].items():
        frames = io.read(path, species=model.config.species)
        ds = data_lib.Dataset(frames, model.config.cutoff, 16, model.config.species)
        m = training.evaluate(model.energy, params, ds)
        tests[name] = {"forces_mae": m["forces_mae"], "energy_mae": m["energy_mae"], "frames": len(frames)}
    lines = [json.loads(l) for l in open(Path(point["output"]) / "metrics.jsonl")]
    ms = [l["throughput"]["ms_per_step"] for l in lines[1:]] or [lines[0]["throughput"]["ms_per_step"]]
    return {**{k: v for k, v in point.items() if k not in ("overrides", "tests", "output")}, "test": tests,
            "ms_per_step": float(np.median(ms)), "train_time_s": result["train_time_s"],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "n_params": int(sum(np.size(x) for x in __import__("jax").tree_util.tree_leaves(params)))}


def _run(point):
    proc = subprocess.run([sys.executable, __file__, "--point", json.dumps(point)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"point {point['key']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _overrides(data, train, l_max, steps, channels, extra=()):
    return [f"data.train=[{train}]", f"data.valid=[{data / 'qm9_valid.xyz.gz'}]", "data.test=null",
            f"data.e0s={HERE.parent / 'equijax/data/e0s_gfn2-xtb.json'}", "train.batching=budget",
            "train.batch_size=16", f"train.max_steps={steps}", f"train.eval_every={max(steps // 8, 1)}",
            "train.early_stopping_patience=100", "train.weights.energy=100",  # as configs/qm9.yaml
            f"model.l_max={l_max}", f"model.channels={channels}", *extra]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", nargs="?", choices=["curves", "cost"])
    parser.add_argument("--data", type=Path, default=Path("data/qm9"), help="folder of make_data.py --qm9")
    parser.add_argument("--molecules", type=int, nargs="+", default=[150, 600, 2400],
                        help="curves: training molecules per point")
    parser.add_argument("--l-max", type=int, nargs="+", help="default: 0 1 (curves), 0 1 2 3 (cost)")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--runs", type=Path, default=Path("runs/qm9_studies"))
    parser.add_argument("--out", type=Path, help="results JSON (default experiments/results/qm9_<study>.json)")
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--point", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.point:
        print(json.dumps(run_point(json.loads(args.point))))
        return
    if args.study is None:
        parser.error("give a study: curves or cost")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    out = args.out or HERE / "results" / f"qm9_{args.study}.json"
    results = [] if args.force or not out.exists() else json.loads(out.read_text())
    done = {r["key"] for r in results}
    data = args.data.resolve()
    test_molecules = str(data / "qm9_test_molecules.xyz.gz")
    if args.study == "curves":
        points = [(l, m) for l in (args.l_max or [0, 1]) for m in args.molecules]
    else:
        points = [(l, max(args.molecules)) for l in (args.l_max or [0, 1, 2, 3])]
    for l_max, m in points:
        key = f"l{l_max}_m{m}_s{args.steps}_c{args.channels}"
        if key in done:
            continue
        paths = _subsets(data, m, args.runs / "data")
        point = {"key": key, "study": args.study, "l_max": l_max, "molecules": m, "steps": args.steps,
                 "channels": args.channels, "output": str(args.runs / key),
                 "overrides": _overrides(data, paths["train"], l_max, args.steps, args.channels),
                 "tests": {"unseen_molecules": test_molecules, "held_out_frames": str(paths["test_frames"])}}
        r = _run(point)
        results.append(r)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1) + "\n")
        t = r["test"]
        print(f"l_max={l_max} molecules={m}: force MAE unseen molecules {t['unseen_molecules']['forces_mae']:.1f}, "
              f"held-out frames {t['held_out_frames']['forces_mae']:.1f} meV/Å; energy MAE "
              f"{t['unseen_molecules']['energy_mae']:.2f} / {t['held_out_frames']['energy_mae']:.2f} meV/atom; "
              f"{r['ms_per_step']:.1f} ms/step, peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
    if args.study == "curves":
        _plot(results, out.with_suffix(".png"))
    _table(results, args.study)


def _table(results, study):
    if study == "curves":
        print("| l_max | molecules (frames) | force MAE, unseen molecules | held-out frames | energy MAE unseen / frames |")
        print("|---|---|---|---|---|")
        for r in sorted(results, key=lambda r: (r["l_max"], r["molecules"])):
            t = r["test"]
            print(f"| {r['l_max']} | {r['molecules']} ({3 * r['molecules']}) | {t['unseen_molecules']['forces_mae']:.1f} meV/Å "
                  f"| {t['held_out_frames']['forces_mae']:.1f} meV/Å | {t['unseen_molecules']['energy_mae']:.1f} / "
                  f"{t['held_out_frames']['energy_mae']:.1f} meV/atom |")
    else:
        print("| l_max | parameters | ms/step (median) | peak RSS | force MAE unseen molecules | held-out frames |")
        print("|---|---|---|---|---|---|")
        for r in sorted(results, key=lambda r: r["l_max"]):
            t = r["test"]
            print(f"| {r['l_max']} | {r['n_params']} | {r['ms_per_step']:.1f} | {r['peak_rss_mb']:.0f} MB | "
                  f"{t['unseen_molecules']['forces_mae']:.1f} meV/Å | {t['held_out_frames']['forces_mae']:.1f} meV/Å |")


def _plot(results, png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for l_max, colour in ((0, "tab:orange"), (1, "tab:blue"), (2, "tab:green"), (3, "tab:red")):
        rs = sorted((r for r in results if r["l_max"] == l_max), key=lambda r: r["molecules"])
        if not rs:
            continue
        x = [3 * r["molecules"] for r in rs]
        ax.loglog(x, [r["test"]["unseen_molecules"]["forces_mae"] for r in rs], "o-", color=colour,
                  label=f"l_max={l_max}, unseen molecules")
        ax.loglog(x, [r["test"]["held_out_frames"]["forces_mae"] for r in rs], "s--", color=colour,
                  label=f"l_max={l_max}, held-out frames")
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    for axis in (ax.xaxis, ax.yaxis):  # plain numbers, not powers of ten
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_formatter(NullFormatter())
    ax.set_xticks([450, 1800, 7200])
    ax.set_yticks([180, 200, 220, 240, 260])
    ax.set_xlabel("training frames (3 per molecule)")
    ax.set_ylabel("force MAE (meV/Å)")
    ax.set_title("QM9 molecules, GFN2-xTB, 500 K MD")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


if __name__ == "__main__":
    main()
