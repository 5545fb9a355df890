"""The ``equijax`` command line.

    equijax train [CONFIG.yaml] [key=value ...]   train a potential (default config ships with the package)
    equijax config [CONFIG.yaml] [key=value ...]  every config key with its type, default and unit
    equijax evaluate MODEL DATA [DATA ...]        metrics table and parity plots
    equijax vibrate MODEL STRUCTURE               frequencies, modes, IR, thermochemistry
    equijax phonons MODEL CRYSTAL                 phonons at Γ and along a band path
    equijax md MODEL STRUCTURE                    molecular dynamics, jitted on the device
    equijax export CHECKPOINT MODEL               the small model file of a training checkpoint
    equijax convert OLD.pkl NEW.npz --trust-pickle   one-off conversion of an equijax 0.1 pickle

Every error is one line on stderr and a non-zero exit (``--debug`` shows the
traceback). MODEL is a model file (``model.npz``) or a checkpoint; neither is
ever unpickled.
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
  equijax train train.max_steps=200 --output runs/quick train.seed=1   # overrides go anywhere
  equijax config                                  # every key, type, default and unit
  equijax evaluate runs/default/model.npz equijax/data/aspirin_test.xyz
  equijax vibrate runs/default/model.npz experiments/workloads/aspirin.xyz --relax
  equijax md runs/default/model.npz equijax/data/aspirin_test.xyz --steps 2000 --replicas 8

units: energies eV, forces eV/Å, stress eV/Å³; MAEs are printed in meV/atom and meV/Å.
compiled programs are kept in $XDG_CACHE_HOME/equijax/xla (else ~/.cache/equijax/xla), so a
second run starts in seconds; EQUIJAX_CACHE_DIR=DIR moves the cache, EQUIJAX_CACHE_DIR=off disables it.
on a GPU: pip install 'equijax[cuda13]' (or [cuda12]) for the fused kernels (model.backend=auto).
"""


def _train(args):
    from equijax import config as config_lib, training

    if args.distributed:
        training.init_distributed()  # JAX_COORDINATOR_ADDRESS / _NUM_PROCESSES / _PROCESS_ID, or SLURM, ...
    config = config_lib.load(args.config, list(args.overrides) + ([f"train.init={args.init}"] if args.init else []))
    output = Path(args.output or config["output"] or "runs/default")
    result = training.fit(config, output, resume=not args.restart, progress=not args.no_progress,
                          accept_changes=args.accept_changes)
    import jax

    if jax.process_index() != 0:  # process 0 reports for the run
        return
    print()
    print(f"trained {result['steps']} steps in {result['train_time_s']:.0f} s; model file {output}/model.npz")
    if "test" in result:
        t = result["test"]
        print(f"test set ({result['n_test']} frames, best EMA parameters):")
        print(f"  energy MAE {t['energy_mae']:8.2f} meV/atom   RMSE {t['energy_rmse']:8.2f}")
        print(f"  force  MAE {t['forces_mae']:8.1f} meV/Å      RMSE {t['forces_rmse']:8.1f}")
        if "stress_mae" in t:
            print(f"  stress MAE {t['stress_mae']:8.3f} meV/Å³     RMSE {t['stress_rmse']:8.3f}")
        if "dipole_mae" in t:
            print(f"  dipole MAE {t['dipole_mae']:8.1f} me·Å       RMSE {t['dipole_rmse']:8.1f}")
        if "hessian_mae" in t:
            print(f"  H·v    MAE {t['hessian_mae'] / 1000:8.3f} eV/Å²     RMSE {t['hessian_rmse'] / 1000:8.3f}")
        if "frequency_mae" in t:
            print(f"  H·v in normal modes MAE {t['frequency_mae']:6.1f} cm⁻¹  RMSE {t['frequency_rmse']:6.1f}")
        if "displacement_mae" in t:
            print(f"  H⁺δF (minimum shift) MAE {t['displacement_mae']:6.1f} mÅ  RMSE {t['displacement_rmse']:6.1f}")
        if "dipole_derivative_mae" in t:
            print(f"  dμ/dx·v MAE {t['dipole_derivative_mae']:7.1f} me          "
                  f"RMSE {t['dipole_derivative_rmse']:7.1f}")
        print(f"  (predicting zero forces: MAE {t['zero_force_mae']:.1f} meV/Å, "
              f"{t['zero_force_mae'] / t['forces_mae']:.1f}× worse)")


