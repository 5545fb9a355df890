"""What the Hessian term costs: train-step time with and without it, same model, same batches.

The default architecture (l_max=1, 16 channels, 3 layers, float32) on batches
of 4 Hessian-labelled frames (ethanol and aspirin), one process, median of
``--repeats`` steps after compilation; the force-only step is the reference::

    python experiments/hessian_loss_cost.py   # -> experiments/results/hessian_loss_cost.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import numpy as np
import optax

from equijax import config as config_lib, data, io, training
from equijax.models import NequIPConfig, nequip

HERE = Path(__file__).resolve().parent


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "hessian_loss_cost.json")
    args = parser.parse_args(argv)

    folder = config_lib.PACKAGE / "data"
    frames = (io.read(folder / "ethanol_hessian_train.xyz.gz", index=":16", require=("hessian",))
              + io.read(folder / "aspirin_hessian_train.xyz.gz", index=":16", require=("hessian",)))
    mc = {k: v for k, v in config_lib.load(None)["model"].items() if v is not None}  # the default job's model
    cfg = NequIPConfig.from_dict({**mc, "species": (1, 6, 8), "avg_num_neighbours": 12.8})
    model = nequip(cfg)
    ds = data.Dataset(frames, cfg.cutoff, 4, cfg.species)
    batches = list(ds.batches(shuffle=True, seed=0))
    variants = {
        "forces": (training.LossWeights(1.0, 10.0), 1),
        "forces + H v (k=1)": (training.LossWeights(1.0, 10.0, hessian=1.0), 1),
        "forces + H v (k=2)": (training.LossWeights(1.0, 10.0, hessian=1.0), 2),
        "forces + H v (k=4)": (training.LossWeights(1.0, 10.0, hessian=1.0), 4),
        "forces + dipole + H v + dmu v (k=2)": (training.LossWeights(1.0, 10.0, 0.0, 1.0, 1.0, 1.0), 2),
    }
    rows = []
    for name, (weights, k) in variants.items():
        opt = optax.adam(1e-3)
        dipole_fn = model.dipole if weights.dipole > 0 else None
        step = jax.jit(training.train_step(model.energy, opt, weights, dipole_fn=dipole_fn, hessian_directions_k=k),
                       donate_argnums=0)
        state = training.init_state(model.init(jax.random.PRNGKey(0)), opt)
        t0 = time.perf_counter()
        state, m = step(state, batches[0])
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - t0
        times = []
        for r in range(args.repeats):
            t0 = time.perf_counter()
            state, m = step(state, batches[r % len(batches)])
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t0)
        rows.append({"loss": name, "directions": k, "median_ms": 1e3 * float(np.median(times)),
                     "first_call_s": compile_s})
        rows[-1]["factor_vs_forces"] = rows[-1]["median_ms"] / rows[0]["median_ms"]
        print(f"{name:40s} {rows[-1]['median_ms']:8.1f} ms  ({rows[-1]['factor_vs_forces']:.2f}x)  "
              f"first call {compile_s:.1f} s", flush=True)
    out = {"device": jax.devices()[0].device_kind, "batch": "4 structures (ethanol/aspirin)", "rows": rows}
    args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
