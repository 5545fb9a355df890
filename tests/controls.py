"""Negative controls: deliberately broken potentials that a physics test must catch.

A symmetry test that also passes for these is vacuous (too shallow a model,
too symmetric a structure); each equivariance test runs one of them through
the same assertion and expects it to fail.
"""

import e3nn_jax as e3nn
import jax.numpy as jnp

import equijax
from equijax import layers


def parity_mislabelled(config):
    """NequIP whose edge harmonics are all labelled even (1e instead of 1o): a classic parity bug.

    Rotations cannot see it; the inversion can, but only through pseudoscalar
    channels, which first reach the energy in the third layer.
    """

    def plan(irreps_in, hidden, irreps_sh, *args):
        wrong = e3nn.Irreps([(mul, (ir.l, 1)) for mul, ir in e3nn.Irreps(irreps_sh)])
        return layers.conv_plan(irreps_in, hidden, wrong, *args)

    return equijax.nequip(config, interaction=(plan, layers.conv_init, layers.conv))


def rotation_broken(energy_fn, strength=1e-3):
    """An energy with a small term that depends on the x axis: not rotation invariant."""

    def fn(params, graph):
        x = jnp.where(graph.nodes["mask"], graph.nodes["positions"][:, 0], 0.0)
        return energy_fn(params, graph) + strength * jnp.sum(jnp.sin(x))

    return fn
