"""Potentials: pure functions from ``(params, graph)`` to energies.

* :mod:`~equijax.models.potential`: the :class:`Potential` interface every
  architecture returns, and what they share (species lookup, energy sums).
* :mod:`~equijax.models.nequip`: NequIP, :class:`NequIPConfig` and :func:`nequip`.
* :mod:`~equijax.models.precision`: :func:`float64_model`, the same potential in float64.

:func:`build` makes the potential a config describes, whatever its
architecture; model files go through it.
"""

from equijax.models.nequip import NequIPConfig, nequip
from equijax.models.potential import Potential, check_species, species_index, total_energy
from equijax.models.precision import float64_model

#: architecture name -> (config class, factory); what model files and run configs may name
ARCHITECTURES = {"nequip": (NequIPConfig, nequip)}


def build(config) -> Potential:
    """The potential of ``config`` (any architecture's config dataclass)."""
    for config_cls, factory in ARCHITECTURES.values():
        if isinstance(config, config_cls):
            return factory(config)
    raise TypeError(f"no architecture takes a config of type {type(config).__name__}")


__all__ = ["ARCHITECTURES", "NequIPConfig", "Potential", "build", "check_species", "float64_model", "nequip",
           "species_index", "total_energy"]
