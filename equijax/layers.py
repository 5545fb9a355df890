"""Equivariant layers as pure functions on e3nn-jax ``IrrepsArray``s.

Every layer is a pair of functions, ``*_init(key, ...) -> params`` and
``*(params, ...) -> output``, whose static structure (irreps) is passed as
arguments; parameters are plain dicts of arrays. Weights are drawn N(0, 1) and
scaled by ``1/sqrt(fan_in)`` when applied, as e3nn does, so every layer keeps
unit-variance activations whatever its width.

Shapes: ``n`` is the leading (node or edge) axis, ``C`` the channel count.
"""

from __future__ import annotations

import functools
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


ACTIVATIONS = {"silu": jax.nn.silu, "tanh": jnp.tanh, "sigmoid": jax.nn.sigmoid}

# e3nn (PyTorch)'s normalize2mom: 1 / sqrt(mean f(z)^2) over z = torch.randn(1_000_000) from a generator seeded
# with 0, in float64. A Monte-Carlo estimate, off the exact value (e3nn-jax's quadrature) by up to ~1e-3, so a
# model trained with e3nn (SevenNet, nequip) is reproduced only with these. Written by
# experiments/e3nn_torch_constants.py; tests/test_imports.py recomputes them where torch is installed.
E3NN_TORCH_CONSTANTS = {
    "silu": 1.6791767923989418,
    "tanh": 1.5937334472592695,
    "sigmoid": 1.8467055342154763,
}


def normalized(activation):
    """``activation / c``, with ``c`` its root mean square under N(0, 1): e3nn's normalisation.

    e3nn-jax computes ``c`` on a million-point quadrature at every call (about
    50 ms, on the host, while a model is traced); this computes it once per
    function and precision, with the same numbers.
    """
    return _normalized(activation, bool(jax.config.jax_enable_x64))


@functools.lru_cache(maxsize=None)
def _normalized(activation, x64: bool):
    return e3nn.normalize_function(activation)  # the quadrature's dtype, hence c's last digits, follows x64


@functools.lru_cache(maxsize=None)
def named_activation(name: str, normalization: str = "e3nn-jax"):
    """The activation ``name`` (a key of :data:`ACTIVATIONS`) scaled to unit second moment.

    ``normalization`` is ``"e3nn-jax"`` (:func:`normalized`) or
    ``"e3nn-torch"`` (the constants of :data:`E3NN_TORCH_CONSTANTS`).
    """
    f = ACTIVATIONS[name]
    if normalization == "e3nn-jax":
        return normalized(f)
    if normalization == "e3nn-torch":
        c = E3NN_TORCH_CONSTANTS[name]
        return lambda x: f(x) * c
    raise ValueError(f"activation normalization must be 'e3nn-jax' or 'e3nn-torch', got {normalization!r}")


def gate(x: e3nn.IrrepsArray, even_gate: str = "sigmoid", normalization: str = "e3nn-jax") -> e3nn.IrrepsArray:
    """NequIP's gate: SiLU on the even scalars, tanh on the odd; even gates by ``even_gate``, odd by tanh.

    Input: scalars, then one gate per non-scalar irrep, then the non-scalars
    (the irreps :func:`conv_plan` calls ``irreps_pre_gate``).
    """
    act = functools.partial(named_activation, normalization=normalization)
    return e3nn.gate(x, even_act=act("silu"), odd_act=act("tanh"), even_gate_act=act(even_gate),
                     odd_gate_act=act("tanh"), normalize_act=False)


def mlp_init(key, sizes, dtype=jnp.float32) -> list:
    """Weights of a bias-free MLP with layer sizes ``sizes`` (input first)."""
    keys = jax.random.split(key, len(sizes) - 1)
    return [jax.random.normal(k, (a, b), dtype) for k, a, b in zip(keys, sizes[:-1], sizes[1:])]


def mlp(params: list, x: jax.Array, activation=jax.nn.silu, normalization: str = "e3nn-jax") -> jax.Array:
    """(n, sizes[0]) -> (n, sizes[-1]); no biases, so ``mlp(0) == 0``.

    ``activation`` is a function, normalised as e3nn-jax does, or a name of
    :data:`ACTIVATIONS` with the given ``normalization``.
    """
    act = named_activation(activation, normalization) if isinstance(activation, str) else normalized(activation)
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


