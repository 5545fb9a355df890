"""Cu phonons: the equijax model trained on the EMT metal set against EMT itself.

Both relax the fcc lattice constant first (equation of state through ASE),
then: equijax from its autodiff supercell force constants
(:mod:`equijax.phonons`), EMT from ASE's finite-difference ``Phonons``.
Writes ``experiments/results/cu_phonons.{png,json}``.

    equijax train metals.yaml --output runs/metals
    python experiments/phonons_cu.py --checkpoint runs/metals/model.npz
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def lattice_constant(calc, a0=3.6):
    from ase.build import bulk
    from ase.eos import EquationOfState

    volumes, energies = [], []
    for a in np.linspace(0.97 * a0, 1.03 * a0, 9):
        atoms = bulk("Cu", "fcc", a=a)
        atoms.calc = calc
        volumes.append(atoms.get_volume())
        energies.append(atoms.get_potential_energy())
    v0, _, _ = EquationOfState(volumes, energies).fit()
    return (4 * v0) ** (1 / 3)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=Path("runs/metals/model.npz"))
    parser.add_argument("--supercell", type=int, default=4)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "cu_phonons")
    args = parser.parse_args(argv)

    import jax

    jax.config.update("jax_enable_x64", True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from ase import units
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.phonons import Phonons

    from equijax import checkpoint, phonons, vibrations
    from equijax.calculator import EquijaxCalculator

    model, params, _ = checkpoint.load_model(args.checkpoint)
    model, params = vibrations.float64_model(model, params)
    n = args.supercell
    a_ours = lattice_constant(EquijaxCalculator(model=model, params=params))
    a_emt = lattice_constant(EMT())
    path = bulk("Cu", "fcc", a=a_ours).cell.bandpath("GXWKGLUWLK", npoints=120)

    fc = phonons.force_constants(model, params, bulk("Cu", "fcc", a=a_ours), (n, n, n))
    ours = phonons.frequencies(fc, path.kpts)
    emt_atoms = bulk("Cu", "fcc", a=a_emt)
    with tempfile.TemporaryDirectory() as tmp:
        cwd = os.getcwd()
        os.chdir(tmp)
        try:
            ph = Phonons(emt_atoms, EMT(), supercell=(n, n, n), delta=0.01)
            ph.run()
            ph.read(acoustic=True)
            ref = np.real(ph.band_structure(emt_atoms.cell.bandpath("GXWKGLUWLK", npoints=120).kpts)) / units.invcm
        finally:
            os.chdir(cwd)
    ours_s, ref_s = np.sort(ours, 1), np.sort(ref, 1)
    result = {"a_equijax_A": a_ours, "a_emt_A": a_emt, "supercell": n,
              "freq_mae_cm": float(np.abs(ours_s - ref_s).mean()),
              "freq_max_abs_err_cm": float(np.abs(ours_s - ref_s).max()),
              "max_freq_equijax_cm": float(ours.max()), "max_freq_emt_cm": float(ref.max())}
    print(json.dumps(result, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))

    x, special_x, labels = path.get_linear_kpoint_axis()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(x, ref_s, color="k", lw=1)
    ax.plot(x, ours_s, color="C1", lw=1, ls="--")
    ax.plot([], [], "k", label="EMT (finite differences)")
    ax.plot([], [], "C1--", label="equijax model (autodiff)")
    ax.set_xticks(special_x, [l.replace("G", "Γ") for l in labels])
    for s in special_x:
        ax.axvline(s, color="gray", lw=0.5)
    ax.set(xlim=(x[0], x[-1]), ylabel="frequency (cm⁻¹)", title=f"Cu phonons ({n}×{n}×{n} supercell)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main()
