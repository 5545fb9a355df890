"""Integrators and a minimiser as pure, jittable step functions.

Every ensemble is an :class:`Integrator` pair in the manner of optax and
jax-md: ``init(...) -> MDState`` and ``step(state, nbrs) -> (state, nbrs)``.
One step moves the atoms, updates the in-JAX neighbour list
(:func:`equijax.md.neighbours.update`) and evaluates forces once. Steps are
meant to be run many at a time inside ``lax.scan`` (:mod:`equijax.md.run`)
and ``vmap``-ed over replicas.

Units are ASE's: Å, eV, amu, and time in ASE units (``ase.units.fs`` per
femtosecond); temperatures enter as ``kT`` in eV. Atoms with ``mask`` false
(padding of a replica) carry no momentum and never move, and are not
counted as degrees of freedom.

Why not jax-md's integrators? They work with equijax's energy
(:func:`equijax.md.potential.jax_md_energy_fn`), but they count every atom,
padding included, as degrees of freedom, and wrap positions into the box,
which would invalidate the cell shifts of a neighbour list between builds.

References: BAOAB Langevin, Leimkuhler & Matthews, AMRX 2013, 34;
Nosé–Hoover chains, Martyna, Klein & Tuckerman, JCP 97, 2635 (1992), with
the Trotter factorisation of Martyna et al., Mol. Phys. 87, 1117 (1996);
stochastic cell rescaling, Bernetti & Bussi, JCP 153, 114107 (2020);
FIRE, Bitzek et al., PRL 97, 170201 (2006), as in ``ase.optimize.FIRE``.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from equijax.md import neighbours as nl


class MDState(NamedTuple):
    """The state of one system (``vmap`` adds a leading replica axis to every field).

    Attributes:
        positions, momenta, forces: (n, 3) Å, amu·Å/time, eV/Å.
        energy: () potential energy, eV.
        stress: (3, 3) eV/Å³ (zeros when not periodic).
        cell: (3, 3) Å, lattice vectors as rows (zeros when not periodic).
        mass: (n,) amu (1 on padding atoms).
        mask: (n,) bool, real atoms.
        key: PRNG key of the stochastic steps.
        aux: dict of integrator-specific arrays (thermostat chain, barostat
            work, FIRE's step size).
    """

    positions: jax.Array
    momenta: jax.Array
    forces: jax.Array
    energy: jax.Array
    stress: jax.Array
    cell: jax.Array
    mass: jax.Array
    mask: jax.Array
    key: jax.Array
    aux: dict


class Integrator(NamedTuple):
    init: Callable  # (positions, cell, mass, mask, key, kT, nbrs) -> (MDState, nbrs)
    step: Callable  # (MDState, nbrs) -> (MDState, nbrs)


def degrees_of_freedom(mask) -> jax.Array:
    """3 per real atom (as ``ase.Atoms.get_temperature``)."""
    return 3.0 * jnp.sum(mask)


def kinetic_energy(state: MDState) -> jax.Array:
    """() eV."""
    p = jnp.where(state.mask[:, None], state.momenta, 0.0)
    return 0.5 * jnp.sum(p * p / state.mass[:, None])


def temperature_kT(state: MDState) -> jax.Array:
    """() instantaneous kT in eV: 2 KE / dof."""
    return 2.0 * kinetic_energy(state) / degrees_of_freedom(state.mask)


def volume(cell) -> jax.Array:
    return jnp.abs(jnp.linalg.det(cell))


def pressure(state: MDState) -> jax.Array:
    """() instantaneous pressure in eV/Å³ (periodic): 2 KE / 3V - tr(stress) / 3."""
    v = volume(state.cell)
    return 2.0 * kinetic_energy(state) / (3.0 * v) - jnp.trace(state.stress) / 3.0


def per_atom_normal(key, n: int, dtype) -> jax.Array:
    """(n, 3) standard normals, atom ``i`` drawing from ``fold_in(key, i)``: a padded
    replica draws the same numbers for its real atoms as the unpadded system, whatever
    JAX's ``jax_threefry_partitionable`` setting (with it, one draw of shape (n, 3) would too)."""
    return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), (3,), dtype))(jnp.arange(n))


