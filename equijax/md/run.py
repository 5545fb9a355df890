"""Running a simulation: chunks on the device, checks and files on the host.

:func:`simulate` is the driver behind ``equijax md``. The device runs
``frames × interval`` steps per call (a ``lax.scan`` of ``fori_loop``\\ s,
``vmap``-ed over replicas) and hands back one frame per ``interval`` steps.
Between chunks the host

* reallocates the neighbour list and **replays the chunk** when any build
  ran out of room (:mod:`equijax.md.neighbours`), so no pair is ever missed;
* stops with :class:`MDError` at the first frame that is not finite, too
  hot, or has an atom that lost every neighbour (a molecule flying apart),
  after writing every frame before it;
* appends frames to the trajectory (extxyz) and the log (CSV) as it goes, so
  a killed run keeps what it computed.

Units at this interface: fs, K, GPa, Å, eV, amu.
"""

from __future__ import annotations

import functools
import json
import time
import warnings
from pathlib import Path
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from ase import Atoms, units

from equijax import graph as graph_lib
from equijax.md import integrators as md, neighbours as nl, potential

ENSEMBLES = ("nve", "nvt-langevin", "nvt-nose-hoover", "npt")

LOG_COLUMNS = ("replica", "step", "time_fs", "potential_eV", "kinetic_eV", "total_eV", "conserved_eV",
               "temperature_K", "pressure_GPa", "volume_A3", "fmax_eV_A", "force_spread_eV_A")


class MDError(RuntimeError):
    """The simulation stopped: the message says why and at which step."""


class Frames(NamedTuple):
    """What is recorded every ``interval`` steps; leading axes (frame, replica)."""

    step: np.ndarray
    positions: np.ndarray  # Å
    momenta: np.ndarray  # amu·Å/(ASE time)
    forces: np.ndarray  # eV/Å
    cell: np.ndarray  # Å
    potential: np.ndarray  # eV
    kinetic: np.ndarray  # eV
    conserved: np.ndarray  # eV: the quantity the ensemble conserves (total energy, + thermostat, + PV)
    temperature: np.ndarray  # K
    pressure: np.ndarray  # GPa (nan when not periodic)
    fmax: np.ndarray  # eV/Å
    isolated: np.ndarray  # real atoms with no neighbour within the cutoff
    force_spread: np.ndarray  # eV/Å: committees, the largest per-atom force spread of the members (else 0)


class Result(NamedTuple):
    frames: Frames  # every recorded frame (host arrays)
    state: md.MDState  # the last state, one leading replica axis
    steps_per_second: float  # MD steps (all replicas at once) per wall second, compile excluded
    ns_per_day: float
    reallocations: int  # neighbour-list overflows recovered
    capacity: int  # the neighbour list's final capacity
    seconds: float
    compile_included: bool = False  # a run of one chunk: its rate includes tracing and compilation


def _replicas(structures, replicas: int, species):
    """Pad structures (one per replica, or copies of one) to the same atom count."""
    structures = [structures] if isinstance(structures, Atoms) else list(structures)
    if len(structures) == 1:
        structures = structures * replicas
    elif replicas not in (1, len(structures)):
        raise ValueError(f"{len(structures)} structures for {replicas} replicas: give one, or one per replica")
    periodic = {bool(np.all(a.pbc)) for a in structures}
    if len(periodic) > 1 or any(np.any(a.pbc) and not np.all(a.pbc) for a in structures):
        raise ValueError("MD runs structures periodic in all three directions or in none, not a mix")
    for a in structures:
        graph_lib.check_structure(graph_lib.from_ase(a), species)
    n = max(len(a) for a in structures)
    positions = np.zeros((len(structures), n, 3))
    numbers = np.zeros((len(structures), n), np.int32)
    masses = np.ones((len(structures), n))
    cells = np.zeros((len(structures), 3, 3))
    for k, a in enumerate(structures):
        positions[k, : len(a)] = a.positions
        numbers[k, : len(a)] = a.numbers
        masses[k, : len(a)] = a.get_masses()
        cells[k] = a.cell.array
    return structures, positions, numbers, masses, cells, periodic.pop()


