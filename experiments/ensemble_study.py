"""Ensembles: the cost of K members in one program, and how well their spread flags errors.

    python experiments/ensemble_study.py                 # everything (about 25 min on 2 CPU cores)
    python experiments/ensemble_study.py --skip-train    # cost table and calibration of existing runs
    python experiments/ensemble_study.py --skip-cost --repeat   # the end-to-end pair again, in reverse order

1. **Cost per step** on the default job's batches (batch 8, the default
   model): one member, then K = 4 and 8 members in one jitted step with
   ``lax.map`` and with ``vmap`` (median of 40 steps after warm-up, and the
   first call, which compiles). Training K members one after another costs
   K x one member's step and K compilations.
2. **Cost end to end**: ``equijax train`` (the default job, 4000 steps) with
   one member and with ``train.ensemble=4``, run one after the other in this
   process's children; wall time from start to model file, compile included.
3. **Calibration** of the 4-member committee: per-atom force spread against
   the committee's actual per-atom force error, on held-out frames of the
   training molecules (ethanol, aspirin: 500 K GFN2-xTB MD) and on a molecule
   never seen in training (malonaldehyde, same reference and sampling):
   Spearman correlation, RMS error per spread decile (plot), and the share
   of the 10% largest errors whose spread is in the top 10%; then all test
   atoms pooled, as a user screening new structures would meet them.

Writes ``experiments/results/ensemble_study.json`` and ``ensemble_calibration.png``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

from equijax import calibration as calibration_lib, checkpoint, config as config_lib, data, ensemble, io, plots, training
from equijax.models import NequIPConfig, nequip

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
TEST_SETS = {"ethanol (held-out frames)": "equijax/data/ethanol_test.xyz",
             "aspirin (held-out frames)": "equijax/data/aspirin_test.xyz",
             "malonaldehyde (unseen molecule)": "equijax/data/malonaldehyde_test.xyz"}


def default_model_and_batches(n_batches: int, overrides=()):
    cfg = config_lib.load(None, list(overrides))
    dc, mc = cfg["data"], cfg["model"]
    structures = io.read_many(config_lib.data_paths(dc["train"]))
    stats = data.statistics(structures, mc["cutoff"], None, config_lib.read_e0s(dc["e0s"]))
    model_cfg = NequIPConfig.from_dict({**{k: v for k, v in mc.items() if v is not None}, "species": stats.species,
                                        "energy_shift": stats.energy_shift, "energy_scale": stats.energy_scale,
                                        "avg_num_neighbours": stats.avg_num_neighbours})
    ds = data.Dataset(structures, model_cfg.cutoff, cfg["train"]["batch_size"], model_cfg.species)
    batches = [jax.device_put(b) for _, b in zip(range(n_batches), ds.batches(shuffle=True, seed=0, drop_last=True))]
    return nequip(model_cfg), batches, cfg["train"]


def time_steps(members: int, strategy: str | None, n_steps: int = 40, overrides=()) -> dict:
    """First call (compile) and median step time of one member (strategy None) or K members."""
    model, batches, tc = default_model_and_batches(n_steps + 5, overrides)
    opt = training.optimizer(tc["learning_rate"], tc["warmup_steps"], tc["max_steps"])
    step = training.train_step(model.energy, opt)
    states = [training.init_state(training.initial_params(model, jax.random.PRNGKey(k)), opt) for k in range(members)]
    if strategy is None:
        state, fn = states[0], jax.jit(step, donate_argnums=0)
        call = lambda s, b: fn(s, b)  # noqa: E731
    else:
        state = ensemble.stack(states)
        fn = jax.jit(training.ensemble_train_step(step, strategy), donate_argnums=0)
        active = np.ones(members, bool)
        call = lambda s, b: fn(s, b, active)  # noqa: E731
    t = time.perf_counter()
    state, m = call(state, batches[0])
    jax.block_until_ready(m)
    first = time.perf_counter() - t
    times = []
    for b in batches[1:]:
        t = time.perf_counter()
        state, m = call(state, b)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    times = np.array(times[4:])  # after warm-up
    return {"members": members, "strategy": strategy or "single", "first_call_s": first,
            "median_step_ms": 1000 * float(np.median(times)), "iqr_ms": [1000 * float(np.percentile(times, 25)),
                                                                       1000 * float(np.percentile(times, 75))]}


def cost_table() -> list:
    rows = [time_steps(1, None)]
    for k in (4, 8):
        for strategy in ("map", "vmap"):
            rows.append(time_steps(k, strategy))
    one = rows[0]["median_step_ms"]
    for r in rows:
        r["ratio_to_one_member"] = r["median_step_ms"] / one
        r["sequential_ratio"] = r["members"]  # K single runs: K x the steps and K compilations
        print(f"{r['strategy']:>6s} K={r['members']}: {r['median_step_ms']:7.1f} ms/step "
              f"({r['ratio_to_one_member']:.2f}x one member; sequential {r['members']}x), "
              f"first call {r['first_call_s']:.1f} s", flush=True)
    return rows


def channel_scaling() -> list:
    """One member's step with 16 and 64 channels: is the model compute-bound on this machine?"""
    rows = []
    for channels in (16, 64):
        r = time_steps(1, None, overrides=[f"model.channels={channels}"])
        rows.append({"channels": channels, "median_step_ms": r["median_step_ms"]})
        print(f"one member, {channels} channels: {r['median_step_ms']:.1f} ms/step", flush=True)
    return rows


