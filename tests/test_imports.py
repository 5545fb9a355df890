"""Pretrained SevenNet models imported (equijax.imports): the same model as sevenn's own, read safely.

Contracts: SevenNet-0 (11Jul2024) and SevenNet-l3i5, converted from the
checkpoints inside the installed ``sevenn`` package, give the energies,
forces and stresses of sevenn's own calculator on 20 structures (bulk
crystals of 18 elements, a slab, a strained supercell, a triclinic cell,
cells shorter than twice the cutoff, a molecule) to 1e-6 eV/atom, 1e-5 eV/Å
and 1e-6 eV/Å³ in float64, and to float32 rounding in float32
(references: ``experiments/sevennet_reference.py``, run with sevenn and
torch); the imported model is rotation equivariant and its forces are the
derivatives of its energy; the converted file goes through the CLI,
``equijax.load`` and the calculator. A checkpoint whose pickle names code is
refused and the code does not run. Needs only ``pip install sevenn --no-deps``
(no torch).
"""

import pickle
import zipfile
from pathlib import Path

import ase.io
import jax
import numpy as np
import pytest

import equijax
from equijax import cli, graph as G, imports, layers, physics, testing
from equijax.calculator import EquijaxCalculator

DATA = Path(__file__).parent / "data"
INSTALLED = {card.name for card in imports.available()}
needs_sevenn = pytest.mark.skipif("7net-0" not in INSTALLED, reason="pip install sevenn --no-deps")
VOIGT = ([0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1])  # ASE's order: xx yy zz yz xz xy


@pytest.fixture(scope="module")
def sevennet0():
    """SevenNet-0 (11Jul2024) in float64: (config, params, metadata), converted once for the module."""
    return imports.load("7net-0", "float64")


@pytest.fixture(scope="module")
def frames():
    return {name: ase.io.read(DATA / f"sevennet_{name}.extxyz", ":") for name in ("7net-0", "7net-l3i5")}


def _errors(model, params, frames, suffix, dtype):
    """Largest |ΔE|/atom, |ΔF|, |Δσ| against the references, all structures in one batch."""
    g = G.build_graph(frames, model.config.cutoff, species=model.config.species, dtype=dtype)
    out = jax.jit(physics.energy_forces_stress(model.energy))(params, g)
    energy, forces, stress = (np.asarray(x, np.float64) for x in (out.energy, out.forces, out.stress))
    worst, start = np.zeros(3), 0
    for k, atoms in enumerate(frames):
        n = len(atoms)
        errs = [abs(energy[k] - atoms.info[f"energy_{suffix}"]) / n,
                np.abs(forces[start : start + n] - atoms.arrays[f"forces_{suffix}"]).max(),
                np.abs(stress[k][VOIGT] - atoms.info[f"stress_{suffix}"]).max() if atoms.pbc.all() else 0.0]
        worst = np.maximum(worst, errs)
        start += n
    return worst


@needs_sevenn
@pytest.mark.parametrize("name", ["7net-0", "7net-l3i5"])
def test_float64_equals_sevenn_in_float64(name, frames, sevennet0):
    config, params, meta = sevennet0 if name == "7net-0" else imports.load(name, "float64")
    assert meta["source"]["name"] == name and "GPL-3.0" in meta["source"]["licence"]
    worst = _errors(equijax.nequip(config), params, frames[name], "f64", np.float64)
    assert worst[0] < 1e-6 and worst[1] < 1e-5 and worst[2] < 1e-6, worst  # eV/atom, eV/Å, eV/Å³


@needs_sevenn
def test_float32_equals_sevenns_own_float32_calculator(frames):
    config, params, _ = imports.load("7net-0", "float32")
    worst = _errors(equijax.nequip(config), params, frames["7net-0"], "f32", np.float32)
    # two float32 programs that sum in different orders: rounding of ~1e-7 relative, nothing more
    assert worst[0] < 5e-6 and worst[1] < 1e-4 and worst[2] < 2e-6, worst


