"""NequIP (Batzner et al., Nat. Commun. 13, 2453 (2022)) as pure functions: its config and its factory."""

from __future__ import annotations

import dataclasses
import numbers
from typing import Optional

import e3nn_jax as e3nn
import jax
import jax.numpy as jnp
import jraph
import numpy as np

from equijax import graph as graph_lib
from equijax import kernels, layers
from equijax.config import default
from equijax.models.potential import Potential, check_species, species_index, total_energy


@dataclasses.dataclass(frozen=True)
class NequIPConfig:
    """Hyperparameters of a NequIP potential (hashable, JSON-serialisable).

    Defaults are those of the run-config schema's ``model`` section
    (:data:`equijax.config.SCHEMA`, ``equijax config``): one source.

    Attributes:
        species: atomic numbers the model knows, in embedding order.
        cutoff: neighbour cutoff in Å.
        l_max: highest rotation order of features and edge harmonics;
            0 gives the invariant baseline.
        parity: keep both parities (O(3) features) or only ``(-1)^l``.
        channels: multiplicity of every irrep of the hidden features.
        n_layers: interaction layers.
        n_radial: Bessel functions.
        radial_hidden: hidden sizes of the radial MLP.
        envelope_p: order of the polynomial cutoff envelope.
        avg_num_neighbours: average neighbour count N (set from data).
        message_normalization: the neighbour sum of messages is divided by
            ``sqrt(N)`` (``"sqrt"``, as NequIP does; the default) or by ``N``
            (``"mean"``, equijax 0.1). Recorded in model files, so models
            trained either way evaluate as trained.
        readout_hidden: scalar width of the readout's hidden layer.
        dtype: ``"float32"`` or ``"float64"``.
        members: 1 for one potential; K > 1 for a committee of K members of
            these hyperparameters, parameters stacked ``(K, ...)`` and energy
            the members' mean (:mod:`equijax.ensemble`).
        energy_shift, energy_scale: per-species atomic energy shift (eV) and
            scale (eV), ``E_i = scale[Z_i] * e_i + shift[Z_i]``; default 0 and 1.
        se3, irreps, self_connection, resnet, gate, activation_normalization,
        cutoff_function, cutoff_on, radial_frequencies, readout: the options
        that published NequIP-family models need (SevenNet's), each usable in
        any model; see the schema (``equijax config``). ``avg_num_neighbours``
        may also be one number per layer.
        backend: how message passing runs (:mod:`equijax.kernels`):
            ``"auto"`` (cuEquivariance's fused kernels on a GPU where they are
            installed, pure JAX elsewhere), ``"jax"`` or ``"cuequivariance"``.
            An execution choice only: parameters are the same for every
            backend, so a model trained with one runs with any other.
    """

    species: tuple = (1, 6, 7, 8)
    cutoff: float = default("model.cutoff")
    l_max: int = default("model.l_max")
    parity: bool = default("model.parity")
    channels: int = default("model.channels")
    n_layers: int = default("model.n_layers")
    n_radial: int = default("model.n_radial")
    radial_hidden: tuple = default("model.radial_hidden")
    envelope_p: int = default("model.envelope_p")
    avg_num_neighbours: float = 12.0  # the schema's null: from the training data; a model without data needs one
    message_normalization: str = default("model.message_normalization")
    readout_hidden: int = default("model.readout_hidden")
    dtype: str = default("model.dtype")
    energy_shift: Optional[tuple] = None
    energy_scale: Optional[tuple] = None
    members: int = 1
    se3: bool = default("model.se3")
    irreps: Optional[tuple] = None
    self_connection: str = default("model.self_connection")
    resnet: bool = default("model.resnet")
    gate: str = default("model.gate")
    activation_normalization: str = default("model.activation_normalization")
    cutoff_function: str = default("model.cutoff_function")
    cutoff_on: Optional[float] = None
    radial_frequencies: str = default("model.radial_frequencies")
    readout: str = default("model.readout")
    backend: str = default("model.backend")

    def __post_init__(self):
        _check(self)

    def replace(self, **kwargs) -> "NequIPConfig":
        return dataclasses.replace(self, **kwargs)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "NequIPConfig":
        """The config of a model file (or of ``to_dict``), type-checked.

        Raises:
            ValueError: an unknown key, or a value of the wrong type or range (named).
        """
        d = dict(d)
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}")
        for key in ("species", "radial_hidden", "energy_shift", "energy_scale", "irreps", "avg_num_neighbours"):
            if isinstance(d.get(key), (list, tuple)):
                d[key] = tuple(d[key])
        return cls(**d)

    @property
    def hidden_irreps(self) -> e3nn.Irreps:
        """The hidden irreps of every layer where ``irreps`` is not given."""
        irreps = []
        for l in range(self.l_max + 1):
            parities = (1,) if self.se3 else (1, -1) if self.parity else ((-1) ** l,)
            irreps += [(self.channels, (l, p)) for p in parities]
        return e3nn.Irreps(irreps)

    def layer_irreps(self) -> list:
        """Hidden irreps of each layer, (n_layers,)."""
        if self.irreps is None:
            return [self.hidden_irreps] * self.n_layers
        return [e3nn.Irreps(x) for x in self.irreps]

    def divisors(self) -> list:
        """What each layer divides its neighbour sum by: sqrt(N) or N, N per layer or shared."""
        n = self.avg_num_neighbours
        per_layer = list(n) if isinstance(n, tuple) else [n] * self.n_layers
        return [x ** (0.5 if self.message_normalization == "sqrt" else 1.0) for x in per_layer]


