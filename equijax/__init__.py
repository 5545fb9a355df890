"""equijax: E(3)-equivariant interatomic potentials as pure JAX functions."""

from equijax import graph, layers, physics
from equijax.graph import Structure, build_graph, from_ase
from equijax.models import NequIPConfig, Potential, nequip

__version__ = "0.1.0"