@needs_sevenn
def test_imported_model_is_rotation_equivariant_and_conservative(frames, sevennet0):
    config, params, _ = sevennet0
    model = equijax.nequip(config)
    atoms = next(a for a in frames["7net-0"] if a.info["kind"].startswith("triclinic"))
    errs = testing.equivariance_errors(model.energy, params, atoms, config.cutoff, hessian=False, reflect=False)
    assert max(errs.values()) < 1e-9, errs  # SevenNet has no parity (SE(3)): rotations only
    g = G.build_graph([atoms], config.cutoff, species=config.species, dtype=np.float64)
    efs = jax.jit(physics.energy_forces_stress(model.energy))
    forces = np.asarray(efs(params, g).forces)
    pos = np.asarray(g.nodes["positions"])
    for a, i in [(0, 0), (2, 1), (3, 2)]:
        d = np.zeros_like(pos)
        d[a, i] = 1e-5
        up, down = (float(efs(params, physics.with_positions(g, pos + s * d)).energy[0]) for s in (1, -1))
        assert abs(-(up - down) / 2e-5 - forces[a, i]) < 1e-6


@needs_sevenn
def test_the_command_writes_a_model_file_that_loads_everywhere(tmp_path, frames, sevennet0, capsys):
    out = tmp_path / "7net0.npz"
    cli.main(["import", "7net-0", str(out)])
    assert "GPL-3.0" in capsys.readouterr().out
    model, params, meta = equijax.load(out)
    assert meta["source"]["format"] == "sevennet" and model.config.se3
    _, direct, _ = sevennet0
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(direct)):
        np.testing.assert_array_equal(np.asarray(a), b)
    atoms = frames["7net-0"][0].copy()
    atoms.calc = EquijaxCalculator(str(out))
    assert abs(atoms.get_potential_energy() - frames["7net-0"][0].info["energy_f64"]) < 1e-6 * len(atoms)
    cli.main(["models"])
    listed = capsys.readouterr().out
    assert "7net-0" in listed and "842,618" in listed  # SevenNet's 842,623 less its 5 fixed denominators


class _Payload:
    """What a malicious checkpoint holds: unpickling it would run a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def _torch_zip(path, obj_bytes):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", obj_bytes)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")


def test_a_checkpoint_that_names_code_is_refused_and_runs_nothing(tmp_path, capsys):
    marker = tmp_path / "ran"
    crafted = tmp_path / "crafted.pth"
    _torch_zip(crafted, pickle.dumps({"config": {}, "model_state_dict": {"w": _Payload(marker)}}, protocol=2))
    with pytest.raises(imports.torchzip.UnsafeCheckpoint, match="system"):
        imports.torchzip.load(crafted)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["import", str(crafted), str(tmp_path / "out.npz")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "refused" in err[0] and "Traceback" not in err[0]
    assert not marker.exists() and not (tmp_path / "out.npz").exists()
    # an allowed name used for something else is refused too: _codecs.encode beyond latin-1 text
    _torch_zip(crafted, b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00xX\x05\x00\x00\x00rot13\x86R.")
    with pytest.raises(imports.torchzip.UnsafeCheckpoint, match="latin-1"):
        imports.torchzip.load(crafted)
    # a damaged file: one clear error
    truncated = tmp_path / "cut.pth"
    truncated.write_bytes((DATA / "sevennet_reference.json").read_bytes()[:50])
    with pytest.raises(ValueError, match="not a PyTorch zip checkpoint"):
        imports.torchzip.load(truncated)


def test_e3nn_torch_constants_are_e3nns():
    torch = pytest.importorskip("torch")
    normalize2mom = pytest.importorskip("e3nn.math").normalize2mom
    functions = {"silu": torch.nn.functional.silu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}
    for name, c in layers.E3NN_TORCH_CONSTANTS.items():
        assert float(normalize2mom(functions[name]).cst) == c, name


def test_unknown_sources_and_models_without_sevenn_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["import", "7net-omni", str(tmp_path / "x.npz")])
    err = capsys.readouterr().err.strip()
    assert err.startswith("equijax: error:") and "not a pretrained name" in err and "\n" not in err
