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

Many molecules (``--qm9 N``): N distinct molecules drawn at random (seed 0)
from QM9's 133,885 B3LYP equilibrium geometries (PyPI ``qm9pack``, MIT; H, C,
N, O, F, up to 9 heavy atoms), each run for 30 fs of GFN2-xTB Langevin MD at
500 K (0.5 fs steps, Maxwell-Boltzmann start) and labelled at four frames
10 fs apart (energy, forces, dipole; same settings as above). Splits are by
molecule, fixed by a molecule's place in the random draw (so a smaller N is
a subset of a larger one): 1 in 20 validation, 3 in 20 test molecules (never
trained on), the rest training molecules, whose fourth frame is held out as
the by-frame test. Written as ``qm9_{train,valid,test_molecules,test_frames}.xyz.gz``
with each frame's ``mol_id`` (QM9 index) and ``smiles``. The work is done in
chunks of 50 molecules written atomically to ``--work`` (default
``OUT/qm9_chunks``), so a killed run resumes where it stopped. The full set
(3000 molecules, 12,000 frames) is not in git::

    python experiments/make_data.py --qm9 3000 --out data/qm9

and the sample shipped for tests and the default many-molecule config
(400 molecules, the first 400 of the same draw) is assembled from its chunks::

    python experiments/make_data.py --qm9 400 --out equijax/data --work data/qm9/qm9_chunks

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
    for _ in tqdm(range(n_frames), desc=label, leave=False, mininterval=5, disable=not label):
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


QM9_CHUNK = 50


def qm9_table():
    """QM9 (qm9pack's CSV files): ``(index, smiles, symbols, positions Å)`` for every molecule."""
    import csv
    import json
    import re

    try:
        import qm9pack
    except ImportError as e:
        raise SystemExit("--qm9 needs the QM9 geometries: pip install qm9pack") from e
    folder = Path(qm9pack.__file__).parent / "data"
    csv.field_size_limit(1 << 30)
    table = []
    for part in ("qm9_part1.csv", "qm9_part2.csv", "qm9_part3.csv"):
        with open(folder / part, newline="") as f:
            for row in csv.DictReader(f):
                # JSON, not eval: the CSV holds lists of floats and quoted symbols
                symbols = json.loads(row["Elements"].replace("'", '"'))
                positions = json.loads(re.sub(r"\.(?=[,\]])", ".0", row["XYZ_Ang"]))  # "0." is not JSON
                table.append((int(row["Index"]), row["SMILES"], symbols, positions))
    return table


def qm9_split(rank: int) -> str:
    """Split of the molecule at place ``rank`` of the random draw."""
    return {0: "valid", 1: "test_molecules", 2: "test_molecules", 3: "test_molecules"}.get(rank % 20, "train")


def qm9_chunk_job(args):
    """Label one chunk of molecules; write it atomically; skip it if it exists."""
    chunk, molecules, work = args
    import ase.io
    from ase import Atoms
    from tblite.ase import TBLite

    path = Path(work) / f"chunk_{chunk:05d}.xyz.gz"
    if path.exists():
        return chunk, 0
    frames, failed = [], 0
    for rank, (index, smiles, symbols, positions) in molecules:
        try:
            calc = TBLite(method="GFN2-xTB", verbosity=0)
            md = run_md(Atoms(symbols, positions=positions), calc, 500.0, 4, 20, 20, seed=index,
                        label="")
        except Exception:  # an SCF that does not converge: the molecule is left out and counted
            failed += 1
            continue
        for k, frame in enumerate(md):
            frame.info.update(mol_id=index, smiles=smiles, rank=rank, frame=k)
            frames.append(frame)
    tmp = path.with_suffix(".tmp.gz")
    ase.io.write(tmp, frames, format="extxyz")
    os.replace(tmp, path)  # atomic: a killed run never leaves half a chunk
    return chunk, failed


def qm9_main(n_molecules, out, work, processes):
    import ase.io
    from tqdm import tqdm

    work = Path(work or Path(out) / "qm9_chunks")
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    table = qm9_table()
    order = np.random.default_rng(0).permutation(len(table))[:n_molecules]
    chunks = [(c, [(r, table[order[r]]) for r in range(c * QM9_CHUNK, min((c + 1) * QM9_CHUNK, n_molecules))],
               work) for c in range(-(-n_molecules // QM9_CHUNK))]
    failed = 0
    with Pool(processes) as pool:
        for _, f in tqdm(pool.imap_unordered(qm9_chunk_job, chunks), total=len(chunks), desc="QM9 chunks",
                         unit="chunk"):
            failed += f
    splits = {"train": [], "valid": [], "test_molecules": [], "test_frames": []}
    for c, molecules, _ in chunks:
        for frame in ase.io.read(work / f"chunk_{c:05d}.xyz.gz", index=":"):
            if frame.info["rank"] >= n_molecules:
                continue
            split = qm9_split(frame.info["rank"])
            if split == "train" and frame.info["frame"] == 3:
                split = "test_frames"
            splits[split].append(frame)
    for split, frames in splits.items():
        ase.io.write(Path(out) / f"qm9_{split}.xyz.gz", frames, format="extxyz")
    sizes = ", ".join(f"{k} {len(v)}" for k, v in splits.items())
    print(f"QM9: {n_molecules} molecules ({failed} left out: no SCF convergence), frames: {sizes}; "
          f"{time.time() - t0:.0f} s; files in {out}")


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
    parser.add_argument("--qm9", type=int, metavar="N", help="instead: N QM9 molecules, split by molecule")
    parser.add_argument("--work", type=Path, help="--qm9: folder of the restartable chunks (default OUT/qm9_chunks)")
    parser.add_argument("--processes", type=int, default=os.cpu_count())
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.qm9:
        return qm9_main(args.qm9, args.out, args.work, args.processes)

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
