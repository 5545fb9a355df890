"""The optimiser, the training state, one train step and evaluation over a data set."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from equijax import ensemble
from equijax.config import default
from equijax.runtime import host, shard
from equijax.training.losses import LossWeights, Terms, _errors, _summed, loss_fn, metrics


def optimizer(learning_rate=default("train.learning_rate"), warmup_steps=default("train.warmup_steps"),
              total_steps=default("train.max_steps"), schedule=default("train.schedule"),
              clip_norm=default("train.clip_norm")) -> optax.GradientTransformation:
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


def set_lr_factor(opt_state, factor):
    """Set the reduce-on-plateau factor inside an :func:`optimizer` state
    (a number; for stacked ensemble states, one per member)."""
    scale_state = opt_state[2]
    hp = dict(scale_state.hyperparams)
    hp["step_size"] = jnp.asarray(factor, hp["step_size"].dtype).reshape(hp["step_size"].shape)
    return opt_state[:2] + (scale_state._replace(hyperparams=hp),) + opt_state[3:]


def lr_factor(opt_state):
    """The plateau factor: a float, or an array of one per member for ensemble states."""
    x = host(opt_state[2].hyperparams["step_size"])
    return float(x) if x.ndim == 0 else x


class TrainState(NamedTuple):
    params: object
    ema_params: object
    opt_state: object
    step: jax.Array


def initial_params(model, key):
    """``model.init(key)`` with the energy readout's last layer set to zero.

    Training then starts from the per-element reference energies and the
    network adds only what the data ask for, instead of first unlearning
    random per-atom energies of the order of the energy scale (measured by
    ``experiments/readout_start.py``; docs: explanation/energy-references).
    """
    params = model.init(key)
    readout = dict(params["readout"], out=jax.tree_util.tree_map(jnp.zeros_like, params["readout"]["out"]))
    return dict(params, readout=readout)


def init_state(params, opt: optax.GradientTransformation) -> TrainState:
    ema = jax.tree_util.tree_map(jnp.copy, params)  # its own buffers: the step donates both
    return TrainState(params, ema, opt.init(params), jnp.zeros((), jnp.int32))


def train_step(energy_fn, opt: optax.GradientTransformation, weights: LossWeights = LossWeights(),
               ema_decay: float = default("train.ema_decay"), dipole_fn=None,
               hessian_directions_k: int = default("train.hessian_directions"), seed: int = default("train.seed"),
               hessian_metric: str = default("train.hessian_metric")):
    """``(state, stacked_graph) -> (state, metrics)``: one step (jit it).

    The Hessian term's directions are a function of ``seed``, the step
    number and each structure's index: an exact resume draws the same ones.
    """
    loss = loss_fn(energy_fn, weights, dipole_fn, hessian_directions_k, hessian_metric)
    base = jax.random.PRNGKey(seed)

    def fn(state: TrainState, stacked):
        key = jax.random.fold_in(base, state.step)
        (_, metrics), grads = jax.value_and_grad(loss, has_aux=True)(state.params, stacked, key)
        updates, opt_state = opt.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # warm the EMA up: short runs should not be dominated by the initial weights
        decay = jnp.minimum(ema_decay, (1.0 + state.step) / (10.0 + state.step))
        ema = jax.tree_util.tree_map(lambda e, p: decay * e + (1 - decay) * p, state.ema_params, params)
        metrics["grad_norm"] = optax.tree.norm(grads)
        return TrainState(params, ema, opt_state, state.step + 1), metrics

    return fn


def ensemble_train_step(step, strategy: str = "auto"):
    """``(states, stacked_graph, active) -> (states, metrics)``: one step of K members (jit it).

    ``step`` is a single-model :func:`train_step`; ``states`` are K
    :class:`TrainState` stacked on a leading axis; every member takes the
    same batch; ``active`` (K,) bool freezes members that stopped early
    (their state comes back unchanged). Metrics have a leading K axis.
    ``strategy``: :func:`equijax.ensemble.over_members`.
    """
    def one(member, batch):
        state, active = member
        new, metrics = step(state, batch)
        return jax.tree_util.tree_map(lambda n, o: jnp.where(active, n, o), new, state), metrics

    mapped = ensemble.over_members(one, strategy)
    return lambda states, batch, active: mapped((states, active), batch)


def evaluator(energy_fn, terms: Terms = Terms(), dipole_fn=None):
    """``(params, stacked_graph) -> dict`` of summed errors (jit it); see :func:`~equijax.training.metrics`.

    ``terms`` (:class:`~equijax.training.losses.Terms`) says which errors;
    ``dipole_fn`` is needed for the dipole terms. Hessian-vector products
    and dipole derivatives go along fixed directions (a fixed key):
    successive evaluations compare like with like.
    """
    errors = _errors(energy_fn, terms, dipole_fn)
    key = jax.random.PRNGKey(2**31 - 1)
    return lambda params, stacked: _summed(errors, params, stacked, key)


def evaluate(energy_fn, params, dataset, terms: Terms = Terms(), dipole_fn=None, mesh: Mesh | None = None) -> dict:
    """Metrics (MAE, RMSE; :func:`~equijax.training.metrics`) of ``params`` over a whole
    :class:`equijax.data.Dataset`; ``mesh`` shards its batches over devices."""
    out = {} if mesh is None else {"out_shardings": NamedSharding(mesh, P())}
    fn = jax.jit(evaluator(energy_fn, terms, dipole_fn), **out)
    total = None
    for batch in dataset.batches():
        if mesh is not None:
            batch = shard(batch, mesh)
        sums = host(fn(params, batch))
        total = sums if total is None else jax.tree_util.tree_map(lambda a, b: a + b, total, sums)
    return metrics(total)


class Plateau:
    """Host-side reduce-on-plateau and early stopping on a validation metric."""

    def __init__(self, patience: int = default("train.plateau_patience"), factor: float = default("train.plateau_factor"),
                 min_factor: float = 1e-3, stop_patience: int = default("train.early_stopping_patience")):
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


class Selection:
    """Model selection of one model or a committee: each member's plateau schedule, early stopping,
    and best EMA parameters so far (host arrays, stacked for a committee: what ``model.npz`` holds).

    Args:
        plateaus: one :class:`Plateau` per member (restored on a resume).
        criterion: ``valid metrics -> float``, lower is better.
        best: the best parameters of a resumed run, else ``None`` (the current EMA ones stand in).
        schedule: with ``"plateau"`` the learning rate follows the plateaus.
    """

    def __init__(self, plateaus: list, criterion, best=None, schedule: str = "cosine"):
        self.plateaus, self.criterion, self.best, self.schedule = plateaus, criterion, best, schedule
        self.committee = len(plateaus) > 1
        self.stopped = [p.since_best >= p.stop_patience for p in plateaus]

    def active(self):
        """(K,) bool: the members still training (a stopped member is frozen)."""
        return np.logical_not(self.stopped)

    def update(self, state: TrainState, valid):
        """``(state, improved, summary, extra)`` after a validation.

        ``valid``: a metrics dict, or for a committee a list of them (one per
        member). ``summary`` is the one model's metrics or the members' mean;
        ``extra`` what a committee adds to the metrics line.
        """
        if not self.committee:
            factor, improved, stop = self.plateaus[0].update(self.criterion(valid), lr_factor(state.opt_state))
            self.stopped = [stop]
            if improved:
                self.best = host(state.ema_params)
            return self._scheduled(state, factor), improved, valid, {}
        factors = np.array(lr_factor(state.opt_state), dtype=float)
        improved, ema_now = False, None
        if self.best is None:  # a member that never improves keeps its EMA parameters of now
            self.best = ema_now = host(state.ema_params)
        for k, (p, vk) in enumerate(zip(self.plateaus, valid)):
            if self.stopped[k]:
                continue
            factors[k], better, self.stopped[k] = p.update(self.criterion(vk), factors[k])
            if better:
                ema_now = host(state.ema_params) if ema_now is None else ema_now
                self.best = jax.tree_util.tree_map(lambda b, e: _set_row(b, k, e[k]), self.best, ema_now)
                improved = True
        summary = {key: float(np.mean([vk[key] for vk in valid])) for key in valid[0]}
        extra = {"valid_members": valid, "stopped": [bool(x) for x in self.stopped]}
        return self._scheduled(state, factors), improved, summary, extra

    def _scheduled(self, state, factor):
        if self.schedule != "plateau":
            return state
        return state._replace(opt_state=set_lr_factor(state.opt_state, factor))


def _set_row(stacked, k, value):
    stacked = np.array(stacked)  # a writable host copy
    stacked[k] = value
    return stacked