def maxwell_boltzmann(key, mass, mask, kT) -> jax.Array:
    """(n, 3) momenta drawn at ``kT`` (eV), with the centre-of-mass momentum removed."""
    p = per_atom_normal(key, mass.shape[0], mass.dtype) * jnp.sqrt(mass * kT)[:, None]
    p = jnp.where(mask[:, None], p, 0.0)
    total_mass = jnp.sum(jnp.where(mask, mass, 0.0))
    velocity_com = jnp.sum(p, axis=0) / total_mass
    return jnp.where(mask[:, None], p - mass[:, None] * velocity_com, 0.0)


def _evaluate(force_fn, spec, state: MDState, nbrs, periodic: bool):
    nbrs = nl.update(spec, nbrs, state.positions, state.cell if periodic else None, state.mask)
    out = force_fn(state.positions, nbrs, state.cell if periodic else None)
    forces = jnp.where(state.mask[:, None], out.forces, 0.0)
    return state._replace(forces=forces, energy=out.energy, stress=out.stress), nbrs


def _drift(state: MDState, dt) -> MDState:
    return state._replace(positions=state.positions + dt * state.momenta / state.mass[:, None])


def _kick(state: MDState, dt) -> MDState:
    return state._replace(momenta=state.momenta + dt * state.forces)


def _initial(force_fn, spec, periodic, aux):
    def init(positions, cell, mass, mask, key, kT, nbrs):
        key, sub = jax.random.split(key)
        zeros = jnp.zeros_like(positions)
        state = MDState(positions, maxwell_boltzmann(sub, mass, mask, kT), zeros, jnp.zeros((), positions.dtype),
                        jnp.zeros((3, 3), positions.dtype), cell, mass, mask, key, aux(positions.dtype, mask, kT))
        return _evaluate(force_fn, spec, state, nbrs, periodic)

    return init


def nve(force_fn, spec: nl.Spec, dt: float, periodic: bool = False) -> Integrator:
    """Velocity Verlet (microcanonical). Starts from Maxwell–Boltzmann momenta at ``kT``."""

    def step(state, nbrs):
        state = _drift(_kick(state, 0.5 * dt), dt)
        state, nbrs = _evaluate(force_fn, spec, state, nbrs, periodic)
        return _kick(state, 0.5 * dt), nbrs

    return Integrator(_initial(force_fn, spec, periodic, lambda dtype, mask, kT: {}), step)


def _ornstein_uhlenbeck(state: MDState, c1, kT) -> MDState:
    key, sub = jax.random.split(state.key)
    noise = per_atom_normal(sub, state.momenta.shape[0], state.momenta.dtype)
    p = c1 * state.momenta + jnp.sqrt((1.0 - c1 ** 2) * kT * state.mass)[:, None] * noise
    return state._replace(momenta=jnp.where(state.mask[:, None], p, 0.0), key=key)


def langevin(force_fn, spec: nl.Spec, dt: float, kT: float, friction: float, periodic: bool = False) -> Integrator:
    """Langevin dynamics by BAOAB (canonical). ``friction`` γ in 1/time."""
    c1 = jnp.exp(-friction * dt)

    def step(state, nbrs):
        state = _drift(_kick(state, 0.5 * dt), 0.5 * dt)
        state = _drift(_ornstein_uhlenbeck(state, c1, kT), 0.5 * dt)
        state, nbrs = _evaluate(force_fn, spec, state, nbrs, periodic)
        return _kick(state, 0.5 * dt), nbrs

    return Integrator(_initial(force_fn, spec, periodic, lambda dtype, mask, kT: {}), step)


