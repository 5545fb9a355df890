"""``fit``: a run config in, a trained model file out (setup, then the loop, then the report)."""

from __future__ import annotations

import time
from pathlib import Path

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from equijax import calibration, checkpoint, config as config_lib, ensemble, loader
from equijax.runtime import check_memory, check_shared_folder, host, machine_info, replicate, shard
from equijax.training.report import Report, Window
from equijax.training.setup import CHECKPOINT_NAME, MODEL_NAME, Run, setup
from equijax.training.step import Selection, ensemble_train_step, evaluate, evaluator, lr_factor, train_step
from equijax.training.losses import metrics

__all__ = ["CHECKPOINT_NAME", "MODEL_NAME", "fit"]


def fit(config: dict, output, resume: bool = True, progress: bool = True, log=print, callback=None,
        accept_changes: bool = False) -> dict:
    """Train a NequIP potential as ``config`` says (schema: :data:`equijax.config.SCHEMA`).

    Writes into ``output``: ``checkpoint.npz`` (latest state, for resuming),
    ``model.npz`` (best validation, EMA parameters: the model file to share
    and load), ``metrics.jsonl`` (one line per evaluation),
    ``learning_curve.png`` and ``result.json``. Restarting with the same
    ``output`` resumes from ``checkpoint.npz`` and reproduces an
    uninterrupted run bit for bit: the data order is a function of (seed,
    epoch). A resume whose config differs from the checkpoint's stops with
    the differences, unless ``accept_changes``.

    ``callback(step, state)``, if given, runs after every step (tests use it
    to simulate a kill).

    With ``train.ensemble = K > 1`` it trains a committee of K members in
    one compiled step (:func:`~equijax.training.ensemble_train_step`): member
    k starts from the initialisation of ``seed + k`` (so member 0 is the
    single model of the same seed), all members take the same batches, each
    has its own EMA, plateau schedule and early stopping (a stopped member is
    frozen), and ``model.npz`` holds every member's best EMA parameters
    stacked, with ``config.members = K`` (the file loads as the committee).

    Returns:
        dict with the test metrics of the best EMA parameters and paths.

    Raises:
        ConfigError, ValueError, FileNotFoundError: bad config, data or
            checkpoint, or a resume with a changed config.
    """
    config = config_lib.validate(config)
    output = Path(output)
    lead = jax.process_index() == 0  # in a run of several processes, process 0 writes and reports
    if not lead:
        progress, log = False, (lambda *a, **k: None)
    output.mkdir(parents=True, exist_ok=True)
    check_shared_folder(output)  # several processes: one folder, or one line in every process
    run, state, plateaus, resumed = setup(config, output, resume, accept_changes, log)
    selection = Selection(plateaus, run.criterion, _resumed_best(resumed, output), run.sections.train.schedule)
    step = int(np.max(host(state.step)))
    report = Report(run, step, resumed is not None, lead)
    step_fn, validate = _programs(run, selection)
    t0 = time.time()
    state, step, stopped = _loop(run, state, selection, report, step_fn, validate, step, progress, callback)
    if stopped:
        log(f"early stopping at step {step}: no validation improvement for {plateaus[0].stop_patience} evaluations"
            + (" (every member)" if run.committee else ""))
    result = {"steps": step, "train_time_s": time.time() - t0, "output": str(output), "machine": machine_info(),
              "skipped_frames": [{"frame": where, "reason": reason} for where, reason in run.skipped]}
    if run.sections.data.test:
        result.update(_test(run, selection.best, validate))
    report.finish(result)
    return result


def _resumed_best(resumed, output: Path):
    """The best parameters a resumed run had found: the checkpoint's (older checkpoints: the model file's)."""
    if resumed is None:
        return None
    if "best_params" in resumed:
        return resumed["best_params"]
    if (output / MODEL_NAME).exists():
        return host(checkpoint.load_model(output / MODEL_NAME).params)
    return None


def _programs(run: Run, selection: Selection):
    """``(step_fn, validate)``: the jitted step (``state, batch -> state, metrics``) and validation
    (``params, dataset -> metrics``; a committee's: one dict per member)."""
    t = run.sections.train
    single_step = train_step(run.model.energy, run.opt, run.weights, t.ema_decay, run.dipole_fn, t.hessian_directions,
                             t.seed, t.hessian_metric)
    single_eval = evaluator(run.model.energy, run.terms, run.dipole_fn)
    replicated = NamedSharding(run.mesh, P())  # states and metrics: every process holds all of them
    if run.committee:
        step_fn = _committee_step(single_step, selection, t.ensemble_strategy, t.ensemble, replicated)
        eval_fn = jax.jit(ensemble.over_members(single_eval, t.ensemble_strategy), out_shardings=replicated)
    else:
        step_fn = jax.jit(single_step, donate_argnums=0, out_shardings=replicated)
        eval_fn = jax.jit(single_eval, out_shardings=replicated)

    def validate(params, dataset):
        total = None
        for batch in dataset.batches():
            sums = host(eval_fn(params, shard(batch, run.mesh)))
            total = sums if total is None else jax.tree_util.tree_map(lambda a, b: a + b, total, sums)
        if not run.committee:
            return metrics(total)
        return [metrics(jax.tree_util.tree_map(lambda x: x[k], total)) for k in range(t.ensemble)]

    return step_fn, validate