def simulate(model, params, structures, *, ensemble: str = "nvt-langevin", temperature: float = 300.0,
             timestep: float = 0.5, steps: int = 1000, interval: int = 10, pressure: float = 0.0,
             friction: float = 0.01, tau: float = 100.0, tau_p: float = 1000.0, compressibility: float = 4.6e-5,
             seed: int = 0, replicas: int = 1, minimize: bool = False, fmax: float = 0.05,
             minimize_steps: int = 2000, skin: float | None = None, capacity: int | None = None,
             chunk_frames: int = 20, max_temperature: float | None = None, max_force_spread: float | None = None,
             on_spread: str = "stop", output=None, progress: bool = True, on_chunk=None) -> Result:
    """Run MD (or minimise first) for one structure or many replicas at once.

    Args:
        model, params: an equijax model and its parameters (``equijax.load``).
        structures: an ``ase.Atoms`` (copied ``replicas`` times) or one per replica.
        ensemble: ``"nve"``, ``"nvt-langevin"``, ``"nvt-nose-hoover"`` or ``"npt"``
            (Langevin + stochastic cell rescaling; periodic only).
        temperature: K (initial Maxwell–Boltzmann momenta, and the thermostat).
        timestep: fs.  steps: MD steps, a multiple of ``interval``.
        interval: steps between recorded frames.
        pressure: GPa (NPT).  friction: Langevin γ, 1/fs.
        tau: Nosé–Hoover period, fs.  tau_p: barostat relaxation, fs.
        compressibility: 1/bar (NPT; water's by default).
        seed: PRNG seed (momenta and noise); replica k uses ``seed + k``.
        minimize: FIRE first, until the largest force is below ``fmax`` (eV/Å)
            or ``minimize_steps``.
        skin, capacity: neighbour list (defaults: 0.25 Å; 1.15 × the pairs now; grows on overflow).
        chunk_frames: frames per device call (``chunk_frames × interval`` steps);
            any number of steps runs on one compiled program.
        max_temperature: stop above this (K); default ``10 × temperature + 1000``.
        max_force_spread: committees only (``train.ensemble > 1``): a frame
            whose largest per-atom force spread of the members exceeds this
            (eV/Å) is where the model stops knowing what it does; every
            recorded frame logs the spread (``force_spread_eV_A``).
        on_spread: ``"stop"`` (an :class:`MDError` there, frames before it
            kept) or ``"warn"`` (a warning, noted in ``summary.json``, and on).
        output: folder for ``trajectory*.extxyz``, ``md_log.csv``, ``md.png``,
            ``summary.json`` (nothing is written when ``None``).
        progress: a progress bar with steps/s and ns/day.
        on_chunk: optional ``callback(frames)`` after every chunk.

    Raises:
        ValueError: bad arguments or structures.
        MDError: the simulation became unphysical (frames before it are kept).
    """
    if ensemble not in ENSEMBLES:
        raise ValueError(f"unknown ensemble {ensemble!r}; choose one of {', '.join(ENSEMBLES)}")
    if steps < 0 or interval < 1 or steps % interval:
        raise ValueError(f"steps ({steps}) must be a non-negative multiple of interval ({interval})")
    if replicas < 1:
        raise ValueError(f"replicas must be at least 1, got {replicas}")
    if timestep <= 0 or temperature < 0:
        raise ValueError("timestep must be positive and temperature non-negative")
    if on_spread not in ("stop", "warn"):
        raise ValueError(f"on_spread must be 'stop' or 'warn', got {on_spread!r}")
    if max_force_spread is not None and getattr(model, "member", None) is None:
        raise ValueError("a force-spread threshold needs a committee model (trained with train.ensemble > 1)")
    cfg = model.config
    dtype = jnp.float64 if cfg.dtype == "float64" else jnp.float32
    if dtype == jnp.float64 and not jax.config.jax_enable_x64:
        raise ValueError("a float64 model needs jax_enable_x64 (jax.config.update('jax_enable_x64', True))")
    atoms_list, positions, numbers, masses, cells, periodic = _replicas(structures, replicas, cfg.species)
    if ensemble == "npt" and not periodic:
        raise ValueError("NPT needs a periodic cell")
    n_rep = len(atoms_list)
    max_temperature = 10.0 * temperature + 1000.0 if max_temperature is None else max_temperature

    dt = timestep * units.fs
    kT = units.kB * temperature
    mask = numbers > 0
    positions, masses, cells = (jnp.asarray(x, dtype) for x in (positions, masses, cells))

    settings = {"dt": dt, "kT": kT, "friction": friction / units.fs, "tau": tau * units.fs,
                "pressure": pressure * units.GPa, "compressibility": compressibility / units.bar,
                "tau_p": tau_p * units.fs}
    settings = {k: jnp.asarray(v, dtype) for k, v in settings.items()}

    def initialise(kind, key):
        """First forces, on a list with room enough (grown until it does not overflow)."""
        nonlocal spec, reallocations
        while True:
            programs = _programs(model, spec, kind, periodic, chunk_frames)
            state, nbrs = programs.init(params, settings, z, positions, cells, masses, jnp.asarray(mask), key)
            # the first forces: one step of zero length through the chunk program itself
            # (positions, momenta and cell stay; no second compilation of the model)
            (state, nbrs), _ = programs.chunk(params, {**settings, "dt": jnp.zeros_like(settings["dt"])}, z, state,
                                              nbrs, 1, 1)
            if not np.any(np.asarray(nbrs.overflow)):
                return state, nbrs
            spec = nl.grown(spec, nbrs, np.asarray(cells))
            reallocations += 1

    # replica k draws from seed + k, so replica k of a batch is the single run with that seed
    keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(n_rep) + seed)
    spec = nl.make_spec(positions, cfg.cutoff, cells, periodic, skin, capacity, mask)  # room for every replica

    writer = _Writer(output, atoms_list, ensemble) if output is not None else None
    reallocations = 0
    z = jnp.asarray(numbers)

    def run_chunks(kind, state, nbrs, total_steps, every, stop=None, bar=None):
        nonlocal spec, reallocations
        n_frames_total = total_steps // every
        done, timed_steps, timed_seconds = 0, 0, 0.0
        while done < n_frames_total:
            valid = min(chunk_frames, n_frames_total - done)
            fn = _programs(model, spec, kind, periodic, chunk_frames).chunk
            started = time.perf_counter()
            (new_state, new_nbrs), obs = fn(params, settings, z, state, nbrs, valid, every)
            obs = [np.swapaxes(x, 0, 1)[:valid] for x in jax.device_get(obs)]  # -> (frame, replica)
            elapsed = time.perf_counter() - started
            if np.any(np.asarray(new_nbrs.overflow)):
                spec = nl.grown(spec, new_nbrs, np.asarray(state.cell))
                reallocations += 1
                nbrs = _programs(model, spec, kind, periodic, chunk_frames).build(state.positions, state.cell,
                                                                                  state.mask)
                continue  # replay this chunk from its start with room to spare
            if (spec, kind) in warm:
                timed_steps += valid * every
                timed_seconds += elapsed
            warm.add((spec, kind))
            steps_now = (done + np.arange(1, valid + 1)) * every
            frames = Frames(np.broadcast_to(steps_now[:, None], (valid, n_rep)).copy(), *obs)
            if not periodic:
                frames = frames._replace(pressure=np.full_like(frames.pressure, np.nan))
            bad = _first_bad(frames, max_temperature, initially_isolated)
            spread = _first_spread(frames, max_force_spread) if kind != "fire" else None
            if spread is not None and on_spread == "warn":
                if not warned:
                    warnings.warn(spread[1] + f" at step {int(frames.step[spread[0], 0])}; continuing", stacklevel=2)
                    if writer is not None:
                        writer.note(f"warning: {spread[1]} at step {int(frames.step[spread[0], 0])}")
                    warned.append(True)
            elif spread is not None and (bad is None or spread[0] < bad[0]):
                bad = spread
            if bad is not None:
                index, reason = bad
                good = Frames(*(x[:index] for x in frames))
                if writer is not None:
                    writer.append(good, timestep)
                    writer.close(stopped=reason)
                raise MDError(f"{reason} at step {int(frames.step[index, 0])}; "
                              + ("the frames before it are written to " + str(output) if output is not None
                                 else "the frames before it are kept"))
            state, nbrs = new_state, new_nbrs
            done += valid
            if writer is not None and kind != "fire":
                writer.append(frames, timestep)
            if on_chunk is not None:
                on_chunk(frames)
            collected.append(frames)
            if bar is not None:
                bar.update(valid * every)
                if timed_seconds > 0:
                    rate = timed_steps / timed_seconds
                    bar.set_postfix_str(f"{rate:.1f} steps/s, {rate * timestep * 86400 * 1e-6:.3g} ns/day")
            if stop is not None and stop(frames):
                break
        return state, nbrs, timed_steps, timed_seconds

    warm: set = set()  # programs that ran once: later calls are timed (compile excluded)
    warned: list = []
    collected: list = []
    initially_isolated = np.stack([_isolated(a, cfg.cutoff, positions.shape[1]) for a in atoms_list])

    started = time.perf_counter()
    bar = None
    if minimize:
        state, nbrs = initialise("fire", keys)
        state, nbrs, _, _ = run_chunks("fire", state, nbrs, minimize_steps - minimize_steps % 10, 10,
                                       stop=lambda f: bool(np.all(f.fmax[-1] < fmax)))
        positions, cells = state.positions, state.cell
        fmax_now = float(np.max(collected[-1].fmax[-1])) if collected else float("nan")
        if writer is not None:
            writer.note(f"FIRE: {sum(len(f.step) for f in collected) * 10} steps, fmax {fmax_now:.3g} eV/Å")
        collected.clear()
    kind = ensemble
    md_started = time.perf_counter()
    state, nbrs = initialise(kind, keys)
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, unit="step", desc=f"MD {ensemble}, {n_rep} replica{'s' * (n_rep > 1)}")
    try:
        state, nbrs, timed_steps, timed_seconds = run_chunks(kind, state, nbrs, steps, interval, bar=bar)
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - started
    md_seconds = time.perf_counter() - md_started
    compile_included = timed_seconds == 0
    rate = timed_steps / timed_seconds if not compile_included else (steps / md_seconds if steps else float("nan"))
    frames = Frames(*(np.concatenate(xs) for xs in zip(*collected))) if collected else None
    result = Result(frames, state, rate, rate * timestep * 86400 * 1e-6, reallocations, spec.capacity, seconds,
                    compile_included)
    if writer is not None:
        writer.close(result=result)
    return result


