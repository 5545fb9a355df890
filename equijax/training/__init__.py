"""Training, outside the model: loss, optimiser, EMA, train step, evaluation, and the ``fit`` loop.

The model is any ``energy_fn(params, graph)``. Batches are *stacked* padded
graphs of shape ``(n_shards, ...)`` (:meth:`equijax.data.Dataset.batches`),
one shard per device; losses are sums over every real structure of every
shard divided by the global counts, so one device and many give the same
numbers. Data parallelism is plain JAX (:mod:`equijax.runtime`): parameters
are replicated and the batch's shard axis is split over a mesh; over
several processes call :func:`init_distributed` first (``equijax train
--distributed`` does), and only process 0 writes files.

* :mod:`~equijax.training.losses`: the loss terms and their metrics.
* :mod:`~equijax.training.step`: optimiser, state, train step, evaluation, plateau schedule.
* :mod:`~equijax.training.run`: :func:`fit`, a run config in and a model file out.
"""

from equijax.modes import MODE_FLOOR_CM, WAVENUMBER, displacement_basis, frequency_basis, newton_step
from equijax.runtime import data_mesh, host, init_distributed, machine_info, replicate, shard
from equijax.training.losses import (HESSIAN_METRICS, LossWeights, Terms, hessian_directions, loss_fn, metrics,
                                     reference_dipole_derivative, reference_hvp)
from equijax.training.run import CHECKPOINT_NAME, MODEL_NAME, fit
from equijax.training.step import (Plateau, TrainState, ensemble_train_step, evaluate, evaluator, init_state,
                                   initial_params, lr_factor, optimizer, set_lr_factor, train_step)

__all__ = ["CHECKPOINT_NAME", "HESSIAN_METRICS", "LossWeights", "MODEL_NAME", "MODE_FLOOR_CM", "Plateau",
           "Terms", "TrainState", "WAVENUMBER", "data_mesh", "displacement_basis", "ensemble_train_step", "evaluate",
           "evaluator", "fit", "frequency_basis", "hessian_directions", "host", "init_distributed", "init_state",
           "initial_params", "loss_fn", "lr_factor", "machine_info", "metrics", "newton_step", "optimizer",
           "reference_dipole_derivative", "reference_hvp", "replicate", "set_lr_factor", "shard", "train_step"]
