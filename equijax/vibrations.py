"""Vibrational analysis from autodiff Hessians: frequencies, modes, thermochemistry.

    result = vibrate(model, params, atoms, relax=True)
    result.frequencies_cm        # (3N - 6,) cm⁻¹ (imaginary ones negative)
    result.vibrations            # ase.vibrations.VibrationsData (modes, ZPE, Jmol output)
    result.thermo(300.0)         # dict: ZPE, enthalpy/entropy/Gibbs (molecules) or free energy (crystals)

The Hessian is the exact second derivative of the potential (reverse-over-
reverse autodiff, float64), mass-weighted, with rigid-body motions projected
out: translations and rotations for molecules (five for linear ones),
translations only for periodic systems. ASE's ``VibrationsData`` and
thermochemistry classes do the rest.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from ase import units
from ase.vibrations import VibrationsData

from equijax import graph as graph_lib, modes
from equijax.compiled import compiled
from equijax.models import float64_model

def rigid_body_basis(positions: np.ndarray, masses: np.ndarray, periodic: bool) -> np.ndarray:
    """(3N, 6) orthonormal mass-weighted rigid-body motions (:func:`equijax.modes.rigid_body_basis`)."""
    return modes.rigid_body_basis(np.asarray(positions, float), np.asarray(masses, float), periodic)


def project_hessian(hessian_2d: np.ndarray, atoms) -> tuple[np.ndarray, int]:
    """Remove rigid-body motions from a (3N, 3N) Cartesian Hessian.

    Returns:
        ``(projected Cartesian Hessian, number of rigid-body modes)``;
        the projection is done in mass-weighted coordinates
        (:func:`equijax.modes.project_rigid`).
    """
    projected, basis = modes.project_rigid(np.asarray(hessian_2d, float), atoms.positions, atoms.get_masses(),
                                           bool(np.any(atoms.pbc)))
    return projected, int(modes.n_rigid(basis))


class VibrationalResult(NamedTuple):
    atoms: object
    hessian: np.ndarray  # (3N, 3N) eV/Å², projected
    n_rigid: int
    vibrations: VibrationsData
    dipole_derivative: np.ndarray | None = None  # (3N, 3) dμ/dx in e (e·Å per Å)

    def normal_modes(self):
        """``(frequencies_cm (M,), modes (M, 3N))``: mass-weighted orthonormal eigenvectors,
        rigid-body modes dropped, ascending; imaginary frequencies negative."""
        lam, vec, vibration = modes.normal_modes(self.hessian, self.atoms.positions, self.atoms.get_masses(),
                                                 bool(np.any(self.atoms.pbc)))
        return modes.to_wavenumber(lam[vibration]), vec[:, vibration].T

    def ir_intensities(self) -> np.ndarray:
        """IR intensities (km/mol) of the modes of :meth:`normal_modes`, from dμ/dQ."""
        if self.dipole_derivative is None:
            raise ValueError("no dipole derivative: call vibrate(..., ir=True) with a model trained on dipoles")
        _, vectors = self.normal_modes()
        w = np.repeat(1.0 / np.sqrt(self.atoms.get_masses()), 3)
        dmu_dq = (vectors * w[None, :]) @ self.dipole_derivative  # (M, 3) e/sqrt(amu)
        return modes.KM_PER_MOL * (modes.E_ANGSTROM_IN_DEBYE**2) * (dmu_dq**2).sum(1)

    @property
    def frequencies_cm(self) -> np.ndarray:
        """Vibrational frequencies (cm⁻¹), rigid-body modes dropped; imaginary as negative."""
        f = self.vibrations.get_frequencies()
        order = np.argsort(np.abs(f))
        f = f[np.sort(order[self.n_rigid :])]
        return np.where(np.abs(f.imag) > 0, -np.abs(f.imag), f.real)

    @property
    def energies_ev(self) -> np.ndarray:
        """Vibrational quanta ħω (eV) of the modes in :attr:`frequencies_cm`."""
        return self.frequencies_cm * units.invcm

    def thermo(self, temperature: float = 298.15, pressure: float = 101325.0, symmetry_number: int = 1,
               spin: float = 0.0) -> dict:
        """Harmonic thermochemistry with ASE: ideal gas for molecules, harmonic for crystals (eV, eV/K)."""
        from ase.thermochemistry import HarmonicThermo, IdealGasThermo

        n_imaginary = int((self.frequencies_cm < 0).sum())
        if n_imaginary:
            raise ValueError(f"{n_imaginary} imaginary mode(s): not a minimum; relax the structure first")
        energies = self.frequencies_cm * units.invcm
        zpe = 0.5 * energies.sum()
        potential = float(self.atoms.get_potential_energy()) if self.atoms.calc is not None else 0.0
        if np.any(self.atoms.pbc):
            t = HarmonicThermo(vib_energies=energies, potentialenergy=potential)
            return {"zpe": zpe, "helmholtz": t.get_helmholtz_energy(temperature, verbose=False),
                    "entropy": t.get_entropy(temperature, verbose=False)}
        geometry = "linear" if self.n_rigid == 5 else "nonlinear"
        t = IdealGasThermo(vib_energies=energies, geometry=geometry, potentialenergy=potential,
                           atoms=self.atoms, symmetrynumber=symmetry_number, spin=spin)
        return {"zpe": zpe, "enthalpy": t.get_enthalpy(temperature, verbose=False),
                "entropy": t.get_entropy(temperature, pressure, verbose=False),
                "gibbs": t.get_gibbs_energy(temperature, pressure, verbose=False)}


def hessian_2d(model, params, atoms, batch_size: int | None = None) -> np.ndarray:
    """(3N, 3N) Cartesian Hessian (eV/Å²) of one structure, dense or chunked (compiled once per size)."""
    fn = compiled(model, batch_size).hessian
    g = graph_lib.build_graph([atoms], model.config.cutoff, species=model.config.species,
                              dtype=np.dtype(model.config.dtype), pad_to="tight")
    n = len(atoms)
    h = np.asarray(fn(params, g))[:n, :, :n, :]
    return h.reshape(3 * n, 3 * n)


def vibrate_many(model, params, molecules, ir: bool = False) -> list[VibrationalResult]:
    """Harmonic analysis of many structures (conformers, molecules) in one compiled call.

    The structures are padded to common sizes and their Hessians (and dipole
    derivatives) computed by one ``jax.vmap`` over the stack; no relaxation.
    Results equal :func:`vibrate` one by one.
    """
    model64, params64 = float64_model(model, params)
    cfg = model64.config
    graphs = [graph_lib.build_graph([a], cfg.cutoff, species=cfg.species, dtype=np.float64) for a in molecules]
    sizes = tuple(max(s) for s in zip(*[graph_lib.padded_sizes(g) for g in graphs]))
    graphs = [graph_lib.build_graph([a], cfg.cutoff, species=cfg.species, dtype=np.float64, pad_to=sizes)
              for a in molecules]
    stacked = graph_lib.stack_graphs(graphs)
    fns = compiled(model64).stacked
    hessians = np.asarray(fns.hessian(params64, stacked))
    if ir:
        dmus = np.asarray(fns.dipole_derivative(params64, stacked))
    results = []
    for k, atoms in enumerate(molecules):
        n = len(atoms)
        atoms = atoms.copy()
        h = hessians[k][:n, :, :n, :].reshape(3 * n, 3 * n)
        projected, n_rigid = project_hessian(h, atoms)
        dmu = dmus[k][:, :n, :].reshape(3, 3 * n).T if ir else None
        results.append(VibrationalResult(atoms, projected, n_rigid, VibrationsData.from_2d(atoms, projected), dmu))
    return results


def dipole_derivative(model, params, atoms) -> np.ndarray:
    """(3N, 3) derivative of the model's dipole (e·Å) with respect to positions (Å), by autodiff."""
    g = graph_lib.build_graph([atoms], model.config.cutoff, species=model.config.species,
                              dtype=np.dtype(model.config.dtype), pad_to="tight")
    n = len(atoms)

    d = np.asarray(compiled(model).dipole_derivative(params, g))  # (3, n_node, 3)
    return d[:, :n, :].reshape(3, 3 * n).T