class _Programs(NamedTuple):
    init: object  # (params, settings, numbers, positions, cells, masses, mask, keys) -> (MDState, nbrs)
    chunk: object  # (params, settings, numbers, state, nbrs, valid, every) -> ((state, nbrs), observations)
    build: object  # (positions, cells, mask) -> nbrs


def _no_forces(positions, nbrs, cell=None):
    zero = jnp.zeros((), positions.dtype)
    return potential.ForcesStress(zero, jnp.zeros_like(positions), jnp.zeros((3, 3), positions.dtype))


def _integrator(model, params, settings, numbers, spec, kind, periodic, forces=True):
    ff = potential.force_fn(model, params, numbers) if forces else _no_forces
    s = settings
    if kind == "fire":
        return md.fire(ff, spec, periodic)
    if kind == "nve":
        return md.nve(ff, spec, s["dt"], periodic)
    if kind == "nvt-langevin":
        return md.langevin(ff, spec, s["dt"], s["kT"], s["friction"], periodic)
    if kind == "nvt-nose-hoover":
        return md.nose_hoover(ff, spec, s["dt"], s["kT"], s["tau"], periodic=periodic)
    return md.npt_langevin(ff, spec, s["dt"], s["kT"], s["friction"], s["pressure"], s["compressibility"], s["tau_p"])


