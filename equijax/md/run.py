"""Running a simulation: chunks on the device, checks and files on the host.

:func:`simulate` is the driver behind ``equijax md``. The device runs
``frames × interval`` steps per call (:mod:`equijax.md.programs`) and hands
back one frame per ``interval`` steps. Between chunks the host
(:class:`Driver`, whose state is its attributes)

* reallocates the neighbour list and **replays the chunk** when any build
  ran out of room (:mod:`equijax.md.neighbours`), so no pair is ever missed;
* stops with :class:`MDError` at the first frame that is not finite, too
  hot, or has an atom that lost every neighbour (a molecule flying apart),
  after writing every frame before it;
* appends the chunk's frames to the trajectories and the log and records
  the state to continue from (:mod:`equijax.md.output`), so a killed run
  keeps what it computed and ``resume=True`` continues it exactly.

Units at this interface: fs, K, GPa, Å, eV, amu.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from ase import Atoms, units

from equijax import graph as graph_lib
from equijax.md import integrators as md, neighbours as nl
from equijax.md.output import LOG_COLUMNS, Writer, read_state
from equijax.md.programs import programs

ENSEMBLES = ("nve", "nvt-langevin", "nvt-nose-hoover", "npt")
__all__ = ["ENSEMBLES", "LOG_COLUMNS", "Frames", "MDError", "Result", "simulate"]


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

    @classmethod
    def of_chunk(cls, observations, done: int, every: int, periodic: bool) -> "Frames":
        """The frames of a chunk's observations (axes (frame, replica)) after ``done`` frames of ``every`` steps."""
        valid, n_rep = observations[0].shape[:2]
        steps = (done + np.arange(1, valid + 1)) * every
        frames = cls(np.broadcast_to(steps[:, None], (valid, n_rep)).copy(), *observations)
        return frames if periodic else frames._replace(pressure=np.full_like(frames.pressure, np.nan))

    def head(self, n: int) -> "Frames":
        return Frames(*(x[:n] for x in self))


class Result(NamedTuple):
    frames: Frames  # every recorded frame (host arrays)
    state: md.MDState  # the last state, one leading replica axis
    steps_per_second: float  # MD steps (all replicas at once) per wall second, compile excluded
    ns_per_day: float
    reallocations: int  # neighbour-list overflows recovered
    capacity: int  # the neighbour list's final capacity
    seconds: float
    compile_included: bool = False  # a run of one chunk: its rate includes tracing and compilation


class System(NamedTuple):
    """The replicas, padded to one atom count (leading axis: replica)."""

    atoms: list  # one ase.Atoms per replica
    positions: jax.Array  # (R, n, 3) Å
    numbers: jax.Array  # (R, n), 0 on padding
    masses: jax.Array  # (R, n) amu, 1 on padding
    cells: jax.Array  # (R, 3, 3) Å
    periodic: bool

    @property
    def mask(self):
        return self.numbers > 0


class Limits(NamedTuple):
    """When a run stops: temperature, a committee's force spread, atoms that fly apart."""

    max_temperature: float
    max_force_spread: float | None
    on_spread: str
    initially_isolated: np.ndarray  # (R, n) bool


def _replicas(structures, replicas: int, species, dtype) -> System:
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
    return System(structures, jnp.asarray(positions, dtype), jnp.asarray(numbers), jnp.asarray(masses, dtype),
                  jnp.asarray(cells, dtype), periodic.pop())