def vibrate(model, params, atoms, relax: bool = False, fmax: float = 1e-3, batch_size: int | None = None,
            steps: int = 500, ir: bool = False) -> VibrationalResult:
    """Relax (optionally), then harmonic analysis of ``atoms`` in float64.

    Args:
        model: a potential (any dtype: it is re-evaluated in float64).
        params: its parameters.
        atoms: an ``ase.Atoms``; a copy is relaxed, the input is not changed.
        relax: BFGS relaxation to ``fmax`` (eV/Å) first.
        batch_size: Hessian columns per batch (memory-bounded); ``None``: dense.
        ir: also the dipole derivative, for :meth:`VibrationalResult.ir_intensities`.
    """
    from equijax.calculator import EquijaxCalculator

    model64, params64 = float64_model(model, params)
    atoms = atoms.copy()
    atoms.calc = EquijaxCalculator(model=model64, params=params64)
    if relax:
        from ase.optimize import BFGS

        BFGS(atoms, logfile=None).run(fmax=fmax, steps=steps)
    h = hessian_2d(model64, params64, atoms, batch_size)
    projected, n_rigid = project_hessian(h, atoms)
    dmu = dipole_derivative(model64, params64, atoms) if ir else None
    return VibrationalResult(atoms, projected, n_rigid, VibrationsData.from_2d(atoms, projected), dmu)


