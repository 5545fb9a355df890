"""Side-by-side benchmark: equijax against jax-md's NequIP on the same structures.

Workloads (structures in experiments/workloads/, the standard model: l_max=2,
32 channels per irrep and parity, 4 layers, 8 Bessel functions, cutoff 5 Å,
radial MLP 2×64, float32):

  W1  energy + forces, 32 aspirin molecules (672 atoms) in one batch
  W2  energy + forces, periodic water box (192 atoms, 1 g/cm³)
  W3  one training step on W1 (energy + force loss, gradient, Adam update)
  W4  full Hessian (63×63) of one aspirin molecule (both by reverse-over-reverse
      autodiff; equijax pads it tightly, jax-md gets it unpadded)
  W4f the same Hessian by forward-over-reverse autodiff (jacfwd of the gradient)

equijax runs with the pure-JAX message passing ("equijax") and with
cuEquivariance's segmented polynomial ("equijax-cue": fused CUDA kernels on a
GPU, its pure-JAX fallback elsewhere): on a GPU machine add
--models equijax equijax-cue jaxmd.

Each (model, workload) runs in a fresh process, so that the first call
(init + compile) and the peak memory are its own. Both models see the same
neighbour list (equijax's, from vesin); jax-md gets it unpadded, and equijax
pads it tightly (one padding node, edge and graph; --padding bucket for
build_graph's default sizes). Every code runs once with glibc's default
allocator and once with transparent huge pages (GLIBC_TUNABLES=
glibc.malloc.hugetlb=1, which the equijax command sets; see
equijax/hugepages.py), unless --allocator says otherwise. Per warm call the
process's user and system CPU time and minor page faults are recorded. Label
values do not change timings; W3 trains towards zero energy and forces.

Usage:
  python experiments/benchmark.py                    # everything, prints a table
  python experiments/benchmark.py --workloads W1 W4 --repeats 20
  python experiments/benchmark.py --out experiments/results/benchmark_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORKLOADS = HERE / "workloads"
SPECIES = (1, 6, 8)
# equijax with each message-passing backend (equijax.kernels), and the peer
MODELS = ("equijax", "equijax-cue", "jaxmd", "nequix")
BACKENDS = {"equijax": "jax", "equijax-cue": "cuequivariance"}
# hidden irreps of every model: both parities (the standard size) or, with --no-parity, one parity
# per l (32x0e+32x1o+32x2e), the only form nequix supports
def _parity():
    return os.environ.get("EQUIJAX_BENCH_PARITY", "1") == "1"


def _irreps():
    return "32x0e+32x0o+32x1e+32x1o+32x2e+32x2o" if _parity() else "32x0e+32x1o+32x2e"


def _structures(workload):
    import ase.io

    if workload in ("W1", "W3"):
        return ase.io.read(WORKLOADS / "w1_aspirin_x32.xyz", index=":")
    if workload == "W2":
        return [ase.io.read(WORKLOADS / "water_box.xyz")]
    return [ase.io.read(WORKLOADS / "aspirin.xyz")]  # W4, W4f


def _peak_memory_mb():
    import jax

    dev = jax.devices()[0]
    if dev.platform != "cpu":
        stats = dev.memory_stats() or {}
        return stats.get("peak_bytes_in_use", 0) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _flops(jitted, *args):
    try:
        cost = jitted.lower(*args).compile().cost_analysis()
        if isinstance(cost, (list, tuple)):
            cost = cost[0]
        return float(cost.get("flops", float("nan")))
    except Exception:  # cost analysis is best effort
        return float("nan")


def _equijax_setup(workload, structures, backend="jax"):
    import jax
    import optax

    import equijax as eq
    from equijax import physics, training

    cfg = eq.NequIPConfig(species=SPECIES, l_max=2, parity=_parity(), channels=32, n_layers=4,
                          n_radial=8, cutoff=5.0, radial_hidden=(64, 64), dtype="float32", backend=backend)
    # the same work as jax-md, which gets the list unpadded: "tight" leaves one padding node, edge and
    # graph (W4 is always so, as equijax.vibrations pads a Hessian). --padding bucket: build_graph's
    # default ladder (2^k, 1.5·2^k), what one build_graph call on W1 gives (768 nodes, 12288 edges)
    tight = workload.startswith("W4") or os.environ.get("EQUIJAX_BENCH_PADDING", "tight") == "tight"
    graph = eq.build_graph(structures, cfg.cutoff, species=SPECIES, pad_to="tight" if tight else None)
    cfg = cfg.replace(avg_num_neighbours=eq.graph.num_neighbours(graph))
    model = eq.nequip(cfg)

    def init():
        return model.init(jax.random.PRNGKey(0))

    if workload in ("W1", "W2"):
        fn = jax.jit(physics.energy_and_forces(model.energy))
        return init, lambda p: (fn, (p, graph))
    if workload.startswith("W4"):
        fn = jax.jit(physics.hessian(model.energy, "forward" if workload == "W4f" else "reverse"))
        return init, lambda p: (fn, (p, graph))
    # W3: zero labels; the step's cost does not depend on their values
    graph = graph._replace(
        nodes={**graph.nodes, "forces": jax.numpy.zeros_like(graph.nodes["positions"])},
        globals={**graph.globals, "energy": jax.numpy.zeros(graph.n_node.shape, "float32")},
    )
    opt = optax.adam(1e-3)
    step = jax.jit(training.train_step(model.energy, opt))
    stacked = eq.graph.stack_graphs([graph])  # one data shard

    def make(p):
        return step, (training.init_state(p, opt), stacked)

    return init, make


def _jaxmd_setup(workload, structures):
    import jax
    import jax.numpy as jnp
    import jraph
    import numpy as np
    import optax
    from jax_md._nn import nequip as jmd_nequip

    cfg = jmd_nequip.default_config()
    cfg.hidden_irreps = _irreps()
    cfg.sh_irreps = "1x0e+1x1o+1x2e"
    cfg.graph_net_steps = 4
    cfg.num_basis = 8
    cfg.r_max = 5.0
    cfg.radial_net_n_hidden = 64
    cfg.radial_net_n_layers = 2
    cfg.n_elements = len(SPECIES)
    cfg.shift, cfg.scale = 0.0, 1.0

    send, recv, shift, pos = _same_neighbours(structures)  # the same neighbours as equijax, unpadded
    recv, send = jnp.asarray(recv), jnp.asarray(send)
    offset = jnp.asarray(shift, jnp.float32)
    cfg.n_neighbors = float(len(recv) / len(pos))
    numbers = np.concatenate([s.numbers for s in structures])
    nodes = jax.nn.one_hot(jnp.asarray([SPECIES.index(z) for z in numbers]), len(SPECIES))
    pos = jnp.asarray(pos, jnp.float32)
    n_node = jnp.asarray([len(s) for s in structures])
    model = jmd_nequip.model_from_config(cfg)

    def graph(p):
        return jraph.GraphsTuple(nodes=nodes, edges=p[send] - p[recv] + offset, senders=send,
                                 receivers=recv, globals=None, n_node=n_node,
                                 n_edge=jnp.asarray([len(recv)]))

    def energy(params, p):
        return model.apply(params, graph(p))[:, 0]

    def init():
        return model.init(jax.random.PRNGKey(0), graph(pos))

    if workload in ("W1", "W2"):
        fn = jax.jit(lambda params, p: (energy(params, p), -jax.grad(lambda q: energy(params, q).sum())(p)))
        return init, lambda params: (fn, (params, pos))
    if workload.startswith("W4"):
        # the same route as equijax.physics.hessian: the models are compared, not the AD mode
        outer = jax.jacfwd if workload == "W4f" else jax.jacrev
        fn = jax.jit(lambda params, p: outer(jax.grad(lambda q: energy(params, q).sum()))(p))
        return init, lambda params: (fn, (params, pos))
    opt = optax.adam(1e-3)

    def loss(params):
        e, g = jax.value_and_grad(lambda q: energy(params, q).sum())(pos)
        e = energy(params, pos)
        return ((e / n_node) ** 2).mean() + 10.0 * (g**2).mean()

    @jax.jit
    def step(state):
        params, opt_state = state
        grads = jax.grad(loss)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return init, lambda params: (step, ((params, opt.init(params)),))


def _same_neighbours(structures):
    """equijax's neighbour list (vesin), unpadded and concatenated: senders, receivers, offsets, positions."""
    import numpy as np

    import equijax as eq

    recv, send, shift, offs = [], [], [], 0
    for s in structures:
        st = eq.graph.from_ase(s)
        r, se, sh = eq.graph.neighbours(st, 5.0)
        cell = st.cell if st.cell is not None else np.zeros((3, 3))
        recv.append(r + offs)
        send.append(se + offs)
        shift.append(sh @ cell)
        offs += len(s)
    positions = np.concatenate([s.positions for s in structures])
    return np.concatenate(send), np.concatenate(recv), np.concatenate(shift), positions


