"""From a run config to what the loop needs: data, model, optimiser, state (``fit``'s first phase).

:func:`setup` reads and splits the data, decides the model's config (a
resumed checkpoint's, a fine-tuned model file's, or one fitted to the data's
statistics), builds the padded data sets, the optimiser and the initial (or
resumed) training state. Nothing here writes a file.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from equijax import checkpoint, config as config_lib, ensemble, io, loader
from equijax.loader import checks
from equijax.runtime import data_mesh, memory_available, replicate
from equijax.training.losses import _REPORTED, LossWeights, Terms
from equijax.training.step import Plateau, TrainState, init_state, initial_params, optimizer

CHECKPOINT_NAME = "checkpoint.npz"  # latest training state, for resuming
MODEL_NAME = "model.npz"  # best validation, EMA parameters: what users load


class Run(NamedTuple):
    """Everything a training run fixes before its first step.

    Attributes:
        config: the validated run config (what checkpoints record).
        sections: the same, typed (:func:`equijax.config.sections`).
        output: the run folder.
        model: the potential of one member.
        saved_config: the model config that files record (``members`` = K: loads as the committee).
        train_set, valid_set: padded data sets of one shape each (:class:`equijax.data.Dataset`).
        mesh: the data mesh over every device of every process.
        opt: the optimiser.
        weights: the loss weights.
        terms: what validation and test evaluate (:class:`~equijax.training.losses.Terms`).
        dipole_fn: the model's dipole function when a dipole term is trained, else ``None``.
        steps_per_epoch: steps of the first epoch (budget batching: epochs differ a little).
        skipped: frames ``data.bad_frames=skip`` left out: ``(file: frame, reason)``.
    """

    config: dict
    sections: object
    output: Path
    model: object
    saved_config: dict
    train_set: object
    valid_set: object
    mesh: object
    opt: object
    weights: LossWeights
    terms: Terms
    dipole_fn: object
    steps_per_epoch: int
    skipped: tuple = ()

    @property
    def committee(self) -> bool:
        return self.sections.train.ensemble > 1

    def epoch_plan(self, epoch: int) -> list:
        """The steps of ``epoch``: a function of (seed, epoch) only, so a resumed run replays the same batches."""
        seed = self.sections.train.seed
        return self.train_set.plan(shuffle=True, seed=seed * 100_003 + epoch, drop_last=True)

    def criterion(self, v: dict) -> float:
        """Model selection: energy + force RMSE; a Hessian term counts in force units (meV/Å), as the loss weighs
        it (the frequency term reports in cm⁻¹, not milli-units)."""
        w = self.weights
        h = float(np.sqrt(w.hessian / w.forces)) if w.hessian > 0 and w.forces > 0 else 1.0
        h *= 1000.0 / _REPORTED.get(self.terms.hessian_metric, 1000.0)
        return v["forces_rmse"] + v["energy_rmse"] + h * v.get("hessian_rmse", v.get("frequency_rmse", 0.0))

    def read(self, paths, species=None):
        """Labelled structures of data files, in memory or lazily as ``data.lazy`` says."""
        return _read(self.sections.data, self.weights, paths, species or self.model.config.species)[0]

    def dataset(self, structures):
        """A data set of the validation set's padded shape (a test set: one evaluator compilation)."""
        valid = self.valid_set
        return loader.Dataset(structures, valid.cutoff, valid.batch_size, self.model.config.species,
                              valid.n_shards, valid.dtype, valid.budget, hessian_width=valid.hessian_width,
                              partial_labels=valid.partial_labels)


