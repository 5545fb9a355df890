"""Side by side: SevenNet-0 in equijax against sevenn's own calculator, same model, same structures, this CPU.

Both run float32 through their ASE calculators, as users meet them (neighbour list, graph, model, results),
each in its own process (equijax in this interpreter, sevenn in --peer-python), torch with 2 threads.
Workloads: energy + forces of rattled NaCl rocksalt cells of 64, 216 and 512 atoms (median of --repeats warm
calls, positions moved slightly before each call so that nothing is cached), one equijax Hessian-vector
product of the 64-atom cell (time and memory), and the Hessian of the 64-atom
cell (one warm call): equijax's by autodiff (2 Hessian-vector products per batch, to fit 24 GB), sevenn's by central differences of its forces (6N force calls, the way phonopy
and ASE's Vibrations get one from it; sevenn has no Hessian). Prints each median and the ratio.

    python experiments/sevennet_speed.py --peer-python /tmp/sevenn/bin/python
    python experiments/sevennet_speed.py --peer-python ... --out experiments/results/sevennet_speed_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

SIZES = (64, 216, 512)


def cell(n_atoms: int):
    from ase.build import bulk

    reps = {64: (2, 2, 2), 216: (3, 3, 3), 512: (4, 4, 4)}[n_atoms]
    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True) * reps
    atoms.rattle(0.05, seed=n_atoms)
    return atoms


def _calculator(code: str):
    if code == "equijax":
        from equijax import imports
        from equijax.calculator import EquijaxCalculator
        from equijax.models import nequip

        config, params, _ = imports.load("7net-0", "float32")
        # the memory-bounded Hessian: 2 columns at a time (one H·v of this model at 64 atoms needs ~4 GB)
        return EquijaxCalculator(model=nequip(config), params=params, hessian_batch_size=2)
    import torch
    from sevenn.calculator import SevenNetCalculator

    torch.set_num_threads(2)
    return SevenNetCalculator(model="7net-0", device="cpu")


def _fd_hessian(calc, atoms, delta=0.01):
    import numpy as np

    n = len(atoms)
    h = np.zeros((3 * n, 3 * n))
    for k in range(3 * n):
        rows = []
        for s in (1, -1):
            a = atoms.copy()
            a.positions[k // 3, k % 3] += s * delta
            a.calc = calc
            rows.append(a.get_forces().ravel())
        h[k] = -(rows[0] - rows[1]) / (2 * delta)
    return h


def _hvp(calc, atoms, repeats: int) -> dict:
    """One Hessian-vector product of the model on a tightly padded graph: its time and XLA's temporary memory."""
    import jax
    import numpy as np

    from equijax import graph as graph_lib, physics

    cfg = calc.model.config
    g = graph_lib.build_graph([atoms], cfg.cutoff, species=cfg.species, pad_to="tight")
    v = np.zeros(g.nodes["positions"].shape, np.float32)
    v[0, 0] = 1.0
    compiled = jax.jit(physics.hessian_vector_product(calc.model.energy)).lower(calc.params, g, v).compile()
    jax.block_until_ready(compiled(calc.params, g, v))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(compiled(calc.params, g, v))
        times.append(time.perf_counter() - t)
    return {"hvp_ms": 1e3 * statistics.median(times), "hvp_edges": int(np.asarray(g.edges["mask"]).sum()),
            "hvp_temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes)}


def worker(code: str, repeats: int, hessian: bool = True) -> dict:
    import numpy as np

    t0 = time.perf_counter()
    calc = _calculator(code)
    out = {"code": code, "load_s": time.perf_counter() - t0, "energy_forces_ms": {}}
    rng = np.random.default_rng(0)
    for n in SIZES:
        atoms = cell(n)
        atoms.calc = calc
        t = time.perf_counter()
        atoms.get_forces()
        first = time.perf_counter() - t
        times = []
        for _ in range(repeats):
            atoms.positions += rng.normal(0.0, 1e-4, atoms.positions.shape)
            t = time.perf_counter()
            atoms.get_forces()
            times.append(time.perf_counter() - t)
        out["energy_forces_ms"][n] = {"first": 1e3 * first, "median": 1e3 * statistics.median(times)}
    atoms = cell(64)
    if code == "equijax":
        out.update(_hvp(calc, atoms, repeats))
    if not hessian:
        return out
    if code == "equijax":
        t = time.perf_counter()
        calc.get_hessian(atoms)
        out["hessian_first_ms"] = 1e3 * (time.perf_counter() - t)  # compilation included
        atoms.positions += 1e-4
        t = time.perf_counter()
        calc.get_hessian(atoms)  # one warm call: a Hessian takes long enough to time once
        out["hessian_ms"] = 1e3 * (time.perf_counter() - t)
    else:
        t = time.perf_counter()
        _fd_hessian(calc, atoms)
        out["hessian_ms"] = 1e3 * (time.perf_counter() - t)  # one 384-call finite-difference Hessian
    return out


def _cpu() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line)
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peer-python", required=True, help="interpreter of an environment with torch and sevenn")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-hessian", action="store_true", help="energy and forces only")
    p.add_argument("--out", type=Path)
    p.add_argument("--worker", choices=("equijax", "sevenn"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.repeats, not args.no_hessian)))
        return
    results = {}
    for code, python in (("equijax", sys.executable), ("sevenn", args.peer_python)):
        proc = subprocess.run([python, __file__, "--worker", code, "--repeats", str(args.repeats),
                               "--peer-python", args.peer_python] + ["--no-hessian"] * args.no_hessian,
                              capture_output=True, text=True, check=True)
        results[code] = json.loads(proc.stdout.strip().splitlines()[-1])
    e, s = results["equijax"], results["sevenn"]
    print(f"CPU: {_cpu()}; float32; median of {args.repeats} warm calls (ms)")
    print(f"{'workload':28s} {'equijax':>10s} {'sevenn':>10s} {'ratio':>7s}")
    rows = []
    for n in SIZES:
        a, b = e["energy_forces_ms"][str(n)]["median"], s["energy_forces_ms"][str(n)]["median"]
        rows.append({"workload": f"energy+forces, {n} atoms", "equijax_ms": a, "sevenn_ms": b, "ratio": b / a})
    if not args.no_hessian:
        rows.append({"workload": "Hessian, 64 atoms", "equijax_ms": e["hessian_ms"], "sevenn_ms": s["hessian_ms"],
                     "ratio": s["hessian_ms"] / e["hessian_ms"], "note": "sevenn: central differences, 384 force calls"})
    print(f"equijax H·v, 64 atoms, tight padding ({e['hvp_edges']} edges): {e['hvp_ms']:.0f} ms, "
          f"{e['hvp_temp_bytes'] / 2**30:.2f} GiB of temporaries; 192 of them make the Hessian")
    for r in rows:
        print(f"{r['workload']:28s} {r['equijax_ms']:10.1f} {r['sevenn_ms']:10.1f} {r['ratio']:6.2f}x")
    if args.out:
        args.out.write_text(json.dumps({"cpu": _cpu(), "repeats": args.repeats, "rows": rows, "raw": results},
                                       indent=1) + "\n")


if __name__ == "__main__":
    main()