def _config(args):
    import yaml

    from equijax import config as config_lib

    if args.config is None and not args.overrides:
        print("Every key of a run config (YAML sections data, model, train), with its default, [unit] and type.\n"
              "Set them in a YAML file or as overrides: equijax train my.yaml model.l_max=2 train.seed=1")
        print(config_lib.describe())
        return
    config = config_lib.load(args.config, args.overrides)
    print("# valid; the complete config with defaults filled in")
    print(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), end="")


def _export(args):
    from equijax import checkpoint

    path = checkpoint.export_model(args.checkpoint, args.model)
    print(f"model file {path} ({path.stat().st_size / 1e6:.2f} MB): config and EMA parameters")


def _convert(args):
    from equijax import checkpoint

    path = checkpoint.convert_pickle(args.old, args.new, trust_pickle=args.trust_pickle)
    print(f"converted {args.old} -> {path}")


def _evaluate(args):
    import jax
    import numpy as np

    from equijax import checkpoint, data as data_lib, io, physics

    model, params, _ = checkpoint.load_model(args.checkpoint)
    cfg = model.config
    out = Path(args.output or Path(args.checkpoint).with_suffix("").as_posix() + "_eval")
    out.mkdir(parents=True, exist_ok=True)
    derive = jax.jit(jax.vmap(physics.energy_forces_stress(model.energy), in_axes=(None, 0)))
    dtype = np.float64 if cfg.dtype == "float64" else np.float32
    sets = [data_lib.Dataset(io.read(path, species=cfg.species), cfg.cutoff, args.batch_size, cfg.species, 1, dtype)
            for path in args.data]
    pad_to = tuple(np.max([ds.pad_to for ds in sets], axis=0).tolist())  # one shape: one compilation
    rows = []
    for path, ds in zip(args.data, sets):
        ds.pad_to = pad_to
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
    if model.member is not None:
        _calibration_report(model, params, args.data, sets, rows, out)
    (out / "metrics.json").write_text(json.dumps(rows, indent=1))
    print(f"parity plots{', calibration plot' if model.member is not None else ''} and metrics.json in {out}/")


def _calibration_report(model, params, paths, sets, rows, out):
    """A committee's spread against its actual errors, per data file (printed, stored, plotted)."""
    from equijax import ensemble

    k = ensemble.size(params)
    print(f"\ncommittee of {k} members: does the spread flag the errors? (per atom; per frame for energies)")
    print(f"{'data':40s} {'mean spread':>12s} {'mean |ΔF|':>10s} {'Spearman':>9s} {'caught':>7s} {'scale':>6s} "
          f"{'E Spearman':>11s}")
    print(f"{'':40s} {'meV/Å':>12s} {'meV/Å':>10s} {'F':>9s} {'top 10%':>7s} {'':>6s} {'':>11s}")
    for path, ds, row in zip(paths, sets, rows):
        cal = row["calibration"] = ensemble.force_calibration(model, params, ds)
        print(f"{Path(path).name:40s} {cal['mean_force_spread_meV_A']:12.1f} {cal['mean_force_error_meV_A']:10.1f} "
              f"{cal['spearman']:9.2f} {100 * cal['caught']:6.0f}% {cal['scale']:6.2f} {cal['energy_spearman']:11.2f}")
    ensemble.plot_calibration({Path(r["data"]).stem: r["calibration"] for r in rows}, out / "calibration.png",
                              f"calibration, {k} members")
    print("caught: share of the 10% largest per-atom force errors whose spread is in the top 10% (10% by chance); "
          "scale: RMS error / RMS spread, the factor that makes the spread an error bar on these data")


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
    spread = None
    if model.member is not None:  # a committee: every member's frequencies, paired by mode overlap
        members = vibrations.member_frequencies(model, params, result, args.batch_size)
        spread = members.std(0)
        np.savetxt(out / "frequencies_members_cm.txt", members.T,
                   header="harmonic frequencies of each committee member (columns), cm^-1, rows paired with "
                          "frequencies_cm.txt by normal-mode overlap")
    print(f"{len(atoms)} atoms; {result.n_rigid} rigid-body modes projected out; {len(freqs)} vibrations"
          + (f"; ± is the spread (std) of {len(members)} committee members" if spread is not None else "") + ":")
    print("  mode  freq (cm⁻¹)" + ("   ± (cm⁻¹)" if spread is not None else "") + ("   IR (km/mol)" if args.ir else ""))
    for k, f in enumerate(freqs):
        print(f"  {k + 1:4d} {f:12.1f}" + (f" {spread[k]:10.1f}" if spread is not None else "")
              + (f" {intensities[k]:13.2f}" if args.ir else "") + ("  (imaginary)" if f < 0 else ""))
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
    print("Γ-point frequencies (cm⁻¹): " + " ".join(f"{f:.1f}" for f in gamma))
    bs = phonons.band_structure(fc, args.path, args.npoints)
    fig, ax = plt.subplots(figsize=(7, 4))
    bs.plot(ax=ax, emin=min(0.0, float(bs.energies.min()) * 1.1), emax=float(bs.energies.max()) * 1.1,
            ylabel="phonon energy (meV)")
    fig.savefig(out / "band_structure.png", dpi=120)
    bs.write(str(out / "band_structure.json"))
    np.savetxt(out / "gamma_cm.txt", gamma, header="phonon frequencies at Gamma, cm^-1")
    print(f"band_structure.png, band_structure.json (meV), gamma_cm.txt in {out}/")


