"""Molecular dynamics throughput, side by side in one run.

Three ways to run NVE (velocity Verlet, 0.5 fs) with NequIP of the same size:

  equijax-jit  ``equijax.md.simulate``: steps in ``lax.scan`` on the device,
               in-JAX neighbour list, replicas by ``vmap``
  ase-loop     ASE's ``VelocityVerlet`` through ``EquijaxCalculator`` (one
               host round trip and one vesin neighbour search per step);
               replicas one after another
  jax-md       jax-md 0.2.29's own NequIP (``energy.nequip_neighbor_list``)
               with its own neighbour list and ``simulate.nve``, steps in
               ``lax.fori_loop``; replicas by ``vmap``

Workloads (structures in experiments/workloads/):

  water     the 192-atom periodic water box (one system)
  aspirin   32 aspirin replicas (21 atoms each), every one its own system

Model: the benchmark's standard NequIP (l_max=2, 32 channels per irrep and
parity, 4 layers, 8 Bessel, 5 Å, radial MLP 2×64, float32), or
``--model default`` (equijax's default training size: l_max=1, 16 channels,
3 layers, radial MLP 2×32). Parameters are random (the same for every
equijax run; jax-md's from its own init): throughput does not depend on them
over a few steps. Reported: steps/s of the whole system (all replicas),
the time of one equijax model call (energy, forces, stress on the MD
neighbour list: the floor of a step),
medians of ``--repeats`` timed chunks after a warm-up chunk, the first call
(compile), ns/day, and ratios to equijax-jit.

Usage:
  python experiments/md_benchmark.py --out experiments/results/md_benchmark_cpu.json
  python experiments/md_benchmark.py --workloads water --model default --steps 20
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
WORKLOADS = HERE / "workloads"
SPECIES = (1, 6, 8)
SIZES = {"standard": dict(l_max=2, channels=32, n_layers=4, radial_hidden=(64, 64)),
         "default": dict(l_max=1, channels=16, n_layers=3, radial_hidden=(32, 32))}
TIMESTEP_FS = 0.5


def structures(workload):
    import ase.io

    if workload == "water":
        return [ase.io.read(WORKLOADS / "water_box.xyz")]
    aspirin = ase.io.read(WORKLOADS / "aspirin.xyz")
    return [aspirin.copy() for _ in range(32)]


def equijax_model(size):
    import jax

    import equijax

    cfg = equijax.NequIPConfig(species=SPECIES, cutoff=5.0, n_radial=8, **SIZES[size])
    model = equijax.nequip(cfg)
    return model, model.init(jax.random.PRNGKey(0))


SKIN = None  # equijax's neighbour-list skin (Å); None: its default


def run_equijax(atoms, size, steps, repeats):
    from equijax import md

    model, params = equijax_model(size)
    stamps = [time.perf_counter()]
    md.simulate(model, params, atoms, ensemble="nve", temperature=300, timestep=TIMESTEP_FS,
                steps=steps * (repeats + 1), interval=steps, chunk_frames=1, progress=False,
                max_temperature=float("inf"), on_chunk=lambda frames: stamps.append(time.perf_counter()), skin=SKIN)
    times = list(np.diff(stamps))  # per chunk of ``steps`` steps, the host's checks included
    return times[0], times[1:]


def model_call_ms(atoms, size, repeats=5):
    """Median ms of one energy+forces+stress call on the MD neighbour list (the model's share of a step)."""
    import jax
    import jax.numpy as jnp

    from equijax.md import neighbours, potential

    model, params = equijax_model(size)
    a = atoms[0]
    periodic = bool(a.pbc.all())
    cell = jnp.asarray(a.cell.array, jnp.float32) if periodic else None
    positions = jnp.asarray(a.positions, jnp.float32)
    spec, nbrs = neighbours.allocate(positions, model.config.cutoff, cell, periodic)
    if len(atoms) > 1:  # replicas: one vmapped call, as the jitted MD makes it
        fn = jax.jit(jax.vmap(lambda r: potential.force_fn(model, params, a.numbers)(r, nbrs, cell)))
        positions = jnp.stack([positions] * len(atoms))
    else:
        fn = jax.jit(lambda r: potential.force_fn(model, params, a.numbers)(r, nbrs, cell))
    jax.block_until_ready(fn(positions))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(positions))
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def run_ase(atoms, size, steps, repeats):
    from ase import units
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
    from ase.md.verlet import VelocityVerlet

    from equijax.calculator import EquijaxCalculator

    model, params = equijax_model(size)
    systems = []
    for k, a in enumerate(atoms):
        a = a.copy()
        a.calc = EquijaxCalculator(model=model, params=params)
        MaxwellBoltzmannDistribution(a, temperature_K=300, rng=np.random.RandomState(k))
        systems.append(VelocityVerlet(a, TIMESTEP_FS * units.fs))
    t0 = time.perf_counter()
    for dyn in systems:
        dyn.run(1)
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for dyn in systems:
            dyn.run(steps)
        times.append(time.perf_counter() - t)
    return first, times


