"""Reference energies, forces and stresses of SevenNet's pretrained models, by sevenn's own code.

Runs in an environment with torch and sevenn (``../shared/notes/peer-environments.md``):

    python -m venv /tmp/sevenn && /tmp/sevenn/bin/pip install torch==2.13.0 sevenn==0.10.4
    /tmp/sevenn/bin/python experiments/sevennet_reference.py            # writes tests/data/sevennet_*.extxyz

For each model (7net-0, 7net-l3i5) and each of the structures below it writes, per frame:
- ``energy_f64``, ``stress_f64`` (info) and ``forces_f64`` (arrays): sevenn's calculator with the model in
  float64 (``model.double()``, inputs in float64). The Wigner-3j blocks that the checkpoint stores in float32
  are recomputed in float64 with the checkpoint's signs; the energies are unchanged at this precision.
- ``energy_f32``, ``stress_f32``, ``forces_f32``: sevenn's own calculator exactly as users run it (float32).
Units: eV, eV/Å, eV/Å³ (ASE's Voigt order xx yy zz yz xz xy; stress only for periodic structures).

Structures: 14 bulk crystals of 18 elements (rattled), a slab with vacuum and an adsorbate, a rattled and
strained supercell, a triclinic cell, cells shorter than twice the cutoff, and a molecule in vacuum.
"""

import functools
import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch
from ase import Atoms
from ase.build import bulk, fcc111, molecule
from ase.spacegroup import crystal

OUT = Path(__file__).parent.parent / "tests" / "data"
MODELS = ("7net-0", "7net-l3i5")


def structures() -> list:
    rng = np.random.default_rng(0)
    crystals = [
        bulk("Si", "diamond", a=5.43), bulk("Cu", "fcc", a=3.61), bulk("NaCl", "rocksalt", a=5.64),
        bulk("MgO", "rocksalt", a=4.21), bulk("Fe", "bcc", a=2.87), bulk("Al", "fcc", a=4.05, cubic=True),
        bulk("GaAs", "zincblende", a=5.65), bulk("LiF", "rocksalt", a=4.03), bulk("ZnO", "wurtzite", a=3.25, c=5.21),
        bulk("W", "bcc", a=3.16, cubic=True), bulk("Pt", "fcc", a=3.92),
        crystal(["Sr", "Ti", "O"], [(0, 0, 0), (0.5, 0.5, 0.5), (0.5, 0.5, 0)], spacegroup=221, cellpar=3.905),
        crystal(["Ti", "O"], [(0, 0, 0), (0.305, 0.305, 0)], spacegroup=136, cellpar=[4.59, 4.59, 2.96, 90, 90, 90]),
        bulk("Ni", "fcc", a=3.52) * (2, 1, 1),
    ]
    out = []
    for k, atoms in enumerate(crystals):
        atoms = atoms.copy()
        atoms.rattle(0.03, seed=k)
        atoms.info["kind"] = f"bulk {atoms.get_chemical_formula()}"
        out.append(atoms)
    slab = fcc111("Pt", size=(2, 2, 3), vacuum=6.0)
    slab += Atoms("O", positions=[slab.positions[-1] + [0.0, 0.0, 1.9]])
    slab.rattle(0.02, seed=20)
    slab.info["kind"] = "slab Pt(111) with O, 12 Å vacuum"
    strained = bulk("Si", "diamond", a=5.43, cubic=True) * (2, 2, 1)
    strained.set_cell(strained.cell.array @ (np.eye(3) + [[0.02, 0.01, 0], [0.01, -0.015, 0], [0, 0, 0.01]]),
                      scale_atoms=True)
    strained.rattle(0.08, seed=21)
    strained.info["kind"] = "rattled, strained Si supercell"
    triclinic = bulk("Cu", "fcc", a=3.61) * (2, 2, 1)
    triclinic.set_cell(triclinic.cell.array + [[0.0, 0.2, 0.1], [0.15, 0.0, -0.1], [0.1, 0.1, 0.0]], scale_atoms=True)
    triclinic.rattle(0.03, seed=22)
    triclinic.info["kind"] = "triclinic Cu cell"
    tiny = bulk("Al", "fcc", a=4.05)  # one atom, 2.86 Å vectors: far shorter than twice the 5 Å cutoff
    tiny.positions += rng.normal(0.0, 0.01, (1, 3))
    tiny.info["kind"] = "one-atom Al cell, vectors shorter than 2 cutoffs"
    short = bulk("MgO", "rocksalt", a=4.21)
    short.set_cell(short.cell.array * 1.03, scale_atoms=True)
    short.rattle(0.05, seed=23)
    short.info["kind"] = "strained primitive MgO, shorter than 2 cutoffs"
    mol = molecule("CH3CH2OH")
    mol.rattle(0.03, seed=24)
    mol.info["kind"] = "ethanol in vacuum (no cell)"
    return out + [slab, strained, triclinic, tiny, short, mol]


