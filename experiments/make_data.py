"""Reference data from real methods: GFN2-xTB molecular dynamics and EMT metals.

Molecules (rMD17 style): geometry from SMILES (RDKit, MMFF), then Langevin MD
at 500 K with GFN2-xTB forces (tblite), a frame every ``--stride`` steps
after ``--equilibrate`` steps. Training frames and test frames come from two
separate trajectories (different seeds and starting velocities). Each frame
stores the GFN2-xTB energy (eV), forces (eV/Å) and dipole (e·Å; tblite
returns e·Å although its docstring says Debye).

Metals: ASE's EMT for Cu, Ni and a random Cu/Ni alloy, fcc supercells
(32 atoms) under random strains of up to ±3%, Langevin MD at 300, 600 and
900 K; energy, forces and stress (eV/Å³, ASE sign convention).

Isolated atoms: the energy of each element alone (H, C, N, O, F with
GFN2-xTB, at the same calculator settings as the molecular frames; Cu and Ni
with EMT), the reference for transferable per-element energy shifts (E0s).

Hessians (``--hessians``): for each molecule, its GFN2-xTB minimum (BFGS to
0.1 meV/Å), then half of the frames displaced along its normal modes with
classical Boltzmann amplitudes at a temperature drawn from 50-500 K (the
curvature around the minimum, where harmonic frequencies live) and half from
a 500 K MD trajectory of its own (seeds 3 and 4: not the trajectories of the
force data). Every frame carries energy, forces, dipole, the Hessian
(eV/Å², central differences of analytic tblite gradients, δ = 0.005 Å, 6N
gradients, symmetrised; per-atom array ``hessian``: atom a's row holds
H[a, i, b, j] in the order (i, b, j)) and the
dipole derivative (e, ``dipole_derivative``, [a, 3 i + c] = dμ_c/dx_ai),
written gzipped as ``{name}_hessian_train.xyz.gz`` / ``_test.xyz.gz``. The
shipped set (ethanol and aspirin, 120 train + 30 test frames each) was made by::

    python experiments/make_data.py --hessians --out equijax/data --train 120 --test 30

in 2 min 20 s on 2 cores (0.1 s per ethanol Hessian, 0.7 s per aspirin Hessian).

Outputs extended XYZ files ``{name}_train.xyz`` and ``{name}_test.xyz``, and
``e0s_gfn2-xtb.json`` and ``e0s_emt.json`` (eV).

The default set shipped in ``equijax/data`` (ethanol and aspirin, 500 train +
100 test frames each; EMT Cu, Ni and CuNi, 20 train + 5 test frames per system
and temperature)
was made by::

    python experiments/make_data.py --out equijax/data

which takes about 4 minutes on 2 cores. The transfer check of per-element
energy references (a molecule of the same elements that is not trained on)::

    python experiments/make_data.py --out equijax/data --molecules malonaldehyde --train 0 --test 50 --no-metals

Larger sets, e.g. for learning
curves (about 1 minute per 1000 aspirin frames per core)::

    python experiments/make_data.py --out data/large --molecules aspirin --train 2000 --test 500 --no-metals
"""

from __future__ import annotations

import argparse
import os
import time
from multiprocessing import Pool
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core per process: faster for small molecules

import numpy as np

SMILES = {
    "ethanol": "CCO",
    "aspirin": "CC(=O)OC1=CC=CC=C1C(=O)O",
    "malonaldehyde": "O=CC=CO",
    "toluene": "Cc1ccccc1",
    "uracil": "O=C1C=CNC(=O)N1",
    "naphthalene": "c1ccc2ccccc2c1",
    "salicylic_acid": "O=C(O)c1ccccc1O",
    "benzene": "c1ccccc1",
    "paracetamol": "CC(=O)Nc1ccc(O)cc1",
    "azobenzene": "c1ccc(cc1)/N=N/c1ccccc1",
}


def from_smiles(smiles: str, seed: int = 0):
    """ASE Atoms of an MMFF-optimised conformer (RDKit), nothing downloaded."""
    from ase import Atoms
    from rdkit import Chem
    from rdkit.Chem import AllChem

    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    if AllChem.EmbedMolecule(mol, randomSeed=seed) != 0:
        raise RuntimeError(f"RDKit could not embed {smiles}")
    AllChem.MMFFOptimizeMolecule(mol)
    pos = mol.GetConformer().GetPositions()
    return Atoms([a.GetSymbol() for a in mol.GetAtoms()], positions=pos)


