"""First call as a user meets it: a fresh Python process loads a trained model
with ``EquijaxCalculator(path)`` and computes the forces of one aspirin.

Cold: an empty compilation cache; warm: a second fresh process that finds the
programs the first one cached (``equijax.compile_cache``; the location follows
``XDG_CACHE_HOME``, here a temporary folder). Times are measured inside the
process (imports excluded, then reported separately), medians over repeats.

  python experiments/first_call.py [MODEL] --repeats 3 --out experiments/results/first_call_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHILD = """
import sys, time
t0 = time.perf_counter()
import ase.io
from equijax.calculator import EquijaxCalculator
atoms = ase.io.read(sys.argv[2])
t1 = time.perf_counter()
atoms.calc = EquijaxCalculator(sys.argv[1])
atoms.get_forces()
t2 = time.perf_counter()
print("RESULT", t1 - t0, t2 - t1)
"""


def once(model, structure, cache_home) -> tuple[float, float]:
    env = {**os.environ, "XDG_CACHE_HOME": str(cache_home), "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("EQUIJAX_CACHE_DIR", None)
    out = subprocess.run([sys.executable, "-c", CHILD, str(model), str(structure)], env=env,
                         capture_output=True, text=True, check=True).stdout
    _, imports, first = [l for l in out.splitlines() if l.startswith("RESULT")][-1].split()
    return float(imports), float(first)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default="runs/default/model.npz", help="model file (equijax train's)")
    p.add_argument("--structure", default=str(HERE / "workloads" / "aspirin.xyz"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    cold, warm = [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as cache:
            cold.append(once(args.model, args.structure, cache))
            warm.append(once(args.model, args.structure, cache))
    result = {
        "model": args.model, "structure": args.structure, "repeats": args.repeats, "cpus": os.cpu_count(),
        "cold_first_forces_s": statistics.median(c[1] for c in cold),
        "warm_first_forces_s": statistics.median(w[1] for w in warm),
        "import_s": statistics.median(c[0] for c in cold + warm),
        "cold": cold, "warm": warm,
    }
    print(f"first forces of one aspirin in a fresh process: cold {result['cold_first_forces_s']:.2f} s, "
          f"warm (from the cache) {result['warm_first_forces_s']:.2f} s; imports {result['import_s']:.2f} s "
          f"(medians of {args.repeats})")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