def radial_basis(r: jax.Array, n_radial: int, cutoff: float, envelope_p: int = 6, *, envelope: str = "polynomial",
                 cutoff_on=None, frequencies=None) -> jax.Array:
    """(n_edge,) distances -> (n_edge, n_radial) Bessel basis × envelope.

    ``sqrt(2/c) sin(w_n r) / r`` with ``w_n = n π / c``, or the given
    ``frequencies`` (n_radial,) where they are trained, times the envelope,
    and exact zeros beyond the cutoff. Envelopes: NequIP's polynomial of
    order ``p`` (two vanishing derivatives at ``c``), or XPLOR's switch, 1 below
    ``cutoff_on`` and ``(c² - r²)² (c² + 2r² - 3r_on²) / (c² - r_on²)³`` above
    (SevenNet).
    """
    inside = r < cutoff
    if envelope == "polynomial":
        env = e3nn.poly_envelope(envelope_p - 1, 2)(r / cutoff)
    elif envelope == "xplor":
        r2, on2, c2 = r * r, cutoff_on * cutoff_on, cutoff * cutoff
        env = jnp.where(r < cutoff_on, 1.0, (c2 - r2) ** 2 * (c2 + 2 * r2 - 3 * on2) / (c2 - on2) ** 3)
    else:
        raise ValueError(f"envelope must be 'polynomial' or 'xplor', got {envelope!r}")
    if frequencies is None:
        basis = e3nn.bessel(r, n_radial, cutoff)
    else:
        basis = np.sqrt(2.0 / cutoff) * jnp.sin(frequencies * r[:, None]) / r[:, None]
    return basis * jnp.where(inside, env, 0.0)[:, None]


def embed_edges(vectors, mask, senders, receivers, n_node, *, l_max, n_radial, cutoff, envelope_p=6,
                envelope="polynomial", cutoff_on=None, frequencies=None, se3=False) -> Edges:
    """Spherical harmonics and radial basis, computed once for all layers.

    Padding edges get a harmless stand-in vector of length ``2 * cutoff``
    so that no NaN can arise (not even in gradients) and their radial basis
    is exactly zero. With ``se3`` the harmonics are labelled even (``1e``,
    ...): the same numbers, for models without parity. The radial options
    are those of :func:`radial_basis`.
    """
    stand_in = jnp.zeros_like(vectors).at[:, 0].set(2.0 * cutoff)
    vectors = jnp.where(mask[:, None], vectors, stand_in)
    r = jnp.linalg.norm(vectors, axis=-1)
    sh = e3nn.spherical_harmonics(
        e3nn.Irreps.spherical_harmonics(l_max), vectors, normalize=True, normalization="component"
    )
    if se3:
        sh = e3nn.IrrepsArray(sh_irreps(l_max, se3=True), sh.array)
    radial = radial_basis(r, n_radial, cutoff, envelope_p, envelope=envelope, cutoff_on=cutoff_on,
                          frequencies=frequencies) * mask[:, None]
    return Edges(sh, radial, senders, receivers, n_node)


def sh_irreps(l_max: int, se3: bool = False) -> e3nn.Irreps:
    """Irreps of the edge harmonics: ``0e + 1o + 2e + ...``, or all even with ``se3``."""
    if se3:
        return e3nn.Irreps([(1, (l, 1)) for l in range(l_max + 1)])
    return e3nn.Irreps.spherical_harmonics(l_max)


# ------------------------------------------------------- NequIP interaction


