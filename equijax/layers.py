"""Equivariant layers as pure functions on e3nn-jax ``IrrepsArray``s.

Every layer is a pair of functions, ``*_init(key, ...) -> params`` and
``*(params, ...) -> output``, whose static structure (irreps) is passed as
arguments; parameters are plain dicts of arrays. Weights are drawn N(0, 1) and
scaled by ``1/sqrt(fan_in)`` when applied, as e3nn does, so every layer keeps
unit-variance activations whatever its width.

Shapes: ``n`` is the leading (node or edge) axis, ``C`` the channel count.
"""

from __future__ import annotations

from typing import NamedTuple

import e3nn_jax as e3nn
import jax
import jax.numpy as jnp
import numpy as np

from equijax import kernels


# --------------------------------------------------------------- linear maps


def _groups(irreps: e3nn.Irreps) -> dict:
    """{irrep: total multiplicity} in order of first appearance."""
    out = {}
    for mul, ir in e3nn.Irreps(irreps):
        out[ir] = out.get(ir, 0) + mul
    return out


def linear_init(key, irreps_in, irreps_out, dtype=jnp.float32, n_species: int = 0) -> dict:
    """Weights of an equivariant linear map ``irreps_in -> irreps_out``.

    One (mul_in, mul_out) matrix per irrep present in both; with
    ``n_species > 0`` one such matrix per species, (n_species, mul_in, mul_out)
    (NequIP's self-connection, a tensor product with the one-hot species).
    """
    groups_in = _groups(irreps_in)
    params = {}
    for ir, mul_out in _groups(irreps_out).items():
        if ir in groups_in:
            key, sub = jax.random.split(key)
            shape = (groups_in[ir], mul_out)
            if n_species:
                shape = (n_species,) + shape
            params[str(ir)] = jax.random.normal(sub, shape, dtype)
    return params


def linear(params: dict, x: e3nn.IrrepsArray, irreps_out, species=None) -> e3nn.IrrepsArray:
    """Equivariant linear map, (n, irreps_in) -> (n, irreps_out).

    Irreps of ``irreps_out`` absent from the input come out as zeros. With
    ``species`` (n,) int, the weights are chosen per row (self-connection).
    """
    irreps_out = e3nn.Irreps(irreps_out)
    by_ir = {}
    for (mul, ir), chunk in zip(x.irreps, x.chunks):
        if chunk is None:
            chunk = jnp.zeros(x.shape[:-1] + (mul, ir.dim), x.dtype)
        by_ir.setdefault(ir, []).append(chunk)
    mixed = {}
    for ir in _groups(irreps_out):
        w = params.get(str(ir))
        if w is None:
            continue
        xin = jnp.concatenate(by_ir[ir], axis=-2)  # (n, mul_in, 2l+1)
        w = w / np.sqrt(w.shape[-2])
        if species is None:
            mixed[ir] = jnp.einsum("...ui,uv->...vi", xin, w)
        else:
            onehot = jax.nn.one_hot(species, w.shape[0], dtype=x.dtype)
            mixed[ir] = jnp.einsum("...s,...ui,suv->...vi", onehot, xin, w)
    return _assemble(mixed, irreps_out, x.shape[:-1], x.dtype)


def _assemble(mixed: dict, irreps_out: e3nn.Irreps, leading: tuple, dtype) -> e3nn.IrrepsArray:
    """``{irrep: (..., mul, 2l+1)}`` -> IrrepsArray of ``irreps_out``; absent irreps are zeros."""
    # an irrep may appear several times in irreps_out: hand out its rows in order
    out_chunks, used = [], {}
    for mul, ir in irreps_out:
        if ir not in mixed:
            out_chunks.append(None)
            continue
        start = used.get(ir, 0)
        out_chunks.append(mixed[ir][..., start : start + mul, :])
        used[ir] = start + mul
    return e3nn.from_chunks(irreps_out, out_chunks, leading, dtype)


def linear_paths(params: dict, plan: "ConvPlan", summed: jax.Array) -> e3nn.IrrepsArray:
    """:func:`linear` of ``linear_out`` applied to the summed messages as they come from the kernel.

    Args:
        summed: (n, irreps_tp.dim, C), the components of every path (channels last).

    Returns:
        (n, irreps_pre_gate), equal to ``linear(params, x, irreps_pre_gate)`` with
        ``x`` the same numbers as an IrrepsArray ``C x`` each path (same weights).

    The components are first put in order of output irrep by one static
    permutation of this node-sized array; each irrep is then one contiguous
    slice and one ``einsum``. Splitting ``summed`` into one IrrepsArray chunk
    per path instead made reverse mode assemble the cotangent from one padded
    piece per path (27 at l_max=2), which XLA re-evaluated inside the gather
    onto the edges: the largest single cost of a CPU force call.
    """
    order, groups = _path_groups(plan.irreps_tp)
    grouped = jnp.take(summed, order, axis=1)
    C = summed.shape[-1]
    mixed, start = {}, 0
    for ir, n_paths in groups:
        block = grouped[:, start : start + n_paths * ir.dim, :].reshape(-1, n_paths, ir.dim, C)
        start += n_paths * ir.dim
        w = params.get(str(ir))
        if w is None:
            continue
        w = (w / np.sqrt(w.shape[-2])).reshape(n_paths, C, w.shape[-1])
        mixed[ir] = jnp.einsum("npic,pcv->nvi", block, w)
    return _assemble(mixed, plan.irreps_pre_gate, summed.shape[:1], summed.dtype)