def setup(config: dict, output: Path, resume: bool, accept_changes: bool, log):
    """``(run, state, plateaus, resumed)`` of a validated ``config``; ``resumed`` is the checkpoint's content
    (or ``None`` for a new run)."""
    s = config_lib.sections(config)
    resumed = _resume_point(config, output, resume, accept_changes, log)
    weights = LossWeights(**s.train.weights._asdict())
    train, valid, skipped = _split(s, weights, log)
    model_cfg, start_params = _model_config(s, train, valid, resumed, output, log)
    if model_cfg.dtype == "float64" and not jax.config.jax_enable_x64:
        raise config_lib.ConfigError(
            "model.dtype=float64 needs float64 enabled in JAX (else every array is float32): the equijax "
            "command does it itself; in Python call jax.config.update('jax_enable_x64', True) before fit")
    model = _build(model_cfg.replace(members=1))
    if s.train.ensemble > 1:
        _check_ensemble_fits(model, s.train.ensemble)
    mesh = data_mesh()
    _check_devices(s, weights, mesh)
    train_set, valid_set = _datasets(s, weights, model_cfg, train, valid, mesh)
    with_dmu = weights.dipole_derivative > 0
    terms = Terms.of(weights, s.train.hessian_directions, s.train.hessian_metric)
    # with Hessian labels, validation also reports where the force errors move the minima (newton_step)
    terms = terms._replace(displacement=terms.hessian_directions > 0)
    opt = optimizer(s.train.learning_rate, s.train.warmup_steps, s.train.max_steps, s.train.schedule,
                    s.train.clip_norm)
    run = Run(config, s, output, model, model_cfg.replace(members=s.train.ensemble).to_dict(), train_set, valid_set,
              mesh, opt, weights, terms, model.dipole if weights.dipole > 0 or with_dmu else None, 0, tuple(skipped))
    run = run._replace(steps_per_epoch=len(run.epoch_plan(0)))
    if train_set.budget is not None:
        b = train_set.budget
        log(f"budget batching: up to {b.nodes} atoms, {b.edges} edges, {b.graphs} structures per device and step; "
            f"{run.steps_per_epoch} steps per epoch")
    plateaus = [Plateau(s.train.plateau_patience, s.train.plateau_factor, stop_patience=s.train.early_stopping_patience)
                for _ in range(s.train.ensemble)]
    state = replicate(_initial_state(run, resumed, start_params, plateaus), mesh)
    return run, state, plateaus, resumed


def _resume_point(config, output: Path, resume: bool, accept_changes: bool, log):
    """The checkpoint to resume from, or ``None``; refuses pickles and changed configs."""
    ckpt_path = output / CHECKPOINT_NAME
    if resume and not ckpt_path.exists() and (output / "checkpoint.pkl").exists():
        raise checkpoint.CheckpointError(
            f"{output} holds a pickle checkpoint of equijax 0.1 (checkpoint.pkl), which is not loaded; "
            f"start over with --restart, or " + checkpoint.CONVERT_HINT.format(path=output / "checkpoint.pkl"))
    if not (resume and ckpt_path.exists()):
        return None
    resumed = checkpoint.load(ckpt_path)
    try:  # keys added to the schema since the checkpoint was written take their defaults, not a difference
        before = config_lib.validate(resumed["run_config"])
    except (config_lib.ConfigError, TypeError):
        before = resumed["run_config"]
    changes = config_lib.diff({**before, "output": None}, {**config, "output": None})
    if changes and not accept_changes:
        raise config_lib.ConfigError(
            f"the config differs from the one {ckpt_path} was trained with ({'; '.join(changes)}): "
            "restart with --restart, or resume with the new values with --accept-changes")
    for line in changes:
        log(f"resuming with a changed config: {line}")
    return resumed


