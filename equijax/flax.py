"""A thin flax (linen) shell around any :class:`equijax.Potential`, for flax users.

The module holds the functional parameters unchanged, as one entry of its
``params`` collection, so both forms share one parameter tree::

    module = PotentialModule(equijax.nequip(cfg))
    variables = module.init(key, graph)                 # {"params": {"potential": params}}
    module.apply(variables, graph)                      # (n_graph,) eV, = model.energy(params, graph)
    module.apply(variables, graph, method="forces")     # (n_node, 3) eV/Å, by autodiff of the energy
    variables = as_variables(params)                    # a trained model file's parameters, for flax
    params = params_of(variables)                       # and back

Nothing is computed here: every method calls the potential's pure
functions (and :mod:`equijax.physics`), so a flax model that embeds an
equijax potential gets the same numbers, derivatives and compiled programs.
Needs ``pip install 'equijax[flax]'``.
"""

from __future__ import annotations

try:
    import flax.linen as nn
except ImportError as err:  # an optional extra
    raise ImportError("equijax.flax needs flax: pip install 'equijax[flax]'") from err

from equijax import physics

#: the name of the potential's parameters inside the module's ``params`` collection
NAME = "potential"


class PotentialModule(nn.Module):
    """A linen module of ``potential`` (any :class:`equijax.Potential`: NequIP, a committee, your own).

    Attributes:
        potential: the potential; its ``init(key)`` makes the module's parameters.
    """

    potential: object

    def setup(self):
        self._params = self.param(NAME, lambda key: self.potential.init(key))

    def __call__(self, graph):
        """(n_graph,) energies, eV."""
        return self.potential.energy(self._params, graph)

    def atomic_energies(self, graph):
        """(n_node,) atomic energies, eV (zero on padding)."""
        return self.potential.atomic_energies(self._params, graph)

    def forces(self, graph):
        """(n_node, 3) forces, eV/Å: ``-dE/dr`` of :meth:`__call__`'s energy."""
        return physics.energy_and_forces(self.potential.energy)(self._params, graph)[1]

    def dipole(self, graph):
        """(n_graph, 3) dipoles, e·Å (the potential's dipole head)."""
        return self.potential.dipole(self._params, graph)


def as_variables(params) -> dict:
    """Functional parameters as the module's variables: ``{"params": {"potential": params}}``."""
    return {"params": {NAME: params}}


def params_of(variables) -> dict:
    """The functional parameters inside a module's variables."""
    return variables["params"][NAME]