def _patch_onehot(node_embedding):
    forward = node_embedding.OnehotEmbedding.forward

    def onehot64(self, data):
        data = forward(self, data)
        for key in (self.key_x, self.key_additional_output):
            if key is not None and key in data and data[key].is_floating_point():
                data[key] = data[key].double()
        return data

    node_embedding.OnehotEmbedding.forward = onehot64


def _float64_calculator(name):
    """sevenn's calculator with its model in float64 (sevenn builds float32 inputs and one-hots by default)."""
    import sevenn.nn.node_embedding as node_embedding
    import sevenn.util

    if not getattr(sevenn.util.dtype_correct, "float64", False):  # patch once per process
        sevenn.util.dtype_correct = functools.partial(sevenn.util.dtype_correct, float_dtype=torch.float64)
        sevenn.util.dtype_correct.float64 = True
        _patch_onehot(node_embedding)
    from e3nn import o3
    from sevenn.calculator import SevenNetCalculator

    calc = SevenNetCalculator(model=name, device="cpu")
    calc.model.double()
    for buffer_name, buf in calc.model.named_buffers():
        tail = buffer_name.rsplit(".", 1)[-1]
        if tail.startswith("_w3j_"):
            w = o3.wigner_3j(*map(int, tail[5:].split("_")), dtype=torch.float64)
            buf.copy_(w * torch.sign((buf * w).sum()))
    return calc


def evaluate(calc, atoms) -> tuple:
    atoms = atoms.copy()
    atoms.calc = calc
    energy, forces = atoms.get_potential_energy(), atoms.get_forces()
    stress = atoms.get_stress() if atoms.pbc.all() else np.zeros(6)
    return float(energy), np.asarray(forces, float), np.asarray(stress, float)


def main():
    import ase.io
    import sevenn
    from sevenn.calculator import SevenNetCalculator

    torch.set_num_threads(2)
    OUT.mkdir(parents=True, exist_ok=True)
    meta = {"sevenn": sevenn.__version__, "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "script": "experiments/sevennet_reference.py"}
    try:  # the CPU model, as in every results file
        meta["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line)
    except (OSError, StopIteration):
        pass
    # the structures as the extended XYZ file holds them (positions to 1e-8 Å), so that the references are
    # those of the positions a reader of the file gets
    ase.io.write(OUT / "sevennet_structures.extxyz", structures(), format="extxyz")
    frames = {name: ase.io.read(OUT / "sevennet_structures.extxyz", ":") for name in MODELS}
    for name in MODELS:  # float32 first: the float64 set-up patches sevenn for the rest of the process
        own = SevenNetCalculator(model=name, device="cpu")
        for atoms in frames[name]:
            atoms.info["energy_f32"], atoms.arrays["forces_f32"], atoms.info["stress_f32"] = evaluate(own, atoms)
    for name in MODELS:
        f64 = _float64_calculator(name)
        for atoms in frames[name]:
            atoms.info["energy_f64"], atoms.arrays["forces_f64"], atoms.info["stress_f64"] = evaluate(f64, atoms)
            atoms.info["model"] = name
            print(f"{name:10s} {atoms.info['kind']:48s} {len(atoms):3d} atoms  E {atoms.info['energy_f64']:12.6f} eV  "
                  f"float32 - float64 {atoms.info['energy_f32'] - atoms.info['energy_f64']:+.2e} eV")
        path = OUT / f"sevennet_{name}.extxyz"
        ase.io.write(path, frames[name], format="extxyz")
        print(f"wrote {path}")
    (OUT / "sevennet_structures.extxyz").unlink()
    (OUT / "sevennet_reference.json").write_text(json.dumps(meta, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