def finite_difference_hessian(atoms, calc=None, delta: float = 0.005, dipole_derivative: bool = False):
    """(N, 3, N, 3) Hessian (eV/Å²) of any ASE calculator by central differences of its forces.

    The reference-method Hessian for training and validation: ``6N`` force
    calls, ``H[:, :, a, i] = -(F(x + δ e_ai) - F(x - δ e_ai)) / 2δ``, then
    symmetrised (as ASE's ``Vibrations`` with ``nfree=2`` does). Error
    O(δ²); δ = 0.005 Å is ASE's default for molecules.

    Args:
        atoms: an ``ase.Atoms`` (not changed).
        calc: the calculator; default ``atoms.calc``.
        delta: displacement, Å.
        dipole_derivative: also return the (N, 3, 3) derivative of the
            calculator's dipole, ``[a, i, c] = dμ_c / dx_ai`` (e·Å/Å = e),
            from the same displacements (ASE's ``Infrared`` does the same).
    """
    work = atoms.copy()
    work.calc = calc if calc is not None else atoms.calc
    x0 = work.get_positions()
    n = len(work)
    h = np.empty((n, 3, n, 3))
    dmu = np.empty((n, 3, 3))
    for a in range(n):
        for i in range(3):
            forces, dipoles = [], []
            for sign in (1.0, -1.0):
                x = x0.copy()
                x[a, i] += sign * delta
                work.set_positions(x)
                forces.append(work.get_forces())
                if dipole_derivative:
                    dipoles.append(work.get_dipole_moment())
            h[:, :, a, i] = -(forces[0] - forces[1]) / (2 * delta)
            if dipole_derivative:
                dmu[a, i] = (dipoles[0] - dipoles[1]) / (2 * delta)
    flat = h.reshape(3 * n, 3 * n)
    h = (0.5 * (flat + flat.T)).reshape(n, 3, n, 3)
    return (h, dmu) if dipole_derivative else h


