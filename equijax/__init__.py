"""equijax: E(3)-equivariant interatomic potentials as pure JAX functions.

One module per concern: :mod:`equijax.graph` (neighbours, batching, padding),
:mod:`equijax.layers` and :mod:`equijax.models` (the potential),
:mod:`equijax.physics` (forces, stress, Hessians), :mod:`equijax.training`,
:mod:`equijax.io`, :mod:`equijax.checkpoint` (model files that cannot carry
code: ``model, params, metadata = equijax.load("model.npz")``),
:mod:`equijax.config` (the run-config schema), :mod:`equijax.ensemble`
(committees: K stacked parameter sets, mean and spread); and, imported on demand,
:mod:`equijax.calculator` (ASE), :mod:`equijax.vibrations`,
:mod:`equijax.phonons`, :mod:`equijax.md` (molecular dynamics in JAX),
:mod:`equijax.testing`.
"""

from equijax import checkpoint, config, data, ensemble, graph, io, layers, physics, training
from equijax.checkpoint import load_model as load
from equijax.graph import Structure, build_graph, from_ase
from equijax.models import NequIPConfig, Potential, nequip

__version__ = "0.2.0"
