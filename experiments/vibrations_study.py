"""Validation of the vibrational workflow (results in docs/results/vibrations.md).

(a) autodiff Hessian vs ASE's finite-difference ``Vibrations`` run through our
    own calculator, on the same trained model: largest frequency difference.
(b) models (before and after Hessian fine-tuning) against GFN2-xTB's own
    harmonic frequencies and IR intensities (central-difference Hessian and
    dipole derivative of tblite, :func:`equijax.vibrations.vibrate_reference`),
    each at its own relaxed geometry, modes paired by eigenvector overlap
    (:func:`equijax.vibrations.match_modes`), for the trained molecules and
    for molecules never trained on; also each model at GFN2-xTB's minimum
    (the curvature error alone), and the force errors on the 500 K test
    frames.
(c) time and peak memory of the Hessian against the number of atoms: dense,
    chunked (32 columns at a time) and finite differences through the
    calculator (ASE, 4 displacements per coordinate), each in a fresh process;
    "none" is the same process without a Hessian (imports, model, structure),
    whose peak RSS is the baseline.

Usage (after ``equijax train train.weights.dipole=1.0 --output runs/dipole`` and
``equijax train equijax/configs/hessian_finetune.yaml --output runs/finetune``)::

    python experiments/vibrations_study.py --checkpoint runs/dipole/model.npz \
        --compare before=runs/dipole/model.npz after=runs/finetune/model.npz
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SMILES = {"ethanol": "CCO", "aspirin": "CC(=O)OC1=CC=CC=C1C(=O)O"}


def _fd_vibrations(atoms, calc, ir=False):
    from ase.vibrations import Infrared, Vibrations

    atoms = atoms.copy()
    atoms.calc = calc
    with tempfile.TemporaryDirectory() as tmp:
        cwd = os.getcwd()
        os.chdir(tmp)
        try:
            vib = (Infrared if ir else Vibrations)(atoms, delta=0.005, nfree=4)
            vib.run()
            f = vib.get_frequencies()
            freqs = np.where(np.abs(f.imag) > 0, -np.abs(f.imag), f.real)
            intensities = vib.intensities * 42.255 if ir else None  # (D/Å)²/amu -> km/mol
        finally:
            os.chdir(cwd)
    return freqs, intensities


def part_a(checkpoint_path, fmax=1e-4):
    """(a) autodiff vs ASE finite differences through our calculator, same model and geometry."""
    import jax

    jax.config.update("jax_enable_x64", True)
    from equijax import checkpoint, vibrations
    from equijax.calculator import EquijaxCalculator

    sys.path.insert(0, str(HERE))
    from make_data import from_smiles

    model, params, _ = checkpoint.load_model(checkpoint_path)
    rows = []
    for name in ("ethanol", "aspirin"):
        ours = vibrations.vibrate(model, params, from_smiles(SMILES[name]), relax=True, fmax=fmax)
        f_ad, _ = ours.normal_modes()
        model64, params64 = vibrations.float64_model(model, params)
        f_fd, _ = _fd_vibrations(ours.atoms, EquijaxCalculator(model=model64, params=params64))
        f_fd = np.sort(f_fd[np.argsort(np.abs(f_fd))][ours.n_rigid:])  # drop the rigid-body modes
        rows.append({"molecule": name, "atoms": len(ours.atoms), "modes": len(f_ad),
                     "autodiff_vs_fd_max_cm": float(np.max(np.abs(np.sort(f_ad) - f_fd)))})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def compare(reference, result) -> dict:
    """Frequency and IR errors of ``result`` against ``reference``, modes paired by eigenvector overlap."""
    from equijax import vibrations

    f_ref, m_ref = reference.normal_modes()
    f, m = result.normal_modes()
    index, overlap = vibrations.match_modes(m_ref, m)
    ir_ref, ir = reference.ir_intensities(), result.ir_intensities()
    by_order = np.mean(np.abs(np.sort(f) - np.sort(f_ref)))
    return {"freq_mae_cm": float(np.mean(np.abs(f[index] - f_ref))), "freq_mae_by_order_cm": float(by_order),
            "freq_max_cm": float(np.max(np.abs(f[index] - f_ref))), "ir_mae_km_mol": float(np.mean(np.abs(ir[index] - ir_ref))),
            "ir_ref_mean_km_mol": float(np.mean(ir_ref)), "mean_overlap": float(np.mean(overlap)),
            "imaginary_modes": int((f < 0).sum())}


def part_b(checkpoints, molecules, fmax=1e-4):
    """(b) each model against GFN2-xTB's own harmonic analysis, each at its own minimum; test force errors."""
    import jax

    jax.config.update("jax_enable_x64", True)
    from tblite.ase import TBLite

    from equijax import checkpoint, config as config_lib, data, io, training, vibrations

    sys.path.insert(0, str(HERE))
    from make_data import SMILES as ALL, from_smiles

    references = {}
    for name in molecules:
        t0 = time.perf_counter()
        references[name] = vibrations.vibrate_reference(from_smiles(ALL[name]), TBLite(method="GFN2-xTB", verbosity=0),
                                                        fmax=fmax, ir=True)
        print(f"GFN2-xTB {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    rows = []
    for label, path in checkpoints.items():
        model, params, _ = checkpoint.load_model(path)
        for name in molecules:
            ours = vibrations.vibrate(model, params, from_smiles(ALL[name]), relax=True, fmax=fmax, ir=True)
            # the same at GFN2-xTB's minimum: the curvature error alone, without the geometry's
            there = vibrations.vibrate(model, params, references[name].atoms, relax=False, ir=True)
            at_ref = {f"at_reference_minimum_{k}": v for k, v in compare(references[name], there).items()
                      if k in ("freq_mae_cm", "ir_mae_km_mol")}
            rows.append({"model": label, "checkpoint": str(path), "molecule": name,
                         "in_training": name in ("ethanol", "aspirin"), **compare(references[name], ours), **at_ref})
            print(json.dumps(rows[-1]), flush=True)
        for name in ("ethanol", "aspirin"):  # forces on the 500 K MD test frames of the default job
            test = io.read(config_lib.PACKAGE / "data" / f"{name}_test.xyz")
            m = training.evaluate(model.energy, params, data.Dataset(test, model.config.cutoff, 8, model.config.species))
            rows.append({"model": label, "checkpoint": str(path), "molecule": name, "test_set": f"{name}_test.xyz",
                         "forces_mae_mev_a": m["forces_mae"], "energy_mae_mev_atom": m["energy_mae"]})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _cluster(n_copies):
    from ase.io import read

    one = read(HERE / "workloads" / "aspirin.xyz")
    atoms = one.copy()
    side = int(np.ceil(n_copies ** (1 / 3)))
    for k in range(1, n_copies):
        other = one.copy()
        other.positions += 12.0 * np.array([k % side, (k // side) % side, k // side**2])
        atoms += other
    return atoms


def part_c_worker(method, n_copies, checkpoint_path):
    import jax

    jax.config.update("jax_enable_x64", True)
    from equijax import checkpoint, vibrations
    from equijax.calculator import EquijaxCalculator

    atoms = _cluster(n_copies)
    model, params, _ = checkpoint.load_model(checkpoint_path)
    model, params = vibrations.float64_model(model, params)
    t0 = time.perf_counter()
    first = warm = 0.0
    if method == "none":  # the baseline: imports, model and structure only
        pass
    elif method == "fd":
        _fd_vibrations(atoms, EquijaxCalculator(model=model, params=params))
        first = time.perf_counter() - t0
        warm = first
    else:
        batch = None if method == "dense" else 32
        vibrations.hessian_2d(model, params, atoms, batch)
        first = time.perf_counter() - t0
        t1 = time.perf_counter()
        vibrations.hessian_2d(model, params, atoms, batch)  # compiled function reused
        warm = time.perf_counter() - t1
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB -> MB, whole process
    row = {"method": method, "atoms": len(atoms), "first_s": first, "second_s": warm, "peak_rss_mb": peak,
           "device": jax.devices()[0].device_kind}
    if jax.devices()[0].platform == "gpu":
        row["peak_device_mb"] = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use", 0) / 2**20
    return row


def part_c(checkpoint_path, copies, dense_max_atoms=100, methods=("none", "dense", "chunked", "fd")):
    rows = []
    for n in copies:
        for method in methods:
            if method == "dense" and 21 * n > dense_max_atoms:
                continue  # dense memory grows as N² (4 GB at 84 atoms here): left out on a 24 GB machine
            proc = subprocess.run([sys.executable, __file__, "--worker", method, str(n), "--checkpoint",
                                   str(checkpoint_path)], capture_output=True, text=True)
            lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if not lines:
                print(f"{method} {n}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            rows.append(json.loads(lines[-1][7:]))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=Path("runs/dipole/model.npz"), help="model of (a), (c)")
    parser.add_argument("--compare", nargs="+", default=["before=runs/dipole/model.npz", "after=runs/finetune/model.npz"],
                        metavar="LABEL=MODEL", help="models of (b)")
    parser.add_argument("--molecules", nargs="+", default=["ethanol", "aspirin", "malonaldehyde", "salicylic_acid"],
                        help="molecules of (b); those beyond ethanol and aspirin were never trained on")
    parser.add_argument("--copies", type=int, nargs="+", default=[1, 2, 4, 8], help="aspirin copies for (c)")
    parser.add_argument("--parts", default="abc")
    parser.add_argument("--methods", nargs="+", default=["none", "dense", "chunked", "fd"])
    parser.add_argument("--dense-max-atoms", type=int, default=100)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "vibrations_study.json")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(part_c_worker(args.worker[0], int(args.worker[1]), args.checkpoint)), flush=True)
        return
    out = json.loads(args.out.read_text()) if args.out.exists() else {}  # keep the parts not rerun
    out.pop("validation", None)  # (a) and (b) of equijax 0.2's first release, modes matched by order
    if "a" in args.parts:
        out["autodiff_vs_fd"] = part_a(args.checkpoint)
    if "b" in args.parts:
        out["vs_gfn2"] = part_b(dict(c.split("=", 1) for c in args.compare), args.molecules)
    if "c" in args.parts:
        out["scaling"] = part_c(args.checkpoint, args.copies, args.dense_max_atoms, args.methods)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
