"""ASE calculator around a trained equijax potential.

    from equijax.calculator import EquijaxCalculator
    atoms.calc = EquijaxCalculator("runs/default/model.npz")
    atoms.get_forces()                       # eV/Å
    atoms.calc.get_hessian(atoms)            # (3N, 3N) eV/Å², for ase.vibrations.VibrationsData.from_2d

A committee model file (``equijax train train.ensemble=K``) gives the
members' mean energy, forces and stress (the derivatives of the mean
energy) and how much the members disagree: ``results["energy_std"]`` (eV,
over members), ``results["forces_std"]`` ((N,) eV/Å per atom,
:func:`equijax.ensemble.force_spread`) and ``results["energy_members"]`` ((K,)
eV, every member's energy).

Each calculator pads its graphs to a grow-only capacity
(:func:`equijax.graph.grow_capacity`): MD, relaxations and a stream of
different structures reuse one compiled function and recompile only when a
structure outgrows it (geometrically, so rarely).
"""

from __future__ import annotations

import jax
import numpy as np
from ase.calculators.calculator import Calculator, all_changes

from equijax import checkpoint, graph as graph_lib
from equijax.compiled import compiled
from ase.stress import full_3x3_to_voigt_6_stress


class EquijaxCalculator(Calculator):
    """Energy, free energy, forces, stress (periodic) and Hessians from a checkpoint.

    Args:
        checkpoint_path: a model file (``model.npz``) or checkpoint written by
            ``equijax train`` (EMA parameters), or ``None`` with ``model`` and
            ``params``. Files are read without unpickling anything.
        model: a :class:`equijax.Potential`.
        params: its parameters.
        hessian_batch_size: columns per batch of the memory-bounded Hessian;
            ``None`` uses the dense Hessian.
        backend: message-passing backend for a model read from a file
            (``"auto"``, ``"jax"``, ``"cuequivariance"``; :mod:`equijax.kernels`);
            by default the file's, where it can run here.
        compile_cache: keep compiled programs on disk so that the next
            process starts in seconds (:mod:`equijax.compile_cache`): ``True``
            (the default folder, ``~/.cache/equijax/xla``), a folder, or ``False``.

    On a CPU, start the Python that uses this calculator with
    ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (the ``equijax`` command does so
    itself): XLA's large buffers then come in huge pages, faster calls
    (:mod:`equijax.hugepages`; glibc reads it only at start-up, so the
    calculator cannot switch it on).
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, checkpoint_path=None, model=None, params=None, hessian_batch_size=None, backend=None,
                 compile_cache=True, **kwargs):
        super().__init__(**kwargs)
        if compile_cache:
            from equijax import compile_cache as cache

            cache.enable(None if compile_cache is True else compile_cache)
        if checkpoint_path is not None:
            model, params, _ = checkpoint.load_model(checkpoint_path, backend)
        if model is None or params is None:
            raise ValueError("give a checkpoint path, or both model and params")
        if model.config.dtype == "float64" and not jax.config.jax_enable_x64:
            raise ValueError("a float64 model needs float64 enabled: call jax.config.update('jax_enable_x64', "
                             "True) before creating the calculator (the equijax commands do it themselves)")
        self.model, self.params = model, params
        self.dtype = np.float64 if model.config.dtype == "float64" else np.float32
        fns = compiled(model, hessian_batch_size)
        self._efs, self._hessian, self._members = fns.energy_forces_stress, fns.hessian, fns.members
        self.capacity = None  # padded (n_node, n_edge, n_graph), grown on demand

    def _graph(self, atoms):
        cfg = self.model.config
        s = graph_lib.from_ase(atoms)
        graph_lib.check_structure(s, cfg.species)
        nl = graph_lib.neighbours(s, cfg.cutoff)
        self.capacity = graph_lib.grow_capacity(self.capacity, (len(s.positions), len(nl[0]), 1))
        return graph_lib.build_graph([s], cfg.cutoff, pad_to=self.capacity, dtype=self.dtype, neighbour_lists=[nl])

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        graph = self._graph(self.atoms)
        n = len(self.atoms)
        if self._members is None:
            out = jax.device_get(self._efs(self.params, graph))
        else:  # one pass gives every member; the mean is the committee's prediction
            from equijax import ensemble

            each = jax.device_get(self._members(self.params, graph))
            out = jax.tree_util.tree_map(lambda x: x.mean(0), each)
        energy = float(out.energy[0])
        self.results = {"energy": energy, "free_energy": energy, "forces": np.asarray(out.forces[:n], float)}
        if self._members is not None:
            energies = np.asarray(each.energy[:, 0], float)
            self.results.update(energy_std=float(np.sqrt(ensemble.variance(energies))), energy_members=energies,
                                forces_std=np.asarray(ensemble.force_spread(each.forces[:, :n]), float))
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