def vibrate_reference(atoms, calc, relax: bool = True, fmax: float = 1e-4, delta: float = 0.005,
                      ir: bool = False) -> VibrationalResult:
    """Harmonic analysis with any ASE calculator (a reference method), as :func:`vibrate` does with a model.

    The Hessian (and with ``ir`` the dipole derivative) by central
    differences (:func:`finite_difference_hessian`), after a BFGS
    relaxation to ``fmax`` (eV/Å); projected and analysed exactly like the
    model's, so frequencies, modes and IR intensities compare like with like.
    """
    atoms = atoms.copy()
    atoms.calc = calc
    if relax:
        from ase.optimize import BFGS

        BFGS(atoms, logfile=None).run(fmax=fmax, steps=2000)
    n = len(atoms)
    h, dmu = finite_difference_hessian(atoms, calc, delta, dipole_derivative=True)
    projected, n_rigid = project_hessian(h.reshape(3 * n, 3 * n), atoms)
    return VibrationalResult(atoms, projected, n_rigid, VibrationsData.from_2d(atoms, projected),
                             dmu.reshape(3 * n, 3) if ir else None)


def normal_mode_samples(atoms, hessian: np.ndarray, temperature: float, n_samples: int,
                        rng: np.random.Generator) -> list:
    """Geometries displaced along the normal modes with classical Boltzmann amplitudes.

    Each mode ``k`` (frequency ω_k, rigid-body motions excluded) gets a
    Gaussian amplitude of variance ``kT / ω_k²`` in mass-weighted
    coordinates: the harmonic thermal distribution at ``temperature`` (K)
    around the minimum ``atoms``. ``hessian``: (3N, 3N) or (N, 3, N, 3), eV/Å².
    """
    n = len(atoms)
    w2, vectors, vibration = modes.normal_modes(np.reshape(hessian, (3 * n, 3 * n)), atoms.positions,
                                                atoms.get_masses(), bool(np.any(atoms.pbc)))
    w2, vectors = np.abs(w2[vibration]), vectors[:, vibration]  # eV/(Å² amu)
    inv_sqrt_m = np.repeat(atoms.get_masses() ** -0.5, 3)
    kt = units.kB * temperature
    out = []
    for _ in range(n_samples):
        q = rng.standard_normal(len(w2)) * np.sqrt(kt / w2)  # Å·√amu
        sample = atoms.copy()
        sample.positions = atoms.positions + (inv_sqrt_m * (vectors @ q)).reshape(n, 3)
        out.append(sample)
    return out


def match_modes(reference: np.ndarray, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pair the modes of two analyses by the overlap of their eigenvectors, not by order.

    Args:
        reference: (M, 3N) mass-weighted orthonormal mode vectors
            (:meth:`VibrationalResult.normal_modes`) of a molecule.
        vectors: the same of another analysis of that molecule.

    Returns:
        ``(index, overlap)``, both (M,): ``vectors[index[i]]`` is the partner
        of ``reference[i]`` (the assignment that maximises the total absolute
        overlap) and ``overlap[i]`` its ``|<reference_i, vectors_j>|`` in [0, 1].
    """
    from scipy.optimize import linear_sum_assignment

    o = np.abs(reference @ vectors.T)
    rows, cols = linear_sum_assignment(-o)
    index = np.empty(len(reference), int)
    index[rows] = cols
    return index, o[np.arange(len(reference)), index]


def member_frequencies(model, params, result: VibrationalResult, batch_size: int | None = None) -> np.ndarray:
    """(K, M) harmonic frequencies (cm⁻¹) of every member of a committee, paired with ``result``'s modes.

    Each member's Hessian is taken at ``result.atoms`` (the committee's
    geometry), projected like the committee's, and its modes are matched to
    the committee's by eigenvector overlap (:func:`match_modes`); the spread
    of a column is the uncertainty of that frequency.
    """
    from equijax import ensemble

    if getattr(model, "member", None) is None:
        raise ValueError("member frequencies need a committee model (trained with train.ensemble > 1)")
    model64, params64 = float64_model(model, params)
    _, reference = result.normal_modes()
    out = []
    for k in range(ensemble.size(params64)):
        h = hessian_2d(model64.member, ensemble.member(params64, k), result.atoms, batch_size)
        projected, _ = project_hessian(h, result.atoms)
        freqs, vectors = result._replace(hessian=projected).normal_modes()
        index, _ = match_modes(reference, vectors)
        out.append(freqs[index])
    return np.array(out)
