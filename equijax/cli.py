"""The ``equijax`` command line.

    equijax train [CONFIG.yaml] [key=value ...]   train a potential (default config ships with the package)
    equijax evaluate CHECKPOINT DATA [DATA ...]   metrics table and parity plots
    equijax vibrate CHECKPOINT STRUCTURE          frequencies, modes, IR, thermochemistry
    equijax phonons CHECKPOINT CRYSTAL            phonons at Γ and along a band path
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EPILOG = """examples:
  equijax train                                   # default: ethanol + aspirin (GFN2-xTB), a few CPU minutes
  equijax train train.max_steps=200 output=runs/quick
  equijax train my.yaml model.l_max=2 model.channels=32 train.batch_size=32
  equijax evaluate runs/default/best.pkl equijax/data/aspirin_test.xyz
  equijax vibrate runs/default/best.pkl experiments/workloads/aspirin.xyz --relax

units: energies eV, forces eV/Å, stress eV/Å³; MAEs are printed in meV/atom and meV/Å.
"""


def _train(args):
    from equijax import config as config_lib, training

    if args.distributed:
        import jax

        jax.distributed.initialize()  # reads the cluster from the environment (SLURM, Open MPI, ...)
    overrides = list(args.overrides)
    config_path = args.config
    if config_path and "=" in config_path:
        overrides.insert(0, config_path)
        config_path = None
    config = config_lib.load(config_path, overrides)
    output = Path(config.pop("output", None) or args.output)
    result = training.fit(config, output, resume=not args.restart, progress=not args.no_progress)
    print()
    print(f"trained {result['steps']} steps in {result['train_time_s']:.0f} s; outputs in {output}/")
    if "test" in result:
        t = result["test"]
        print(f"test set ({result['n_test']} frames, best EMA parameters):")
        print(f"  energy MAE {t['energy_mae']:8.2f} meV/atom   RMSE {t['energy_rmse']:8.2f}")
        print(f"  force  MAE {t['forces_mae']:8.1f} meV/Å      RMSE {t['forces_rmse']:8.1f}")
        if "stress_mae" in t:
            print(f"  stress MAE {t['stress_mae']:8.3f} meV/Å³     RMSE {t['stress_rmse']:8.3f}")
        if "dipole_mae" in t:
            print(f"  dipole MAE {t['dipole_mae']:8.1f} me·Å       RMSE {t['dipole_rmse']:8.1f}")
        print(f"  (predicting zero forces: MAE {t['zero_force_mae']:.1f} meV/Å, "
              f"{t['zero_force_mae'] / t['forces_mae']:.1f}× worse)")


def _evaluate(args):
    import jax
    import numpy as np

    from equijax import checkpoint, data as data_lib, io, physics

    model, params, _ = checkpoint.load_model(args.checkpoint)
    cfg = model.config
    out = Path(args.output or Path(args.checkpoint).with_suffix("").as_posix() + "_eval")
    out.mkdir(parents=True, exist_ok=True)
    derive = jax.jit(jax.vmap(physics.energy_forces_stress(model.energy), in_axes=(None, 0)))
    rows = []
    for path in args.data:
        structures = io.read(path, species=cfg.species)
        ds = data_lib.Dataset(structures, cfg.cutoff, args.batch_size, cfg.species, 1,
                              np.float64 if cfg.dtype == "float64" else np.float32)
        e_ref, e_pred, f_ref, f_pred, n_atoms = [], [], [], [], []
        for batch in ds.batches():
            res = jax.device_get(derive(params, batch))
            g = jax.device_get(batch)
            gm, nm = g.globals["mask"][0], g.nodes["mask"][0]
            e_ref += list(g.globals["energy"][0][gm]); e_pred += list(res.energy[0][gm])
            n_atoms += list(g.n_node[0][gm])
            f_ref.append(g.nodes["forces"][0][nm]); f_pred.append(res.forces[0][nm])
        e_ref, e_pred, n_atoms = np.array(e_ref), np.array(e_pred), np.array(n_atoms)
        f_ref, f_pred = np.concatenate(f_ref), np.concatenate(f_pred)
        de = (e_pred - e_ref) / n_atoms
        df = f_pred - f_ref
        row = {"data": str(path), "frames": len(e_ref),
               "energy_mae_meV_atom": 1000 * float(np.abs(de).mean()),
               "energy_rmse_meV_atom": 1000 * float(np.sqrt((de**2).mean())),
               "forces_mae_meV_A": 1000 * float(np.abs(df).mean()),
               "forces_rmse_meV_A": 1000 * float(np.sqrt((df**2).mean())),
               "zero_force_mae_meV_A": 1000 * float(np.abs(f_ref).mean())}
        rows.append(row)
        _parity_plot(e_ref / n_atoms, e_pred / n_atoms, f_ref.ravel(), f_pred.ravel(),
                     out / (Path(path).stem + "_parity.png"), Path(path).stem)
    print(f"{'data':40s} {'frames':>6s} {'E MAE':>10s} {'E RMSE':>10s} {'F MAE':>10s} {'F RMSE':>10s}")
    print(f"{'':40s} {'':>6s} {'meV/atom':>10s} {'meV/atom':>10s} {'meV/Å':>10s} {'meV/Å':>10s}")
    for r in rows:
        print(f"{Path(r['data']).name:40s} {r['frames']:6d} {r['energy_mae_meV_atom']:10.2f} "
              f"{r['energy_rmse_meV_atom']:10.2f} {r['forces_mae_meV_A']:10.1f} {r['forces_rmse_meV_A']:10.1f}")
    (out / "metrics.json").write_text(json.dumps(rows, indent=1))
    print(f"parity plots and metrics.json in {out}/")


def _vibrate(args):
    import jax

    jax.config.update("jax_enable_x64", True)  # the application, not the library, asks for float64
    import ase.io
    import numpy as np

    from equijax import checkpoint, vibrations

    model, params, payload = checkpoint.load_model(args.checkpoint)
    trained_dipole = ((payload.get("run_config") or {}).get("train", {}).get("weights", {}).get("dipole", 0) or 0) > 0
    if args.ir and not (trained_dipole and "charges" in params):
        raise ValueError(f"{args.checkpoint} was not trained on dipoles, so its IR intensities would be "
                         "meaningless: train with train.weights.dipole=1.0")
    atoms = ase.io.read(args.structure)
    result = vibrations.vibrate(model, params, atoms, relax=args.relax, fmax=args.fmax, batch_size=args.batch_size,
                                ir=args.ir)
    out = Path(args.output or Path(args.structure).stem + "_vib")
    out.mkdir(parents=True, exist_ok=True)
    freqs, _ = result.normal_modes()
    intensities = result.ir_intensities() if args.ir else None
    print(f"{len(atoms)} atoms; {result.n_rigid} rigid-body modes projected out; {len(freqs)} vibrations:")
    print("  mode  freq (cm⁻¹)" + ("   IR (km/mol)" if args.ir else ""))
    for k, f in enumerate(freqs):
        print(f"  {k + 1:4d} {f:12.1f}" + (f" {intensities[k]:13.2f}" if args.ir else "")
              + ("  (imaginary)" if f < 0 else ""))
    ase.io.write(out / "relaxed.xyz", result.atoms)
    result.vibrations.write_jmol(out / "modes.xyz")
    np.savetxt(out / "frequencies_cm.txt", freqs, header="harmonic frequencies, cm^-1")
    np.save(out / "hessian.npy", result.hessian)
    if args.ir:
        np.savetxt(out / "ir_km_per_mol.txt", np.stack([freqs, intensities], 1), header="cm^-1  km/mol")
    _spectrum_plot(freqs, out / "spectrum.png", Path(args.structure).stem, intensities)
    try:
        thermo = result.thermo(args.temperature)
        print(f"thermochemistry at {args.temperature} K (eV): " + ", ".join(f"{k} {v:.4f}" for k, v in thermo.items()))
        (out / "thermo.json").write_text(json.dumps({"temperature_K": args.temperature, **thermo}, indent=1))
    except ValueError as err:
        print(f"no thermochemistry: {err}")
    print(f"modes (Jmol: modes.xyz), spectrum.png, hessian.npy (eV/Å²) in {out}/")


def _phonons(args):
    import jax

    jax.config.update("jax_enable_x64", True)
    import ase.io
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from equijax import checkpoint, phonons, vibrations

    model, params, _ = checkpoint.load_model(args.checkpoint)
    model, params = vibrations.float64_model(model, params)
    prim = ase.io.read(args.structure)
    if not prim.pbc.all():
        raise ValueError(f"{args.structure}: phonons need a cell periodic in all three directions")
    fc = phonons.force_constants(model, params, prim, tuple(args.supercell), args.batch_size)
    out = Path(args.output or Path(args.structure).stem + "_phonons")
    out.mkdir(parents=True, exist_ok=True)
    gamma = phonons.frequencies(fc, [[0, 0, 0]])[0]
    print(f"Γ-point frequencies (cm⁻¹): " + " ".join(f"{f:.1f}" for f in gamma))
    bs = phonons.band_structure(fc, args.path, args.npoints)
    fig, ax = plt.subplots(figsize=(7, 4))
    bs.plot(ax=ax, emin=min(0.0, float(bs.energies.min()) * 1.1), emax=float(bs.energies.max()) * 1.1,
            ylabel="phonon energy (meV)")
    fig.savefig(out / "band_structure.png", dpi=120)
    bs.write(str(out / "band_structure.json"))
    np.savetxt(out / "gamma_cm.txt", gamma, header="phonon frequencies at Gamma, cm^-1")
    print(f"band_structure.png, band_structure.json (meV), gamma_cm.txt in {out}/")


def _spectrum_plot(freqs, path, title, intensities=None, width=10.0):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    x = np.linspace(0, max(4000.0, float(np.max(freqs, initial=0)) + 200), 4000)
    weights = np.ones_like(freqs) if intensities is None else np.asarray(intensities)
    keep = freqs > 0
    real, weights = freqs[keep], weights[keep]
    y = sum(w * np.exp(-0.5 * ((x - f) / width) ** 2) for f, w in zip(real, weights)) if len(real) else 0 * x
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot(x, y, lw=1)
    ax.vlines(real, 0, weights, color="C1", lw=0.6)
    label = "IR intensity (km/mol)" if intensities is not None else "modes (unit intensities)"
    ax.set(xlabel="wavenumber (cm⁻¹)", ylabel=label, title=f"{title}: harmonic spectrum, 10 cm⁻¹ Gaussians")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _parity_plot(e_ref, e_pred, f_ref, f_pred, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(1, 2, figsize=(9, 4))
    for a, (x, y, label) in zip(ax, ((e_ref, e_pred, "energy (eV/atom)"), (f_ref, f_pred, "force component (eV/Å)"))):
        a.plot(x, y, ".", ms=2, alpha=0.5)
        lo, hi = np.min([x.min(), y.min()]), np.max([x.max(), y.max()])
        a.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        a.set(xlabel=f"reference {label}", ylabel=f"predicted {label}", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="equijax", description="E(3)-equivariant interatomic potentials in JAX.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a potential from a YAML config",
                       description="Train a NequIP potential. With no CONFIG the shipped default "
                                   "(equijax/configs/default.yaml) trains on the bundled GFN2-xTB data. "
                                   "A run resumes from OUTPUT/checkpoint.pkl if it exists.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("config", nargs="?", help="YAML config (default: the shipped default.yaml)")
    t.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. train.max_steps=500")
    t.add_argument("--output", default="runs/default", help="run folder (default: runs/default)")
    t.add_argument("--restart", action="store_true", help="ignore an existing checkpoint and start over")
    t.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    t.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() first (multi-host data parallel)")
    t.set_defaults(func=_train)
    e = sub.add_parser("evaluate", help="metrics and parity plots of a checkpoint on data files",
                       description="Evaluate a checkpoint (its EMA parameters) on labelled data files "
                                   "(.xyz/.extxyz, rMD17 .npz, ASE .db).")
    e.add_argument("checkpoint")
    e.add_argument("data", nargs="+")
    e.add_argument("--output", help="folder for plots and metrics.json (default: next to the checkpoint)")
    e.add_argument("--batch-size", type=int, default=16)
    e.set_defaults(func=_evaluate)
    v = sub.add_parser("vibrate", help="harmonic frequencies, normal modes and thermochemistry",
                       description="Vibrational analysis from the exact autodiff Hessian (float64): optional "
                                   "relaxation, rigid-body projection, frequencies (cm⁻¹), normal modes (Jmol "
                                   "xyz), spectrum plot and ideal-gas (molecule) or harmonic (crystal) "
                                   "thermochemistry.")
    v.add_argument("checkpoint")
    v.add_argument("structure", help="any file ASE reads (xyz, extxyz, cif, POSCAR, ...)")
    v.add_argument("--relax", action="store_true", help="BFGS relaxation first")
    v.add_argument("--fmax", type=float, default=1e-3, help="relaxation threshold, eV/Å (default 1e-3)")
    v.add_argument("--temperature", type=float, default=298.15, help="K (default 298.15)")
    v.add_argument("--batch-size", type=int, help="Hessian columns per batch (memory-bounded); default dense")
    v.add_argument("--ir", action="store_true",
                   help="IR intensities from the dipole head (train with train.weights.dipole > 0)")
    v.add_argument("--output", help="output folder (default: STRUCTURE_vib)")
    v.set_defaults(func=_vibrate)
    ph = sub.add_parser("phonons", help="phonon frequencies at Γ and a band structure (crystals)",
                        description="Phonons from the exact autodiff force constants of a supercell: only the "
                                    "Hessian columns of one primitive cell are computed. Writes a band-structure "
                                    "plot (meV) along a path of the Brillouin zone.")
    ph.add_argument("checkpoint")
    ph.add_argument("structure", help="primitive cell, any periodic file ASE reads")
    ph.add_argument("--supercell", type=int, nargs=3, default=[3, 3, 3])
    ph.add_argument("--path", default=None, help="special points, e.g. GXWKGLUWLK (default: ASE's for the lattice)")
    ph.add_argument("--npoints", type=int, default=100)
    ph.add_argument("--batch-size", type=int, default=16, help="Hessian columns per batch")
    ph.add_argument("--output", help="output folder (default: STRUCTURE_phonons)")
    ph.set_defaults(func=_phonons)
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"equijax: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
