"""Force-MAE learning curves on aspirin: invariant (l_max=0) against equivariant (l_max=1).

Checks the NequIP paper's claim that equivariant features learn forces from
far fewer frames. Each point is one run of ``equijax.training.fit`` with the
same step budget, evaluated on a separate test trajectory.

Data (GFN2-xTB, 500 K): make it first (about 4 minutes on one core)::

    python experiments/make_data.py --out data/large --molecules aspirin --train 1200 --test 300 --no-metals

Then::

    python experiments/learning_curves.py --force         # writes experiments/results/learning_curves.{json,png}
    python experiments/learning_curves.py --sizes 50 100 --steps 500 --out /tmp/lc   # quicker, elsewhere

Points already in the output JSON are kept and only replotted (so an
interrupted study continues where it stopped); ``--force`` recomputes them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("data/large"), help="folder with aspirin_{train,test}.xyz")
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 100, 250, 500, 1000])
    parser.add_argument("--l-max", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=1500, help="optimiser steps per run")
    parser.add_argument("--runs", type=Path, default=Path("runs/learning_curves"))
    parser.add_argument("--out", type=Path, default=HERE / "results" / "learning_curves")
    parser.add_argument("--force", action="store_true", help="recompute points already in the output JSON")
    args = parser.parse_args(argv)

    from equijax import config as config_lib, training

    results = []
    out_json = args.out.with_suffix(".json")
    if out_json.exists() and not args.force:
        results = json.loads(out_json.read_text())
    done = {(r["l_max"], r["n_train"]) for r in results}
    if done:
        print(f"{len(done)} points already in {out_json} are kept (--force recomputes them)")
    for l_max in args.l_max:
        for n in args.sizes:
            if (l_max, n) in done:
                continue
            cfg = config_lib.load(None, [
                f"data.train=[{args.data / 'aspirin_train.xyz'}]", f"data.test=[{args.data / 'aspirin_test.xyz'}]",
                f"data.max_train={n}", "data.valid_fraction=0.05", f"model.l_max={l_max}",
                f"train.max_steps={args.steps}", f"train.eval_every={max(args.steps // 10, 1)}",
                f"train.batch_size={min(8, n)}",
            ])
            t0 = time.time()
            r = training.fit(cfg, args.runs / f"l{l_max}_n{n}", resume=not args.force, progress=False,
                             log=lambda *a: None)
            row = {"l_max": l_max, "n_train": n, "steps": r["steps"], "wall_s": time.time() - t0, **r["test"]}
            print(json.dumps(row), flush=True)
            results.append(row)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            out_json.write_text(json.dumps(results, indent=1))
    plot(results, args.out.with_suffix(".png"))


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    for l_max in sorted({r["l_max"] for r in results}):
        rows = sorted((r for r in results if r["l_max"] == l_max), key=lambda r: r["n_train"])
        ax.plot([r["n_train"] for r in rows], [r["forces_mae"] for r in rows], "o-",
                label=f"l_max={l_max}" + (" (invariant)" if l_max == 0 else ""))
    zero = results[0]["zero_force_mae"] if results else None
    if zero:
        ax.axhline(zero, color="gray", ls=":", label="zero-force baseline")
    ax.set(xscale="log", yscale="log", xlabel="training frames", ylabel="test force MAE (meV/Å)",
           title="aspirin, GFN2-xTB 500 K")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
