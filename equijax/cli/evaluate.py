"""``equijax evaluate``: metrics tables, parity plots and a committee's calibration."""

from __future__ import annotations

import json
from pathlib import Path


def _evaluate(args):
    import numpy as np

    from equijax import data as data_lib, io, plots, training
    from equijax.cli.common import load_model
    from equijax.compiled import compiled

    model, params, _ = load_model(args.checkpoint)
    cfg = model.config
    out = Path(args.output or Path(args.checkpoint).with_suffix("").as_posix() + "_eval")
    out.mkdir(parents=True, exist_ok=True)
    dtype = np.float64 if cfg.dtype == "float64" else np.float32
    sets = [data_lib.Dataset(io.read(path, species=cfg.species), cfg.cutoff, args.batch_size, cfg.species, 1, dtype)
            for path in args.data]
    pad_to = tuple(np.max([ds.pad_to for ds in sets], axis=0).tolist())
    sets = [ds.with_sizes(pad_to=pad_to) for ds in sets]  # one shape: one compilation
    rows = []
    for path, ds in zip(args.data, sets):
        m = training.evaluate(model.energy, params, ds)  # the metrics of training's validation and test
        ref, pred = _predictions(compiled(model).stacked.energy_forces_stress, params, ds)
        rows.append({"data": str(path), "frames": len(ds),
                     "energy_mae_meV_atom": m["energy_mae"], "energy_rmse_meV_atom": m["energy_rmse"],
                     "forces_mae_meV_A": m["forces_mae"], "forces_rmse_meV_A": m["forces_rmse"],
                     "zero_force_mae_meV_A": 1000 * float(np.abs(ref["forces"]).mean())})
        plots.parity(ref["energy"], pred["energy"], ref["forces"].ravel(), pred["forces"].ravel(),
                     out / (Path(path).stem + "_parity.png"), Path(path).stem)
    print(f"{'data':40s} {'frames':>6s} {'E MAE':>10s} {'E RMSE':>10s} {'F MAE':>10s} {'F RMSE':>10s}")
    print(f"{'':40s} {'':>6s} {'meV/atom':>10s} {'meV/atom':>10s} {'meV/Å':>10s} {'meV/Å':>10s}")
    for r in rows:
        print(f"{Path(r['data']).name:40s} {r['frames']:6d} {r['energy_mae_meV_atom']:10.2f} "
              f"{r['energy_rmse_meV_atom']:10.2f} {r['forces_mae_meV_A']:10.1f} {r['forces_rmse_meV_A']:10.1f}")
    if model.member is not None:
        _calibration_report(model, params, args.data, sets, rows, out)
    (out / "metrics.json").write_text(json.dumps(rows, indent=1))
    print(f"parity plots{', calibration plot' if model.member is not None else ''} and metrics.json in {out}/")


def _predictions(derive, params, dataset):
    """Reference and predicted energies per atom (eV/atom) and forces (eV/Å) of every real structure and atom."""
    import jax
    import numpy as np

    ref, pred = {"energy": [], "forces": []}, {"energy": [], "forces": []}
    for batch in dataset.batches():
        res, g = jax.device_get((derive(params, batch), batch))
        for s in range(g.n_node.shape[0]):  # shards
            gm, nm = g.globals["mask"][s], g.nodes["mask"][s]
            n = g.n_node[s][gm]
            ref["energy"].append(g.globals["energy"][s][gm] / n)
            pred["energy"].append(res.energy[s][gm] / n)
            ref["forces"].append(g.nodes["forces"][s][nm])
            pred["forces"].append(res.forces[s][nm])
    return ({k: np.concatenate(v) for k, v in ref.items()}, {k: np.concatenate(v) for k, v in pred.items()})


def _calibration_report(model, params, paths, sets, rows, out):
    """A committee's spread against its actual errors, per data file (printed, stored, plotted)."""
    from equijax import calibration, ensemble, plots

    k = ensemble.size(params)
    print(f"\ncommittee of {k} members: does the spread flag the errors? (per atom; per frame for energies)")
    print(f"{'data':40s} {'mean spread':>12s} {'mean |ΔF|':>10s} {'Spearman':>9s} {'caught':>7s} {'scale':>6s} "
          f"{'E Spearman':>11s}")
    print(f"{'':40s} {'meV/Å':>12s} {'meV/Å':>10s} {'F':>9s} {'top 10%':>7s} {'':>6s} {'':>11s}")
    for path, ds, row in zip(paths, sets, rows):
        cal = row["calibration"] = calibration.force_calibration(model, params, ds)
        print(f"{Path(path).name:40s} {cal['mean_force_spread_meV_A']:12.1f} {cal['mean_force_error_meV_A']:10.1f} "
              f"{cal['spearman']:9.2f} {100 * cal['caught']:6.0f}% {cal['scale']:6.2f} {cal['energy_spearman']:11.2f}")
    plots.calibration({Path(r["data"]).stem: r["calibration"] for r in rows}, out / "calibration.png",
                      f"calibration, {k} members")
    print("caught: share of the 10% largest per-atom force errors whose spread is in the top 10% (10% by chance); "
          "scale: RMS error / RMS spread, the factor that makes the spread an error bar on these data")


def register(sub, epilog: str) -> None:
    """Add this module's commands to the ``equijax`` parser."""
    e = sub.add_parser("evaluate", help="metrics and parity plots of a model on data files",
                       description="Evaluate a model file or checkpoint (its EMA parameters) on labelled data "
                                   "files (.xyz/.extxyz, rMD17 .npz, ASE .db). A committee (trained with "
                                   "train.ensemble > 1) also reports its calibration: how well the members' "
                                   "spread ranks the actual errors (Spearman), and a calibration plot.")
    e.add_argument("checkpoint", metavar="MODEL", help="model.npz or checkpoint.npz")
    e.add_argument("data", nargs="+")
    e.add_argument("--output", help="folder for plots and metrics.json (default: next to the checkpoint)")
    e.add_argument("--batch-size", type=int, default=16)
    e.set_defaults(func=_evaluate)