def _md(args):
    import jax

    if args.float64:
        jax.config.update("jax_enable_x64", True)
    import ase.io

    from equijax import checkpoint, md, vibrations

    model, params, _ = checkpoint.load_model(args.checkpoint)
    if args.float64:
        model, params = vibrations.float64_model(model, params)
    atoms = ase.io.read(args.structure, index=args.frame)
    out = Path(args.output or Path(args.structure).stem + "_md")
    n_atoms = len(atoms)
    print(f"{n_atoms} atoms x {args.replicas} replica(s), {args.ensemble}, {args.temperature:g} K, "
          f"dt {args.timestep:g} fs, {args.steps} steps ({args.steps * args.timestep / 1000:g} ps)"
          + (f", {args.pressure:g} GPa" if args.ensemble == "npt" else ""))
    result = md.simulate(model, params, atoms, ensemble=args.ensemble, temperature=args.temperature,
                         timestep=args.timestep, steps=args.steps, interval=args.interval, pressure=args.pressure,
                         friction=args.friction, tau=args.tau, tau_p=args.tau_p,
                         compressibility=args.compressibility, seed=args.seed, replicas=args.replicas,
                         minimize=args.minimize, fmax=args.fmax, skin=args.skin, capacity=args.capacity,
                         max_force_spread=args.max_force_spread, on_spread=args.on_spread,
                         output=out, progress=not args.no_progress)
    f = result.frames
    timing = "compile included: a run of one chunk" if result.compile_included else "compile excluded"
    print(f"{result.steps_per_second:.1f} steps/s ({result.steps_per_second * args.replicas:.1f} replica-steps/s), "
          f"{result.ns_per_day:.3g} ns/day per replica, {timing}; "
          f"neighbour list: capacity {result.capacity}, {result.reallocations} reallocation(s)")
    if f is not None:
        drift = (f.conserved[-1] - f.conserved[0]) / max(n_atoms, 1) * 1000
        print(f"mean temperature {f.temperature.mean():.1f} K; conserved-quantity change "
              f"{drift.mean():+.3f} meV/atom over the run (mean over replicas)")
    print(f"trajectory (extxyz), md_log.csv, md.png, summary.json in {out}/")


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


