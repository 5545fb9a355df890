"""The loss: errors of energies, forces, stress, dipoles and Hessian-vector products, summed over shards.

The model is any ``energy_fn(params, graph)``. Batches are *stacked* padded
graphs of shape ``(n_shards, ...)`` (:meth:`equijax.data.Dataset.batches`);
losses are sums over every real structure of every shard divided by the
global counts, so one device and many give the same numbers. Labels travel
in the graph: ``globals["energy"]``, ``nodes["forces"]``,
``globals["stress"]``, ``globals["dipole"]``, ``nodes["hessian"]`` and
``nodes["dipole_derivative"]``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from equijax import graph as graph_lib, physics
from equijax.config import SCHEMA, default
from equijax.modes import MODE_FLOOR_CM, frequency_basis, label_modes, modes_times, newton_step, rows_times


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

    energy: float = default("train.weights.energy")
    forces: float = default("train.weights.forces")
    stress: float = default("train.weights.stress")
    dipole: float = default("train.weights.dipole")
    hessian: float = default("train.weights.hessian")
    dipole_derivative: float = default("train.weights.dipole_derivative")
    displacement: float = default("train.weights.displacement")


#: each error term and the count it is averaged over (the order of the loss's sum); ``frequency`` is the
#: Hessian term measured in normal modes (``hessian_metric="frequency"``), weighted by ``LossWeights.hessian``
_COUNTS = {"energy": "n_graphs", "forces": "n_force", "stress": "n_stress", "dipole": "n_dipole",
           "hessian": "n_hessian", "frequency": "n_frequency", "dipole_derivative": "n_dipole_derivative",
           "displacement": "n_displacement"}
#: the factor from a term's label units to its reported ones (meV, me, ...); frequency errors are in cm⁻¹
_REPORTED = {"frequency": 1.0}
HESSIAN_METRICS = SCHEMA["train"]["hessian_metric"].type


def hessian_directions(graph, key, k: int):
    """(k, n_node, 3) random directions for a Hessian-vector-product loss; zero on padding.

    Standard normal components (identity covariance, Hutchinson's choice:
    the expected squared error of ``H v`` is the squared Frobenius error of
    ``H``, whatever the molecule's size). Each atom's numbers are drawn from
    ``key`` folded with its structure's ``globals["index"]`` (else its
    position in the batch) and its index within the structure, so they do
    not depend on how a batch is split over shards or devices.
    """
    graph_of_node = graph_lib.node_graph_index(graph)
    first = jnp.cumsum(graph.n_node) - graph.n_node
    local = jnp.arange(graph_of_node.shape[0]) - first[graph_of_node]
    structure = graph.globals.get("index", jnp.arange(graph.n_node.shape[0]))[graph_of_node]
    keys = jax.vmap(lambda s, a: jax.random.fold_in(jax.random.fold_in(key, s), a))(structure, local)
    v = jax.vmap(lambda kk: jax.random.normal(kk, (k, 3)))(keys).swapaxes(0, 1)
    return jnp.where(graph.nodes["mask"][None, :, None], v, 0.0).astype(graph.nodes["positions"].dtype)


def reference_hvp(graph, v):
    """(k, n_node, 3) products of the labelled Hessians (``nodes["hessian"]``) with directions ``v`` (k, n_node, 3)."""
    return rows_times(graph.nodes["hessian"], graph, v)  # column j of a row: atom j of the node's own structure


def reference_dipole_derivative(graph, v):
    """(k, n_graph, 3) ``(dμ/dx) v`` of the labelled dipole derivatives (``nodes["dipole_derivative"]``)."""
    per_atom = jnp.einsum("aic,kai->akc", graph.nodes["dipole_derivative"], v)
    n_graph = graph.n_node.shape[0]
    return jax.ops.segment_sum(per_atom, graph_lib.node_graph_index(graph), n_graph).swapaxes(0, 1)


class Terms(NamedTuple):
    """Which error terms an evaluation computes: a static spec, one compiled program each.

    Attributes:
        stress: stress components (periodic data).
        dipole: dipoles (needs the model's dipole function).
        hessian_directions: random directions per structure of the
            Hessian-vector products ``H v``; 0: no Hessian term.
        dipole_derivative: ``(dμ/dx) v`` along the Hessian term's directions.
        hessian_metric: ``"cartesian"`` compares ``H v`` for standard-normal
            ``v`` (eV/Å²); ``"frequency"`` compares ``T^T H T z`` for
            standard-normal ``z`` in the reference's normal modes
            (:func:`equijax.modes.frequency_basis`, cm⁻¹), and the dipole
            derivatives go along the same ``v = T z``.
        displacement: :func:`equijax.modes.newton_step` of the force errors
            on Hessian-labelled structures.

    ``dipole_derivative`` and ``displacement`` are computed only with a
    Hessian term (they share its labels and directions).
    """

    stress: bool = False
    dipole: bool = False
    hessian_directions: int = 0
    dipole_derivative: bool = False
    hessian_metric: str = "cartesian"
    displacement: bool = False

    @classmethod
    def of(cls, weights: LossWeights, hessian_directions: int = 1, hessian_metric: str = "cartesian") -> "Terms":
        """The terms a loss with ``weights`` needs (a weight of zero computes nothing)."""
        return cls(stress=weights.stress > 0, dipole=weights.dipole > 0 or weights.dipole_derivative > 0,
                   hessian_directions=hessian_directions if weights.hessian > 0 else 0,
                   dipole_derivative=weights.dipole_derivative > 0, hessian_metric=hessian_metric,
                   displacement=weights.displacement > 0)


def _errors(energy_fn, terms: Terms, dipole_fn=None):
    """``(params, graph, key) -> dict`` of summed absolute and squared errors and counts, per :class:`Terms`.

    ``key`` seeds the random directions of the Hessian term (unused
    without one). ``dipole_fn`` is needed for the dipole terms.
    """
    if terms.hessian_metric not in HESSIAN_METRICS:
        raise ValueError(f"hessian_metric must be one of {HESSIAN_METRICS}, got {terms.hessian_metric!r}")
    if (terms.dipole or terms.dipole_derivative) and dipole_fn is None:
        raise ValueError("a dipole term needs the model's dipole function (model.dipole)")
    derive = physics.energy_forces_stress(energy_fn) if terms.stress else physics.energy_and_forces(energy_fn)
    with_hvp = physics.energy_forces_hvp(energy_fn)
    hvp = physics.hessian_vector_product(energy_fn)

    def predict(params, graph, v):
        """Energy, forces (and stress) and, with directions ``v``, ``H v``."""
        if v is None:
            return derive(params, graph), None
        if terms.stress:
            return derive(params, graph), jax.vmap(lambda t: hvp(params, graph, t))(v)
        e, f, hv = with_hvp(params, graph, v)  # energy, forces and H v from one linearised gradient
        return (e, f), hv

    def fn(params, graph, key):
        v = modes = basis = None
        if terms.hessian_directions:
            # the labels' normal modes, once for the frequency metric and the displacement term alike
            if terms.hessian_metric == "frequency" or terms.displacement:
                modes = label_modes(graph, MODE_FLOOR_CM)
            v = hessian_directions(graph, key, terms.hessian_directions)
            if terms.hessian_metric == "frequency":
                basis = frequency_basis(graph, modes=modes)
                v = rows_times(basis, graph, v)
        out, hv = predict(params, graph, v)
        gmask, nmask = graph.globals["mask"], graph.nodes["mask"]
        de = jnp.where(gmask, (out[0] - graph.globals["energy"]) / jnp.maximum(graph.n_node, 1), 0.0)
        df = jnp.where(nmask[:, None], out[1] - graph.nodes["forces"], 0.0)
        sums = {**_sums("energy", de, gmask.sum()), **_sums("forces", df, 3 * nmask.sum())}
        if terms.stress:
            ds = jnp.where(gmask[:, None, None], out.stress - graph.globals["stress"], 0.0)
            sums.update(_sums("stress", ds, 9 * gmask.sum()))
        if terms.dipole:
            dd = jnp.where(gmask[:, None], dipole_fn(params, graph) - graph.globals["dipole"], 0.0)
            sums.update(_sums("dipole", dd, 3 * gmask.sum()))
        if terms.hessian_directions:
            sums.update(_hessian_sums(terms, graph, v, hv, df, modes, basis))
            if terms.dipole_derivative:
                sums.update(_dipole_derivative_sums(terms, dipole_fn, params, graph, v))
        return sums

    return fn


def _sums(term: str, error, count) -> dict:
    """``{term_sq, term_abs, n_term}``: summed squared and absolute errors and how many there are."""
    return {f"{term}_sq": (error**2).sum(), f"{term}_abs": jnp.abs(error).sum(), _COUNTS[term]: count}


def _hessian_sums(terms: Terms, graph, v, hv, df, modes, basis) -> dict:
    """Errors of ``H v`` (Cartesian or in normal modes) and of the Newton step of the force errors ``df``."""
    gmask, nmask = graph.globals["mask"], graph.nodes["mask"]
    # structures without a Hessian label (force data mixed in) do not count
    labelled = graph.globals.get("hessian_mask", gmask)
    hmask = nmask & labelled[graph_lib.node_graph_index(graph)]
    dh = jnp.where(hmask[None, :, None], hv - reference_hvp(graph, v), 0.0)
    k = terms.hessian_directions
    if terms.hessian_metric == "frequency":
        dw = modes_times(basis, graph, dh)  # (k, n_graph, W, 3), zero beyond each structure's modes
        n_modes = 3 * hmask.sum() - 6 * (gmask & labelled).sum()
        out = _sums("frequency", dw, k * jnp.maximum(n_modes, 0))
    else:
        out = _sums("hessian", dh, 3 * k * hmask.sum())
    if terms.displacement:
        dx = jnp.where(hmask[:, None], newton_step(graph, df, modes=modes), 0.0)
        out.update(_sums("displacement", dx, 3 * hmask.sum()))
    return out


def _dipole_derivative_sums(terms: Terms, dipole_fn, params, graph, v) -> dict:
    """Errors of ``(dμ/dx) v`` along the Hessian term's directions ``v``."""
    def mu(positions):
        return dipole_fn(params, physics.with_positions(graph, positions))

    _, push = jax.linearize(mu, graph.nodes["positions"])
    gmask = graph.globals["mask"]
    dmask = gmask & graph.globals.get("dipole_derivative_mask", gmask)
    dm = jnp.where(dmask[None, :, None], jax.vmap(push)(v) - reference_dipole_derivative(graph, v), 0.0)
    return _sums("dipole_derivative", dm, 3 * terms.hessian_directions * dmask.sum())


def _summed(errors, params, stacked, key):
    if stacked.n_node.shape[0] == 1:
        # one shard: skip the vmap, whose size-1 batch axis makes XLA's CPU scatters slower
        return errors(params, jax.tree_util.tree_map(lambda x: x[0], stacked), key)
    per_shard = jax.vmap(errors, in_axes=(None, 0, None))(params, stacked, key)
    return jax.tree_util.tree_map(lambda x: x.sum(0), per_shard)


def loss_fn(energy_fn, weights: LossWeights = LossWeights(), dipole_fn=None,
            hessian_directions_k: int = default("train.hessian_directions"),
            hessian_metric: str = default("train.hessian_metric")):
    """``(params, stacked_graph, key) -> (loss, metrics)``.

    ``dipole_fn`` is needed when ``weights.dipole > 0``; ``key`` seeds the
    ``hessian_directions_k`` random directions per structure of the Hessian
    term (used only when ``weights.hessian > 0``), measured by
    ``hessian_metric`` (:class:`Terms`; with ``"frequency"`` the weight is
    in 1/(cm⁻¹)²).
    """
    if (weights.dipole > 0 or weights.dipole_derivative > 0) and dipole_fn is None:
        raise ValueError("a dipole weight needs the model's dipole function (model.dipole)")
    if weights.dipole_derivative > 0 and weights.hessian <= 0:
        raise ValueError("the dipole-derivative term shares the Hessian term's directions: give a Hessian weight too")
    if weights.displacement > 0 and weights.hessian <= 0:
        raise ValueError("the displacement term needs the Hessian labels of the Hessian term: give a Hessian weight too")
    errors = _errors(energy_fn, Terms.of(weights, hessian_directions_k, hessian_metric), dipole_fn)

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