def _frozen_copy(atoms):
    """A copy holding the calculator's results as a SinglePointCalculator."""
    from ase.calculators.singlepoint import SinglePointCalculator

    copy = atoms.copy()
    copy.arrays.pop("momenta", None)  # labels only
    results = {k: np.copy(v) for k, v in atoms.calc.results.items() if k in ("energy", "forces", "stress", "dipole")}
    copy.calc = SinglePointCalculator(copy, **results)
    return copy


def run_md(atoms, calc, temperature, n_frames, stride, equilibrate, seed, timestep_fs=0.5, friction=0.01, label=""):
    """Langevin MD; returns ``n_frames`` labelled frames, one every ``stride`` steps."""
    from ase import units
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary, ZeroRotation
    from tqdm import tqdm

    atoms = atoms.copy()
    atoms.calc = calc
    rng = np.random.default_rng(seed)
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=rng)
    Stationary(atoms)
    if not atoms.pbc.any():
        ZeroRotation(atoms)
    dyn = Langevin(atoms, timestep_fs * units.fs, temperature_K=temperature, friction=friction / units.fs, rng=rng)
    dyn.run(equilibrate)
    frames = []
    for _ in tqdm(range(n_frames), desc=label, leave=False, mininterval=5):
        dyn.run(stride)
        atoms.get_forces()
        frames.append(_frozen_copy(atoms))
    return frames


def molecule_job(args):
    name, n_train, n_test, stride, equilibrate, out = args
    import ase.io
    from tblite.ase import TBLite

    t0 = time.time()
    start = from_smiles(SMILES[name])
    for split, n, seed in (("train", n_train, 1), ("test", n_test, 2)):
        if n == 0:
            continue
        calc = TBLite(method="GFN2-xTB", verbosity=0)
        frames = run_md(start, calc, 500.0, n, stride, equilibrate, seed, label=f"{name} {split}")
        ase.io.write(Path(out) / f"{name}_{split}.xyz", frames, format="extxyz")
    return f"{name}: {n_train}+{n_test} frames, {time.time() - t0:.0f} s"


def _label_hessian(atoms, calc, kind):
    """Energy, forces, dipole, the finite-difference Hessian and dipole derivative of ``atoms`` by ``calc``."""
    from equijax.vibrations import finite_difference_hessian

    atoms = atoms.copy()
    atoms.calc = calc
    hessian, dmu = finite_difference_hessian(atoms, calc, dipole_derivative=True)
    atoms.get_forces()
    frame = _frozen_copy(atoms)
    frame.arrays["hessian"] = hessian.reshape(len(atoms), -1)  # row (atom, xyz), columns (atom', xyz')
    frame.arrays["dipole_derivative"] = dmu.reshape(len(atoms), 9)  # [a, 3 i + c] = dμ_c/dx_ai, e
    frame.info["sampling"] = kind
    return frame


def hessian_job(args):
    """Hessian-labelled frames of one molecule: its minimum, normal-mode samples and 500 K MD."""
    name, n_train, n_test, stride, equilibrate, out = args
    import ase.io
    from ase.optimize import BFGS
    from tblite.ase import TBLite
    from tqdm import tqdm

    from equijax.vibrations import finite_difference_hessian, normal_mode_samples

    t0 = time.time()
    calc = TBLite(method="GFN2-xTB", verbosity=0)
    minimum = from_smiles(SMILES[name])
    minimum.calc = calc
    BFGS(minimum, logfile=None).run(fmax=1e-4, steps=2000)
    h0 = finite_difference_hessian(minimum, calc)
    for split, n, seed in (("train", n_train, 3), ("test", n_test, 4)):
        if n == 0:
            continue
        rng = np.random.default_rng(seed)
        n_nms = n // 2
        # normal-mode samples at 50-500 K: the curvature around the minimum, where frequencies live
        geometries = [(a, "normal_modes") for t in rng.uniform(50, 500, n_nms)
                      for a in normal_mode_samples(minimum, h0, t, 1, rng)]
        geometries += [(a, "md_500K") for a in run_md(minimum, calc, 500.0, n - n_nms - (split == "train"),
                                                      stride, equilibrate, seed, label=f"{name} md")]
        if split == "train":
            geometries.insert(0, (minimum, "minimum"))
        frames = [_label_hessian(a, calc, kind) for a, kind in tqdm(geometries, desc=f"{name} {split} Hessians",
                                                                   leave=False, mininterval=5)]
        ase.io.write(Path(out) / f"{name}_hessian_{split}.xyz.gz", frames, format="extxyz")  # ~4x smaller
    return f"{name}: {n_train}+{n_test} Hessian frames, {time.time() - t0:.0f} s"


