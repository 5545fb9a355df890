"""The device side of a simulation: jitted, replica-vmapped programs that run chunks of steps.

:func:`programs` gives, per (model, list size, integrator), an ``init``
program (momenta, thermostat, neighbour list), a ``chunk`` program (``frames
× interval`` steps as a ``lax.scan`` of ``fori_loop``\\ s, one observation
per frame: :data:`OBSERVED`) and a neighbour-list ``build``. Parameters, the
numeric settings, the interval and the number of frames wanted are
arguments, so a new temperature, time step or step count compiles nothing.

Units at this interface: ASE's (Å, eV, amu, ASE time), settings already converted.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from ase import units

from equijax.md import integrators as md, neighbours as nl, potential

#: what :func:`programs`' chunk observes per frame, in this order (the fields of ``equijax.md.Frames`` after step)
OBSERVED = ("positions", "momenta", "forces", "cell", "potential", "kinetic", "conserved", "temperature", "pressure",
            "fmax", "isolated", "force_spread")


class Programs(NamedTuple):
    """The jitted, replica-vmapped device programs of one model, integrator and list size."""


    init: object  # (params, settings, numbers, positions, cells, masses, mask, keys) -> (MDState, nbrs)
    chunk: object  # (params, settings, numbers, state, nbrs, valid, every) -> ((state, nbrs), observations)
    build: object  # (positions, cells, mask) -> nbrs


def _no_forces(positions, nbrs, cell=None):
    zero = jnp.zeros((), positions.dtype)
    return potential.ForcesStress(zero, jnp.zeros_like(positions), jnp.zeros((3, 3), positions.dtype))


def _integrator(model, params, settings, numbers, spec, kind, periodic, forces=True):
    ff = potential.force_fn(model, params, numbers) if forces else _no_forces
    s = settings
    if kind == "fire":
        return md.fire(ff, spec, periodic)
    if kind == "nve":
        return md.nve(ff, spec, s["dt"], periodic)
    if kind == "nvt-langevin":
        return md.langevin(ff, spec, s["dt"], s["kT"], s["friction"], periodic)
    if kind == "nvt-nose-hoover":
        return md.nose_hoover(ff, spec, s["dt"], s["kT"], s["tau"], periodic=periodic)
    return md.npt_langevin(ff, spec, s["dt"], s["kT"], s["friction"], s["pressure"], s["compressibility"], s["tau_p"])


def _observe(state, nbrs, settings, kind, periodic, cutoff, spread_fn):
    """What a frame records (see :class:`Frames`), on the device."""
    kin = md.kinetic_energy(state)
    conserved = state.energy + kin
    if kind == "nvt-nose-hoover":
        conserved = conserved + md.nose_hoover_energy(state, settings["kT"], settings["tau"])
    if kind == "npt":
        conserved = conserved + settings["pressure"] * md.volume(state.cell)
    press = md.pressure(state) / units.GPa if periodic else jnp.zeros((), state.energy.dtype)  # NaN on the host
    counts = neighbour_counts(nbrs, state.positions, state.cell if periodic else None, cutoff)
    isolated = jnp.sum(state.mask & (counts == 0))
    fmax = jnp.max(jnp.linalg.norm(state.forces, axis=-1))
    temp = md.temperature_kT(state) / units.kB
    spread = spread_fn(state.positions, nbrs, state.cell if periodic else None)
    return (state.positions, state.momenta, state.forces, state.cell, state.energy, kin, conserved, temp,
            press, fmax, isolated, spread)


@functools.lru_cache(maxsize=64)
def programs(model, spec: nl.Spec, kind: str, periodic: bool, chunk_frames: int) -> Programs:
    """Jitted, replica-vmapped programs, shared by every run of this model and list size.

    Parameters, numeric settings, the interval and the number of frames
    actually wanted from a chunk are arguments, so a new temperature,
    pressure, time step, interval or step count compiles nothing.
    """

    def init(params, settings, numbers, positions, cells, masses, mask, keys):
        # momenta, thermostat and list only: the driver's first (zero-length) step computes the forces
        def single(z, r, cell, mass, m, k):
            nbrs = nl.build(spec, r, cell if periodic else None, m)
            integrator = _integrator(model, params, settings, z, spec, kind, periodic, forces=False)
            return integrator.init(r, cell, mass, m, k, settings["kT"], nbrs)
        return jax.vmap(single)(numbers, positions, cells, masses, mask, keys)

    def chunk(params, settings, numbers, state, nbrs, valid, every):
        def single(z, state, nbrs):
            step = _integrator(model, params, settings, z, spec, kind, periodic).step
            spread_fn = potential.spread_fn(model, params, z)

            def frame(carry, index):
                # frames past ``valid`` (the end of the run) leave the state as it is
                carry = jax.lax.cond(index < valid,
                                     lambda c: jax.lax.fori_loop(0, every, lambda _, c: step(*c), c),
                                     lambda c: c, carry)
                return carry, _observe(*carry, settings, kind, periodic, model.config.cutoff, spread_fn)

            return jax.lax.scan(frame, (state, nbrs), jnp.arange(chunk_frames))
        return jax.vmap(single)(numbers, state, nbrs)

    def build(positions, cells, mask):
        return jax.vmap(lambda r, c, m: nl.build(spec, r, c if periodic else None, m))(positions, cells, mask)

    return Programs(jax.jit(init), jax.jit(chunk), jax.jit(build))


def neighbour_counts(nbrs, positions, cell, cutoff):
    _, _, _, real = nl.as_pairs(nbrs, positions, cell, cutoff)
    return jnp.zeros(positions.shape[0] + 1, jnp.int32).at[nbrs.receivers].add(real.astype(jnp.int32))[:-1]
