"""Training steps per device call: one jitted call per step, or several steps scanned in one call.

    python experiments/steps_per_call.py      # about 2 minutes on 2 CPU cores

The default job's model and batches (batch 8, l_max=1, 16 channels, 3 layers).
One call per step maps fresh buffers at every call (minor page faults,
system time); ``lax.scan`` over n steps in one call reuses the buffers of
its first iteration. Median time per step, minor page faults per step and
system CPU time, two rounds each. A probe for the Speed issue (the fit loop
still makes one call per step); writes ``experiments/results/steps_per_call.json``.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ensemble_study import default_model_and_batches
from equijax import training

RESULTS = Path(__file__).resolve().parent / "results"


def main():
    model, batches, tc = default_model_and_batches(64)
    opt = training.optimizer(tc["learning_rate"], tc["warmup_steps"], tc["max_steps"])
    step = training.train_step(model.energy, opt)
    state = training.init_state(training.initial_params(model, jax.random.PRNGKey(0)), opt)
    rows = []
    for n in (1, 4, 8):
        if n == 1:
            fn, items = jax.jit(step, donate_argnums=0), batches
        else:
            fn = jax.jit(lambda s, stacked: jax.lax.scan(step, s, stacked), donate_argnums=0)
            items = [jax.tree_util.tree_map(lambda *x: jnp.stack(x), *batches[i : i + n])
                     for i in range(0, len(batches), n)]
        for round_ in range(2):
            state, m = fn(state, items[0])
            jax.block_until_ready(m)
            before, times = resource.getrusage(resource.RUSAGE_SELF), []
            for item in items[1:]:
                t = time.perf_counter()
                state, m = fn(state, item)
                jax.block_until_ready(m)
                times.append((time.perf_counter() - t) / n)
            after = resource.getrusage(resource.RUSAGE_SELF)
            steps = (len(items) - 1) * n
            row = {"steps_per_call": n, "round": round_, "median_step_ms": 1000 * float(np.median(times)),
                   "minor_faults_per_step": (after.ru_minflt - before.ru_minflt) / steps,
                   "system_s_per_step": (after.ru_stime - before.ru_stime) / steps}
            rows.append(row)
            print(f"{n} step(s) per call: {row['median_step_ms']:.1f} ms/step, "
                  f"{row['minor_faults_per_step']:.0f} minor faults/step, "
                  f"{1000 * row['system_s_per_step']:.1f} ms system time/step", flush=True)
    out = {"machine": training.machine_info(), "rows": rows}
    (RESULTS / "steps_per_call.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