def run_jaxmd(atoms, size, steps, repeats):
    import jax
    import jax.numpy as jnp
    from jax_md import energy, simulate, space
    from jax_md._nn import nequip as jmd_nequip
    from ase import units

    s = SIZES[size]
    cfg = jmd_nequip.default_config()
    cfg.hidden_irreps = "+".join(f"{s['channels']}x{l}{p}" for l in range(s["l_max"] + 1) for p in "eo")
    cfg.sh_irreps = "+".join(f"1x{l}{'eo'[l % 2]}" for l in range(s["l_max"] + 1))
    cfg.graph_net_steps = s["n_layers"]
    cfg.num_basis = 8
    cfg.r_max = 5.0
    cfg.radial_net_n_hidden = s["radial_hidden"][0]
    cfg.radial_net_n_layers = len(s["radial_hidden"])
    cfg.n_elements = len(SPECIES)
    cfg.shift, cfg.scale = 0.0, 1.0
    cfg.n_neighbors = 20.0
    one_hot = jax.nn.one_hot(jnp.asarray([SPECIES.index(z) for z in atoms[0].numbers]), len(SPECIES))
    periodic = bool(atoms[0].pbc.all())
    if periodic:
        box = jnp.asarray(atoms[0].cell.array.T, jnp.float32)
        displacement, shift = space.periodic_general(box, fractional_coordinates=True)
        R = [jnp.asarray(a.get_scaled_positions(), jnp.float32) for a in atoms]
        neighbor_fn, init_fn, energy_fn = energy.nequip_neighbor_list(
            displacement, box, cfg, atoms=one_hot, fractional_coordinates=True)
    else:
        displacement, shift = space.free()
        R = [jnp.asarray(a.positions, jnp.float32) for a in atoms]
        neighbor_fn, init_fn, energy_fn = energy.nequip_neighbor_list(
            displacement, 100.0, cfg, atoms=one_hot, disable_cell_list=True)
    t0 = time.perf_counter()
    masses = jnp.asarray(atoms[0].get_masses(), jnp.float32)[:, None]
    nbrs = neighbor_fn.allocate(R[0])
    params = init_fn(jax.random.PRNGKey(0), R[0], nbrs)
    init, apply = simulate.nve(lambda r, neighbor: energy_fn(params, r, neighbor), shift, TIMESTEP_FS * units.fs)
    stack = lambda xs: jax.tree_util.tree_map(lambda *x: jnp.stack(x), *xs)
    R = jnp.stack(R)
    nbrs = stack([neighbor_fn.allocate(r) for r in R])
    kT = units.kB * 300.0
    keys = jax.random.split(jax.random.PRNGKey(0), len(R))
    state = jax.jit(jax.vmap(lambda k, r, nb: init(k, r, mass=masses, kT=kT, neighbor=nb)))(keys, R, nbrs)

    @jax.jit
    def chunk(state, nbrs):
        def one(state, nb):
            def body(_, carry):
                st, nb = carry
                st = apply(st, neighbor=nb)
                return st, nb.update(st.position)
            return jax.lax.fori_loop(0, steps, body, (state, nb))
        return jax.vmap(one)(state, nbrs)

    state, nbrs = jax.block_until_ready(chunk(state, nbrs))
    first = time.perf_counter() - t0  # allocation, init and compile, as equijax's first chunk
    if bool(np.any(nbrs.did_buffer_overflow)):
        raise RuntimeError("jax-md neighbour list overflowed: raise its capacity")
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        state, nbrs = jax.block_until_ready(chunk(state, nbrs))
        times.append(time.perf_counter() - t)
    return first, times


RUNNERS = {"equijax-jit": run_equijax, "ase-loop": run_ase, "jax-md": run_jaxmd}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", nargs="+", default=["water", "aspirin"], choices=["water", "aspirin"])
    p.add_argument("--codes", nargs="+", default=list(RUNNERS), choices=list(RUNNERS))
    p.add_argument("--model", default="standard", choices=list(SIZES))
    p.add_argument("--steps", type=int, default=10, help="MD steps per timed chunk")
    p.add_argument("--repeats", type=int, default=3, help="timed chunks (median reported)")
    p.add_argument("--skin", type=float, help="equijax's neighbour-list skin, Å (default: its own, 0.25)")
    p.add_argument("--out", help="write the results as JSON")
    args = p.parse_args(argv)
    global SKIN
    SKIN = args.skin
    import jax

    rows = []
    model_ms = {}
    for workload in args.workloads:
        atoms = structures(workload)
        if "equijax-jit" in args.codes:
            model_ms[workload] = model_call_ms(atoms, args.model)
            print(f"{workload:8s} equijax model call (E+F+stress on the MD list): {model_ms[workload]:.1f} ms")
        for code in args.codes:
            first, times = RUNNERS[code](atoms, args.model, args.steps, args.repeats)
            median = statistics.median(times)
            rate = args.steps / median
            rows.append({"workload": workload, "code": code, "atoms": sum(len(a) for a in atoms),
                         "systems": len(atoms), "steps_per_s": rate,
                         "ns_per_day": rate * TIMESTEP_FS * 86400 * 1e-6, "first_call_s": first,
                         "chunk_times_s": times})
            print(f"{workload:8s} {code:12s} {rate:9.2f} steps/s  first call {first:6.1f} s", flush=True)
    for r in rows:
        ref = next(x for x in rows if x["workload"] == r["workload"] and x["code"] == "equijax-jit") \
            if "equijax-jit" in args.codes else None
        r["equijax_speedup"] = ref["steps_per_s"] / r["steps_per_s"] if ref else None
    print()
    print("| workload | code | steps/s | ns/day | first call (s) | equijax-jit speed-up |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workload']} ({r['atoms']} atoms, {r['systems']} system{'s' * (r['systems'] > 1)}) | {r['code']} | "
              f"{r['steps_per_s']:.2f} | {r['ns_per_day']:.3f} | {r['first_call_s']:.1f} | "
              f"{r['equijax_speedup']:.2f}× |")
    if args.out:
        machine = {"platform": platform.platform(), "processor": platform.processor(),
                   "device": str(jax.devices()[0]), "jax": jax.__version__}
        Path(args.out).write_text(json.dumps({"machine": machine, "model": args.model, "steps": args.steps,
                                              "timestep_fs": TIMESTEP_FS,
                                              "equijax_model_call_ms": model_ms, "equijax_skin": args.skin,
                                              "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
