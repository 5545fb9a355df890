"""Training, outside the model: loss, optimiser, EMA, train step, evaluation.

The model is any ``energy_fn(params, graph)``. Batches are *stacked* padded
graphs of shape ``(n_shards, ...)`` (:meth:`equijax.data.Dataset.batches`),
one shard per device; losses are sums over every real structure of every
shard divided by the global counts, so one device and many give the same
numbers. Labels travel in the graph: ``globals["energy"]``,
``nodes["forces"]``, ``globals["stress"]``.

Data parallelism is plain JAX: parameters are replicated and the batch's
shard axis is split over a ``jax.sharding.Mesh`` (:func:`data_mesh`); ``jit``
partitions the computation. Over several hosts, call
``jax.distributed.initialize()`` first (the ``equijax train --distributed``
flag does); each host then feeds its own shards.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from equijax import physics


class LossWeights(NamedTuple):
    """Weights of the mean squared errors in the loss.

    ``energy``: per-atom energy error, (eV/atom)²; ``forces``: force
    components, (eV/Å)²; ``stress``: stress components, (eV/Å³)²;
    ``dipole``: dipole components, (e·Å)² (needs the model's dipole head).
    """

    energy: float = 1.0
    forces: float = 10.0
    stress: float = 0.0
    dipole: float = 0.0


def _errors(energy_fn, with_stress, dipole_fn=None):
    """``(params, graph) -> dict`` of summed absolute and squared errors and counts."""
    derive = physics.energy_forces_stress(energy_fn) if with_stress else physics.energy_and_forces(energy_fn)

    def fn(params, graph):
        out = derive(params, graph)
        gmask, nmask = graph.globals["mask"], graph.nodes["mask"]
        de = jnp.where(gmask, (out[0] - graph.globals["energy"]) / jnp.maximum(graph.n_node, 1), 0.0)
        df = jnp.where(nmask[:, None], out[1] - graph.nodes["forces"], 0.0)
        sums = {
            "energy_sq": (de**2).sum(), "energy_abs": jnp.abs(de).sum(), "n_graphs": gmask.sum(),
            "forces_sq": (df**2).sum(), "forces_abs": jnp.abs(df).sum(), "n_force": 3 * nmask.sum(),
        }
        if with_stress:
            ds = jnp.where(gmask[:, None, None], out.stress - graph.globals["stress"], 0.0)
            sums.update(stress_sq=(ds**2).sum(), stress_abs=jnp.abs(ds).sum(), n_stress=9 * gmask.sum())
        if dipole_fn is not None:
            dd = jnp.where(gmask[:, None], dipole_fn(params, graph) - graph.globals["dipole"], 0.0)
            sums.update(dipole_sq=(dd**2).sum(), dipole_abs=jnp.abs(dd).sum(), n_dipole=3 * gmask.sum())
        return sums

    return fn


def _summed(errors, params, stacked):
    per_shard = jax.vmap(errors, in_axes=(None, 0))(params, stacked)
    return jax.tree_util.tree_map(lambda x: x.sum(0), per_shard)


def loss_fn(energy_fn, weights: LossWeights = LossWeights(), dipole_fn=None):
    """``(params, stacked_graph) -> (loss, metrics)``; ``dipole_fn`` is needed when ``weights.dipole > 0``."""
    if weights.dipole > 0 and dipole_fn is None:
        raise ValueError("a dipole weight needs the model's dipole function (model.dipole)")
    errors = _errors(energy_fn, weights.stress > 0, dipole_fn if weights.dipole > 0 else None)

    def fn(params, stacked):
        s = _summed(errors, params, stacked)
        e_mse = s["energy_sq"] / jnp.maximum(s["n_graphs"], 1)
        f_mse = s["forces_sq"] / jnp.maximum(s["n_force"], 1)
        loss = weights.energy * e_mse + weights.forces * f_mse
        metrics = {"energy_rmse": jnp.sqrt(e_mse), "forces_rmse": jnp.sqrt(f_mse)}
        if weights.stress > 0:
            s_mse = s["stress_sq"] / jnp.maximum(s["n_stress"], 1)
            loss = loss + weights.stress * s_mse
            metrics["stress_rmse"] = jnp.sqrt(s_mse)
        if weights.dipole > 0:
            d_mse = s["dipole_sq"] / jnp.maximum(s["n_dipole"], 1)
            loss = loss + weights.dipole * d_mse
            metrics["dipole_rmse"] = jnp.sqrt(d_mse)
        metrics["loss"] = loss
        return loss, metrics

    return fn


def optimizer(learning_rate=5e-3, warmup_steps=100, total_steps=10_000, schedule="cosine",
              clip_norm=10.0) -> optax.GradientTransformation:
    """Adam with linear warm-up, then cosine decay (or constant), and clipping.

    The learning rate is an injected hyperparameter, so a host-side
    reduce-on-plateau (:class:`Plateau`) can scale it between steps.
    """
    if schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(warmup_steps, 1),
                                                max(total_steps, warmup_steps + 1), learning_rate * 0.01)
    elif schedule in ("constant", "plateau"):
        lr = optax.linear_schedule(0.0, learning_rate, max(warmup_steps, 1))
    else:
        raise ValueError(f"unknown schedule {schedule!r}: use 'cosine', 'constant' or 'plateau'")
    return optax.chain(
        optax.clip_by_global_norm(clip_norm),
        optax.scale_by_adam(),
        optax.inject_hyperparams(optax.scale)(step_size=1.0),  # the plateau factor
        optax.scale_by_learning_rate(lr),
    )


def set_lr_factor(opt_state, factor: float):
    """Set the reduce-on-plateau factor inside an :func:`optimizer` state."""
    scale_state = opt_state[2]
    hp = dict(scale_state.hyperparams)
    hp["step_size"] = jnp.asarray(factor, hp["step_size"].dtype)
    return opt_state[:2] + (scale_state._replace(hyperparams=hp),) + opt_state[3:]


def lr_factor(opt_state) -> float:
    return float(opt_state[2].hyperparams["step_size"])


class TrainState(NamedTuple):
    params: object
    ema_params: object
    opt_state: object
    step: jax.Array


def init_state(params, opt: optax.GradientTransformation) -> TrainState:
    ema = jax.tree_util.tree_map(jnp.copy, params)  # its own buffers: the step donates both
    return TrainState(params, ema, opt.init(params), jnp.zeros((), jnp.int32))


def train_step(energy_fn, opt: optax.GradientTransformation, weights: LossWeights = LossWeights(),
               ema_decay: float = 0.99, dipole_fn=None):
    """``(state, stacked_graph) -> (state, metrics)``: one step (jit it)."""
    loss = loss_fn(energy_fn, weights, dipole_fn)

    def fn(state: TrainState, stacked):
        (_, metrics), grads = jax.value_and_grad(loss, has_aux=True)(state.params, stacked)
        updates, opt_state = opt.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # warm the EMA up: short runs should not be dominated by the initial weights
        decay = jnp.minimum(ema_decay, (1.0 + state.step) / (10.0 + state.step))
        ema = jax.tree_util.tree_map(lambda e, p: decay * e + (1 - decay) * p, state.ema_params, params)
        metrics["grad_norm"] = optax.tree.norm(grads)
        return TrainState(params, ema, opt_state, state.step + 1), metrics

    return fn


def evaluator(energy_fn, with_stress: bool = False, dipole_fn=None):
    """``(params, stacked_graph) -> dict`` of summed errors (jit it); see :func:`metrics`."""
    errors = _errors(energy_fn, with_stress, dipole_fn)
    return lambda params, stacked: _summed(errors, params, stacked)


def metrics(sums: dict) -> dict:
    """MAE and RMSE from summed errors: meV/atom, meV/Å, meV/Å³, me·Å (dipole)."""
    out = {}
    for key, count in (("energy", "n_graphs"), ("forces", "n_force"), ("stress", "n_stress"), ("dipole", "n_dipole")):
        if key + "_sq" in sums:
            n = max(float(sums[count]), 1.0)
            out[f"{key}_mae"] = 1000 * float(sums[key + "_abs"]) / n
            out[f"{key}_rmse"] = 1000 * float(np.sqrt(float(sums[key + "_sq"]) / n))
    return out


def evaluate(energy_fn, params, dataset, with_stress: bool = False, mesh: Mesh | None = None,
             dipole_fn=None) -> dict:
    """Metrics of ``params`` over a whole :class:`equijax.data.Dataset`."""
    fn = jax.jit(evaluator(energy_fn, with_stress, dipole_fn))
    total = None
    for batch in dataset.batches():
        if mesh is not None:
            batch = shard(batch, mesh)
        sums = jax.device_get(fn(params, batch))
        total = sums if total is None else jax.tree_util.tree_map(lambda a, b: a + b, total, sums)
    return metrics(total)


class Plateau:
    """Host-side reduce-on-plateau and early stopping on a validation metric."""

    def __init__(self, patience: int = 5, factor: float = 0.5, min_factor: float = 1e-3, stop_patience: int = 15):
        self.patience, self.factor, self.min_factor, self.stop_patience = patience, factor, min_factor, stop_patience
        self.best = float("inf")
        self.bad = 0
        self.since_best = 0

    def update(self, value: float, lr_factor_now: float) -> tuple[float, bool, bool]:
        """Returns ``(new_lr_factor, improved, stop)``."""
        if value < self.best:
            self.best, self.bad, self.since_best = value, 0, 0
            return lr_factor_now, True, False
        self.bad += 1
        self.since_best += 1
        if self.bad >= self.patience:
            lr_factor_now = max(lr_factor_now * self.factor, self.min_factor)
            self.bad = 0
        return lr_factor_now, False, self.since_best >= self.stop_patience

    def state_dict(self):
        return {"best": self.best, "bad": self.bad, "since_best": self.since_best}

    def load_state_dict(self, d):
        self.best, self.bad, self.since_best = d["best"], d["bad"], d["since_best"]


# ------------------------------------------------------------------ sharding


def data_mesh(devices=None) -> Mesh:
    """A 1-D mesh named ``"data"`` over all (global) devices."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    return Mesh(devices, ("data",))


def replicate(tree, mesh: Mesh):
    return jax.device_put(tree, NamedSharding(mesh, P()))


def shard(stacked, mesh: Mesh):
    """Split a stacked batch's leading (shard) axis over the mesh.

    Every host builds the same global batch (same files, same seed); on
    several hosts each one hands over only the shards of its own devices
    (``jax.devices()`` lists devices process by process), and JAX assembles
    the global array.
    """
    sharding = NamedSharding(mesh, P("data"))
    if jax.process_count() == 1:
        return jax.device_put(stacked, sharding)
    per_host = jax.local_device_count()
    start = jax.process_index() * per_host

    def local(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(sharding, x[start : start + per_host], x.shape)

    return jax.tree_util.tree_map(local, stacked)
