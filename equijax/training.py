"""Training, outside the model: loss, optimiser, EMA, train step, evaluation.

The model is any ``energy_fn(params, graph)``. Batches are *stacked* padded
graphs of shape ``(n_shards, ...)`` (:meth:`equijax.data.Dataset.batches`),
one shard per device; losses are sums over every real structure of every
shard divided by the global counts, so one device and many give the same
numbers. Labels travel in the graph: ``globals["energy"]``,
``nodes["forces"]``, ``globals["stress"]``.

Data parallelism is plain JAX: parameters are replicated and the batch's
shard axis is split over a ``jax.sharding.Mesh`` (:func:`data_mesh`); ``jit``
partitions the computation. Over several processes (hosts, or processes of
one host), call :func:`init_distributed` first (the ``equijax train
--distributed`` flag does); each process then feeds its own shards, and only
process 0 writes files.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from equijax import ensemble, physics


class LossWeights(NamedTuple):
    """Weights of the mean squared errors in the loss.

    ``energy``: per-atom energy error, (eV/atom)²; ``forces``: force
    components, (eV/Å)²; ``stress``: stress components, (eV/Å³)²;
    ``dipole``: dipole components, (e·Å)² (needs the model's dipole head);
    ``hessian``: components of Hessian-vector products ``H v`` along random
    directions, (eV/Å²)² (needs ``nodes["hessian"]`` labels; see
    :func:`hessian_directions`); ``dipole_derivative``: the dipole's
    derivative along the same directions, ``(dμ/dx) v``, e² (needs the
    dipole head and ``nodes["dipole_derivative"]`` labels; for IR);
    ``displacement``: on Hessian-labelled structures, the force error
    mapped through the reference's inverse Hessian, ``H⁺ δF`` (Å²): where
    the force error moves the minimum, to first order (see
    :func:`displacement_basis`).
    """

    energy: float = 1.0
    forces: float = 10.0
    stress: float = 0.0
    dipole: float = 0.0
    hessian: float = 0.0
    dipole_derivative: float = 0.0
    displacement: float = 0.0


#: each error term and the count it is averaged over (the order of the loss's sum); ``frequency`` is the
#: Hessian term measured in normal modes (``hessian_metric="frequency"``), weighted by ``LossWeights.hessian``
_COUNTS = {"energy": "n_graphs", "forces": "n_force", "stress": "n_stress", "dipole": "n_dipole",
           "hessian": "n_hessian", "frequency": "n_frequency", "dipole_derivative": "n_dipole_derivative",
           "displacement": "n_displacement"}
#: the factor from a term's label units to its reported ones (meV, me, ...); frequency errors are in cm⁻¹
_REPORTED = {"frequency": 1.0}
#: wavenumber (cm⁻¹) of a mass-weighted Hessian eigenvalue of 1 eV/Å²/amu: ω = C·√λ
WAVENUMBER = 521.4709
HESSIAN_METRICS = ("cartesian", "frequency")
#: soft modes below this wavenumber (cm⁻¹) weigh as if they were at it: no division by near-zero eigenvalues
MODE_FLOOR_CM = 100.0


def _graph_of_node(graph):
    n = graph.nodes["mask"].shape[0]
    return jnp.repeat(jnp.arange(graph.n_node.shape[0]), graph.n_node, total_repeat_length=n)


def hessian_directions(graph, key, k: int):
    """(k, n_node, 3) random directions for a Hessian-vector-product loss; zero on padding.

    Standard normal components (identity covariance, Hutchinson's choice:
    the expected squared error of ``H v`` is the squared Frobenius error of
    ``H``, whatever the molecule's size). Each atom's numbers are drawn from
    ``key`` folded with its structure's ``globals["index"]`` (else its
    position in the batch) and its index within the structure, so they do
    not depend on how a batch is split over shards or devices.
    """
    graph_of_node = _graph_of_node(graph)
    first = jnp.cumsum(graph.n_node) - graph.n_node
    local = jnp.arange(graph_of_node.shape[0]) - first[graph_of_node]
    structure = graph.globals.get("index", jnp.arange(graph.n_node.shape[0]))[graph_of_node]
    keys = jax.vmap(lambda s, a: jax.random.fold_in(jax.random.fold_in(key, s), a))(structure, local)
    v = jax.vmap(lambda kk: jax.random.normal(kk, (k, 3)))(keys).swapaxes(0, 1)
    return jnp.where(graph.nodes["mask"][None, :, None], v, 0.0).astype(graph.nodes["positions"].dtype)


def _rows_times(rows, graph, v):
    """(k, n_node, 3): each structure's matrix, stored as its atoms' rows ``rows`` (n_node, 3, W, 3), times ``v``."""
    n, width = rows.shape[0], rows.shape[2]
    graph_of_node = _graph_of_node(graph)
    first = (jnp.cumsum(graph.n_node) - graph.n_node)[graph_of_node]
    columns = first[:, None] + jnp.arange(width)[None, :]  # (n_node, W) global node index of column j
    valid = jnp.arange(width)[None, :] < graph.n_node[graph_of_node][:, None]
    vj = jnp.where(valid[None, :, :, None], v[:, jnp.clip(columns, 0, n - 1)], 0.0)  # (k, n_node, W, 3)
    return jnp.einsum("iajb,kijb->kia", rows, vj)


def reference_hvp(graph, v):
    """(k, n_node, 3) products of the labelled Hessians (``nodes["hessian"]``) with directions ``v`` (k, n_node, 3)."""
    return _rows_times(graph.nodes["hessian"], graph, v)  # column j of a row: atom j of the node's own structure


def _label_modes(graph, floor_cm: float):
    """The labelled Hessians' normal modes: ``(rows, lam)``.

    ``rows`` (n_node, 3, W, 3): per structure (the layout of
    ``nodes["hessian"]``; rows Cartesian coordinates, columns modes, real
    modes first) ``M^-1/2 U`` of the mass-weighted reference Hessian
    ``M^-1/2 H M^-1/2 = U Λ U^T`` with translations and rotations projected
    out; zero on their columns, on structures without a label and on
    padding. ``lam`` (n_node, 1, W, 3): the node's structure's ``|λ|``
    (eV/Å²/amu), raised to at least ``(floor_cm / C)²``. Labels only: no
    gradient flows through the eigensolver.
    """
    from ase.data import atomic_masses

    h = graph.nodes["hessian"]
    n, width = h.shape[0], h.shape[2]
    n_graph = graph.n_node.shape[0]
    first = jnp.cumsum(graph.n_node) - graph.n_node
    slot = jnp.clip(first[:, None] + jnp.arange(width)[None, :], 0, n - 1)  # (n_graph, W) node of each atom slot
    valid = (jnp.arange(width)[None, :] < graph.n_node[:, None]) & graph.nodes["mask"][slot]
    dtype = h.dtype
    mass = jnp.where(valid, jnp.asarray(atomic_masses, dtype)[graph.nodes["atomic_numbers"][slot]], 1.0)
    w = jnp.repeat(valid, 3, axis=1).astype(dtype)  # (n_graph, 3W) real coordinates
    s = jnp.repeat(jnp.sqrt(mass), 3, axis=1)  # √m per coordinate
    dense = h[slot].reshape(n_graph, 3 * width, 3 * width) * w[:, :, None] * w[:, None, :]
    mw = dense / (s[:, :, None] * s[:, None, :])
    # translations and rotations in mass-weighted coordinates, orthonormalised (a linear molecule's
    # dependent rotation gets a zero column)
    pos = graph.nodes["positions"][slot]
    centre = (mass[..., None] * pos * valid[..., None]).sum(1, keepdims=True) / jnp.maximum(
        (mass * valid).sum(1)[:, None, None], 1e-12)
    r = jnp.where(valid[..., None], pos - centre, 0.0)
    eye = jnp.eye(3, dtype=dtype)
    trans = jnp.broadcast_to(eye, (n_graph, width, 3, 3))  # [g, atom, xyz, which]
    rot = jnp.cross(r[:, :, None, :], eye[None, None, :, :]).swapaxes(2, 3)  # r × e_a: [g, atom, xyz, a]
    rigid = (jnp.concatenate([trans, rot], axis=3) * jnp.sqrt(mass)[..., None, None]
             * valid[..., None, None]).reshape(n_graph, 3 * width, 6)
    u_r, sv, _ = jnp.linalg.svd(rigid, full_matrices=False)
    u_r = u_r * (sv > 1e-6 * jnp.maximum(sv[:, :1], 1e-12))[:, None, :]
    project = jnp.eye(3 * width, dtype=dtype) - u_r @ u_r.swapaxes(1, 2)
    lam, modes = jnp.linalg.eigh(project @ mw @ project)
    # rigid-body and padding directions have zero eigenvalues; drop them by where the vectors live
    spurious = (jnp.einsum("gcr,gcm->grm", u_r, modes) ** 2).sum(1) + (((1 - w)[:, :, None] * modes) ** 2).sum(1)
    # real modes first: column (j, b) of a structure of n atoms exists only for j < n
    order = jnp.argsort(jnp.where(spurious < 0.5, lam, jnp.finfo(dtype).max), axis=1)
    lam, spurious = jnp.take_along_axis(lam, order, 1), jnp.take_along_axis(spurious, order, 1)
    modes = jnp.take_along_axis(modes, order[:, None, :], 2) * (spurious < 0.5)[:, None, :]
    lam = jnp.maximum(jnp.abs(lam), (floor_cm / WAVENUMBER) ** 2)
    basis = modes / s[:, :, None] * w[:, :, None]  # (n_graph, 3W rows, 3W modes)
    labelled = graph.globals.get("hessian_mask", graph.globals["mask"])
    graph_of_node = _graph_of_node(graph)
    local = jnp.clip(jnp.arange(n) - first[graph_of_node], 0, width - 1)
    rows = basis.reshape(n_graph, width, 3, width, 3)[graph_of_node, local]  # (n_node, 3, W, 3)
    keep = graph.nodes["mask"] & labelled[graph_of_node]
    rows = jnp.where(keep[:, None, None, None], rows, 0.0)
    return jax.lax.stop_gradient(rows), jax.lax.stop_gradient(lam.reshape(n_graph, 1, width, 3)[graph_of_node])


def frequency_basis(graph, floor_cm: float = MODE_FLOOR_CM, modes=None):
    """(n_node, 3, W, 3) ``T``: the labelled Hessians' normal modes, scaled so that errors read in cm⁻¹.

    Per structure (the layout of ``nodes["hessian"]``; rows are Cartesian
    coordinates, columns modes), ``T = sqrt(C/2) M^-1/2 U |Λ|^-1/4`` from the
    mass-weighted reference Hessian ``M^-1/2 H M^-1/2 = U Λ U^T`` with
    translations and rotations projected out (their columns are zero), ``C``
    = :data:`WAVENUMBER` and ``|λ|`` raised to at least ``(floor_cm / C)²``
    (:func:`_label_modes`). For a model Hessian ``H + δH``, ``(T^T δH T)_ii``
    is then, to first order, the error of mode i's harmonic frequency in
    cm⁻¹ (``δω = C δλ / 2√λ``), and the off-diagonal entries measure how the
    modes mix. A loss on ``T^T δH T z`` weighs every mode by what it does to
    its frequency: soft torsions, which an unweighted ``H v`` loss leaves to
    the stiff stretches, count as much as they move the spectrum.
    """
    rows, lam = _label_modes(graph, floor_cm) if modes is None else modes  # (one eigh per step for both terms)
    return rows * jnp.sqrt(WAVENUMBER / 2) * lam**-0.25


def displacement_basis(graph, floor_cm: float = MODE_FLOOR_CM, modes=None):
    """(n_node, 3, W, 3) ``B = M^-1/2 U |Λ|^-1/2`` (:func:`_label_modes`): ``B B^T = H⁺``, the inverse Hessian.

    ``B B^T δF`` is the Newton step of a force error ``δF``: how far (Å) it
    moves the minimum, to first order. Soft modes, where a small force error
    puts the minimum somewhere else (a torsion), weigh most.
    """
    rows, lam = _label_modes(graph, floor_cm) if modes is None else modes
    return rows * lam**-0.5


def _modes_times(basis, graph, r):
    """(k, n_graph, W, 3) ``T^T r`` per structure, for ``r`` (k, n_node, 3) and ``T`` of :func:`frequency_basis`."""
    per_node = jnp.einsum("iajb,kia->ikjb", basis, r)
    return jax.ops.segment_sum(per_node, _graph_of_node(graph), graph.n_node.shape[0]).swapaxes(0, 1)


def newton_step(graph, df, floor_cm: float = MODE_FLOOR_CM, modes=None):
    """(n_node, 3) ``H⁺ δF`` per Hessian-labelled structure (Å): where the force error ``df`` (n_node, 3) moves
    the minimum, to first order; zero elsewhere."""
    basis = displacement_basis(graph, floor_cm, modes)
    c = _modes_times(basis, graph, df[None])[0]  # (n_graph, W, 3): B^T δF, mode (j, b) of each structure
    graph_of_node = _graph_of_node(graph)
    first = jnp.cumsum(graph.n_node) - graph.n_node
    local = jnp.clip(jnp.arange(df.shape[0]) - first[graph_of_node], 0, basis.shape[2] - 1)
    return _rows_times(basis, graph, c[graph_of_node, local][None])[0]


def reference_dipole_derivative(graph, v):
    """(k, n_graph, 3) ``(dμ/dx) v`` of the labelled dipole derivatives (``nodes["dipole_derivative"]``)."""
    per_atom = jnp.einsum("aic,kai->akc", graph.nodes["dipole_derivative"], v)
    n_graph = graph.n_node.shape[0]
    return jax.ops.segment_sum(per_atom, _graph_of_node(graph), n_graph).swapaxes(0, 1)


def _errors(energy_fn, with_stress, dipole_fn=None, hessian_directions_k: int = 0,
            with_dipole_derivative: bool = False, hessian_metric: str = "cartesian", with_displacement: bool = False):
    """``(params, graph, key) -> dict`` of summed absolute and squared errors and counts.

    ``key`` seeds the ``hessian_directions_k`` random directions per
    structure of the Hessian-vector products and, with
    ``with_dipole_derivative``, of the dipole derivatives (needs
    ``dipole_fn``); unused without them. ``hessian_metric``:
    ``"cartesian"`` compares ``H v`` for standard-normal ``v`` (eV/Å²);
    ``"frequency"`` compares ``T^T H T z`` for standard-normal ``z`` in the
    reference's normal modes (:func:`frequency_basis`, cm⁻¹), and the
    dipole derivatives go along the same ``v = T z``. ``with_displacement``
    adds :func:`newton_step` of the force errors on Hessian-labelled
    structures.
    """
    if hessian_metric not in HESSIAN_METRICS:
        raise ValueError(f"hessian_metric must be one of {HESSIAN_METRICS}, got {hessian_metric!r}")
    derive = physics.energy_forces_stress(energy_fn) if with_stress else physics.energy_and_forces(energy_fn)
    with_hvp = physics.energy_forces_hvp(energy_fn)
    hvp = physics.hessian_vector_product(energy_fn)

    def fn(params, graph, key):
        if hessian_directions_k:
            # the labels' normal modes, once for the frequency metric and the displacement term alike
            need_modes = hessian_metric == "frequency" or with_displacement
            modes = _label_modes(graph, MODE_FLOOR_CM) if need_modes else None
            v = hessian_directions(graph, key, hessian_directions_k)
            if hessian_metric == "frequency":
                basis = frequency_basis(graph, modes=modes)
                v = _rows_times(basis, graph, v)
            if with_stress:
                out = derive(params, graph)
                hv = jax.vmap(lambda t: hvp(params, graph, t))(v)
            else:  # energy, forces and H v from one linearised gradient
                e, f, hv = with_hvp(params, graph, v)
                out = (e, f)
        else:
            out = derive(params, graph)
        gmask, nmask = graph.globals["mask"], graph.nodes["mask"]
        de = jnp.where(gmask, (out[0] - graph.globals["energy"]) / jnp.maximum(graph.n_node, 1), 0.0)
        df = jnp.where(nmask[:, None], out[1] - graph.nodes["forces"], 0.0)
        sums = {
            "energy_sq": (de**2).sum(), "energy_abs": jnp.abs(de).sum(), "n_graphs": gmask.sum(),
            "forces_sq": (df**2).sum(), "forces_abs": jnp.abs(df).sum(), "n_force": 3 * nmask.sum(),
        }
        if with_stress:
            ds = jnp.where(gmask[:, None, None], out.stress - graph.globals["stress"], 0.0)
            sums.update(stress_sq=(ds**2).sum(), stress_abs=jnp.abs(ds).sum(), n_stress=9 * gmask.sum())
        if dipole_fn is not None:
            dd = jnp.where(gmask[:, None], dipole_fn(params, graph) - graph.globals["dipole"], 0.0)
            sums.update(dipole_sq=(dd**2).sum(), dipole_abs=jnp.abs(dd).sum(), n_dipole=3 * gmask.sum())
        if hessian_directions_k:
            # structures without a Hessian label (force data mixed in) do not count
            labelled = graph.globals.get("hessian_mask", gmask)
            hmask = nmask & labelled[_graph_of_node(graph)]
            dh = jnp.where(hmask[None, :, None], hv - reference_hvp(graph, v), 0.0)
            if hessian_metric == "frequency":
                dw = _modes_times(basis, graph, dh)  # (k, n_graph, W, 3), zero beyond each structure's modes
                n_modes = 3 * hmask.sum() - 6 * (gmask & labelled).sum()
                sums.update(frequency_sq=(dw**2).sum(), frequency_abs=jnp.abs(dw).sum(),
                            n_frequency=hessian_directions_k * jnp.maximum(n_modes, 0))
            else:
                sums.update(hessian_sq=(dh**2).sum(), hessian_abs=jnp.abs(dh).sum(),
                            n_hessian=3 * hessian_directions_k * hmask.sum())
            if with_displacement:
                dx = jnp.where(hmask[:, None], newton_step(graph, df, modes=modes), 0.0)
                sums.update(displacement_sq=(dx**2).sum(), displacement_abs=jnp.abs(dx).sum(),
                            n_displacement=3 * hmask.sum())
            if with_dipole_derivative:
                def mu(positions):
                    return dipole_fn(params, physics.with_positions(graph, positions))

                _, push = jax.linearize(mu, graph.nodes["positions"])
                dmask = gmask & graph.globals.get("dipole_derivative_mask", gmask)
                dm = jnp.where(dmask[None, :, None], jax.vmap(push)(v) - reference_dipole_derivative(graph, v), 0.0)
                sums.update(dipole_derivative_sq=(dm**2).sum(), dipole_derivative_abs=jnp.abs(dm).sum(),
                            n_dipole_derivative=3 * hessian_directions_k * dmask.sum())
        return sums

    return fn


def _summed(errors, params, stacked, key):
    if stacked.n_node.shape[0] == 1:
        # one shard: skip the vmap, whose size-1 batch axis makes XLA's CPU scatters slower
        return errors(params, jax.tree_util.tree_map(lambda x: x[0], stacked), key)
    per_shard = jax.vmap(errors, in_axes=(None, 0, None))(params, stacked, key)
    return jax.tree_util.tree_map(lambda x: x.sum(0), per_shard)


def loss_fn(energy_fn, weights: LossWeights = LossWeights(), dipole_fn=None, hessian_directions_k: int = 1,
            hessian_metric: str = "cartesian"):
    """``(params, stacked_graph, key) -> (loss, metrics)``.

    ``dipole_fn`` is needed when ``weights.dipole > 0``; ``key`` seeds the
    ``hessian_directions_k`` random directions per structure of the Hessian
    term (used only when ``weights.hessian > 0``), measured by
    ``hessian_metric`` (:func:`_errors`; with ``"frequency"`` the weight is
    in 1/(cm⁻¹)²).
    """
    if (weights.dipole > 0 or weights.dipole_derivative > 0) and dipole_fn is None:
        raise ValueError("a dipole weight needs the model's dipole function (model.dipole)")
    if weights.dipole_derivative > 0 and weights.hessian <= 0:
        raise ValueError("the dipole-derivative term shares the Hessian term's directions: give a Hessian weight too")
    if weights.displacement > 0 and weights.hessian <= 0:
        raise ValueError("the displacement term needs the Hessian labels of the Hessian term: give a Hessian weight too")
    errors = _errors(energy_fn, weights.stress > 0,
                     dipole_fn if weights.dipole > 0 or weights.dipole_derivative > 0 else None,
                     hessian_directions_k if weights.hessian > 0 else 0, weights.dipole_derivative > 0,
                     hessian_metric, weights.displacement > 0)

    def fn(params, stacked, key=jax.random.PRNGKey(0)):
        s = _summed(errors, params, stacked, key)
        e_mse = s["energy_sq"] / jnp.maximum(s["n_graphs"], 1)
        f_mse = s["forces_sq"] / jnp.maximum(s["n_force"], 1)
        loss = weights.energy * e_mse + weights.forces * f_mse
        metrics = {"energy_rmse": jnp.sqrt(e_mse), "forces_rmse": jnp.sqrt(f_mse)}
        for term, count in list(_COUNTS.items())[2:]:
            weight = weights.hessian if term == "frequency" else getattr(weights, term)
            if weight > 0 and term + "_sq" in s:
                mse = s[term + "_sq"] / jnp.maximum(s[count], 1)
                loss = loss + weight * mse
                metrics[term + "_rmse"] = jnp.sqrt(mse)
        metrics["loss"] = loss
        return loss, metrics

    return fn


def optimizer(learning_rate=5e-3, warmup_steps=100, total_steps=10_000, schedule="cosine",
              clip_norm=10.0) -> optax.GradientTransformation:
    """Adam with linear warm-up, then cosine decay (or constant), and clipping.

    The learning rate is an injected hyperparameter, so a host-side
    reduce-on-plateau (:class:`Plateau`) can scale it between steps.
    """
    if schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(warmup_steps, 1),
                                                max(total_steps, warmup_steps + 1), learning_rate * 0.01)
    elif schedule in ("constant", "plateau"):
        lr = optax.linear_schedule(0.0, learning_rate, max(warmup_steps, 1))
    else:
        raise ValueError(f"unknown schedule {schedule!r}: use 'cosine', 'constant' or 'plateau'")
    return optax.chain(
        optax.clip_by_global_norm(clip_norm),
        optax.scale_by_adam(),
        optax.inject_hyperparams(optax.scale)(step_size=1.0),  # the plateau factor
        optax.scale_by_learning_rate(lr),
    )


def set_lr_factor(opt_state, factor):
    """Set the reduce-on-plateau factor inside an :func:`optimizer` state
    (a number; for stacked ensemble states, one per member)."""
    scale_state = opt_state[2]
    hp = dict(scale_state.hyperparams)
    hp["step_size"] = jnp.asarray(factor, hp["step_size"].dtype).reshape(hp["step_size"].shape)
    return opt_state[:2] + (scale_state._replace(hyperparams=hp),) + opt_state[3:]


def lr_factor(opt_state):
    """The plateau factor: a float, or an array of one per member for ensemble states."""
    x = host(opt_state[2].hyperparams["step_size"])
    return float(x) if x.ndim == 0 else x


class TrainState(NamedTuple):
    params: object
    ema_params: object
    opt_state: object
    step: jax.Array


def initial_params(model, key):
    """``model.init(key)`` with the energy readout's last layer set to zero.

    Training then starts from the per-element reference energies and the
    network adds only what the data ask for, instead of first unlearning
    random per-atom energies of the order of the energy scale. On the default
    job (same seed) it lowered the test errors from 3.27 to 2.50 meV/atom and
    from 80.5 to 73.5 meV/Å (``experiments/readout_start.py``).
    """
    params = model.init(key)
    readout = dict(params["readout"], out=jax.tree_util.tree_map(jnp.zeros_like, params["readout"]["out"]))
    return dict(params, readout=readout)


def init_state(params, opt: optax.GradientTransformation) -> TrainState:
    ema = jax.tree_util.tree_map(jnp.copy, params)  # its own buffers: the step donates both
    return TrainState(params, ema, opt.init(params), jnp.zeros((), jnp.int32))


def train_step(energy_fn, opt: optax.GradientTransformation, weights: LossWeights = LossWeights(),
               ema_decay: float = 0.99, dipole_fn=None, hessian_directions_k: int = 1, seed: int = 0,
               hessian_metric: str = "cartesian"):
    """``(state, stacked_graph) -> (state, metrics)``: one step (jit it).

    The Hessian term's directions are a function of ``seed``, the step
    number and each structure's index: an exact resume draws the same ones.
    """
    loss = loss_fn(energy_fn, weights, dipole_fn, hessian_directions_k, hessian_metric)
    base = jax.random.PRNGKey(seed)

    def fn(state: TrainState, stacked):
        key = jax.random.fold_in(base, state.step)
        (_, metrics), grads = jax.value_and_grad(loss, has_aux=True)(state.params, stacked, key)
        updates, opt_state = opt.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # warm the EMA up: short runs should not be dominated by the initial weights
        decay = jnp.minimum(ema_decay, (1.0 + state.step) / (10.0 + state.step))
        ema = jax.tree_util.tree_map(lambda e, p: decay * e + (1 - decay) * p, state.ema_params, params)
        metrics["grad_norm"] = optax.tree.norm(grads)
        return TrainState(params, ema, opt_state, state.step + 1), metrics

    return fn


def ensemble_train_step(step, strategy: str = "auto"):
    """``(states, stacked_graph, active) -> (states, metrics)``: one step of K members (jit it).

    ``step`` is a single-model :func:`train_step`; ``states`` are K
    :class:`TrainState` stacked on a leading axis; every member takes the
    same batch; ``active`` (K,) bool freezes members that stopped early
    (their state comes back unchanged). Metrics have a leading K axis.
    ``strategy``: :func:`equijax.ensemble.over_members`.
    """
    def one(member, batch):
        state, active = member
        new, metrics = step(state, batch)
        return jax.tree_util.tree_map(lambda n, o: jnp.where(active, n, o), new, state), metrics

    mapped = ensemble.over_members(one, strategy)
    return lambda states, batch, active: mapped((states, active), batch)


def evaluator(energy_fn, with_stress: bool = False, dipole_fn=None, hessian_directions_k: int = 0,
              with_dipole_derivative: bool = False, hessian_metric: str = "cartesian",
              with_displacement: bool = False):
    """``(params, stacked_graph) -> dict`` of summed errors (jit it); see :func:`metrics`.

    Hessian-vector products and dipole derivatives, when asked for, go along
    fixed directions (a fixed key): successive evaluations compare like with
    like.
    """
    errors = _errors(energy_fn, with_stress, dipole_fn, hessian_directions_k, with_dipole_derivative, hessian_metric,
                     with_displacement)
    key = jax.random.PRNGKey(2**31 - 1)
    return lambda params, stacked: _summed(errors, params, stacked, key)


def metrics(sums: dict) -> dict:
    """MAE and RMSE from summed errors: meV/atom, meV/Å, meV/Å³, me·Å (dipole), meV/Å² (``H v``), me (``dμ/dx v``),
    cm⁻¹ (``frequency``: the Hessian term in normal modes)."""
    out = {}
    for key, count in _COUNTS.items():
        if key + "_sq" in sums and float(sums[count]) > 0:  # a Hessian term on a set without Hessians: no entry
            n, unit = float(sums[count]), _REPORTED.get(key, 1000.0)
            out[f"{key}_mae"] = unit * float(sums[key + "_abs"]) / n
            out[f"{key}_rmse"] = unit * float(np.sqrt(float(sums[key + "_sq"]) / n))
    return out


def evaluate(energy_fn, params, dataset, with_stress: bool = False, mesh: Mesh | None = None,
             dipole_fn=None, hessian_directions_k: int = 0, with_dipole_derivative: bool = False,
             hessian_metric: str = "cartesian", with_displacement: bool = False) -> dict:
    """Metrics of ``params`` over a whole :class:`equijax.data.Dataset`."""
    out = {} if mesh is None else {"out_shardings": NamedSharding(mesh, P())}
    fn = jax.jit(evaluator(energy_fn, with_stress, dipole_fn, hessian_directions_k, with_dipole_derivative,
                           hessian_metric, with_displacement), **out)
    total = None
    for batch in dataset.batches():
        if mesh is not None:
            batch = shard(batch, mesh)
        sums = host(fn(params, batch))
        total = sums if total is None else jax.tree_util.tree_map(lambda a, b: a + b, total, sums)
    return metrics(total)


class Plateau:
    """Host-side reduce-on-plateau and early stopping on a validation metric."""

    def __init__(self, patience: int = 5, factor: float = 0.5, min_factor: float = 1e-3, stop_patience: int = 15):
        self.patience, self.factor, self.min_factor, self.stop_patience = patience, factor, min_factor, stop_patience
        self.best = float("inf")
        self.bad = 0
        self.since_best = 0

    def update(self, value: float, lr_factor_now: float) -> tuple[float, bool, bool]:
        """Returns ``(new_lr_factor, improved, stop)``."""
        if value < self.best:
            self.best, self.bad, self.since_best = value, 0, 0
            return lr_factor_now, True, False
        self.bad += 1
        self.since_best += 1
        if self.bad >= self.patience:
            lr_factor_now = max(lr_factor_now * self.factor, self.min_factor)
            self.bad = 0
        return lr_factor_now, False, self.since_best >= self.stop_patience

    def state_dict(self):
        return {"best": self.best, "bad": self.bad, "since_best": self.since_best}

    def load_state_dict(self, d):
        self.best, self.bad, self.since_best = d["best"], d["bad"], d["since_best"]


# ------------------------------------------------------------------ sharding


def init_distributed() -> None:
    """Start JAX's distributed runtime for a run of several processes.

    Reads ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0),
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` when they are set (JAX
    itself reads only the first); without them, JAX detects the cluster
    (SLURM, Open MPI, ...). Cross-process collectives of CPU devices go
    through gloo, so several processes of one machine train together too.

    Raises:
        ValueError: a malformed variable, or an incomplete cluster description.
    """
    import os

    kwargs = {}
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        kwargs["coordinator_address"] = os.environ["JAX_COORDINATOR_ADDRESS"]
    for name, key in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
        if os.environ.get(name):
            try:
                kwargs[key] = int(os.environ[name])
            except ValueError:
                raise ValueError(f"{name} must be an integer, got {os.environ[name]!r}") from None
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # affects CPU devices only
    try:
        jax.distributed.initialize(**kwargs)
    except ValueError as err:
        raise ValueError(f"jax.distributed.initialize: {err} (set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and "
                         "JAX_PROCESS_ID, or run under SLURM)") from err


def host(tree):
    """Host (numpy) copies of replicated arrays, also in a run of several processes.

    A replicated global array spans devices this process cannot read, but
    every process holds all of it: its first local shard is the value.
    """
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(x.addressable_data(0))
        return np.asarray(jax.device_get(x))

    return jax.tree_util.tree_map(one, tree)


def data_mesh(devices=None) -> Mesh:
    """A 1-D mesh named ``"data"`` over all (global) devices."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    return Mesh(devices, ("data",))


def replicate(tree, mesh: Mesh):
    return jax.device_put(tree, NamedSharding(mesh, P()))


def shard(stacked, mesh: Mesh, local: bool = False):
    """Split a stacked batch's leading (shard) axis over the mesh.

    With ``local=False`` every host holds the same global batch (same
    files, same seed); on several hosts each one hands over only the shards
    of its own devices (``jax.devices()`` lists devices process by process).
    With ``local=True`` the batch holds only this process's shards (it built
    nothing else). JAX assembles the global array.
    """
    sharding = NamedSharding(mesh, P("data"))
    if jax.process_count() == 1:
        return jax.device_put(stacked, sharding)
    per_host = jax.local_device_count()
    start = jax.process_index() * per_host

    def local_part(x):
        x = np.asarray(x)
        if local:
            return jax.make_array_from_process_local_data(sharding, x, (mesh.size,) + x.shape[1:])
        return jax.make_array_from_process_local_data(sharding, x[start : start + per_host], x.shape)

    return jax.tree_util.tree_map(local_part, stacked)


# ------------------------------------------------------------------ the loop


def machine_info() -> dict:
    """Where a result was measured: processor, cores, JAX version and devices (for result files)."""
    import os
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "jax": jax.__version__, "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()]}


CHECKPOINT_NAME = "checkpoint.npz"  # latest training state, for resuming
MODEL_NAME = "model.npz"  # best validation, EMA parameters: what users load


def fit(config: dict, output, resume: bool = True, progress: bool = True, log=print, callback=None,
        accept_changes: bool = False) -> dict:
    """Train a NequIP potential as ``config`` says (schema: :data:`equijax.config.SCHEMA`).

    Writes into ``output``: ``checkpoint.npz`` (latest state, for resuming),
    ``model.npz`` (best validation, EMA parameters: the model file to share
    and load), ``metrics.jsonl`` (one line per evaluation),
    ``learning_curve.png`` and ``result.json``. Restarting with the same
    ``output`` resumes from ``checkpoint.npz`` and reproduces an
    uninterrupted run bit for bit: the data order is a function of (seed,
    epoch). A resume whose config differs from the checkpoint's stops with
    the differences, unless ``accept_changes``.

    ``callback(step, state)``, if given, runs after every step (tests use it
    to simulate a kill).

    With ``train.ensemble = K > 1`` it trains a committee of K members in
    one compiled step (:func:`ensemble_train_step`): member k starts from the
    initialisation of ``seed + k`` (so member 0 is the single model of the
    same seed), all members take the same batches, each has its own EMA,
    plateau schedule and early stopping (a stopped member is frozen), and
    ``model.npz`` holds every member's best EMA parameters stacked, with
    ``config.members = K`` (the file loads as the committee).

    Returns:
        dict with the test metrics of the best EMA parameters and paths.

    Raises:
        ConfigError, ValueError, FileNotFoundError: bad config, data or
            checkpoint, or a resume with a changed config.
    """
    import json
    import time
    from pathlib import Path

    from tqdm.auto import tqdm

    from equijax import checkpoint, config as config_lib, data as data_lib, io, loader
    from equijax.models import NequIPConfig, nequip

    config = config_lib.validate(config)
    output = Path(output)
    lead = jax.process_index() == 0  # in a run of several processes, process 0 writes and reports
    if not lead:
        progress, log = False, (lambda *a, **k: None)
    output.mkdir(parents=True, exist_ok=True)
    dc, mc, tc = config["data"], config["model"], config["train"]
    ckpt_path = output / CHECKPOINT_NAME
    if resume and not ckpt_path.exists() and (output / "checkpoint.pkl").exists():
        raise checkpoint.CheckpointError(
            f"{output} holds a pickle checkpoint of equijax 0.1 (checkpoint.pkl), which is not loaded; "
            f"start over with --restart, or " + checkpoint.CONVERT_HINT.format(path=output / "checkpoint.pkl"))
    resumed = checkpoint.load(ckpt_path) if resume and ckpt_path.exists() else None
    if resumed is not None:
        changes = config_lib.diff({**resumed["run_config"], "output": None}, {**config, "output": None})
        if changes and not accept_changes:
            raise config_lib.ConfigError(
                f"the config differs from the one {ckpt_path} was trained with ({'; '.join(changes)}): "
                "restart with --restart, or resume with the new values with --accept-changes")
        for line in changes:
            log(f"resuming with a changed config: {line}")

    with_hessian = tc["weights"]["hessian"] > 0
    with_dmu = tc["weights"]["dipole_derivative"] > 0
    require = ("energy", "forces") + (("dipole",) if with_dmu or tc["weights"]["dipole"] > 0 else ())

    def read(paths, species=dc["species"]):
        if dc["lazy"]:  # frames parsed when a batch needs them
            return loader.open_files(config_lib.data_paths(paths), species, require, dc["cache_size"])
        return io.read_many(config_lib.data_paths(paths), species=species, require=require)

    structures = read(dc["train"])
    for key, wanted in (("hessian", with_hessian), ("dipole_derivative", with_dmu)):
        if wanted and not any(key in s.labels for s in structures):  # force data may be mixed in
            raise ValueError(f"train.weights.{key} > 0 but no training frame has a {key} label "
                             f"(make them with experiments/make_data.py --hessians)")
    rng = np.random.default_rng(tc["seed"])
    order = rng.permutation(len(structures))
    n_valid = 0 if dc["valid"] else max(1, int(round(dc["valid_fraction"] * len(structures))))
    if dc["max_train"]:
        order = np.concatenate([order[:n_valid], order[n_valid : n_valid + int(dc["max_train"])]])
    valid = read(dc["valid"]) if dc["valid"] else loader.subset(structures, order[:n_valid])
    train = loader.subset(structures, order[n_valid:])
    if not len(train):
        raise ValueError(f"no training frames left after holding out {n_valid} for validation")

    n_members = tc["ensemble"]
    if resumed is not None:
        model_cfg = NequIPConfig.from_dict(resumed["config"])
        if model_cfg.members != n_members:
            raise config_lib.ConfigError(
                f"{ckpt_path} holds an ensemble of {model_cfg.members} member(s), the config asks for "
                f"train.ensemble={n_members}: restart with --restart or keep train.ensemble={model_cfg.members}")
        model_cfg = model_cfg.replace(members=1, backend=mc["backend"])  # an execution choice: may change
        log(f"resuming from {ckpt_path} at step {int(np.max(resumed['step']))}")
    elif tc["init"]:
        init_path = config_lib.data_paths(tc["init"])[0]
        start, start_params, _ = checkpoint.load_model(init_path)
        if start.config.members != 1 or n_members != 1:
            raise config_lib.ConfigError("train.init fine-tunes one model: give a single model's file and "
                                         "train.ensemble=1")
        model_cfg = start.config.replace(backend=mc["backend"])  # its architecture and energy shifts
        log(f"fine-tuning {init_path}: {len(train)} training, {len(valid)} validation frames; "
            f"species {list(model_cfg.species)} (the model section of the config is not used)")
    else:
        base = NequIPConfig.from_dict({**{k: v for k, v in mc.items() if v is not None}, "species": (1,)})
        use_e0s = dc["energy_shift"] == "e0s" or (dc["energy_shift"] == "auto" and dc["e0s"] is not None)
        if use_e0s and dc["e0s"] is None:
            raise config_lib.ConfigError("data.energy_shift=e0s needs data.e0s (isolated-atom energies)")
        e0s = config_lib.read_e0s(dc["e0s"]) if use_e0s else None
        # the model knows every element of the training and validation frames (a rare one may be in valid only)
        species = dc["species"] or sorted({int(z) for part in (train, valid) for st in part
                                           for z in np.unique(st.atomic_numbers)})
        stats = data_lib.statistics(train, base.cutoff, species, e0s)
        if stats.warning:
            log(stats.warning)
        model_cfg = base.replace(species=stats.species, energy_shift=stats.energy_shift,
                                 energy_scale=stats.energy_scale,
                                 avg_num_neighbours=mc["avg_num_neighbours"] or stats.avg_num_neighbours)
        log(f"{len(train)} training, {len(valid)} validation frames; species {list(stats.species)}; "
            f"avg neighbours {stats.avg_num_neighbours:.1f}; force RMS {stats.force_rms:.3f} eV/Å; "
            f"energy shift from {'isolated atoms' if e0s else 'least squares'}")
    model = nequip(model_cfg)  # one member
    saved_cfg = model_cfg.replace(members=n_members).to_dict()  # what files record: loads as the committee
    if n_members > 1:
        _check_ensemble_fits(model, n_members)
    mesh = data_mesh()
    if mesh.size > 1 and with_hessian and (tc["hessian_metric"] == "frequency" or tc["weights"]["displacement"] > 0):
        # found in testing: on 4 host devices the step with the normal-mode basis did not finish in minutes,
        # while 4 stacked shards on one device run; refuse rather than hang
        raise config_lib.ConfigError(
            f"train.hessian_metric=frequency and train.weights.displacement run on one device for now ({mesh.size} "
            "found): set CUDA_VISIBLE_DEVICES (or --xla_force_host_platform_device_count) to one device, or use "
            "train.hessian_metric=cartesian with train.weights.displacement=0 on several")
    dtype = np.float64 if model_cfg.dtype == "float64" else np.float32
    bs = tc["batch_size"]
    budget = loader.Budget(tc["budget_nodes"], tc["budget_edges"], None) if tc["batching"] == "budget" else None
    train_set = data_lib.Dataset(train, model_cfg.cutoff, bs, model_cfg.species, mesh.size, dtype, budget)
    # validation in fixed batches of the same padded size: one evaluator compilation
    valid_set = data_lib.Dataset(valid, model_cfg.cutoff, bs, model_cfg.species, mesh.size, dtype, train_set.budget)
    if with_hessian:  # one width of Hessian rows and the same label fields: one compiled step and evaluator
        train_set.hessian_width = valid_set.hessian_width = max(train_set.hessian_width or 1,
                                                                valid_set.hessian_width or 1)
        valid_set.partial_labels = train_set.partial_labels
    if train_set.num_batches(drop_last=True) == 0:  # else the loop would wait forever for a full batch
        raise ValueError(f"{len(train)} training frames are fewer than train.batch_size={bs}: "
                         "lower the batch size or give more frames")

    def epoch_plan(epoch):  # a function of (seed, epoch) only: a resumed run replays the same batches
        return train_set.plan(shuffle=True, seed=tc["seed"] * 100_003 + epoch, drop_last=True)

    steps_per_epoch = len(epoch_plan(0))
    if train_set.budget is not None:
        b = train_set.budget
        log(f"budget batching: up to {b.nodes} atoms, {b.edges} edges, {b.graphs} structures per device and step; "
            f"{steps_per_epoch} steps per epoch")
    max_steps = tc["max_steps"]
    weights = LossWeights(**tc["weights"])
    with_stress = weights.stress > 0
    dipole_fn = model.dipole if weights.dipole > 0 or with_dmu else None
    opt = optimizer(tc["learning_rate"], tc["warmup_steps"], max_steps, tc["schedule"], tc["clip_norm"])
    plateaus = [Plateau(tc["plateau_patience"], tc["plateau_factor"], stop_patience=tc["early_stopping_patience"])
                for _ in range(n_members)]
    ensemble_run = n_members > 1

    if resumed is not None:
        state = jax.tree_util.tree_map(jnp.asarray, TrainState(resumed["params"], resumed["ema_params"],
                                                               _restore_opt_state(opt, resumed), resumed["step"]))
        saved = resumed["plateau"] if ensemble_run else [resumed["plateau"]]
        for p, d in zip(plateaus, saved):
            p.load_state_dict(d)
    elif tc["init"]:
        state = init_state(start_params, opt)
    elif ensemble_run:
        state = ensemble.stack([init_state(initial_params(model, jax.random.PRNGKey(tc["seed"] + k)), opt)
                                for k in range(n_members)])
    else:
        state = init_state(initial_params(model, jax.random.PRNGKey(tc["seed"])), opt)
    state = replicate(state, mesh)
    replicated = NamedSharding(mesh, P())  # states and metrics: every process holds all of them
    k_directions = tc["hessian_directions"] if with_hessian else 0
    metric = tc["hessian_metric"]
    single_step = train_step(model.energy, opt, weights, tc["ema_decay"], dipole_fn, tc["hessian_directions"],
                             tc["seed"], metric)
    # with Hessian labels, validation also reports where the force errors move the minima (newton_step)
    single_eval = evaluator(model.energy, with_stress, dipole_fn, k_directions, with_dmu, metric, with_hessian)
    # model selection on energy + force RMSE; a Hessian term counts in force units (meV/Å) as the loss weighs it
    h_factor = float(np.sqrt(weights.hessian / weights.forces)) if with_hessian and weights.forces > 0 else 1.0
    h_factor *= 1000.0 / _REPORTED.get(metric, 1000.0)  # the frequency term reports in cm⁻¹, not milli-units

    def criterion(v):
        return v["forces_rmse"] + v["energy_rmse"] + h_factor * v.get("hessian_rmse", v.get("frequency_rmse", 0.0))
    if ensemble_run:
        step_fn = _ensemble_step_fn(single_step, tc["ensemble_strategy"], n_members, mesh)
        eval_fn = jax.jit(ensemble.over_members(single_eval, tc["ensemble_strategy"]), out_shardings=replicated)
        stopped = [p.since_best >= p.stop_patience for p in plateaus]
        active = jax.device_put(np.logical_not(stopped), replicated)  # moved again only when a member stops
        # every member's best EMA parameters so far: what model.npz holds
        best = host(state.ema_params)
        if resumed is not None and (output / MODEL_NAME).exists():
            best = host(checkpoint.load_model(output / MODEL_NAME).params)
    else:
        step_fn = jax.jit(single_step, donate_argnums=0, out_shardings=replicated)
        eval_fn = jax.jit(single_eval, out_shardings=replicated)
    eval_every = tc["eval_every"]

    def validate(params, dataset=valid_set):
        """Metrics (validation by default): a dict, or for an ensemble a list of dicts (one per member)."""
        total = None
        for batch in dataset.batches():
            sums = host(eval_fn(params, shard(batch, mesh)))
            total = sums if total is None else jax.tree_util.tree_map(lambda a, b: a + b, total, sums)
        if not ensemble_run:
            return metrics(total)
        return [metrics(jax.tree_util.tree_map(lambda x: x[k], total)) for k in range(n_members)]

    def save():
        if lead:  # one writer; the state is replicated, so process 0 holds all of it
            checkpoint.save(ckpt_path, config=saved_cfg, params=host(state.params), ema_params=host(state.ema_params),
                            opt_state=host(jax.tree_util.tree_leaves(state.opt_state)), step=host(state.step),
                            plateau=[p.state_dict() for p in plateaus] if ensemble_run else plateaus[0].state_dict(),
                            run_config=config)

    def export(valid_metrics):
        if lead:
            params = best if ensemble_run else host(state.ema_params)
            checkpoint.save_model(output / MODEL_NAME, saved_cfg, params, step=int(np.max(host(state.step))),
                                  valid=valid_metrics, run_config=config)

    metrics_path = output / "metrics.jsonl"
    step = int(np.max(host(state.step)))
    if lead and resumed is None and metrics_path.exists():
        metrics_path.unlink()
    elif lead and metrics_path.exists():  # lines written after the checkpoint will be written again
        kept = [l for l in metrics_path.read_text().splitlines(True) if json.loads(l)["step"] <= step]
        metrics_path.write_text("".join(kept))
    for stale in output.glob("*.tmp") if lead else ():  # left by a kill in the middle of a write
        stale.unlink()
    t0 = time.time()
    def new_window():  # throughput is measured over the training steps between validations
        return {"start": time.time(), "steps": 0, "structures": 0, "atoms": 0, "wait_s": 0.0,
                "padding": np.zeros(4)}

    # each process builds and reads only the shards of its own devices
    n_local, first_local = jax.local_device_count(), jax.process_index() * jax.local_device_count()
    several = jax.process_count() > 1

    def make_batch(step_shards):
        mine = step_shards[first_local : first_local + n_local] if several else step_shards
        return step_shards, shard(train_set.build(mine), mesh, local=several)

    window = new_window()
    bar = tqdm(total=max_steps, initial=step, disable=not progress, desc="train", unit="step", dynamic_ncols=True,
               mininterval=1.0)
    stop = False
    epoch, skip = 0, step
    plan = epoch_plan(0)
    while skip >= len(plan):  # where a resumed run stands: epochs may differ in length (budget batching)
        skip -= len(plan)
        epoch += 1
        plan = epoch_plan(epoch)
    while step < max_steps and not stop:
        batches = loader.Prefetcher(plan[skip:], make_batch, tc["prefetch"])
        waited = 0.0
        for step_shards, batch in batches:
            if ensemble_run:
                state, m = step_fn(state, batch, active)
            else:
                state, m = step_fn(state, batch)
            step += 1
            window["steps"] += 1
            window["structures"] += sum(len(p) for p in step_shards)
            window["atoms"] += int(sum(train_set.n_atoms[np.asarray(p, np.int64)].sum() for p in step_shards))
            window["padding"] += train_set.padding(step_shards)
            window["wait_s"] += batches.wait_s - waited
            waited = batches.wait_s
            if step % 10 == 0 or step == max_steps:
                m = host(m)
                bar.set_postfix(loss=f"{float(np.mean(m['loss'])):.4f}",
                                F_rmse=f"{1000 * float(np.mean(m['forces_rmse'])):.0f} meV/Å",
                                lr=f"{float(np.mean(lr_factor(state.opt_state))):.2g}×")
            bar.update(1)
            if callback is not None:
                callback(step, state)
            if step % eval_every == 0 or step == max_steps:
                jax.block_until_ready(state)
                seconds = time.time() - window["start"]  # training steps only (the first window: compilation too)
                real_n, pad_n, real_e, pad_e = window["padding"]
                speed = {"structures_per_s": window["structures"] / seconds, "atoms_per_s": window["atoms"] / seconds,
                         "ms_per_step": 1e3 * seconds / max(window["steps"], 1),
                         "node_fill": real_n / pad_n, "edge_fill": real_e / pad_e,
                         "data_wait_fraction": window["wait_s"] / seconds}
                if ensemble_run:
                    members = validate(state.ema_params)
                    factors = np.array(lr_factor(state.opt_state), dtype=float)
                    improved = False
                    ema_now = None
                    for k, (p, vk) in enumerate(zip(plateaus, members)):
                        if stopped[k]:
                            continue
                        factors[k], better, stopped[k] = p.update(criterion(vk), factors[k])
                        if better:
                            ema_now = host(state.ema_params) if ema_now is None else ema_now
                            best = jax.tree_util.tree_map(lambda b, e: _set_row(b, k, e[k]), best, ema_now)
                            improved = True
                    stop = all(stopped)
                    active = jax.device_put(np.logical_not(stopped), replicated)
                    if tc["schedule"] == "plateau":
                        state = state._replace(opt_state=set_lr_factor(state.opt_state, factors))
                    v = {key: float(np.mean([vk[key] for vk in members])) for key in members[0]}
                    extra = {"valid_members": members, "stopped": [bool(x) for x in stopped]}
                else:
                    v = validate(state.ema_params)
                    factor, improved, stop = plateaus[0].update(criterion(v), lr_factor(state.opt_state))
                    if tc["schedule"] == "plateau":
                        state = state._replace(opt_state=set_lr_factor(state.opt_state, factor))
                    extra = {}
                record = {"step": step, "epoch": step / steps_per_epoch, "time_s": time.time() - t0,
                          "train_loss": float(np.mean(host(m["loss"]))),
                          **{f"valid_{k}": x for k, x in v.items()}, "throughput": speed, **extra}
                if lead:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(record) + "\n")
                    bar.write(f"step {step:6d}  valid{' (mean of members)' if ensemble_run else ''}: "
                              f"E MAE {v['energy_mae']:.2f} meV/atom, F MAE {v['forces_mae']:.1f} meV/Å"
                              + (f", Hv MAE {v['hessian_mae'] / 1000:.3f} eV/Å²" if "hessian_mae" in v else "")
                              + (f", Hv in modes MAE {v['frequency_mae']:.1f} cm⁻¹" if "frequency_mae" in v else "")
                              + (f", H⁺δF MAE {v['displacement_mae']:.1f} mÅ" if "displacement_mae" in v else "")
                              + "; "
                              f"{speed['structures_per_s']:.0f} structures/s, {speed['atoms_per_s']:.0f} atoms/s, "
                              f"padding: {100 * speed['node_fill']:.0f}% of node and {100 * speed['edge_fill']:.0f}% "
                              f"of edge slots real, waited for data {100 * speed['data_wait_fraction']:.1f}% of the time")
                if improved:
                    export(members if ensemble_run else v)
                save()
                window = new_window()
            if step >= max_steps or stop:
                break
        batches.close()
        epoch, skip = epoch + 1, 0
        plan = epoch_plan(epoch)
    bar.close()
    if stop:
        log(f"early stopping at step {step}: no validation improvement for {plateaus[0].stop_patience} evaluations"
            + (" (every member)" if ensemble_run else ""))

    if lead:
        plot_learning_curve(metrics_path, output / "learning_curve.png")
    result = {"steps": step, "train_time_s": time.time() - t0, "output": str(output), "machine": machine_info()}
    if dc["test"]:
        if jax.process_count() > 1:  # every process reads the model file process 0 wrote
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("equijax: model file written")
        best_model, local_params, _ = checkpoint.load_model(output / MODEL_NAME)
        best_params = replicate(local_params, mesh)
        test = read(dc["test"], model_cfg.species)
        test_set = data_lib.Dataset(test, model_cfg.cutoff, bs, model_cfg.species, mesh.size, dtype, train_set.budget)
        if with_hessian:
            test_set.hessian_width = max(test_set.hessian_width or 1, train_set.hessian_width)
            test_set.partial_labels = train_set.partial_labels
        result["test"] = evaluate(best_model.energy, best_params, test_set, with_stress, mesh,
                                  best_model.dipole if dipole_fn is not None else None, k_directions, with_dmu,
                                  metric, with_hessian)
        abs_f = [(float(np.abs(s.labels["forces"]).sum()), s.labels["forces"].size) for s in test]
        result["test"]["zero_force_mae"] = 1000 * sum(a for a, _ in abs_f) / sum(n for _, n in abs_f)
        result["n_test"] = len(test)
        if ensemble_run:  # every member in one mapped pass of the compiled evaluator
            result["test_members"] = validate(best_params, test_set)
            result["test_calibration"] = ensemble.force_calibration(best_model, local_params, test_set)
    if lead:
        with open(output / "result.json", "w") as f:
            json.dump(result, f, indent=1)
    return result


def _set_row(stacked, k, value):
    stacked = np.array(stacked)  # a writable host copy
    stacked[k] = value
    return stacked


def _check_ensemble_fits(model, n_members: int) -> None:
    """Refuse an ensemble whose training state alone cannot fit in memory, before allocating it."""
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0))
    per_member = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(shapes))
    need = 6 * per_member * n_members  # params, EMA, two Adam moments, gradients, updates
    room = ensemble.memory_available()
    if room is not None and need > room:
        raise MemoryError(f"train.ensemble={n_members} needs {need / 2**30:.1f} GiB for the training state alone "
                          f"and the device has {room / 2**30:.1f} GiB free: use "
                          f"train.ensemble={max(int(room // (6 * per_member)), 1)} or fewer")


def _ensemble_step_fn(single_step, strategy: str, n_members: int, mesh: Mesh):
    """The jitted K-member step, compiled at its first call and checked against the memory there is."""
    jitted = jax.jit(ensemble_train_step(single_step, strategy), donate_argnums=0,
                     out_shardings=NamedSharding(mesh, P()))
    compiled = []

    def fn(states, batch, active):
        if not compiled:
            exe = jitted.lower(states, batch, active).compile()
            ensemble.check_memory(exe, n_members)
            compiled.append(exe)
        return compiled[0](states, batch, active)

    return fn


def _restore_opt_state(opt, payload):
    """Rebuild the optimiser state pytree from the saved leaves."""
    template = opt.init(jax.tree_util.tree_map(jnp.asarray, payload["params"]))
    treedef = jax.tree_util.tree_structure(template)
    return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(x) for x in payload["opt_state"]])


def plot_learning_curve(metrics_path, png_path):
    """Validation MAEs against steps (PNG)."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(l) for l in open(metrics_path)] if metrics_path.exists() else []
    if not rows:
        return
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    steps = [r["step"] for r in rows]
    ax[0].plot(steps, [r["valid_energy_mae"] for r in rows], "o-")
    ax[0].set(xlabel="step", ylabel="energy MAE (meV/atom)", yscale="log", title="validation, EMA params")
    ax[1].plot(steps, [r["valid_forces_mae"] for r in rows], "o-", color="C1")
    ax[1].set(xlabel="step", ylabel="force MAE (meV/Å)", yscale="log")
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