def _committee_step(single_step, selection: Selection, strategy: str, n_members: int, replicated):
    """The jitted K-member step with the members still training, compiled at its first call and checked
    against the memory there is."""
    jitted = jax.jit(ensemble_train_step(single_step, strategy), donate_argnums=0, out_shardings=replicated)
    compiled, active = [], {}

    def fn(states, batch):
        key = tuple(selection.stopped)
        if key not in active:  # moved to the devices again only when a member stops
            active.clear()
            active[key] = jax.device_put(selection.active(), replicated)
        if not compiled:
            exe = jitted.lower(states, batch, active[key]).compile()
            check_memory(exe, n_members)
            compiled.append(exe)
        return compiled[0](states, batch, active[key])

    return fn


def _loop(run: Run, state, selection: Selection, report: Report, step_fn, validate, step: int, progress: bool,
          callback):
    """Train from ``step`` to ``train.max_steps`` or early stopping; validate and checkpoint on the way.
    Returns ``(state, step, stopped early)``."""
    from tqdm.auto import tqdm

    t = run.sections.train
    make_batch = _batch_maker(run)
    bar = tqdm(total=t.max_steps, initial=step, disable=not progress, desc="train", unit="step", dynamic_ncols=True,
               mininterval=1.0)
    report.write = bar.write
    window, stop, t0 = Window(), False, time.time()
    epoch, skip, plan = _position(run, step)
    while step < t.max_steps and not stop:
        batches = loader.Prefetcher(plan[skip:], make_batch, t.prefetch)
        waited = 0.0
        for step_shards, batch in batches:
            state, m = step_fn(state, batch)
            step += 1
            window.add(run.train_set, step_shards, batches.wait_s - waited)
            waited = batches.wait_s
            if step % 10 == 0 or step == t.max_steps:
                _progress(bar, host(m), state)
            bar.update(1)
            if callback is not None:
                callback(step, state)
            if step % t.eval_every == 0 or step == t.max_steps:
                state, stop = _validation_point(run, state, selection, report, validate, step, m, window, t0)
                window = Window()
            if step >= t.max_steps or stop:
                break
        batches.close()
        epoch, skip = epoch + 1, 0
        plan = run.epoch_plan(epoch)
    bar.close()
    return state, step, stop


def _position(run: Run, step: int):
    """``(epoch, steps into it, its plan)`` of a run at ``step``: epochs may differ in length (budget batching)."""
    epoch, skip = 0, step
    plan = run.epoch_plan(0)
    while skip >= len(plan):
        skip -= len(plan)
        epoch += 1
        plan = run.epoch_plan(epoch)
    return epoch, skip, plan


def _batch_maker(run: Run):
    """``step_shards -> (step_shards, batch on the devices)``; each process builds only its own devices' shards."""
    n_local, first_local = jax.local_device_count(), jax.process_index() * jax.local_device_count()
    several = jax.process_count() > 1

    def make_batch(step_shards):
        mine = step_shards[first_local : first_local + n_local] if several else step_shards
        return step_shards, shard(run.train_set.build(mine), run.mesh, local=several)

    return make_batch


def _progress(bar, m, state) -> None:
    bar.set_postfix(loss=f"{float(np.mean(m['loss'])):.4f}",
                    F_rmse=f"{1000 * float(np.mean(m['forces_rmse'])):.0f} meV/Å",
                    lr=f"{float(np.mean(lr_factor(state.opt_state))):.2g}×")


def _validation_point(run: Run, state, selection: Selection, report: Report, validate, step: int, m, window: Window,
                      t0: float):
    """Validate, update the schedule and the best parameters, write the metrics line, the model file (on
    improvement) and the checkpoint. Returns ``(state, stop)``."""
    jax.block_until_ready(state)
    speed = window.speed()  # training steps only (the first window: compilation too)
    state, improved, v, extra = selection.update(state, validate(state.ema_params, run.valid_set))
    record = {"step": step, "epoch": step / run.steps_per_epoch, "time_s": time.time() - t0,
              "train_loss": float(np.mean(host(m["loss"]))),
              **{f"valid_{k}": x for k, x in v.items()}, "throughput": speed, **extra}
    report.validation(record, v)
    if improved:
        report.model(selection.best, step, extra.get("valid_members", v))
    report.checkpoint(state, selection.plateaus, selection.best)
    return state, all(selection.stopped)


def _test(run: Run, best, validate) -> dict:
    """Test metrics of the best parameters (every process holds them: nothing is read back from disk)."""
    from equijax.models import build

    test = run.read(run.sections.data.test)
    test_set = run.dataset(test)
    params = replicate(best, run.mesh)
    model = build(run.model.config.replace(members=run.sections.train.ensemble))  # as the model file loads
    dipole_fn = model.dipole if run.dipole_fn is not None else None
    out = {"test": evaluate(model.energy, params, test_set, run.terms, dipole_fn, run.mesh)}
    abs_f = [(float(np.abs(s.labels["forces"]).sum()), s.labels["forces"].size) for s in test]
    out["test"]["zero_force_mae"] = 1000 * sum(a for a, _ in abs_f) / sum(n for _, n in abs_f)
    out["n_test"] = len(test)
    if run.committee:  # every member in one mapped pass of the compiled evaluator
        out["test_members"] = validate(params, test_set)
        out["test_calibration"] = calibration.force_calibration(model, best, test_set)
    return out