def _read(data, weights: LossWeights, paths, species):
    """``(structures, where)``: the frames of ``paths`` (in memory, or lazily as ``data.lazy`` says) and
    ``where(k)``, the file and frame of structure ``k``, for messages."""
    require = ("energy", "forces") + (("dipole",) if weights.dipole > 0 or weights.dipole_derivative > 0 else ())
    paths = config_lib.data_paths(paths)
    if data.lazy:  # frames parsed when a batch needs them
        parts = [loader.open_files([p], species, require, max(1, data.cache_size // len(paths))) for p in paths]
    else:
        parts = [io.read(p, species=species, require=require) for p in paths]
    origins = [(p, k) for p, part in zip(paths, parts) for k in range(len(part))]
    structures = loader.concat(parts) if data.lazy else [st for part in parts for st in part]
    return structures, (lambda k: f"{origins[k][0]}: frame {origins[k][1]}")


def _checked(data, structures, where, log):
    """The frames :func:`equijax.loader.checks.check` lets through, and what it found."""
    limits = checks.Limits(data.max_force, data.min_distance, data.energy_outlier_mads)
    keep, problems = checks.check(structures, where, limits, data.bad_frames, log)
    if len(keep) < len(structures):
        structures = loader.subset(structures, keep)
        where = (lambda k, old=where: old(keep[k]))
    return structures, where, problems


def _split(s, weights: LossWeights, log):
    """``(train, valid, skipped)``: the validation files, or a seeded share of the training frames, after
    the frames' checks (``skipped``: what ``data.bad_frames=skip`` left out, as ``(file: frame, reason)``)."""
    data = s.data
    structures, where, problems = _checked(data, *_read(data, weights, data.train, data.species), log)
    for key, wanted in (("hessian", weights.hessian > 0), ("dipole_derivative", weights.dipole_derivative > 0)):
        if wanted and not any(key in st.labels for st in structures):  # force data may be mixed in
            raise ValueError(f"train.weights.{key} > 0 but no training frame has a {key} label "
                             f"(make them with experiments/make_data.py --hessians)")
    order = np.random.default_rng(s.train.seed).permutation(len(structures))
    n_valid = 0 if data.valid else max(1, int(round(data.valid_fraction * len(structures))))
    if data.max_train:
        order = np.concatenate([order[:n_valid], order[n_valid : n_valid + int(data.max_train)]])
    if data.valid:
        valid, _, more = _checked(data, *_read(data, weights, data.valid, data.species), log)
        problems = problems + more
    else:
        valid = loader.subset(structures, order[:n_valid])
    train = loader.subset(structures, order[n_valid:])
    if not len(train):
        raise ValueError(f"no training frames left after holding out {n_valid} for validation")
    skipped = [(p.where, p.reason) for p in problems] if data.bad_frames == "skip" else []
    return train, valid, skipped


def _build(model_cfg):
    from equijax.models import build

    return build(model_cfg)


def _model_config(s, train, valid, resumed, output: Path, log):
    """``(model config, starting parameters or None)``: a resumed checkpoint's, a fine-tuned model's
    (``train.init``), or a new one with the data's energy shifts, scales and neighbour count."""
    n_members, backend = s.train.ensemble, s.model.backend
    if resumed is not None:
        model_cfg = checkpoint.model_config(output / CHECKPOINT_NAME, resumed["config"])
        if model_cfg.members != n_members:
            raise config_lib.ConfigError(
                f"{output / CHECKPOINT_NAME} holds an ensemble of {model_cfg.members} member(s), the config asks "
                f"for train.ensemble={n_members}: restart with --restart or keep train.ensemble={model_cfg.members}")
        log(f"resuming from {output / CHECKPOINT_NAME} at step {int(np.max(resumed['step']))}")
        return model_cfg.replace(members=1, backend=backend), None  # the backend is an execution choice
    if s.train.init:
        init_path = config_lib.data_paths(s.train.init)[0]
        start, start_params, _ = checkpoint.load_model(init_path)
        if start.config.members != 1:
            raise config_lib.ConfigError("train.init fine-tunes one model: give a single model's file")
        log(f"fine-tuning {init_path}: {len(train)} training, {len(valid)} validation frames; "
            f"species {list(start.config.species)} (the model section of the config is not used)")
        return start.config.replace(backend=backend), start_params  # its architecture and energy shifts
    return _fitted_config(s, train, valid, log), None


def _fitted_config(s, train, valid, log):
    """A new model's config: the model section, with shifts, scales and neighbours from the training data."""
    from equijax.models import NequIPConfig

    data, model = s.data, s.model._asdict()
    base = NequIPConfig.from_dict({**{k: v for k, v in model.items() if v is not None}, "species": (1,)})
    e0s = config_lib.read_e0s(data.e0s) if data.energy_shift != "least_squares" and data.e0s is not None else None
    # the model knows every element of the training and validation frames (a rare one may be in valid only)
    species = data.species or sorted({int(z) for part in (train, valid) for st in part
                                      for z in np.unique(st.atomic_numbers)})
    stats = loader.statistics(train, base.cutoff, species, e0s)
    if stats.warning:
        log(stats.warning)
    log(f"{len(train)} training, {len(valid)} validation frames; species {list(stats.species)}; "
        f"avg neighbours {stats.avg_num_neighbours:.1f}; force RMS {stats.force_rms:.3f} eV/Å; "
        f"energy shift from {'isolated atoms' if e0s else 'least squares'}")
    return base.replace(species=stats.species, energy_shift=stats.energy_shift, energy_scale=stats.energy_scale,
                        avg_num_neighbours=model["avg_num_neighbours"] or stats.avg_num_neighbours)


def _check_devices(s, weights: LossWeights, mesh) -> None:
    if mesh.size > 1 and weights.hessian > 0 and (s.train.hessian_metric == "frequency" or weights.displacement > 0):
        # found in testing: on 4 host devices the step with the normal-mode basis did not finish in minutes,
        # while 4 stacked shards on one device run; refuse rather than hang
        raise config_lib.ConfigError(
            f"train.hessian_metric=frequency and train.weights.displacement run on one device for now ({mesh.size} "
            "found): set CUDA_VISIBLE_DEVICES (or --xla_force_host_platform_device_count) to one device, or use "
            "train.hessian_metric=cartesian with train.weights.displacement=0 on several")


def _datasets(s, weights: LossWeights, model_cfg, train, valid, mesh):
    """``(train_set, valid_set)``: validation in batches of the training shape (one evaluator compilation),
    one width of Hessian rows and the same label fields (one compiled step)."""
    dtype = np.float64 if model_cfg.dtype == "float64" else np.float32
    t = s.train
    budget = loader.Budget(t.budget_nodes, t.budget_edges, None) if t.batching == "budget" else None
    width = 1 if weights.hessian > 0 else None
    train_set = loader.Dataset(train, model_cfg.cutoff, t.batch_size, model_cfg.species, mesh.size, dtype, budget,
                               hessian_width=width)
    valid_set = loader.Dataset(valid, model_cfg.cutoff, t.batch_size, model_cfg.species, mesh.size, dtype,
                               train_set.budget, hessian_width=train_set.hessian_width if width else None,
                               partial_labels=train_set.partial_labels if width else ())
    if width:
        train_set = train_set.with_sizes(hessian_width=valid_set.hessian_width)
    if train_set.num_batches(drop_last=True) == 0:  # else the loop would wait forever for a full batch
        raise ValueError(f"{len(train)} training frames are fewer than train.batch_size={t.batch_size}: "
                         "lower the batch size or give more frames")
    return train_set, valid_set


def _initial_state(run: Run, resumed, start_params, plateaus) -> TrainState:
    """The resumed state (plateau counters restored in place), the fine-tuned model's, or a fresh one."""
    t = run.sections.train
    if resumed is not None:
        path = run.output / CHECKPOINT_NAME
        model = _build(run.model.config.replace(members=t.ensemble))  # stacked for a committee
        for key, what in (("params", "parameter"), ("ema_params", "EMA parameter")):
            checkpoint.check_params(path, model, resumed[key], what)
        saved = resumed["plateau"] if run.committee else [resumed["plateau"]]
        for p, d in zip(plateaus, saved):
            p.load_state_dict(d)
        return jax.tree_util.tree_map(jnp.asarray, TrainState(resumed["params"], resumed["ema_params"],
                                                              _restore_opt_state(run.opt, resumed, path, run.committee),
                                                              resumed["step"]))
    if start_params is not None:
        return init_state(start_params, run.opt)
    if run.committee:
        return ensemble.stack([init_state(initial_params(run.model, jax.random.PRNGKey(t.seed + k)), run.opt)
                               for k in range(t.ensemble)])
    return init_state(initial_params(run.model, jax.random.PRNGKey(t.seed)), run.opt)


def _restore_opt_state(opt, payload, path, committee: bool = False):
    """Rebuild the optimiser state pytree from the saved leaves (checked against the optimiser's own;
    a committee's states are stacked, one per member)."""
    init = jax.vmap(opt.init) if committee else opt.init
    template = jax.eval_shape(init, jax.tree_util.tree_map(jnp.asarray, payload["params"]))
    leaves, treedef = jax.tree_util.tree_flatten(template)
    saved = payload["opt_state"]
    if not isinstance(saved, (list, tuple)) or len(saved) != len(leaves):
        raise checkpoint.CheckpointError(f"{path}: its optimiser state does not fit this optimiser "
                                         f"({len(saved) if isinstance(saved, (list, tuple)) else '?'} arrays for "
                                         f"{len(leaves)}): restart with --restart")
    for k, (x, want) in enumerate(zip(saved, leaves)):
        if np.shape(x) != want.shape:
            raise checkpoint.CheckpointError(f"{path}: optimiser state array {k} has shape {np.shape(x)}, "
                                             f"the optimiser needs {want.shape}: restart with --restart")
    return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(x) for x in saved])


def _check_ensemble_fits(model, n_members: int) -> None:
    """Refuse an ensemble whose training state alone cannot fit in memory, before allocating it."""
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0))
    per_member = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(shapes))
    need = 6 * per_member * n_members  # params, EMA, two Adam moments, gradients, updates
    room = memory_available()
    if room is not None and need > room:
        raise MemoryError(f"train.ensemble={n_members} needs {need / 2**30:.1f} GiB for the training state alone "
                          f"and the device has {room / 2**30:.1f} GiB free: use "
                          f"train.ensemble={max(int(room // (6 * per_member)), 1)} or fewer")