def _observe(state, nbrs, settings, kind, periodic, cutoff, spread_fn):
    """What a frame records (see :class:`Frames`), on the device."""
    kin = md.kinetic_energy(state)
    conserved = state.energy + kin
    if kind == "nvt-nose-hoover":
        conserved = conserved + md.nose_hoover_energy(state, settings["kT"], settings["tau"])
    if kind == "npt":
        conserved = conserved + settings["pressure"] * md.volume(state.cell)
    press = md.pressure(state) / units.GPa if periodic else jnp.zeros((), state.energy.dtype)  # NaN on the host
    counts = _neighbour_counts(nbrs, state.positions, state.cell if periodic else None, cutoff)
    isolated = jnp.sum(state.mask & (counts == 0))
    fmax = jnp.max(jnp.linalg.norm(state.forces, axis=-1))
    temp = md.temperature_kT(state) / units.kB
    spread = spread_fn(state.positions, nbrs, state.cell if periodic else None)
    return (state.positions, state.momenta, state.forces, state.cell, state.energy, kin, conserved, temp,
            press, fmax, isolated, spread)


@functools.lru_cache(maxsize=64)
def _programs(model, spec: nl.Spec, kind: str, periodic: bool, chunk_frames: int) -> _Programs:
    """Jitted, replica-vmapped programs, shared by every run of this model and list size.

    Parameters, numeric settings, the interval and the number of frames
    actually wanted from a chunk are arguments, so a new temperature,
    pressure, time step, interval or step count compiles nothing.
    """

    def init(params, settings, numbers, positions, cells, masses, mask, keys):
        # momenta, thermostat and list only: the driver's first (zero-length) step computes the forces
        def single(z, r, cell, mass, m, k):
            nbrs = nl.build(spec, r, cell if periodic else None, m)
            integrator = _integrator(model, params, settings, z, spec, kind, periodic, forces=False)
            return integrator.init(r, cell, mass, m, k, settings["kT"], nbrs)
        return jax.vmap(single)(numbers, positions, cells, masses, mask, keys)

    def chunk(params, settings, numbers, state, nbrs, valid, every):
        def single(z, state, nbrs):
            step = _integrator(model, params, settings, z, spec, kind, periodic).step
            spread_fn = potential.spread_fn(model, params, z)

            def frame(carry, index):
                # frames past ``valid`` (the end of the run) leave the state as it is
                carry = jax.lax.cond(index < valid,
                                     lambda c: jax.lax.fori_loop(0, every, lambda _, c: step(*c), c),
                                     lambda c: c, carry)
                return carry, _observe(*carry, settings, kind, periodic, model.config.cutoff, spread_fn)

            return jax.lax.scan(frame, (state, nbrs), jnp.arange(chunk_frames))
        return jax.vmap(single)(numbers, state, nbrs)

    def build(positions, cells, mask):
        return jax.vmap(lambda r, c, m: nl.build(spec, r, c if periodic else None, m))(positions, cells, mask)

    return _Programs(jax.jit(init), jax.jit(chunk), jax.jit(build))


