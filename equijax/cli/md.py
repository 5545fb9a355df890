"""``equijax md``: molecular dynamics jitted on the device."""

from __future__ import annotations

import argparse
from pathlib import Path


def _md(args):
    import ase.io

    from equijax import md
    from equijax.cli.common import load_model

    model, params, _ = load_model(args.checkpoint, float64=args.float64)
    atoms = ase.io.read(args.structure, index=args.frame)
    out = Path(args.output or Path(args.structure).stem + "_md")
    n_atoms = len(atoms)
    print(f"{n_atoms} atoms x {args.replicas} replica(s), {args.ensemble}, {args.temperature:g} K, "
          f"dt {args.timestep:g} fs, {args.steps} steps ({args.steps * args.timestep / 1000:g} ps)"
          + (f", {args.pressure:g} GPa" if args.ensemble == "npt" else ""))
    result = md.simulate(model, params, atoms, ensemble=args.ensemble, temperature=args.temperature,
                         timestep=args.timestep, steps=args.steps, interval=args.interval, pressure=args.pressure,
                         friction=args.friction, tau=args.tau, tau_p=args.tau_p,
                         compressibility=args.compressibility, seed=args.seed, replicas=args.replicas,
                         minimize=args.minimize, fmax=args.fmax, skin=args.skin, capacity=args.capacity,
                         max_force_spread=args.max_force_spread, on_spread=args.on_spread,
                         output=out, progress=not args.no_progress, resume=args.resume)
    f = result.frames
    timing = "compile included: a run of one chunk" if result.compile_included else "compile excluded"
    print(f"{result.steps_per_second:.1f} steps/s ({result.steps_per_second * args.replicas:.1f} replica-steps/s), "
          f"{result.ns_per_day:.3g} ns/day per replica, {timing}; "
          f"neighbour list: capacity {result.capacity}, {result.reallocations} reallocation(s)")
    if f is not None:
        drift = (f.conserved[-1] - f.conserved[0]) / max(n_atoms, 1) * 1000
        print(f"mean temperature {f.temperature.mean():.1f} K; conserved-quantity change "
              f"{drift.mean():+.3f} meV/atom over the run (mean over replicas)")
    print(f"trajectory (extxyz), md_log.csv, md.png, summary.json, md_state.npz (to --resume) in {out}/")


def register(sub, epilog: str) -> None:
    """Add this module's commands to the ``equijax`` parser."""
    m = sub.add_parser("md", help="molecular dynamics (NVE, NVT, NPT) jitted on the device, many replicas",
                       description="Molecular dynamics with the whole loop in JAX: an in-JAX neighbour list "
                                   "(reallocated and the chunk replayed on overflow), integrators run in "
                                   "chunks, replicas in one vmapped call. Writes trajectory.extxyz (one per "
                                   "replica), md_log.csv (energies eV, temperature K, pressure GPa), md.png, "
                                   "summary.json and md_state.npz, chunk by chunk: a killed run keeps every "
                                   "complete chunk and --resume continues it exactly. Stops with an error at the "
                                   "first unphysical frame, keeping every frame before it.", epilog=epilog,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("checkpoint", metavar="MODEL", help="model.npz or checkpoint.npz")
    m.add_argument("structure", help="starting structure, any file ASE reads")
    m.add_argument("--frame", default=0, type=int, help="which frame of STRUCTURE (default 0)")
    m.add_argument("--ensemble", default="nvt-langevin", choices=("nve", "nvt-langevin", "nvt-nose-hoover", "npt"),
                   help="NVE (velocity Verlet), NVT (BAOAB Langevin or Nosé–Hoover chain), NPT (Langevin + "
                        "stochastic cell rescaling; periodic cells); default nvt-langevin")
    m.add_argument("--temperature", type=float, default=300.0, help="K (default 300; initial velocities too)")
    m.add_argument("--pressure", type=float, default=0.0, help="GPa, NPT only (default 0)")
    m.add_argument("--timestep", type=float, default=0.5, help="fs (default 0.5)")
    m.add_argument("--steps", type=int, default=2000, help="MD steps (default 2000)")
    m.add_argument("--interval", type=int, default=10, help="steps between written frames (default 10)")
    m.add_argument("--replicas", type=int, default=1, help="independent copies run at once (default 1)")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--friction", type=float, default=0.01, help="Langevin friction, 1/fs (default 0.01)")
    m.add_argument("--tau", type=float, default=100.0, help="Nosé–Hoover period, fs (default 100)")
    m.add_argument("--tau-p", type=float, default=1000.0, help="barostat relaxation time, fs (default 1000)")
    m.add_argument("--compressibility", type=float, default=4.6e-5, help="1/bar, NPT (default 4.6e-5, water)")
    m.add_argument("--minimize", action="store_true", help="FIRE minimisation first")
    m.add_argument("--fmax", type=float, default=0.05, help="minimisation threshold, eV/Å (default 0.05)")
    m.add_argument("--skin", type=float, help="neighbour-list skin, Å (default 0.25)")
    m.add_argument("--capacity", type=int, help="neighbour-list pairs (default: 1.15 x the pairs found; grows on overflow)")
    m.add_argument("--float64", action="store_true", help="run in double precision (a float64 model file always is)")
    m.add_argument("--max-force-spread", type=float, metavar="EV_PER_A",
                   help="committee models only: stop (or warn, see --on-spread) at the first frame where the "
                        "members' per-atom forces disagree by more than this, eV/Å (the spread is logged in "
                        "md_log.csv either way)")
    m.add_argument("--on-spread", choices=("stop", "warn"), default="stop",
                   help="what --max-force-spread does: stop, keeping every frame before (default), or warn")
    m.add_argument("--output", help="output folder (default: STRUCTURE_md)")
    m.add_argument("--resume", action="store_true",
                   help="continue the killed or finished run in the output folder from its last complete chunk "
                        "(md_state.npz), with the same settings; --steps is the new total")
    m.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    m.set_defaults(func=_md)
