"""Training, outside the model: losses, optimiser, and a jitted train step.

The model is any ``energy_fn(params, graph)``; labels travel in the padded
graph (``globals["energy"]``, ``nodes["forces"]``, ``globals["stress"]``),
see :mod:`equijax.graph`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from equijax import physics


class LossWeights(NamedTuple):
    """Weights of the loss terms (each a mean squared error).

    ``energy`` weighs the per-atom energy error (eV/atom)², ``forces`` the
    force-component error (eV/Å)², ``stress`` the stress error (eV/Å³)².
    """

    energy: float = 1.0
    forces: float = 10.0
    stress: float = 0.0


def loss_fn(energy_fn, weights: LossWeights = LossWeights()):
    """``(params, graph) -> (loss, metrics)`` over the real graphs of a batch."""
    need_stress = weights.stress > 0
    derive = physics.energy_forces_stress(energy_fn) if need_stress else physics.energy_and_forces(energy_fn)

    def fn(params, graph):
        out = derive(params, graph)
        energy, forces = out[0], out[1]
        gmask = graph.globals["mask"]
        nmask = graph.nodes["mask"]
        n_atoms = jnp.maximum(graph.n_node, 1)
        n_graphs = jnp.maximum(gmask.sum(), 1)
        de = jnp.where(gmask, (energy - graph.globals["energy"]) / n_atoms, 0.0)
        df = jnp.where(nmask[:, None], forces - graph.nodes["forces"], 0.0)
        e_mse = (de**2).sum() / n_graphs
        f_mse = (df**2).sum() / jnp.maximum(3 * nmask.sum(), 1)
        loss = weights.energy * e_mse + weights.forces * f_mse
        metrics = {"energy_mse": e_mse, "forces_mse": f_mse}
        if need_stress:
            ds = jnp.where(gmask[:, None, None], out.stress - graph.globals["stress"], 0.0)
            s_mse = (ds**2).sum() / (9 * n_graphs)
            loss = loss + weights.stress * s_mse
            metrics["stress_mse"] = s_mse
        metrics["loss"] = loss
        return loss, metrics

    return fn


class TrainState(NamedTuple):
    params: object
    opt_state: object
    step: jax.Array


def train_step(energy_fn, optimizer: optax.GradientTransformation, weights: LossWeights = LossWeights()):
    """``(state, graph) -> (state, metrics)``: one gradient step (jit it)."""
    loss = loss_fn(energy_fn, weights)

    def fn(state: TrainState, graph):
        (_, metrics), grads = jax.value_and_grad(loss, has_aux=True)(state.params, graph)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(params, opt_state, state.step + 1), metrics

    return fn