def _isolated(atoms, cutoff, n_padded):
    """(n_padded,) bool: atoms with no neighbour within ``cutoff`` (host, vesin)."""
    i, _, _ = graph_lib.neighbours(graph_lib.from_ase(atoms), cutoff)
    alone = np.zeros(n_padded, bool)
    alone[: len(atoms)] = np.bincount(i, minlength=len(atoms)) == 0
    return alone


def _neighbour_counts(nbrs, positions, cell, cutoff):
    _, _, _, real = nl.as_pairs(nbrs, positions, cell, cutoff)
    return jnp.zeros(positions.shape[0] + 1, jnp.int32).at[nbrs.receivers].add(real.astype(jnp.int32))[:-1]


def _first_spread(frames: Frames, max_force_spread):
    """``(frame index, reason)`` of the first frame whose force spread exceeds the threshold, or ``None``."""
    if max_force_spread is None:
        return None
    over = frames.force_spread > max_force_spread
    if not over.any():
        return None
    index = int(np.nonzero(over.any(axis=1))[0][0])
    replicas = np.nonzero(over[index])[0]
    return index, (f"the committee's force spread {float(frames.force_spread[index].max()):.3g} eV/Å exceeded "
                   f"{max_force_spread:g} eV/Å (replica {', '.join(map(str, replicas[:5]))}): the model is "
                   "extrapolating")


def _first_bad(frames: Frames, max_temperature, initially_isolated):
    """``(frame index, reason)`` of the first unphysical frame, or ``None``."""
    finite = np.isfinite(frames.potential) & np.all(np.isfinite(frames.positions), axis=(-1, -2))
    finite &= np.isfinite(frames.kinetic)
    hot = frames.temperature > max_temperature
    apart = frames.isolated > initially_isolated.sum(axis=-1)[None, :]
    for index in range(len(frames.step)):
        for reason, flags in (("energy or positions became NaN or infinite", ~finite[index]),
                              (f"temperature rose above {max_temperature:g} K", hot[index]),
                              ("an atom lost every neighbour within the cutoff (atoms flew apart)", apart[index])):
            if np.any(flags):
                replicas = np.nonzero(flags)[0]
                return index, f"{reason} (replica {', '.join(map(str, replicas[:5]))})"
    return None