class UsageError(Exception):
    """A command line that does not parse."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        raise UsageError(f"{message} (see {self.prog} --help)")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="equijax", description="E(3)-equivariant interatomic potentials in JAX.",
                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    t = sub.add_parser("train", help="train a potential from a YAML config",
                       description="Train a NequIP potential. With no CONFIG the shipped default "
                                   "(equijax/configs/default.yaml) trains on the bundled GFN2-xTB data. "
                                   "Overrides (section.key=value) may stand anywhere; every key, its type, "
                                   "default and unit: `equijax config`. Writes OUTPUT/model.npz (the model "
                                   "file), checkpoint.npz, metrics.jsonl, learning_curve.png, result.json. A run "
                                   "resumes from OUTPUT/checkpoint.npz if it exists, and stops if the config "
                                   "differs from the checkpoint's.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("config", nargs="?", help="YAML config (default: the shipped default.yaml)")
    t.add_argument("--output", help="run folder (default: the config's output, else runs/default)")
    t.add_argument("--restart", action="store_true", help="ignore an existing checkpoint and start over")
    t.add_argument("--accept-changes", action="store_true",
                   help="resume even though the config differs from the checkpoint's (the new values apply)")
    t.add_argument("--init", metavar="MODEL",
                   help="fine-tune: start from this model file (same as train.init=MODEL), e.g. "
                        "equijax train equijax/configs/hessian_finetune.yaml --init runs/dipole/model.npz")
    t.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    t.add_argument("--distributed", action="store_true",
                   help="one of several processes (hosts, or processes of one host) training together: "
                        "reads JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and "
                        "JAX_PROCESS_ID, or detects SLURM/Open MPI; process 0 writes the files")
    t.set_defaults(func=_train)
    c = sub.add_parser("config", help="every config key with its type, default and unit; or check a config",
                       description="With no arguments: the schema of run configs. With a CONFIG and/or "
                                   "overrides: validate them and print the complete config.")
    c.add_argument("config", nargs="?", help="YAML config to check")
    c.set_defaults(func=_config)
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
    v = sub.add_parser("vibrate", help="harmonic frequencies, normal modes and thermochemistry",
                       description="Vibrational analysis from the exact autodiff Hessian (float64): optional "
                                   "relaxation, rigid-body projection, frequencies (cm⁻¹), normal modes (Jmol "
                                   "xyz), spectrum plot and ideal-gas (molecule) or harmonic (crystal) "
                                   "thermochemistry.")
    v.add_argument("checkpoint", metavar="MODEL", help="model.npz or checkpoint.npz")
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
    ph.add_argument("checkpoint", metavar="MODEL", help="model.npz or checkpoint.npz")
    ph.add_argument("structure", help="primitive cell, any periodic file ASE reads")
    ph.add_argument("--supercell", type=int, nargs=3, default=[3, 3, 3])
    ph.add_argument("--path", default=None, help="special points, e.g. GXWKGLUWLK (default: ASE's for the lattice)")
    ph.add_argument("--npoints", type=int, default=100)
    ph.add_argument("--batch-size", type=int, default=16, help="Hessian columns per batch")
    ph.add_argument("--output", help="output folder (default: STRUCTURE_phonons)")
    ph.set_defaults(func=_phonons)
    m = sub.add_parser("md", help="molecular dynamics (NVE, NVT, NPT) jitted on the device, many replicas",
                       description="Molecular dynamics with the whole loop in JAX: an in-JAX neighbour list "
                                   "(reallocated and the chunk replayed on overflow), integrators run in "
                                   "chunks, replicas in one vmapped call. Writes trajectory.extxyz (one per "
                                   "replica), md_log.csv (energies eV, temperature K, pressure GPa), md.png "
                                   "and summary.json. Stops with an error at the first unphysical frame, "
                                   "keeping every frame before it.", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("checkpoint", metavar="MODEL", help="model.npz or checkpoint.npz")
    m.add_argument("structure", help="starting structure, any file ASE reads")
    m.add_argument("--frame", default=0, type=int, help="which frame of STRUCTURE (default 0)")
    m.add_argument("--ensemble", default="nvt-langevin", choices=("nve", "nvt-langevin", "nvt-nose-hoover", "npt"),
                   help="NVE (velocity Verlet), NVT (BAOAB Langevin or Nosé–Hoover chain), NPT (Langevin + "
                        "stochastic cell rescaling; periodic cells); default nvt-langevin")
    m.add_argument("--temperature", type=float, default=300.0, help="K (default 300; initial velocities too)")
    m.add_argument("--pressure", type=float, default=0.0, help="GPa, NPT only (default 0)")
    m.add_argument("--timestep", type=float, default=0.5, help="fs (default 0.5)")
    m.add_argument("--steps", type=int, default=2000, help="MD steps (default 2000)")
    m.add_argument("--interval", type=int, default=10, help="steps between written frames (default 10)")
    m.add_argument("--replicas", type=int, default=1, help="independent copies run at once (default 1)")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--friction", type=float, default=0.01, help="Langevin friction, 1/fs (default 0.01)")
    m.add_argument("--tau", type=float, default=100.0, help="Nosé–Hoover period, fs (default 100)")
    m.add_argument("--tau-p", type=float, default=1000.0, help="barostat relaxation time, fs (default 1000)")
    m.add_argument("--compressibility", type=float, default=4.6e-5, help="1/bar, NPT (default 4.6e-5, water)")
    m.add_argument("--minimize", action="store_true", help="FIRE minimisation first")
    m.add_argument("--fmax", type=float, default=0.05, help="minimisation threshold, eV/Å (default 0.05)")
    m.add_argument("--skin", type=float, help="neighbour-list skin, Å (default 0.25)")
    m.add_argument("--capacity", type=int, help="neighbour-list pairs (default: 1.15 x the pairs found; grows on overflow)")
    m.add_argument("--float64", action="store_true", help="run in double precision")
    m.add_argument("--max-force-spread", type=float, metavar="EV_PER_A",
                   help="committee models only: stop (or warn, see --on-spread) at the first frame where the "
                        "members' per-atom forces disagree by more than this, eV/Å (the spread is logged in "
                        "md_log.csv either way)")
    m.add_argument("--on-spread", choices=("stop", "warn"), default="stop",
                   help="what --max-force-spread does: stop, keeping every frame before (default), or warn")
    m.add_argument("--output", help="output folder (default: STRUCTURE_md)")
    m.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    m.set_defaults(func=_md)
    x = sub.add_parser("export", help="write the small model file (config + EMA parameters) of a checkpoint")
    x.add_argument("checkpoint", help="checkpoint.npz of a run")
    x.add_argument("model", help="model file to write, e.g. model.npz")
    x.set_defaults(func=_export)
    cv = sub.add_parser("convert", help="convert an equijax 0.1 pickle checkpoint (trusted files only)",
                        description="One-off conversion of a pickle checkpoint of equijax 0.1 to the current "
                                    "format. Unpickling can run arbitrary code, so this needs --trust-pickle: "
                                    "use it only for files you made yourself or otherwise trust.")
    cv.add_argument("old", help="the .pkl file")
    cv.add_argument("new", help="the .npz file to write")
    cv.add_argument("--trust-pickle", action="store_true", help="I trust this file: unpickle it")
    cv.set_defaults(func=_convert)
    return p


def _parse(argv):
    """Parse, letting ``key=value`` overrides stand anywhere after ``train``/``config``."""
    args, extra = parser().parse_known_args(argv)
    overrides = [a for a in extra if "=" in a and not a.startswith("-")]
    unknown = [a for a in extra if a not in overrides]
    if unknown:
        raise UsageError(f"unrecognized arguments: {' '.join(unknown)} (see equijax {args.command} --help)")
    if args.command in ("train", "config"):
        if args.config and "=" in args.config and not args.config.startswith("-"):
            overrides.insert(0, args.config)  # `equijax train a=1`: no config file, an override
            args.config = None
        args.overrides = overrides
    elif overrides:
        raise UsageError(f"unrecognized arguments: {' '.join(overrides)} (see equijax {args.command} --help)")
    return args


#: commands that run models: the console script restarts once for huge pages before them
COMPUTE_COMMANDS = ("train", "evaluate", "vibrate", "phonons", "md")


def main(argv=None):
    """Run the command line; every error is one line on stderr and exit code 2 (1: internal).

    As the console script (``argv`` None), a command that runs models first
    restarts the process with transparent huge pages for XLA's buffers
    (:mod:`equijax.hugepages`); called from Python with ``argv``, it never does.
    """
    console = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    try:
        args = _parse(argv)
        if console and args.command in COMPUTE_COMMANDS:
            from equijax import hugepages

            hugepages.restart(argv, debug)  # returns only when not needed (already on, opted out, not Linux)
        if args.command not in (None, "config"):
            from equijax import compile_cache

            compile_cache.enable()  # the second run of any command skips compilation
        args.func(args)
    except KeyboardInterrupt:
        print("equijax: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as err:  # noqa: BLE001: the CLI's contract is one line, never a traceback
        if debug:
            raise
        user_error = isinstance(err, (UsageError, ValueError, FileNotFoundError, IsADirectoryError,
                                      PermissionError, RuntimeError, TypeError, MemoryError))
        message = " ".join(str(err).split()) or type(err).__name__
        if not user_error:
            message = f"{type(err).__name__}: {message} (an internal error: please report it; --debug shows more)"
        print(f"equijax: error: {message}", file=sys.stderr)
        sys.exit(2 if user_error else 1)


if __name__ == "__main__":
    main()