def _path_groups(irreps_tp: e3nn.Irreps):
    """Static permutation of tensor-product components into groups by irrep (first-appearance order)."""
    slices = irreps_tp.slices()
    by_ir = {}
    for sl, (_, ir) in zip(slices, irreps_tp):
        by_ir.setdefault(ir, []).append(np.arange(sl.start, sl.stop))
    order = np.concatenate([np.concatenate(v) for v in by_ir.values()])
    return order, [(ir, len(v)) for ir, v in by_ir.items()]


def mlp_init(key, sizes, dtype=jnp.float32) -> list:
    """Weights of a bias-free MLP with layer sizes ``sizes`` (input first)."""
    keys = jax.random.split(key, len(sizes) - 1)
    return [jax.random.normal(k, (a, b), dtype) for k, a, b in zip(keys, sizes[:-1], sizes[1:])]


def mlp(params: list, x: jax.Array, activation=jax.nn.silu) -> jax.Array:
    """(n, sizes[0]) -> (n, sizes[-1]); no biases, so ``mlp(0) == 0``."""
    act = e3nn.normalize_function(activation)
    for i, w in enumerate(params):
        x = x @ (w / np.sqrt(w.shape[0]))
        if i < len(params) - 1:
            x = act(x)
    return x


# ---------------------------------------------------------- edge embedding


class Edges(NamedTuple):
    """What every interaction layer needs to know about the edges.

    Attributes:
        sh: (n_edge, irreps_sh) spherical harmonics of the unit edge vector.
        radial: (n_edge, n_radial) radial basis times the cutoff envelope;
            zero on padding edges and beyond the cutoff.
        senders, receivers: (n_edge,) node indices.
        n_node: number of (padded) nodes, for the scatter.
    """

    sh: e3nn.IrrepsArray
    radial: jax.Array
    senders: jax.Array
    receivers: jax.Array
    n_node: int


def radial_basis(r: jax.Array, n_radial: int, cutoff: float, envelope_p: int = 6) -> jax.Array:
    """(n_edge,) distances -> (n_edge, n_radial) Bessel basis × envelope.

    ``sqrt(2/c) sin(n π r / c) / r`` times NequIP's polynomial envelope of
    order ``p`` (smooth, with two vanishing derivatives at ``c``), and exact
    zeros beyond the cutoff.
    """
    envelope = e3nn.poly_envelope(envelope_p - 1, 2)(r / cutoff)
    inside = r < cutoff
    basis = e3nn.bessel(r, n_radial, cutoff) * jnp.where(inside, envelope, 0.0)[:, None]
    return basis


def embed_edges(vectors, mask, senders, receivers, n_node, *, l_max, n_radial, cutoff, envelope_p=6) -> Edges:
    """Spherical harmonics and radial basis, computed once for all layers.

    Padding edges get a harmless stand-in vector of length ``2 * cutoff``
    so that no NaN can arise (not even in gradients) and their radial basis
    is exactly zero.
    """
    stand_in = jnp.zeros_like(vectors).at[:, 0].set(2.0 * cutoff)
    vectors = jnp.where(mask[:, None], vectors, stand_in)
    r = jnp.linalg.norm(vectors, axis=-1)
    sh = e3nn.spherical_harmonics(
        e3nn.Irreps.spherical_harmonics(l_max), vectors, normalize=True, normalization="component"
    )
    radial = radial_basis(r, n_radial, cutoff, envelope_p) * mask[:, None]
    return Edges(sh, radial, senders, receivers, n_node)


# ------------------------------------------------------- NequIP interaction


class ConvPlan(NamedTuple):
    """Static structure of one interaction: irreps and tensor-product paths.

    Channels ride on their own axis during the tensor product: node features
    ``(n, C·irreps)`` become ``(n, C, dim)`` with one copy of each irrep.
    ``coupling[i]`` is the Clebsch-Gordan block of input irrep ``i``:
    ``(sh.dim, 2l_i+1, K_i)`` maps (harmonic, input component) to the
    components of every output path that irrep feeds.
    """

    irreps_in: e3nn.Irreps
    irreps_out: e3nn.Irreps  # after the gate
    irreps_pre_gate: e3nn.Irreps
    irreps_tp: e3nn.Irreps  # one 1x irrep per path
    channels: int
    n_paths: int
    coupling: tuple  # of np.ndarray, one per input irrep
    species_count: int
    radial_sizes: tuple
    irreps_sh: e3nn.Irreps = None
    backend: str = "jax"  # message passing, see equijax.kernels; the model sets it


