"""equijax: E(3)-equivariant interatomic potentials as pure JAX functions.

One module per concern: :mod:`equijax.graph` (neighbours, batching, padding),
:mod:`equijax.layers`, :mod:`equijax.kernels` and :mod:`equijax.models` (the
potential), :mod:`equijax.physics` (forces, stress, Hessians),
:mod:`equijax.modes` (normal-mode algebra), :mod:`equijax.training` (losses,
step, the ``fit`` loop), :mod:`equijax.loader` and :mod:`equijax.data` (data
sets), :mod:`equijax.io`, :mod:`equijax.checkpoint` (model files that cannot
carry code: ``model, params, metadata = equijax.load("model.npz")``),
:mod:`equijax.config` (the run-config schema, the one source of defaults),
:mod:`equijax.ensemble` (committees: K stacked parameter sets, mean and
spread), :mod:`equijax.runtime` (processes, devices, meshes); and, imported on
demand, :mod:`equijax.calculator` (ASE), :mod:`equijax.compiled`,
:mod:`equijax.vibrations`, :mod:`equijax.phonons`, :mod:`equijax.md`
(molecular dynamics in JAX), :mod:`equijax.calibration`, :mod:`equijax.plots`,
:mod:`equijax.flax` (a linen shell), :mod:`equijax.testing`.
"""

from equijax import checkpoint, config, data, ensemble, graph, io, layers, physics, training
from equijax.checkpoint import load_model as load
from equijax.graph import Structure, build_graph, from_ase
from equijax.models import NequIPConfig, Potential, nequip

__version__ = "0.2.0"