class ConvPlan(NamedTuple):
    """Static structure of one interaction: irreps, tensor-product paths and options.

    Channels ride on their own axis during the tensor product: node features
    ``(n, C·irreps)`` become ``(n, C, dim)`` with one copy of each irrep.
    ``coupling[i]`` is the Clebsch-Gordan block of input irrep ``i``:
    ``(sh.dim, 2l_i+1, K_i)`` maps (harmonic, input component) to the
    components of every output path that irrep feeds.

    Where the input irreps have different multiplicities (``128x0e+64x1e``),
    ``groups`` holds one such plan per input irrep, each with its own ``C``,
    and the paths are those of the groups in order.
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
    groups: tuple = ()  # of ConvPlan, one per input irrep, where multiplicities differ
    # options the model sets (NequIPConfig): see nequip()
    self_connection: str = "species"
    resnet: bool = True
    gate: str = "sigmoid"
    normalization: str = "e3nn-jax"

    @property
    def path_channels(self) -> tuple:
        """Channels of each path, (n_paths,)."""
        if self.groups:
            return tuple(c for g in self.groups for c in g.path_channels)
        return (self.channels,) * self.n_paths


def configure(plan: ConvPlan, **options) -> ConvPlan:
    """``plan`` with the given fields replaced, in its groups too."""
    return plan._replace(groups=tuple(configure(g, **options) for g in plan.groups), **options)


def conv_plan(irreps_in, hidden_irreps, irreps_sh, channels, n_species, n_radial, radial_hidden) -> ConvPlan:
    """Work out the paths of a NequIP interaction (host side, once).

    ``channels`` is the multiplicity of the input irreps where they all share
    one; otherwise the plan has ``groups``.
    """
    irreps_in = e3nn.Irreps(irreps_in)
    irreps_sh = e3nn.Irreps(irreps_sh)
    if len({mul for mul, _ in irreps_in}) > 1:
        return _grouped_plan(irreps_in, hidden_irreps, irreps_sh, n_species, n_radial, radial_hidden)
    if len(irreps_in):
        channels = irreps_in[0].mul
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
    return _with_outputs(ConvPlan(
        irreps_in=irreps_in, irreps_out=None, irreps_pre_gate=None,
        irreps_tp=e3nn.Irreps([(1, ir) for ir in paths]), channels=channels, n_paths=len(paths),
        coupling=tuple(coupling), species_count=n_species, radial_sizes=(n_radial,) + tuple(radial_hidden),
        irreps_sh=irreps_sh,
    ), hidden_irreps)


def _grouped_plan(irreps_in, hidden_irreps, irreps_sh, n_species, n_radial, radial_hidden) -> ConvPlan:
    groups = tuple(conv_plan(e3nn.Irreps([(mul, ir)]), hidden_irreps, irreps_sh, mul, n_species, n_radial,
                             radial_hidden) for mul, ir in irreps_in)
    return _with_outputs(ConvPlan(
        irreps_in=irreps_in, irreps_out=None, irreps_pre_gate=None,
        irreps_tp=sum((g.irreps_tp for g in groups), e3nn.Irreps([])), channels=max(g.channels for g in groups),
        n_paths=sum(g.n_paths for g in groups), coupling=(), species_count=n_species,
        radial_sizes=(n_radial,) + tuple(radial_hidden), irreps_sh=irreps_sh, groups=groups,
    ), hidden_irreps)


def _with_outputs(plan: ConvPlan, hidden_irreps) -> ConvPlan:
    """The output irreps (those of ``hidden_irreps`` that some path reaches) and the radial MLP's width."""
    reached = {ir for _, ir in plan.irreps_tp}
    hidden = e3nn.Irreps(hidden_irreps)
    scalars = [(mul, ir) for mul, ir in hidden if ir.l == 0 and ir in reached]
    gated = [(mul, ir) for mul, ir in hidden if ir.l > 0 and ir in reached]
    n_gates = sum(mul for mul, _ in gated)
    gates = [(n_gates, "0e")] if n_gates else []
    plan = plan._replace(irreps_out=e3nn.Irreps(scalars + gated), irreps_pre_gate=e3nn.Irreps(scalars + gates + gated))
    return plan._replace(radial_sizes=plan.radial_sizes + (sum(plan.path_channels),))


def conv_init(key, plan: ConvPlan, dtype=jnp.float32) -> dict:
    k1, k2, k3, k4 = jax.random.split(key, 4)
    tp_channels = e3nn.Irreps([(c, ir) for c, (_, ir) in zip(plan.path_channels, plan.irreps_tp)])
    per_species = plan.species_count if plan.self_connection == "species" else 0
    return {
        "linear_in": linear_init(k1, plan.irreps_in, plan.irreps_in, dtype),
        "radial": mlp_init(k2, plan.radial_sizes, dtype),
        "linear_out": linear_init(k3, tp_channels, plan.irreps_pre_gate, dtype),
        "self": linear_init(k4, plan.irreps_in, plan.irreps_pre_gate, dtype, per_species),
    }