def _nequix_setup(workload, structures):
    """nequix (PyPI nequix 0.4.5, pure-JAX kernels) at the standard size, on the same neighbours.

    Its model outputs scalars only from the last layer, as NequIP does; the
    radial MLP has 2 layers of 64, as ours. Energies of every atom summed,
    forces by autodiff of positions (its own route), float32.
    """
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from nequix.model import Nequix

    send, recv, shift, pos = _same_neighbours(structures)
    send, recv = jnp.asarray(send), jnp.asarray(recv)
    offset = jnp.asarray(shift, jnp.float32)
    species = jnp.asarray([SPECIES.index(z) for z in np.concatenate([s.numbers for s in structures])])
    pos = jnp.asarray(pos, jnp.float32)

    def init():
        return Nequix(jax.random.PRNGKey(0), n_species=len(SPECIES), lmax=2, cutoff=5.0,
                      hidden_irreps=_irreps(), n_layers=4, radial_basis_size=8,
                      radial_mlp_size=64, radial_mlp_layers=2, avg_n_neighbors=float(len(recv) / len(pos)))

    def energy(model, p):
        # nequix's displacement convention: positions[senders] - positions[receivers]
        return model.node_energies(p[send] - p[recv] + offset, species, send, recv).sum()

    if workload in ("W1", "W2"):
        fn = eqx.filter_jit(lambda m, p: jax.value_and_grad(lambda q: energy(m, q))(p))
        return init, lambda m: (fn, (m, pos))
    if workload.startswith("W4"):
        outer = jax.jacfwd if workload == "W4f" else jax.jacrev
        fn = eqx.filter_jit(lambda m, p: outer(jax.grad(lambda q: energy(m, q)))(p))
        return init, lambda m: (fn, (m, pos))
    opt = optax.adam(1e-3)

    def loss(m):
        e, g = jax.value_and_grad(lambda q: energy(m, q))(pos)
        return (e / pos.shape[0]) ** 2 + 10.0 * (g**2).mean()

    @eqx.filter_jit
    def step(state):
        m, opt_state = state
        grads = eqx.filter_grad(loss)(m)
        updates, opt_state = opt.update(grads, opt_state, eqx.filter(m, eqx.is_array))
        return eqx.apply_updates(m, updates), opt_state

    return init, lambda m: (step, ((m, opt.init(eqx.filter(m, eqx.is_array))),))