def simulate(model, params, structures, *, ensemble: str = "nvt-langevin", temperature: float = 300.0,
             timestep: float = 0.5, steps: int = 1000, interval: int = 10, pressure: float = 0.0,
             friction: float = 0.01, tau: float = 100.0, tau_p: float = 1000.0, compressibility: float = 4.6e-5,
             seed: int = 0, replicas: int = 1, minimize: bool = False, fmax: float = 0.05,
             minimize_steps: int = 2000, skin: float | None = None, capacity: int | None = None,
             chunk_frames: int = 20, max_temperature: float | None = None, max_force_spread: float | None = None,
             on_spread: str = "stop", output=None, progress: bool = True, on_chunk=None, resume: bool = False) -> Result:
    """Run MD (or minimise first) for one structure or many replicas at once.

    Args:
        model: an equijax model (``equijax.load``).
        params: its parameters.
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
        skin: neighbour-list skin, Å (default 0.25).
        capacity: neighbour-list pairs (default 1.15 × the pairs now; grows on overflow).
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
            ``summary.json`` and the restart state ``md_state.npz``
            (nothing is written when ``None``; :mod:`equijax.md.output`).
        resume: continue the run in ``output`` from its last complete chunk
            (``md_state.npz``): the same settings, ``steps`` the new total;
            the continued trajectory is the one an uninterrupted run writes.
        progress: a progress bar with steps/s and ns/day.
        on_chunk: optional ``callback(frames)`` after every chunk.

    Raises:
        ValueError: bad arguments or structures.
        MDError: the simulation became unphysical (frames before it are kept).
    """
    _check_arguments(model, ensemble, steps, interval, replicas, timestep, temperature, on_spread, max_force_spread)
    dtype = jnp.float64 if model.config.dtype == "float64" else jnp.float32
    if dtype == jnp.float64 and not jax.config.jax_enable_x64:
        raise ValueError("a float64 model needs float64 enabled: run equijax md --float64, or in Python call "
                         "jax.config.update('jax_enable_x64', True) first")
    system = _replicas(structures, replicas, model.config.species, dtype)
    if ensemble == "npt" and not system.periodic:
        raise ValueError("NPT needs a periodic cell")
    arguments = dict(ensemble=ensemble, temperature=temperature, timestep=timestep, interval=interval,
                     pressure=pressure, friction=friction, tau=tau, tau_p=tau_p, compressibility=compressibility,
                     seed=seed, replicas=len(system.atoms), minimize=minimize, fmax=fmax,
                     minimize_steps=minimize_steps, chunk_frames=chunk_frames)
    saved = _resumed(output, arguments, steps) if resume else None
    settings = {"dt": timestep * units.fs, "kT": units.kB * temperature, "friction": friction / units.fs,
                "tau": tau * units.fs, "pressure": pressure * units.GPa, "compressibility": compressibility / units.bar,
                "tau_p": tau_p * units.fs}
    limits = Limits(10.0 * temperature + 1000.0 if max_temperature is None else max_temperature, max_force_spread,
                    on_spread, np.stack([_isolated(a, model.config.cutoff, system.positions.shape[1])
                                         for a in system.atoms]))
    writer = Writer(output, system.atoms, ensemble, saved) if output is not None else None
    spec = nl.make_spec(system.positions, model.config.cutoff, system.cells, system.periodic, skin, capacity,
                        system.mask)  # room for every replica
    driver = Driver(model, params, system, {k: jnp.asarray(v, dtype) for k, v in settings.items()}, spec,
                    chunk_frames, limits, writer, timestep, on_chunk, arguments)
    started = time.perf_counter()
    if saved is not None:
        state, nbrs, done = driver.restore(saved)
    else:
        (state, nbrs), done = driver.start(ensemble, seed, minimize, minimize_steps, fmax), 0
    result = driver.md(ensemble, state, nbrs, steps, interval, done, progress)
    result = result._replace(seconds=time.perf_counter() - started)
    if writer is not None:
        writer.close(result=result)
    return result


def _check_arguments(model, ensemble, steps, interval, replicas, timestep, temperature, on_spread, max_force_spread):
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


def _resumed(output, arguments: dict, steps: int) -> dict:
    """The restart state of ``output``, checked against this call's settings."""
    if output is None:
        raise ValueError("resume needs the output folder of the run to continue")
    saved = read_state(output)
    if saved.get("stopped"):
        raise ValueError(f"{Path(output)} stopped ({saved['stopped']}): there is no physical state to resume from; "
                         "start a new run (another folder, or without --resume)")
    changed = [f"{k}: {saved['arguments'].get(k)!r} -> {v!r}" for k, v in arguments.items()
               if saved["arguments"].get(k) != v]
    if changed:
        raise ValueError(f"{Path(output)} was run with other settings ({'; '.join(changed)}): resume with the "
                         "same ones (only the number of steps may change)")
    if steps < int(saved["done"]) * arguments["interval"]:
        raise ValueError(f"{Path(output)} already holds {int(saved['done']) * arguments['interval']} steps; "
                         f"give at least that many (--steps), got {steps}")
    return saved


