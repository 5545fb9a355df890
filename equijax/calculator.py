"""ASE calculator around a trained equijax potential.

    from equijax.calculator import EquijaxCalculator
    atoms.calc = EquijaxCalculator("runs/default/best.pkl")
    atoms.get_forces()                       # eV/Å
    atoms.calc.get_hessian(atoms)            # (3N, 3N) eV/Å², for ase.vibrations.VibrationsData.from_2d

Graphs are padded to bucketed sizes (:func:`equijax.graph.bucket`), so
structures of similar size reuse the same compiled functions.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import numpy as np
from ase.calculators.calculator import Calculator, all_changes

from equijax import checkpoint, graph as graph_lib, physics
from ase.stress import full_3x3_to_voigt_6_stress


class Compiled(NamedTuple):
    energy_forces_stress: object  # jitted physics.energy_forces_stress
    hessian: object  # jitted dense or chunked Hessian


@functools.lru_cache(maxsize=16)
def compiled(model, hessian_batch_size=None) -> Compiled:
    """Jitted functions of a model, shared by every calculator and analysis of it,
    so that a new calculator on the same model compiles nothing again."""
    hess = physics.hessian(model.energy) if hessian_batch_size is None else \
        physics.hessian_chunked(model.energy, hessian_batch_size)
    return Compiled(jax.jit(physics.energy_forces_stress(model.energy)), jax.jit(hess))


class EquijaxCalculator(Calculator):
    """Energy, free energy, forces, stress (periodic) and Hessians from a checkpoint.

    Args:
        checkpoint_path: a checkpoint written by ``equijax train`` (its EMA
            parameters are used), or ``None`` with ``model`` and ``params``.
        model, params: a :class:`equijax.Potential` and its parameters.
        hessian_batch_size: columns per batch of the memory-bounded Hessian;
            ``None`` uses the dense Hessian.
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, checkpoint_path=None, model=None, params=None, hessian_batch_size=None, **kwargs):
        super().__init__(**kwargs)
        if checkpoint_path is not None:
            model, params, _ = checkpoint.load_model(checkpoint_path)
        if model is None or params is None:
            raise ValueError("give a checkpoint path, or both model and params")
        self.model, self.params = model, params
        self.dtype = np.float64 if model.config.dtype == "float64" else np.float32
        self._efs, self._hessian = compiled(model, hessian_batch_size)

    def _graph(self, atoms):
        return graph_lib.build_graph([atoms], self.model.config.cutoff, species=self.model.config.species,
                                     dtype=self.dtype)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        out = jax.device_get(self._efs(self.params, self._graph(self.atoms)))
        n = len(self.atoms)
        energy = float(out.energy[0])
        self.results = {"energy": energy, "free_energy": energy, "forces": np.asarray(out.forces[:n], float)}
        if self.atoms.pbc.all():
            self.results["stress"] = full_3x3_to_voigt_6_stress(np.asarray(out.stress[0], float))
        elif "stress" in properties:
            raise ValueError("stress needs a cell periodic in all three directions")

    def get_hessian(self, atoms=None) -> np.ndarray:
        """(3N, 3N) Hessian in eV/Å² (row/column order: atom, then x, y, z)."""
        atoms = self.atoms if atoms is None else atoms
        n = len(atoms)
        h = np.asarray(jax.device_get(self._hessian(self.params, self._graph(atoms))), float)
        return h[:n, :, :n, :].reshape(3 * n, 3 * n)