def _check(cfg: NequIPConfig) -> None:
    """Types and ranges of every field: the run-config schema's rules for the keys it shares, and the rest."""
    from equijax.config import SCHEMA, _check_value

    def integer(v, low):
        return isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= low

    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        if field.name in SCHEMA["model"] and not (field.name == "avg_num_neighbours" and isinstance(value, tuple)):
            _check_value(f"model.{field.name}", SCHEMA["model"][field.name],
                         list(value) if isinstance(value, tuple) else value)
    for name in ("l_max", "channels", "n_layers", "n_radial", "readout_hidden", "members", "envelope_p"):
        if not integer(getattr(cfg, name), 0 if name == "l_max" else 1):
            raise ValueError(f"model.{name} must be an integer >= {0 if name == 'l_max' else 1}, "
                             f"got {getattr(cfg, name)!r}")
    if not cfg.species or not all(integer(z, 1) and z <= 118 for z in cfg.species):
        raise ValueError(f"species must be atomic numbers (1-118), got {cfg.species!r}")
    def positive(v):
        return not isinstance(v, bool) and isinstance(v, numbers.Real) and v > 0

    if not positive(cfg.cutoff):
        raise ValueError(f"model.cutoff must be a positive number, got {cfg.cutoff!r}")
    n = cfg.avg_num_neighbours
    if not (positive(n) or isinstance(n, tuple) and len(n) == cfg.n_layers and all(map(positive, n))):
        raise ValueError(f"model.avg_num_neighbours must be a positive number or one per layer "
                         f"({cfg.n_layers}), got {n!r}")
    if cfg.irreps is not None:
        if not isinstance(cfg.irreps, tuple) or len(cfg.irreps) != cfg.n_layers:
            raise ValueError(f"model.irreps must give one irreps per layer ({cfg.n_layers}), got {cfg.irreps!r}")
        for x in cfg.irreps:
            try:
                e3nn.Irreps(x)
            except Exception:
                raise ValueError(f"model.irreps: {x!r} is not an irreps string such as '16x0e+16x1o'") from None
    if cfg.cutoff_function == "xplor" and not (positive(cfg.cutoff_on) and cfg.cutoff_on < cfg.cutoff):
        raise ValueError(f"model.cutoff_function=xplor needs 0 < model.cutoff_on < model.cutoff, got {cfg.cutoff_on!r}")
    for name in ("energy_shift", "energy_scale"):
        v = getattr(cfg, name)
        if v is not None and (len(v) != len(cfg.species) or not all(
                isinstance(x, numbers.Real) and not isinstance(x, bool) for x in v)):
            raise ValueError(f"{name} must be one number per species ({len(cfg.species)}), got {v!r}")