class _Writer:
    """Trajectory (extxyz, one file per replica), log (CSV) and plot, written as frames arrive."""

    def __init__(self, folder, atoms_list: Sequence[Atoms], ensemble: str):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.atoms = [a.copy() for a in atoms_list]
        self.ensemble = ensemble
        names = ["trajectory.extxyz"] if len(atoms_list) == 1 else \
            [f"trajectory_{k:03d}.extxyz" for k in range(len(atoms_list))]
        self.paths = [self.folder / n for n in names]
        for p in self.paths:
            p.write_text("")
        self.log = (self.folder / "md_log.csv").open("w")
        self.log.write(",".join(LOG_COLUMNS) + "\n")
        self.notes: list = []
        self.rows: list = []

    def note(self, text):
        self.notes.append(text)

    def append(self, frames: Frames, timestep: float):
        from ase.calculators.singlepoint import SinglePointCalculator
        from ase.io import write

        handles = [path.open("a") for path in self.paths]
        for f in range(len(frames.step)):
            for k, (atoms, handle) in enumerate(zip(self.atoms, handles)):
                n = len(atoms)
                a = atoms.copy()
                a.positions = frames.positions[f, k, :n]
                a.set_momenta(frames.momenta[f, k, :n])
                if np.all(a.pbc):
                    a.cell = frames.cell[f, k]
                a.info["step"] = int(frames.step[f, k])
                a.info["time_fs"] = float(frames.step[f, k] * timestep)
                a.calc = SinglePointCalculator(a, energy=float(frames.potential[f, k]), forces=frames.forces[f, k, :n])
                write(handle, a, format="extxyz")
                row = (k, int(frames.step[f, k]), float(frames.step[f, k] * timestep), float(frames.potential[f, k]),
                       float(frames.kinetic[f, k]), float(frames.potential[f, k] + frames.kinetic[f, k]),
                       float(frames.conserved[f, k]), float(frames.temperature[f, k]), float(frames.pressure[f, k]),
                       float(abs(np.linalg.det(frames.cell[f, k]))) if np.all(a.pbc) else float("nan"),
                       float(frames.fmax[f, k]), float(frames.force_spread[f, k]))
                self.rows.append(row)
                self.log.write(",".join(f"{x:.10g}" if isinstance(x, float) else str(x) for x in row) + "\n")
        for handle in handles:
            handle.close()
        self.log.flush()

    def close(self, result: Result | None = None, stopped: str | None = None):
        self.log.close()
        summary = {"ensemble": self.ensemble, "replicas": len(self.atoms), "notes": self.notes,
                   "files": [p.name for p in self.paths] + ["md_log.csv", "md.png"]}
        if result is not None:
            summary.update(steps_per_second=result.steps_per_second, ns_per_day=result.ns_per_day,
                           rate_includes_compile=result.compile_included,
                           neighbour_reallocations=result.reallocations, neighbour_capacity=result.capacity,
                           wall_seconds=result.seconds)
        if stopped is not None:
            summary["stopped"] = stopped
        (self.folder / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        if self.rows:
            plot_log(self.rows, self.folder / "md.png", title=f"{self.ensemble}, {len(self.atoms)} replica(s)")


def plot_log(rows, path, title=""):
    """Energies, temperature and (periodic) pressure against time, one line per replica."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = np.asarray(rows, float)
    periodic = np.isfinite(data[:, 8]).any()
    fig, axes = plt.subplots(3 if periodic else 2, 1, figsize=(7, 7 if periodic else 5), sharex=True)
    for k in np.unique(data[:, 0]).astype(int)[:8]:
        d = data[data[:, 0] == k]
        t = d[:, 2] / 1000.0
        axes[0].plot(t, d[:, 3] - d[0, 3], lw=0.8, color=f"C{k}", label="potential" if k == 0 else None)
        axes[0].plot(t, d[:, 6] - d[0, 3], lw=0.8, ls="--", color=f"C{k}", label="conserved (NVE, NH, NPT: +PV) / total (Langevin)" if k == 0 else None)
        axes[1].plot(t, d[:, 7], lw=0.8, color=f"C{k}")
        if periodic:
            axes[2].plot(t, d[:, 8], lw=0.8, color=f"C{k}")
    axes[0].set_ylabel("energy − E_pot(0) (eV)")
    axes[0].legend(frameon=False)
    axes[1].set_ylabel("temperature (K)")
    if periodic:
        axes[2].set_ylabel("pressure (GPa)")
    axes[-1].set_xlabel("time (ps)")
    axes[0].set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