def metals_job(args):
    n_train, n_test, stride, equilibrate, out, seed = args
    import ase.io
    from ase.build import bulk
    from ase.calculators.emt import EMT

    t0 = time.time()
    rng = np.random.default_rng(seed)
    systems = {"Cu": bulk("Cu", "fcc", a=3.61, cubic=True), "Ni": bulk("Ni", "fcc", a=3.52, cubic=True)}
    alloy = bulk("Cu", "fcc", a=3.57, cubic=True) * (2, 2, 2)
    alloy.numbers[rng.permutation(len(alloy))[: len(alloy) // 2]] = 28
    splits = {"train": [], "test": []}
    for split, n in (("train", n_train), ("test", n_test)):
        for name, atoms in list(systems.items()) + [("CuNi", alloy)]:
            atoms = atoms * (2, 2, 2) if len(atoms) < 32 else atoms.copy()
            for temperature in (300.0, 600.0, 900.0):
                # a fresh random strain for every few frames: stress labels that vary
                frames = []
                while len(frames) < n:
                    strained = atoms.copy()
                    eps = rng.uniform(-0.03, 0.03, (3, 3))
                    strained.set_cell(strained.cell.array @ (np.eye(3) + 0.5 * (eps + eps.T)), scale_atoms=True)
                    frames += run_md(strained, EMT(), temperature, min(10, n - len(frames)), stride, equilibrate,
                                     int(rng.integers(1 << 30)), timestep_fs=2.0, friction=0.02, label=f"{name} {split}")
                splits[split] += frames
    for split, frames in splits.items():
        ase.io.write(Path(out) / f"metals_{split}.xyz", frames, format="extxyz")
    return f"metals (EMT Cu, Ni, CuNi): {len(splits['train'])}+{len(splits['test'])} frames, {time.time() - t0:.0f} s"


def isolated_atoms(out, molecular=("H", "C", "N", "O", "F"), metals=("Cu", "Ni")):
    """Write the isolated-atom energies of both reference methods as JSON (eV)."""
    import json

    from ase import Atoms
    from ase.calculators.emt import EMT
    from tblite.ase import TBLite

    def energy(symbol, calc):
        atoms = Atoms(symbol, positions=[[0.0, 0.0, 0.0]])
        atoms.calc = calc
        return float(atoms.get_potential_energy())

    files = {
        "e0s_gfn2-xtb.json": {"method": "GFN2-xTB (tblite, default occupations, 300 K electronic temperature)",
                              "energies": {s: energy(s, TBLite(method="GFN2-xTB", verbosity=0)) for s in molecular}},
        "e0s_emt.json": {"method": "EMT (ASE)", "energies": {s: energy(s, EMT()) for s in metals}},
    }
    for name, content in files.items():
        content.update(units="eV", made_by="experiments/make_data.py")
        (Path(out) / name).write_text(json.dumps(content, indent=1) + "\n")
    return "isolated atoms: " + ", ".join(files)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("equijax/data"), help="output folder")
    parser.add_argument("--molecules", nargs="+", default=["ethanol", "aspirin"], choices=sorted(SMILES))
    parser.add_argument("--train", type=int, default=500, help="training frames per molecule")
    parser.add_argument("--test", type=int, default=100, help="test frames per molecule")
    parser.add_argument("--stride", type=int, default=20, help="MD steps (0.5 fs) between frames")
    parser.add_argument("--equilibrate", type=int, default=1000, help="MD steps before the first frame")
    parser.add_argument("--no-metals", action="store_true", help="skip the EMT metal set")
    parser.add_argument("--metal-train", type=int, default=20, help="metal frames per system and temperature (train)")
    parser.add_argument("--metal-test", type=int, default=5, help="metal frames per system and temperature (test)")
    parser.add_argument("--hessians", action="store_true",
                        help="instead: Hessian-labelled frames {name}_hessian_{train,test}.xyz")
    parser.add_argument("--processes", type=int, default=os.cpu_count())
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    job = hessian_job if args.hessians else molecule_job
    jobs = [(job, (m, args.train, args.test, args.stride, args.equilibrate, args.out)) for m in args.molecules]
    if not (args.no_metals or args.hessians):
        jobs.append((metals_job, (args.metal_train, args.metal_test, 10, 200, args.out, 0)))
    t0 = time.time()
    if not args.hessians:
        print(isolated_atoms(args.out), flush=True)
    with Pool(args.processes) as pool:
        results = [pool.apply_async(fn, (a,)) for fn, a in jobs]
        for r in results:
            print(r.get(), flush=True)
    print(f"done in {time.time() - t0:.0f} s; files in {args.out}")


if __name__ == "__main__":
    main()