def nequip(config: NequIPConfig, interaction=None) -> Potential:
    """The NequIP potential (Batzner et al., Nat. Commun. 13, 2453 (2022)).

    Species embedding -> ``n_layers`` interactions (:func:`layers.conv`, or
    the block given as ``interaction``) -> readout of atomic energies from the
    even scalars -> per-species shift and scale -> sum per graph.

    Args:
        config: hyperparameters.
        interaction: optional replacement block, a pair ``(plan_fn, init_fn,
            apply_fn)`` with the signatures of :func:`layers.conv_plan`,
            :func:`layers.conv_init` and :func:`layers.conv`; this is how a
            researcher swaps in a new layer (see ``notebooks/``).

    With ``config.members = K > 1`` it returns the committee of K such
    potentials (:func:`equijax.ensemble.committee`).
    """
    if config.members != 1:
        from equijax import ensemble

        return ensemble.committee(nequip(config.replace(members=1), interaction), config.members)
    plan_fn, block_init, block_apply = interaction or (layers.conv_plan, layers.conv_init, layers.conv)
    if config.message_normalization not in ("sqrt", "mean"):
        raise ValueError(f"message_normalization must be 'sqrt' or 'mean', got {config.message_normalization!r}")
    divisors = config.divisors()  # what each layer divides the neighbour sum by (the blocks' argument)
    dtype = jnp.dtype(config.dtype)
    n_species = len(config.species)
    irreps_sh = layers.sh_irreps(config.l_max, config.se3)  # 0e + 1o + 2e + ..., or all even
    options = dict(backend=kernels.resolve(config.backend), self_connection=config.self_connection,
                   resnet=config.resnet, gate=config.gate, normalization=config.activation_normalization)
    plans = []
    irreps = e3nn.Irreps(f"{config.channels}x0e")
    for hidden in config.layer_irreps():
        plan = plan_fn(irreps, hidden, irreps_sh, config.channels, n_species,
                       config.n_radial, config.radial_hidden)
        if isinstance(plan, layers.ConvPlan):
            plan = layers.configure(plan, **options)
        plans.append(plan)
        irreps = plan.irreps_out
    final_irreps = irreps
    readout_irreps = e3nn.Irreps(f"{config.readout_hidden}x0e")
    trained_frequencies = config.radial_frequencies == "trained"
    act = layers.named_activation("silu", config.activation_normalization)

    shift = np.zeros(n_species) if config.energy_shift is None else np.asarray(config.energy_shift)
    scale = np.ones(n_species) if config.energy_scale is None else np.asarray(config.energy_scale)

    @jax.jit
    def init(key):
        keys = jax.random.split(key, config.n_layers + 3)
        params = {
            "embedding": jax.random.normal(keys[0], (n_species, config.channels), dtype),
            "layers": [block_init(k, p, dtype) for k, p in zip(keys[1:], plans)],
            "readout": {
                "hidden": layers.linear_init(keys[-2], final_irreps, readout_irreps, dtype),
                "out": layers.linear_init(keys[-1], readout_irreps, "0e", dtype),
            },
            "shift": jnp.asarray(shift, dtype),
            "scale": jnp.asarray(scale, dtype),
            "charges": {
                "hidden": layers.linear_init(jax.random.fold_in(keys[-2], 1), final_irreps, readout_irreps, dtype),
                "out": layers.linear_init(jax.random.fold_in(keys[-1], 1), readout_irreps, "0e", dtype),
            },
        }
        if trained_frequencies:
            params["radial_frequencies"] = jnp.arange(1, config.n_radial + 1, dtype=dtype) * np.pi / config.cutoff
        return params

    def features(params, graph: jraph.GraphsTuple):
        """Final node features (n_node, irreps) and species indices (n_node,)."""
        positions = graph.nodes["positions"].astype(dtype)
        vectors = graph_lib.edge_vectors(graph, positions, graph.globals["cell"].astype(dtype))
        n_node = positions.shape[0]
        edges = layers.embed_edges(
            vectors, graph.edges["mask"], graph.senders, graph.receivers, n_node,
            l_max=config.l_max, n_radial=config.n_radial, cutoff=config.cutoff,
            envelope_p=config.envelope_p, envelope=config.cutoff_function, cutoff_on=config.cutoff_on,
            frequencies=params["radial_frequencies"] if trained_frequencies else None, se3=config.se3,
        )
        check_species(config.species, graph)
        species = species_index(config.species, graph.nodes["atomic_numbers"])
        # padding nodes (Z = 0) take species 0; unknown real atoms are made NaN in atomic_energies
        species = jnp.where(graph.nodes["mask"], species, jnp.maximum(species, 0))
        h = e3nn.IrrepsArray(f"{config.channels}x0e", params["embedding"][jnp.maximum(species, 0)])
        for p, plan, divisor in zip(params["layers"], plans, divisors):
            h = block_apply(p, plan, h, species, edges, divisor)
        return h, species

    def readout(p, h):
        x = layers.linear(p["hidden"], h, readout_irreps)
        if config.readout == "mlp":
            x = e3nn.scalar_activation(x, [act], normalize_act=False)
        return layers.linear(p["out"], x, "0e").array[:, 0]

    def atomic_energies(params, graph: jraph.GraphsTuple) -> jax.Array:
        h, species = features(params, graph)
        e = readout(params["readout"], h)
        known = jnp.maximum(species, 0)
        e = params["scale"][known] * e + params["shift"][known]
        e = jnp.where(species < 0, jnp.nan, e)  # an element the model does not know: no silent guess
        return jnp.where(graph.nodes["mask"], e, 0.0)

    def charges(params, graph: jraph.GraphsTuple) -> jax.Array:
        h, _ = features(params, graph)
        mask = graph.nodes["mask"]
        q = jnp.where(mask, readout(params["charges"], h), 0.0)
        index = graph_lib.node_graph_index(graph)
        n_graph = graph.n_node.shape[0]
        target = graph.globals.get("charge", jnp.zeros(n_graph, q.dtype))
        count = jax.ops.segment_sum(mask.astype(q.dtype), index, num_segments=n_graph)
        excess = (jax.ops.segment_sum(q, index, num_segments=n_graph) - target) / jnp.maximum(count, 1)
        return jnp.where(mask, q - excess[index], 0.0)

    def dipole(params, graph: jraph.GraphsTuple) -> jax.Array:
        q = charges(params, graph)
        r = graph.nodes["positions"].astype(q.dtype)
        n_graph = graph.n_node.shape[0]
        return jax.ops.segment_sum(q[:, None] * r, graph_lib.node_graph_index(graph), num_segments=n_graph)

    def energy(params, graph: jraph.GraphsTuple) -> jax.Array:
        return total_energy(atomic_energies(params, graph), graph)

    return Potential(init=init, atomic_energies=atomic_energies, energy=energy, config=config,
                     charges=charges, dipole=dipole)