def conv_plan(irreps_in, hidden_irreps, irreps_sh, channels, n_species, n_radial, radial_hidden) -> ConvPlan:
    """Work out the paths of a NequIP interaction (host side, once)."""
    irreps_in = e3nn.Irreps(irreps_in)
    irreps_sh = e3nn.Irreps(irreps_sh)
    allowed = {ir for _, ir in e3nn.Irreps(hidden_irreps)}
    paths, coupling = [], []
    for _, ir1 in irreps_in:
        blocks = []
        for sh_slice, (_, ir2) in zip(irreps_sh.slices(), irreps_sh):
            for ir3 in ir1 * ir2:
                if ir3 not in allowed:
                    continue
                cg = np.asarray(e3nn.clebsch_gordan(ir1.l, ir2.l, ir3.l)) * np.sqrt(ir3.dim)
                block = np.zeros((irreps_sh.dim, ir1.dim, ir3.dim))
                block[sh_slice] = np.transpose(cg, (1, 0, 2))
                blocks.append(block)
                paths.append(ir3)
        coupling.append(np.concatenate(blocks, axis=-1) if blocks else np.zeros((irreps_sh.dim, ir1.dim, 0)))
    irreps_tp = e3nn.Irreps([(1, ir) for ir in paths])
    reached = set(paths)
    hidden = e3nn.Irreps(hidden_irreps)
    scalars = [(mul, ir) for mul, ir in hidden if ir.l == 0 and ir in reached]
    gated = [(mul, ir) for mul, ir in hidden if ir.l > 0 and ir in reached]
    n_gates = sum(mul for mul, _ in gated)
    gates = [(n_gates, "0e")] if n_gates else []
    return ConvPlan(
        irreps_in=irreps_in,
        irreps_out=e3nn.Irreps(scalars + gated),
        irreps_pre_gate=e3nn.Irreps(scalars + gates + gated),
        irreps_tp=irreps_tp,
        channels=channels,
        n_paths=len(paths),
        coupling=tuple(coupling),
        species_count=n_species,
        radial_sizes=(n_radial,) + tuple(radial_hidden) + (len(paths) * channels,),
        irreps_sh=irreps_sh,
    )


def conv_init(key, plan: ConvPlan, dtype=jnp.float32) -> dict:
    k1, k2, k3, k4 = jax.random.split(key, 4)
    tp_channels = e3nn.Irreps([(plan.channels * mul, ir) for mul, ir in plan.irreps_tp])
    return {
        "linear_in": linear_init(k1, plan.irreps_in, plan.irreps_in, dtype),
        "radial": mlp_init(k2, plan.radial_sizes, dtype),
        "linear_out": linear_init(k3, tp_channels, plan.irreps_pre_gate, dtype),
        "self": linear_init(k4, plan.irreps_in, plan.irreps_pre_gate, dtype, plan.species_count),
    }


def conv(params: dict, plan: ConvPlan, h: e3nn.IrrepsArray, species, edges: Edges, avg_num_neighbours: float) -> e3nn.IrrepsArray:
    """One NequIP interaction, (n_node, irreps_in) -> (n_node, irreps_out).

    Channels are mixed on the nodes, gathered onto the edges, coupled
    channel-wise ("uvu") with the edge harmonics, each path weighted per edge
    and channel by a radial MLP, summed over neighbours, divided by
    ``avg_num_neighbours`` (the model passes its normaliser: the square root
    of the average neighbour count by default, as NequIP), mixed again, added to a species-dependent
    self-connection and passed through a gate. Residual when the irreps of
    input and output agree.
    """
    C = plan.channels
    x = linear(params["linear_in"], h, plan.irreps_in)
    x = jnp.swapaxes(x.mul_to_axis(C).array, 1, 2)  # (n_node, dim per channel, C)
    weights = mlp(params["radial"], edges.radial).reshape(-1, plan.n_paths, C)
    summed = kernels.message_passing(plan, x, edges.sh.array, weights, edges.senders, edges.receivers,
                                     edges.n_node, plan.backend)
    out = linear_paths(params["linear_out"], plan, summed / avg_num_neighbours)
    out = out + linear(params["self"], h, plan.irreps_pre_gate, species)
    out = e3nn.gate(out, even_act=jax.nn.silu, odd_act=jnp.tanh, even_gate_act=jax.nn.sigmoid, odd_gate_act=jnp.tanh)
    if plan.irreps_out == plan.irreps_in:
        out = out + h
    return out