def nose_hoover(force_fn, spec: nl.Spec, dt: float, kT: float, tau: float, chain: int = 3,
                periodic: bool = False) -> Integrator:
    """Nosé–Hoover chain (canonical, deterministic), ``chain`` thermostats of period ``tau``.

    ``aux``: chain positions ``xi`` and velocities ``v_xi`` (chain,), so that
    :func:`conserved` (the extended energy) stays constant.
    """

    def half(state):
        """The chain's propagator over dt / 2 (one Trotter step, as MKT 1996)."""
        q = _chain_masses(state.mask, kT, tau, chain).astype(state.momenta.dtype)
        xi, v = state.aux["xi"], state.aux["v_xi"]
        dof = degrees_of_freedom(state.mask)
        ke2 = 2.0 * kinetic_energy(state)
        h = 0.5 * dt

        def force(k, v, ke2):
            drive = jnp.where(k == 0, ke2 - dof * kT, q[k - 1] * v[k - 1] ** 2 - kT)
            return drive / q[k]

        def inward(k, carry):  # k = chain-1 ... 0
            v, ke2 = carry
            k = chain - 1 - k
            outer = jnp.where(k < chain - 1, v[jnp.minimum(k + 1, chain - 1)], 0.0)
            scale = jnp.exp(-0.25 * h * outer)
            v = v.at[k].set((v[k] * scale + 0.5 * h * force(k, v, ke2)) * scale)
            return v, ke2

        v, _ = jax.lax.fori_loop(0, chain, inward, (v, ke2))
        factor = jnp.exp(-h * v[0])
        ke2 = ke2 * factor ** 2
        xi = xi + h * v

        def outward(k, v):  # k = 0 ... chain-1
            outer = jnp.where(k < chain - 1, v[jnp.minimum(k + 1, chain - 1)], 0.0)
            scale = jnp.exp(-0.25 * h * outer)
            return v.at[k].set((v[k] * scale + 0.5 * h * force(k, v, ke2)) * scale)

        v = jax.lax.fori_loop(0, chain, outward, v)
        return state._replace(momenta=state.momenta * factor, aux={"xi": xi, "v_xi": v})

    def step(state, nbrs):
        state = half(state)
        state = _drift(_kick(state, 0.5 * dt), dt)
        state, nbrs = _evaluate(force_fn, spec, state, nbrs, periodic)
        return half(_kick(state, 0.5 * dt)), nbrs

    aux = lambda dtype, mask, kT_: {"xi": jnp.zeros(chain, dtype), "v_xi": jnp.zeros(chain, dtype)}
    return Integrator(_initial(force_fn, spec, periodic, aux), step)


def _chain_masses(mask, kT, tau, chain: int) -> jax.Array:
    """(chain,) thermostat masses: dof·kT·τ² for the first, kT·τ² for the others."""
    return jnp.full(chain, kT * tau ** 2).at[0].multiply(degrees_of_freedom(mask))


def nose_hoover_energy(state: MDState, kT: float, tau: float) -> jax.Array:
    """() the Nosé–Hoover chain's thermostat energy, eV (add to KE + PE for the conserved quantity)."""
    xi, v = state.aux["xi"], state.aux["v_xi"]
    q = _chain_masses(state.mask, kT, tau, xi.shape[0])
    return 0.5 * jnp.sum(q * v ** 2) + degrees_of_freedom(state.mask) * kT * xi[0] + kT * jnp.sum(xi[1:])


