"""Where a model's harmonic frequencies go wrong: per mode, at GFN2-xTB's minimum and at the model's own.

For ethanol and aspirin: each mode's frequency error against GFN2-xTB (modes
paired by eigenvector overlap), split into X–H stretches (> 2500 cm⁻¹) and
the rest; ethanol's H–O–C–C dihedral at each minimum (which conformer the
model relaxes to); and the model's forces at GFN2-xTB's minimum (what moves
its own minimum). The diagnosis of the Hessian training (docs: results/hessian-training.md)::

    python experiments/mode_errors.py LABEL=MODEL ...   # -> experiments/results/mode_errors.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def dihedral_hocc(atoms) -> float:
    """Ethanol's H–O–C–C dihedral (degrees): the OH torsion's conformer."""
    symbols, p = atoms.get_chemical_symbols(), atoms.positions
    o = symbols.index("O")
    carbons = [i for i, x in enumerate(symbols) if x == "C"]
    c1 = min(carbons, key=lambda i: np.linalg.norm(p[i] - p[o]))
    c2 = next(c for c in carbons if c != c1)
    h = min((i for i, x in enumerate(symbols) if x == "H"), key=lambda i: np.linalg.norm(p[i] - p[o]))
    return float(atoms.get_dihedral(h, o, c1, c2))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", metavar="LABEL=MODEL")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "mode_errors.json")
    args = parser.parse_args(argv)

    import jax

    jax.config.update("jax_enable_x64", True)
    from tblite.ase import TBLite

    from equijax import checkpoint, vibrations
    from equijax.calculator import EquijaxCalculator

    sys.path.insert(0, str(HERE))
    from make_data import SMILES, from_smiles

    molecules = ("ethanol", "aspirin")
    refs = {n: vibrations.vibrate_reference(from_smiles(SMILES[n]), TBLite(method="GFN2-xTB", verbosity=0),
                                            fmax=1e-4) for n in molecules}
    rows = []
    for item in args.models:
        label, path = item.split("=", 1)
        model, params, _ = checkpoint.load_model(path)
        for name in molecules:
            f_ref, m_ref = refs[name].normal_modes()
            row = {"model": label, "checkpoint": path, "molecule": name, "reference_cm": f_ref.tolist()}
            for where, result in (("at_reference", vibrations.vibrate(model, params, refs[name].atoms)),
                                  ("own", vibrations.vibrate(model, params, from_smiles(SMILES[name]), relax=True,
                                                             fmax=1e-4))):
                f, m = result.normal_modes()
                index, _ = vibrations.match_modes(m_ref, m)
                err = f[index] - f_ref
                stretch = f_ref > 2500
                row[where] = {"errors_cm": err.tolist(), "mae_cm": float(np.abs(err).mean()),
                              "stretches_mae_cm": float(np.abs(err[stretch]).mean()),
                              "rest_mae_cm": float(np.abs(err[~stretch]).mean())}
                if name == "ethanol":
                    row[where]["dihedral_hocc_deg"] = dihedral_hocc(result.atoms)
            atoms = refs[name].atoms.copy()
            atoms.calc = EquijaxCalculator(path)
            forces = atoms.get_forces()
            row["forces_at_reference_minimum"] = {"max_ev_a": float(np.abs(forces).max()),
                                                  "rms_ev_a": float(np.sqrt((forces**2).mean()))}
            if name == "ethanol":
                row["reference_dihedral_hocc_deg"] = dihedral_hocc(refs[name].atoms)
            rows.append(row)
            print(f"{label:22s} {name:8s} at GFN2 min {row['at_reference']['mae_cm']:5.1f} cm⁻¹ "
                  f"(stretches {row['at_reference']['stretches_mae_cm']:5.1f}, rest {row['at_reference']['rest_mae_cm']:5.1f})"
                  f"  own min {row['own']['mae_cm']:5.1f} (stretches {row['own']['stretches_mae_cm']:5.1f})"
                  f"  |F| at GFN2 min max {row['forces_at_reference_minimum']['max_ev_a']:.3f} eV/Å"
                  + (f"  H-O-C-C {row['own']['dihedral_hocc_deg']:.0f}° (GFN2 {row['reference_dihedral_hocc_deg']:.0f}°)"
                     if name == "ethanol" else ""), flush=True)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