def conv(params: dict, plan: ConvPlan, h: e3nn.IrrepsArray, species, edges: Edges, avg_num_neighbours: float) -> e3nn.IrrepsArray:
    """One NequIP interaction, (n_node, irreps_in) -> (n_node, irreps_out).

    Channels are mixed on the nodes, gathered onto the edges, coupled
    channel-wise ("uvu") with the edge harmonics, each path weighted per edge
    and channel by a radial MLP, summed over neighbours, divided by
    ``avg_num_neighbours`` (the model passes its normaliser: the square root
    of the average neighbour count by default, as NequIP), mixed again, added to a self-connection
    (per species, or one linear map: ``plan.self_connection``) and passed through a gate.
    Residual when the irreps of input and output agree (``plan.resnet``).
    """
    x = linear(params["linear_in"], h, plan.irreps_in)
    weights = mlp(params["radial"], edges.radial, "silu", plan.normalization)
    if plan.groups:
        out = linear_groups(params["linear_out"], plan, _group_messages(plan, x, weights, edges, avg_num_neighbours))
    else:
        C = plan.channels
        x = jnp.swapaxes(x.mul_to_axis(C).array, 1, 2)  # (n_node, dim per channel, C)
        summed = kernels.message_passing(plan, x, edges.sh.array, weights.reshape(-1, plan.n_paths, C),
                                         edges.senders, edges.receivers, edges.n_node, plan.backend)
        out = linear_paths(params["linear_out"], plan, summed / avg_num_neighbours)
    per_species = species if plan.self_connection == "species" else None
    out = out + linear(params["self"], h, plan.irreps_pre_gate, per_species)
    out = gate(out, plan.gate, plan.normalization)
    if plan.resnet and plan.irreps_out == plan.irreps_in:
        out = out + h
    return out


def _group_messages(plan: ConvPlan, x: e3nn.IrrepsArray, weights, edges: Edges, divisor) -> list:
    """Summed messages of each group, [(n_node, K_i, C_i)]: one message passing per input irrep."""
    out, start = [], 0
    for g, chunk, (mul, ir) in zip(plan.groups, x.chunks, x.irreps):
        if g.n_paths == 0:  # this irrep reaches no output (a pseudoscalar under a scalar-only layer)
            out.append(jnp.zeros((edges.n_node, 0, g.channels), x.dtype))
            continue
        width = g.n_paths * g.channels
        w = weights[:, start : start + width].reshape(-1, g.n_paths, g.channels)
        start += width
        if chunk is None:
            chunk = jnp.zeros(x.shape[:-1] + (mul, ir.dim), x.dtype)
        summed = kernels.message_passing(g, jnp.swapaxes(chunk, 1, 2), edges.sh.array, w, edges.senders,
                                         edges.receivers, edges.n_node, g.backend)
        out.append(summed / divisor)
    return out


def linear_groups(params: dict, plan: ConvPlan, summed: list) -> e3nn.IrrepsArray:
    """:func:`linear_paths` for a plan with groups: ``summed[i]`` (n, K_i, C_i) are group i's paths.

    The input of each output irrep is every path of that irrep, groups in
    order and paths in order within a group: the layout of e3nn's ``Linear``
    after a tensor product whose paths are sorted by irrep.
    """
    by_ir = {}
    for g, s in zip(plan.groups, summed):
        for sl, (_, ir) in zip(g.irreps_tp.slices(), g.irreps_tp):
            by_ir.setdefault(ir, []).append(jnp.swapaxes(s[:, sl, :], 1, 2))  # (n, C_i, 2l+1)
    mixed = {}
    for ir, blocks in by_ir.items():
        w = params.get(str(ir))
        if w is not None:
            x = jnp.concatenate(blocks, axis=1)
            mixed[ir] = jnp.einsum("nui,uv->nvi", x, w / np.sqrt(w.shape[-2]))
    return _assemble(mixed, plan.irreps_pre_gate, summed[0].shape[:1], summed[0].dtype)