def loop_step_ms(folder: Path) -> float:
    """Median wall time per step inside the fit loop, from the run's metrics.jsonl (evaluations included)."""
    rows = [json.loads(line) for line in open(folder / "metrics.jsonl")]
    times, steps = np.array([r["time_s"] for r in rows]), np.array([r["step"] for r in rows])
    return 1000 * float(np.median(np.diff(times) / np.diff(steps)))


def train_runs(out: Path, members=(1, 4)) -> dict:
    runs = {}
    for k in members:
        folder = out / f"ensemble{k}"
        cmd = [sys.executable, "-m", "equijax.cli", "train", "--output", str(folder), "--restart", "--no-progress",
               f"train.ensemble={k}"]
        t = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t
        result = json.loads((folder / "result.json").read_text())
        runs[k] = {"wall_s": wall, "folder": str(folder), "loop_ms_per_step": loop_step_ms(folder),
                   "test": result.get("test"), "test_members": result.get("test_members")}
        print(f"equijax train train.ensemble={k}: {wall:.0f} s wall; test force MAE "
              f"{result['test']['forces_mae']:.1f} meV/Å (committee mean)", flush=True)
    return runs


def calibration(model_path: Path) -> dict:
    model, params, _ = checkpoint.load_model(model_path)
    cfg = model.config
    out, pooled = {}, []
    for name, path in TEST_SETS.items():
        ds = data.Dataset(io.read(ROOT / path, species=cfg.species), cfg.cutoff, 16, cfg.species)
        e = calibration_lib.errors(model, params, ds)
        pooled.append(e)
        cal = out[name] = calibration_lib.summary(e)
        print(f"{name}: Spearman {cal['spearman']:.2f} (energy {cal['energy_spearman']:.2f}); mean |F error| "
              f"{cal['mean_force_error_meV_A']:.0f} meV/Å, mean spread {cal['mean_force_spread_meV_A']:.0f} meV/Å; "
              f"top-10% spread catches {100 * cal['caught']:.0f}% of the top-10% errors; "
              f"RMS error / RMS spread {cal['scale']:.2f}", flush=True)
    # all test atoms together, as a user screening new structures would see them: known and unseen molecules
    spread, error = (np.concatenate([getattr(e, f) for e in pooled]) for f in ("force_spread", "force_error"))
    cal = calibration_lib.calibration(spread, error)
    unseen = np.concatenate([np.full(len(e.force_error), name.startswith("malonaldehyde"))
                             for name, e in zip(TEST_SETS, pooled)])
    cal["flagged_unseen"] = float(unseen[spread > cal["threshold"]].mean())
    cal["unseen_share"] = float(unseen.mean())
    out["all test atoms"] = cal
    print(f"all test atoms: Spearman {cal['spearman']:.2f}; top-10% spread catches {100 * cal['caught']:.0f}% of "
          f"the top-10% errors; {100 * cal['flagged_unseen']:.0f}% of the flagged atoms are malonaldehyde's "
          f"({100 * cal['unseen_share']:.0f}% of all atoms)", flush=True)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", default=str(ROOT / "runs" / "ensemble_study"), help="folder for the training runs")
    p.add_argument("--skip-train", action="store_true", help="reuse the runs in --runs")
    p.add_argument("--skip-cost", action="store_true", help="no per-step cost table")
    p.add_argument("--repeat", action="store_true", help="the end-to-end pair again, ensemble first")
    p.add_argument("--channel-scaling", action="store_true", help="only add the 16- vs 64-channel step times")
    args = p.parse_args()
    runs_dir = Path(args.runs)
    result_path = RESULTS / "ensemble_study.json"
    result = json.loads(result_path.read_text()) if result_path.exists() else {}
    result["machine"] = training.machine_info()
    if args.channel_scaling:
        result["channel_scaling"] = channel_scaling()
        result_path.write_text(json.dumps(result, indent=1))
        return
    for key in ("end_to_end", "end_to_end_repeat"):  # runs made before the loop figure was recorded
        for run in result.get(key, {}).values():
            if isinstance(run, dict) and "loop_ms_per_step" not in run and Path(run["folder"], "metrics.jsonl").exists():
                run["loop_ms_per_step"] = loop_step_ms(Path(run["folder"]))
    if not args.skip_cost:
        result["cost_per_step"] = cost_table()
        result["channel_scaling"] = channel_scaling()
    if not args.skip_train:
        # --repeat: a second pair in the opposite order (the ensemble first), to see the VM's drift
        runs = train_runs(runs_dir, members=(4, 1) if args.repeat else (1, 4))
        runs["ratio_4_to_1"] = runs[4]["wall_s"] / runs[1]["wall_s"]
        print(f"end to end: 4 members in one program cost {runs['ratio_4_to_1']:.2f}x one member "
              f"(sequential: 4x)", flush=True)
        result["end_to_end_repeat" if args.repeat else "end_to_end"] = runs
    result["calibration"] = calibration(runs_dir / "ensemble4" / "model.npz")
    plots.calibration({k: v for k, v in result["calibration"].items() if k != "all test atoms"},
                      RESULTS / "ensemble_calibration.png", "4-member committee, per-atom forces")
    result_path.write_text(json.dumps(result, indent=1))
    print(f"wrote {result_path} and ensemble_calibration.png")


if __name__ == "__main__":
    main()
