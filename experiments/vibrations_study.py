"""Validation of the vibrational workflow (results in the README).

(a) autodiff Hessian vs ASE's finite-difference ``Vibrations`` run through our
    own calculator, on the same trained model: largest frequency difference.
(b) a model trained on GFN2-xTB MD (energies, forces, dipoles) against
    GFN2-xTB's own harmonic frequencies and IR intensities (ASE ``Vibrations``
    and ``Infrared`` with tblite), each at its own relaxed geometry; modes
    matched by order.
(c) time and peak memory of the Hessian against the number of atoms: dense,
    chunked (32 columns at a time) and finite differences through the
    calculator (ASE, 4 displacements per coordinate), each in a fresh process;
    "none" is the same process without a Hessian (imports, model, structure),
    whose peak RSS is the baseline.

Usage (after ``equijax train train.weights.dipole=1.0 --output runs/dipole``)::

    python experiments/vibrations_study.py --checkpoint runs/dipole/model.npz
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


def part_a_b(checkpoint_path, fmax=1e-4):
    import jax

    jax.config.update("jax_enable_x64", True)
    from ase.optimize import BFGS
    from tblite.ase import TBLite

    from equijax import checkpoint, vibrations
    from equijax.calculator import EquijaxCalculator

    sys.path.insert(0, str(HERE))
    from make_data import from_smiles

    model, params, _ = checkpoint.load_model(checkpoint_path)
    rows = []
    for name, smiles in SMILES.items():
        start = from_smiles(smiles)
        ours = vibrations.vibrate(model, params, start, relax=True, fmax=fmax, ir=True)
        f_ad, modes = ours.normal_modes()
        ir_ad = ours.ir_intensities()
        model64, params64 = vibrations.float64_model(model, params)
        f_fd, _ = _fd_vibrations(ours.atoms, EquijaxCalculator(model=model64, params=params64))
        f_fd = np.sort(f_fd[np.argsort(np.abs(f_fd))][ours.n_rigid:])  # drop the rigid-body modes
        ref_atoms = start.copy()
        ref_atoms.calc = TBLite(method="GFN2-xTB", verbosity=0)
        BFGS(ref_atoms, logfile=None).run(fmax=fmax, steps=1000)
        f_ref, ir_ref = _fd_vibrations(ref_atoms, TBLite(method="GFN2-xTB", verbosity=0), ir=True)
        order = np.argsort(np.abs(f_ref))
        f_ref, ir_ref = f_ref[order][ours.n_rigid:], ir_ref[order][ours.n_rigid:]
        rows.append({
            "molecule": name, "atoms": len(start), "modes": len(f_ad),
            "autodiff_vs_fd_max_cm": float(np.max(np.abs(np.sort(f_ad) - f_fd))),
            "vs_gfn2_freq_mae_cm": float(np.mean(np.abs(np.sort(f_ad) - np.sort(f_ref)))),
            "vs_gfn2_ir_mae_km_mol": float(np.mean(np.abs(ir_ad[np.argsort(f_ad)] - ir_ref[np.argsort(f_ref)]))),
            "gfn2_ir_mean_km_mol": float(np.mean(ir_ref)),
            "imaginary_modes_model": int((f_ad < 0).sum()),
        })
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
    parser.add_argument("--checkpoint", type=Path, default=Path("runs/dipole/model.npz"))
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
    if "a" in args.parts or "b" in args.parts:
        out["validation"] = part_a_b(args.checkpoint)
    if "c" in args.parts:
        out["scaling"] = part_c(args.checkpoint, args.copies, args.dense_max_atoms, args.methods)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