class Driver:
    """The host side of one simulation: the device programs, chunk by chunk, with their checks and files.

    Its attributes are the run's state between chunks: the neighbour-list
    :class:`~equijax.md.neighbours.Spec` (grown on overflow), the counts of
    reallocations and timed steps, the frames collected and whether the
    spread warning was given.
    """

    def __init__(self, model, params, system: System, settings: dict, spec, chunk_frames: int, limits: Limits,
                 writer, timestep: float, on_chunk, arguments: dict):
        self.model, self.params, self.system, self.settings = model, params, system, settings
        self.spec, self.chunk_frames, self.limits, self.writer = spec, chunk_frames, limits, writer
        self.timestep, self.on_chunk, self.arguments = timestep, on_chunk, arguments
        self.reallocations, self.timed_steps, self.timed_seconds = 0, 0, 0.0
        self.warm: set = set()  # programs that ran once: later calls are timed (compile excluded)
        self.collected: list = []
        self.warned = False

    def programs(self, kind: str):
        return programs(self.model, self.spec, kind, self.system.periodic, self.chunk_frames)

    def initialise(self, kind: str, positions, cells, keys):
        """First forces, on a list with room enough (grown until it does not overflow)."""
        s = self.system
        while True:
            p = self.programs(kind)
            state, nbrs = p.init(self.params, self.settings, s.numbers, positions, cells, s.masses, s.mask, keys)
            # the first forces: one step of zero length through the chunk program itself
            # (positions, momenta and cell stay; no second compilation of the model)
            zero = {**self.settings, "dt": jnp.zeros_like(self.settings["dt"])}
            (state, nbrs), _ = p.chunk(self.params, zero, s.numbers, state, nbrs, 1, 1)
            if not np.any(np.asarray(nbrs.overflow)):
                return state, nbrs
            self.spec = nl.grown(self.spec, nbrs, np.asarray(cells))
            self.reallocations += 1

    def start(self, kind: str, seed: int, minimize: bool, minimize_steps: int, fmax: float):
        """``(state, nbrs)`` at step 0: after a FIRE minimisation if asked for."""
        # replica k draws from seed + k, so replica k of a batch is the single run with that seed
        keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(len(self.system.atoms)) + seed)
        positions, cells = self.system.positions, self.system.cells
        if minimize:
            state, nbrs = self.initialise("fire", positions, cells, keys)
            state, nbrs = self.run("fire", state, nbrs, minimize_steps - minimize_steps % 10, 10,
                                   stop=lambda f: bool(np.all(f.fmax[-1] < fmax)))
            positions, cells = state.positions, state.cell
            fmax_now = float(np.max(self.collected[-1].fmax[-1])) if self.collected else float("nan")
            if self.writer is not None:
                self.writer.note(f"FIRE: {sum(len(f.step) for f in self.collected) * 10} steps, "
                                 f"fmax {fmax_now:.3g} eV/Å")
            self.collected.clear()
        return self.initialise(kind, positions, cells, keys)

    def restore(self, saved: dict):
        """``(state, nbrs, frames done)`` of a saved run (``md_state.npz``), exactly as it stood."""
        self.spec = nl.Spec(float(saved["spec"]["cutoff"]), float(saved["spec"]["skin"]),
                            int(saved["spec"]["capacity"]), tuple(int(i) for i in saved["spec"]["images"]),
                            bool(saved["spec"]["periodic"]))
        self.reallocations = int(saved["reallocations"])
        state = md.MDState(**jax.tree_util.tree_map(jnp.asarray, saved["state"]))
        nbrs = nl.NeighbourList(**jax.tree_util.tree_map(jnp.asarray, saved["nbrs"]))
        return state, nbrs, int(saved["done"])

    def md(self, kind: str, state, nbrs, steps: int, interval: int, done: int, progress: bool) -> Result:
        """Run the dynamics from frame ``done`` to ``steps``: the :class:`Result` (``seconds`` left to the caller)."""
        bar = None
        if progress:
            from tqdm.auto import tqdm

            n_rep = len(self.system.atoms)
            bar = tqdm(total=steps, initial=done * interval, unit="step",
                       desc=f"MD {kind}, {n_rep} replica{'s' * (n_rep > 1)}")
        started = time.perf_counter()
        try:
            state, nbrs = self.run(kind, state, nbrs, steps, interval, done=done, bar=bar)
        finally:
            if bar is not None:
                bar.close()
        compile_included = self.timed_seconds == 0
        ran = steps - done * interval
        rate = self.timed_steps / self.timed_seconds if not compile_included else \
            (ran / (time.perf_counter() - started) if ran else float("nan"))
        frames = Frames(*(np.concatenate(xs) for xs in zip(*self.collected))) if self.collected else None
        return Result(frames, state, rate, rate * self.timestep * 86400 * 1e-6, self.reallocations,
                      self.spec.capacity, 0.0, compile_included)

    def run(self, kind: str, state, nbrs, total_steps: int, every: int, done: int = 0, stop=None, bar=None):
        """Chunks of ``every``-step frames from frame ``done`` up to ``total_steps``; ``(state, nbrs)`` at the end."""
        n_frames_total = total_steps // every
        while done < n_frames_total:
            valid = min(self.chunk_frames, n_frames_total - done)
            out = self._chunk(kind, state, nbrs, valid, every)
            if out is None:  # the list overflowed: replay this chunk from its start with room to spare
                nbrs = self.programs(kind).build(state.positions, state.cell, state.mask)
                continue
            new_state, new_nbrs, observations = out
            frames = Frames.of_chunk(observations, done, every, self.system.periodic)
            self._check(frames, kind)
            state, nbrs, done = new_state, new_nbrs, done + valid
            self._record(kind, frames, state, nbrs, done)
            if bar is not None:
                bar.update(valid * every)
                if self.timed_seconds > 0:
                    rate = self.timed_steps / self.timed_seconds
                    bar.set_postfix_str(f"{rate:.1f} steps/s, {rate * self.timestep * 86400 * 1e-6:.3g} ns/day")
            if stop is not None and stop(frames):
                break
        return state, nbrs

    def _chunk(self, kind: str, state, nbrs, valid: int, every: int):
        """One device call: ``(state, nbrs, observations (frame, replica))``, or ``None`` after an overflow
        (the list is grown; the caller replays)."""
        started = time.perf_counter()
        (new_state, new_nbrs), obs = self.programs(kind).chunk(self.params, self.settings, self.system.numbers,
                                                               state, nbrs, valid, every)
        obs = [np.swapaxes(x, 0, 1)[:valid] for x in jax.device_get(obs)]  # -> (frame, replica)
        elapsed = time.perf_counter() - started
        if np.any(np.asarray(new_nbrs.overflow)):
            self.spec = nl.grown(self.spec, new_nbrs, np.asarray(state.cell))
            self.reallocations += 1
            return None
        if (self.spec, kind) in self.warm:
            self.timed_steps += valid * every
            self.timed_seconds += elapsed
        self.warm.add((self.spec, kind))
        return new_state, new_nbrs, obs

    def _check(self, frames: Frames, kind: str) -> None:
        """Raise :class:`MDError` at the first unphysical (or, as asked, too uncertain) frame, after writing
        the frames before it."""
        lim = self.limits
        bad = _first_bad(frames, lim.max_temperature, lim.initially_isolated)
        spread = _first_spread(frames, lim.max_force_spread) if kind != "fire" else None
        if spread is not None and lim.on_spread == "warn":
            if not self.warned:
                where = f"{spread[1]} at step {int(frames.step[spread[0], 0])}"
                warnings.warn(where + "; continuing", stacklevel=3)
                if self.writer is not None:
                    self.writer.note(f"warning: {where}")
                self.warned = True
        elif spread is not None and (bad is None or spread[0] < bad[0]):
            bad = spread
        if bad is None:
            return
        index, reason = bad
        if self.writer is not None:
            if kind != "fire":
                self.writer.append(frames.head(index), self.timestep)
            self.writer.close(stopped=reason)
        raise MDError(f"{reason} at step {int(frames.step[index, 0])}; "
                      + ("the frames before it are written to " + str(self.writer.folder) if self.writer is not None
                         else "the frames before it are kept"))

    def _record(self, kind: str, frames: Frames, state, nbrs, done: int) -> None:
        """Keep the chunk's frames; write them and the state to continue from (MD, not minimisation)."""
        if self.writer is not None and kind != "fire":
            self.writer.append(frames, self.timestep)
            self.writer.commit({"state": _plain(state), "nbrs": _plain(nbrs), "done": done,
                                "spec": {"cutoff": self.spec.cutoff, "skin": self.spec.skin,
                                         "capacity": self.spec.capacity, "images": list(self.spec.images),
                                         "periodic": self.spec.periodic},
                                "reallocations": self.reallocations, "arguments": self.arguments,
                                "replicas": len(self.system.atoms)})
        if self.on_chunk is not None:
            self.on_chunk(frames)
        self.collected.append(frames)


def _plain(tree) -> dict:
    """A NamedTuple of arrays (and dicts of them) as host dicts, for ``md_state.npz``."""
    return {k: (jax.tree_util.tree_map(np.asarray, v) if isinstance(v, dict) else np.asarray(v))
            for k, v in tree._asdict().items()}


def _isolated(atoms, cutoff, n_padded):
    """(n_padded,) bool: atoms with no neighbour within ``cutoff`` (host, vesin)."""
    i, _, _ = graph_lib.neighbours(graph_lib.from_ase(atoms), cutoff)
    alone = np.zeros(n_padded, bool)
    alone[: len(atoms)] = np.bincount(i, minlength=len(atoms)) == 0
    return alone


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
