"""How much the XLA:CPU flags of the test suite save: compile time of a test model, flag set by flag set.

The suite (tests/conftest.py) is mostly compilation of small programs. This
compiles the suite's physics-test model (l_max 2 with parity, 3 layers, 4
channels, float64) for energy/forces/stress and the Hessian of methanol, in
a fresh process per flag set and repeat, and records the first-call time,
JAX's backend-compile and trace times, and 20 warm Hessian calls::

    python experiments/test_compile_flags.py --repeats 2 --out experiments/results/test_compile_flags.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

BASE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
VARIANTS = {
    "default XLA": "",
    "optimisation level 0 (before)": BASE,
    "+ classic codegen": BASE + " --xla_cpu_use_fusion_emitters=false",
    "+ classic codegen + fast-compile preset (the suite's)": BASE + " --xla_cpu_use_fusion_emitters=false"
                                                                   " --xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_COMPILE",
}

WORKER = """
import collections, json, time
import jax
jax.config.update("jax_enable_x64", True)
totals = collections.Counter()
jax.monitoring.register_event_duration_secs_listener(lambda e, d, **k: totals.__setitem__(e, totals[e] + d))
import numpy as np
from ase.build import molecule
import equijax
from equijax import physics
cfg = equijax.NequIPConfig(species=(1, 6, 8, 29), cutoff=3.5, l_max=2, parity=True, channels=4, n_layers=3,
                           n_radial=6, radial_hidden=(8,), avg_num_neighbours=8.0, readout_hidden=4, dtype="float64")
model = equijax.nequip(cfg)
t = time.perf_counter()
params = model.init(jax.random.PRNGKey(1))
g = equijax.build_graph([molecule("CH3OH")], cfg.cutoff, species=cfg.species, dtype=np.float64)
efs, hess = jax.jit(physics.energy_forces_stress(model.energy)), jax.jit(physics.hessian(model.energy))
jax.block_until_ready((efs(params, g), hess(params, g)))
first = time.perf_counter() - t
t = time.perf_counter()
for _ in range(20):
    h = jax.block_until_ready(hess(params, g))
print(json.dumps({"first_call_s": first, "backend_compile_s": totals["/jax/core/compile/backend_compile_duration"],
                  "trace_s": totals["/jax/core/compile/jaxpr_trace_duration"],
                  "hessian_x20_s": time.perf_counter() - t, "hessian_sum": float(np.asarray(h).sum())}))
"""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("experiments/results/test_compile_flags.json"))
    args = parser.parse_args(argv)
    from equijax.runtime import machine_info

    rows = {}
    for name, flags in VARIANTS.items():
        runs = []
        for _ in range(args.repeats):
            env = {**os.environ, "XLA_FLAGS": flags, "EQUIJAX_CACHE_DIR": "off"}
            out = subprocess.run([sys.executable, "-c", WORKER], env=env, capture_output=True, text=True, check=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        median = {k: sorted(r[k] for r in runs)[len(runs) // 2] for k in runs[0] if k != "hessian_sum"}
        rows[name] = {"xla_flags": flags, "median": median, "runs": runs}
        print(f"{name:58s} first call {median['first_call_s']:5.1f} s, compile {median['backend_compile_s']:5.1f} s, "
              f"trace {median['trace_s']:4.1f} s, 20 Hessians {median['hessian_x20_s']:5.2f} s", flush=True)
    args.out.write_text(json.dumps({"machine": machine_info(), "repeats": args.repeats, "variants": rows},
                                   indent=1) + "\n")


if __name__ == "__main__":
    main()