def worker(model_name, workload, repeats):
    import jax

    from equijax import hugepages

    structures = _structures(workload)
    base_mem = _peak_memory_mb()
    t0 = time.perf_counter()
    if model_name in BACKENDS:
        init, make = _equijax_setup(workload, structures, BACKENDS[model_name])
    elif model_name == "nequix":
        init, make = _nequix_setup(workload, structures)
    else:
        init, make = _jaxmd_setup(workload, structures)
    params = init()
    fn, args = make(params)
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    times = []
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    flops = _flops(fn, *args)
    median = statistics.median(times)
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params) if hasattr(x, "size"))
    return {
        "model": model_name, "workload": workload, "median_s": median,
        "iqr_s": (statistics.quantiles(times, n=4)[2] - statistics.quantiles(times, n=4)[0]) if len(times) > 3 else 0.0,
        "first_call_s": first, "peak_mem_mb": _peak_memory_mb() - (base_mem if jax.devices()[0].platform == "cpu" else 0),
        "gflops": flops / 1e9, "gflops_per_s": flops / 1e9 / median, "n_params": int(n_params),
        "device": str(jax.devices()[0].device_kind), "repeats": repeats,
        "hugepages": hugepages.active(), "padding": os.environ.get("EQUIJAX_BENCH_PADDING", "tight"),
        # CPU time of the process per warm call: user, system (the kernel mapping fresh pages), page faults
        "user_s_per_call": (usage1.ru_utime - usage0.ru_utime) / repeats,
        "system_s_per_call": (usage1.ru_stime - usage0.ru_stime) / repeats,
        "minor_faults_per_call": (usage1.ru_minflt - usage0.ru_minflt) / repeats,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", default=["W1", "W2", "W3", "W4"])
    parser.add_argument("--models", nargs="+", default=["equijax", "jaxmd"], choices=MODELS)
    parser.add_argument("--repeats", type=int, default=10, help="warm calls timed (median reported)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--timeout", type=float, default=900, help="seconds allowed per (model, workload) process")
    parser.add_argument("--no-parity", action="store_true",
                        help="hidden irreps 32x0e+32x1o+32x2e for every model (nequix runs only so)")
    parser.add_argument("--padding", choices=("tight", "bucket"), default="tight",
                        help="equijax's graph padding: as jax-md's (one padding node/edge/graph) or "
                             "build_graph's default buckets")
    parser.add_argument("--allocator", choices=("default", "hugepages", "both"), default="both",
                        help="run every code with glibc's default malloc, with transparent huge pages "
                             "(GLIBC_TUNABLES=glibc.malloc.hugetlb=1, what the equijax command sets), or both")
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "WORKLOAD"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.no_parity:
        os.environ["EQUIJAX_BENCH_PARITY"] = "0"  # the workers read it
    os.environ["EQUIJAX_BENCH_PADDING"] = args.padding
    if "nequix" in args.models and not args.no_parity:
        parser.error("nequix has one parity per l: add --no-parity")
    if args.worker:
        print("RESULT " + json.dumps(worker(*args.worker, args.repeats)), flush=True)
        return

    results = []
    allocators = {"default": [False], "hugepages": [True], "both": [False, True]}[args.allocator]
    for w in args.workloads:
        for m, huge in ((m, h) for h in allocators for m in args.models):
            try:
                proc = subprocess.run([sys.executable, __file__, "--worker", m, w, "--repeats", str(args.repeats)]
                                      + (["--no-parity"] if args.no_parity else []) + ["--padding", args.padding],
                                      capture_output=True, text=True, timeout=args.timeout, env=_worker_env(huge))
            except subprocess.TimeoutExpired:
                print(f"{m} {w}: no result within {args.timeout} s", file=sys.stderr)
                continue
            lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if not lines:
                print(f"{m} {w} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
                continue
            r = json.loads(lines[-1][7:])
            results.append(r)
            if args.out:  # after every row: a run cut short keeps what it measured
                _write(args.out, results)
            print(f"  {w} {m:11s} {'huge pages' if huge else 'default':10s} median {r['median_s']*1e3:9.1f} ms  first call {r['first_call_s']:6.1f} s  "
                  f"peak {r['peak_mem_mb']:7.0f} MB  {r['gflops']:8.2f} GFLOP  {r['gflops_per_s']:7.1f} GFLOP/s  "
                  f"user {r['user_s_per_call']*1e3:.0f} ms  system {r['system_s_per_call']*1e3:.0f} ms  "
                  f"{r['minor_faults_per_call']:.0f} faults per call", flush=True)
    print()
    print(table(results))


def _worker_env(huge: bool) -> dict:
    """The environment of a worker: glibc's huge-page tunable on or off (equijax.hugepages)."""
    from equijax import hugepages

    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    return hugepages.environment(env) if huge else env


def _write(path: Path, results):
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count()}
    path.write_text(json.dumps({"meta": meta, "results": results}, indent=1))


def table(results):
    """Markdown table, a row per (workload, equijax backend, allocator), ratios peer / equijax (>1: equijax faster).

    With both allocators measured, huge-page rows also compare equijax with
    each peer on glibc's default allocator (what that peer's users get).
    """
    by = {(r["workload"], r["model"], r.get("hugepages", False)): r for r in results}
    peers = [p for p in ("jaxmd", "nequix") if any(r["model"] == p for r in results)]
    head = "| workload | equijax backend | allocator | equijax median | " + " | ".join(
        f"{p} median | speed-up vs {p} | vs {p}, default allocator" for p in peers) + \
        " | equijax first call | " + " | ".join(f"{p} first call" for p in peers) + \
        " | equijax peak MB | equijax user / system s per call | faults per call |"
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for w in sorted({r["workload"] for r in results}):
        for huge in (False, True):
            for m, backend in BACKENDS.items():
                a = by.get((w, m, huge))
                if not a:
                    continue
                cells = [w, backend, "huge pages" if huge else "default", f"{a['median_s']*1e3:.1f} ms"]
                for p in peers:
                    b, plain = by.get((w, p, huge)), by.get((w, p, False))
                    cells += [f"{b['median_s']*1e3:.1f} ms" if b else "–",
                              f"{b['median_s'] / a['median_s']:.2f}×" if b else "–",
                              f"{plain['median_s'] / a['median_s']:.2f}×" if plain and huge else "–"]
                cells.append(f"{a['first_call_s']:.1f} s")
                cells += [f"{by[(w, p, huge)]['first_call_s']:.1f} s" if (w, p, huge) in by else "–" for p in peers]
                cells += [f"{a['peak_mem_mb']:.0f}",
                          f"{a.get('user_s_per_call', 0):.2f} / {a.get('system_s_per_call', 0):.2f}",
                          f"{a.get('minor_faults_per_call', 0):.0f}"]
                rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