def npt_langevin(force_fn, spec: nl.Spec, dt: float, kT: float, friction: float, pressure_target: float,
                 compressibility: float, tau_p: float) -> Integrator:
    """Isothermal-isobaric: BAOAB Langevin plus isotropic stochastic cell rescaling.

    Every step scales positions and cell by ``mu`` and momenta by ``1 / mu``,
    with ``3 log mu`` drawn from the Bernetti–Bussi equation for ``log V``
    (``compressibility`` β in Å³/eV, relaxation time ``tau_p``), using the
    autodiff stress. ``pressure_target`` in eV/Å³. Periodic systems only.
    """

    def rescale(state):
        v = volume(state.cell)
        key, sub = jax.random.split(state.key)
        noise = jax.random.normal(sub, (), state.positions.dtype)
        drift = -compressibility / tau_p * (pressure_target - pressure(state) - kT / v) * dt
        d_log_v = drift + jnp.sqrt(2.0 * kT * compressibility * dt / (v * tau_p)) * noise
        mu = jnp.exp(d_log_v / 3.0)
        return state._replace(positions=state.positions * mu, cell=state.cell * mu, momenta=state.momenta / mu,
                              key=key)

    base = langevin(force_fn, spec, dt, kT, friction, periodic=True)
    c1 = jnp.exp(-friction * dt)

    def step(state, nbrs):
        state = _drift(_kick(state, 0.5 * dt), 0.5 * dt)
        state = _drift(_ornstein_uhlenbeck(state, c1, kT), 0.5 * dt)
        state = rescale(state)
        state, nbrs = _evaluate(force_fn, spec, state, nbrs, True)
        return _kick(state, 0.5 * dt), nbrs

    return Integrator(base.init, step)


def fire(force_fn, spec: nl.Spec, periodic: bool = False, dt_start: float = 0.1, dt_max: float = 1.0,
         max_step: float = 0.2, n_min: int = 5, f_inc: float = 1.1, f_dec: float = 0.5, alpha_start: float = 0.1,
         f_alpha: float = 0.99) -> Integrator:
    """FIRE minimisation with ``ase.optimize.FIRE``'s rules and defaults (mass-free).

    ``momenta`` hold FIRE's velocities; ``aux`` its step size, mixing and
    count of downhill steps. Converged when the largest force is small
    (checked by the driver).
    """

    def init(positions, cell, mass, mask, key, kT, nbrs):
        dtype = positions.dtype
        aux = {"dt": jnp.asarray(dt_start, dtype), "alpha": jnp.asarray(alpha_start, dtype),
               "downhill": jnp.zeros((), jnp.int32)}
        zeros = jnp.zeros_like(positions)
        state = MDState(positions, zeros, zeros, jnp.zeros((), dtype), jnp.zeros((3, 3), dtype), cell, mass, mask,
                        key, aux)
        return _evaluate(force_fn, spec, state, nbrs, periodic)

    def step(state, nbrs):
        f, v = state.forces, state.momenta
        dt, alpha, downhill = state.aux["dt"], state.aux["alpha"], state.aux["downhill"]
        power = jnp.vdot(f, v)
        f_norm = jnp.sqrt(jnp.vdot(f, f))
        v_norm = jnp.sqrt(jnp.vdot(v, v))
        mixed = (1.0 - alpha) * v + alpha * f / jnp.where(f_norm > 0, f_norm, 1.0) * v_norm
        first = v_norm == 0  # ASE's first step only kicks
        uphill = (power <= 0) & ~first
        v = jnp.where(uphill, 0.0, mixed)
        faster = ~uphill & ~first & (downhill > n_min)
        dt = jnp.where(uphill, dt * f_dec, jnp.where(faster, jnp.minimum(dt * f_inc, dt_max), dt))
        alpha = jnp.where(uphill, alpha_start, jnp.where(faster, alpha * f_alpha, alpha))
        downhill = jnp.where(uphill, 0, jnp.where(first, downhill, downhill + 1))
        v = v + dt * f
        dr = dt * v
        dr_norm = jnp.sqrt(jnp.vdot(dr, dr))
        dr = jnp.where(dr_norm > max_step, dr * max_step / jnp.where(dr_norm > 0, dr_norm, 1.0), dr)
        dr = jnp.where(state.mask[:, None], dr, 0.0)
        state = state._replace(positions=state.positions + dr, momenta=jnp.where(state.mask[:, None], v, 0.0),
                               aux={"dt": dt, "alpha": alpha, "downhill": downhill})
        return _evaluate(force_fn, spec, state, nbrs, periodic)

    return Integrator(init, step)
