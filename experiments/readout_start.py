"""A/B of the zero-started energy readout (``training.initial_params``) on the default job.

Same config, seed and data; only the initial readout differs (zero vs
``model.init``'s random weights). Test metrics on the bundled test frames and
the energy error on malonaldehyde (never trained on)::

    python experiments/readout_start.py     # two default runs, about 8 minutes on 2 cores

Writes ``experiments/results/readout_start.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import equijax
from equijax import config, data, io, training

HERE = Path(__file__).resolve().parent


def run(readout: str) -> dict:
    initial = training.initial_params
    if readout == "random":
        training.initial_params = lambda model, key: model.init(key)
    try:
        out = Path("runs") / f"readout_{readout}"
        result = training.fit(config.load(), out, resume=False, progress=False, log=lambda *a: None)
    finally:
        training.initial_params = initial
    model, params, _ = equijax.load(out / "model.npz")
    malon = io.read(config.data_paths("data/malonaldehyde_test.xyz")[0], species=model.config.species)
    transfer = training.evaluate(model.energy, params, data.Dataset(malon, model.config.cutoff, 16,
                                                                     model.config.species))
    return {"readout": readout, "test": result["test"], "malonaldehyde": transfer, "machine": result["machine"],
            "train_time_s": result["train_time_s"]}


def main():
    rows = [run("zero"), run("random")]
    for r in rows:
        print(f"{r['readout']:6s} test: E {r['test']['energy_mae']:.2f} meV/atom, F {r['test']['forces_mae']:.1f} "
              f"meV/Å; malonaldehyde E {r['malonaldehyde']['energy_mae']:.1f} meV/atom")
    (HERE / "results" / "readout_start.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
