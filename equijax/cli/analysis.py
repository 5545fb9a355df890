"""``equijax vibrate`` and ``equijax phonons``: harmonic analysis from the autodiff Hessian."""

from __future__ import annotations

import json
from pathlib import Path


def _vibrate(args):
    import ase.io
    import numpy as np

    from equijax import plots, vibrations
    from equijax.cli.common import load_model

    model, params, payload = load_model(args.checkpoint, float64=True)  # the analysis runs in float64
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
    plots.spectrum(freqs, out / "spectrum.png", Path(args.structure).stem, intensities)
    try:
        thermo = result.thermo(args.temperature)
        print(f"thermochemistry at {args.temperature} K (eV): " + ", ".join(f"{k} {v:.4f}" for k, v in thermo.items()))
        (out / "thermo.json").write_text(json.dumps({"temperature_K": args.temperature, **thermo}, indent=1))
    except ValueError as err:
        print(f"no thermochemistry: {err}")
    print(f"modes (Jmol: modes.xyz), spectrum.png, hessian.npy (eV/Å²) in {out}/")


def _phonons(args):
    import ase.io
    import numpy as np

    from equijax import phonons, plots
    from equijax.cli.common import load_model

    model, params, _ = load_model(args.checkpoint, float64=True)
    prim = ase.io.read(args.structure)
    if not prim.pbc.all():
        raise ValueError(f"{args.structure}: phonons need a cell periodic in all three directions")
    fc = phonons.force_constants(model, params, prim, tuple(args.supercell), args.batch_size)
    out = Path(args.output or Path(args.structure).stem + "_phonons")
    out.mkdir(parents=True, exist_ok=True)
    gamma = phonons.frequencies(fc, [[0, 0, 0]])[0]
    print("Γ-point frequencies (cm⁻¹): " + " ".join(f"{f:.1f}" for f in gamma))
    bs = phonons.band_structure(fc, args.path, args.npoints)
    plots.band_structure(bs, out / "band_structure.png")
    bs.write(str(out / "band_structure.json"))
    np.savetxt(out / "gamma_cm.txt", gamma, header="phonon frequencies at Gamma, cm^-1")
    print(f"band_structure.png, band_structure.json (meV), gamma_cm.txt in {out}/")


def register(sub, epilog: str) -> None:
    """Add this module's commands to the ``equijax`` parser."""
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
