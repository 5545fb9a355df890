"""Molecular dynamics in JAX: whole trajectories on the device.

* :mod:`equijax.md.neighbours`: a neighbour list rebuilt inside ``jit`` (Verlet
  skin, fixed capacity, an overflow flag; exact for cells shorter than twice
  the cutoff).
* :mod:`equijax.md.potential`: an equijax model as ``energy(positions, nbrs, cell)``
  and ``forces``/``stress`` by autodiff; and as a jax-md energy function
  (``jax_md_energy_fn``) for jax-md's own lists, integrators and minimisers.
* :mod:`equijax.md.integrators`: NVE (velocity Verlet), NVT (BAOAB Langevin,
  Nosé–Hoover chain), NPT (Langevin + stochastic cell rescaling) and FIRE, as
  pure ``init``/``step`` pairs to ``scan`` and ``vmap``.
* :mod:`equijax.md.programs`: the jitted, replica-vmapped chunk programs.
* :mod:`equijax.md.run`: :func:`simulate`, the chunked host driver behind
  ``equijax md`` (overflow replay, blow-up checks, exact resume).
* :mod:`equijax.md.output`: trajectories (extxyz), log (CSV), restart state
  and plot, kill-safe; :func:`read_trajectory` reads a run's complete frames.

    from equijax import md
    result = md.simulate(model, params, atoms, ensemble="nvt-langevin", temperature=300,
                         timestep=0.5, steps=2000, replicas=8, output="md_run")
"""

from equijax.md import integrators, neighbours, potential
from equijax.md.output import LOG_COLUMNS, read_trajectory
from equijax.md.run import ENSEMBLES, Frames, MDError, Result, simulate

__all__ = ["ENSEMBLES", "Frames", "LOG_COLUMNS", "MDError", "Result", "integrators", "neighbours", "potential",
           "read_trajectory", "simulate"]
