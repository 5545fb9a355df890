"""SevenNet checkpoints as equijax models: the NequIP interaction with SevenNet's options, same numbers.

SevenNet (Park et al., J. Chem. Theory Comput. 20, 4857 (2024)) is NequIP
built on e3nn (PyTorch). Its checkpoints hold a ``config`` dict and a
``model_state_dict`` of e3nn weights; this module maps both onto a
:class:`~equijax.models.NequIPConfig` with the options SevenNet needs and onto
the parameter tree of :func:`~equijax.models.nequip`. The weights are read by
:mod:`equijax.imports.torchzip`, which runs nothing in the file.

Where e3nn and equijax scale differently, the factor is folded into the
weights here (exact up to rounding): e3nn's linear map of a one-hot becomes the
embedding table, SevenNet's ``2/c`` Bessel prefactor (equijax's is
``sqrt(2/c)``) goes into each radial MLP's first layer.
"""

from __future__ import annotations

import numpy as np
import e3nn_jax as e3nn

# names sevenn itself resolves (sevenn.util.pretrained_name_to_path) -> the file inside the installed package
PRETRAINED = {
    "7net-0": "SevenNet_0__11Jul2024/checkpoint_sevennet_0.pth",
    "7net-0_22may2024": "SevenNet_0__22May2024/checkpoint_sevennet_0.pth",
    "7net-l3i5": "SevenNet_l3i5/checkpoint_l3i5.pth",
    "7net-mf-0": "SevenNet_MF_0/checkpoint_sevennet_mf_0.pth",
}


def e3nn_linear(flat: np.ndarray, irreps_in, irreps_out) -> dict:
    """The weights of e3nn's ``o3.Linear(irreps_in, irreps_out)`` as :func:`equijax.layers.linear` holds them.

    e3nn keeps one flat vector: a ``(mul_in, mul_out)`` block for every pair of
    input and output entries of the same irrep, input entries outer. equijax
    keeps one ``(Σ mul_in, Σ mul_out)`` matrix per irrep, entries in order.
    Both divide by ``sqrt(Σ mul_in)``.
    """
    irreps_in, irreps_out = e3nn.Irreps(irreps_in), e3nn.Irreps(irreps_out)
    blocks, start = {}, 0
    for i, (mul_in, ir_in) in enumerate(irreps_in):
        for j, (mul_out, ir_out) in enumerate(irreps_out):
            if ir_in == ir_out:
                size = mul_in * mul_out
                blocks[i, j] = flat[start : start + size].reshape(mul_in, mul_out)
                start += size
    if start != flat.size:
        raise ValueError(f"a linear map {irreps_in} -> {irreps_out} has {start} weights, the file {flat.size}")
    out = {}
    for ir in dict.fromkeys(ir for _, ir in irreps_out):
        rows = [i for i, (_, x) in enumerate(irreps_in) if x == ir]
        cols = [j for j, (_, x) in enumerate(irreps_out) if x == ir]
        if rows:
            out[str(ir)] = np.block([[blocks[i, j] for j in cols] for i in rows])
    return out


def gate_irreps(irreps_out) -> e3nn.Irreps:
    """The input of e3nn's ``Gate`` for outputs ``irreps_out``: scalars, one even gate per non-scalar, non-scalars,
    sorted by irrep and merged (as e3nn's ``Gate.irreps_in``)."""
    irreps_out = e3nn.Irreps(irreps_out)
    scalars = [(m, ir) for m, ir in irreps_out if ir.l == 0]
    gated = [(m, ir) for m, ir in irreps_out if ir.l > 0]
    gates = [(m, "0e") for m, _ in gated]
    return e3nn.Irreps(scalars + gates + gated).sort().irreps.simplify()


def tp_paths(irreps_x, irreps_sh, irreps_out) -> e3nn.Irreps:
    """SevenNet's convolution output: a ``uvu`` path for every (input, harmonic, output) allowed, sorted by irrep."""
    allowed = {ir for _, ir in e3nn.Irreps(irreps_out)}
    paths = [(mul, ir3) for mul, ir1 in e3nn.Irreps(irreps_x) for _, ir2 in e3nn.Irreps(irreps_sh)
             for ir3 in ir1 * ir2 if ir3 in allowed]
    return e3nn.Irreps(paths).sort().irreps


def path_signs(sd: dict, t: int, irreps_x, irreps_sh, irreps_out) -> np.ndarray:
    """±1 per radial weight of layer ``t``: the checkpoint's Wigner-3j signs against e3nn-jax's.

    e3nn (PyTorch) stores the Wigner-3j blocks it used in training
    (``_w3j_l1_l2_l3``); e3nn's later versions, and e3nn-jax, flip the sign of
    some with ``l1 + l2 + l3`` odd. A flip of a path is a flip of its radial
    weights, so it goes there (exact). Any other difference is refused.
    """
    prefix = f"{t}_convolution.convolution._compiled_main_left_right._w3j_"
    signs = []
    allowed = {ir for _, ir in e3nn.Irreps(irreps_out)}
    for mul, ir1 in e3nn.Irreps(irreps_x):
        for _, ir2 in e3nn.Irreps(irreps_sh):
            for ir3 in ir1 * ir2:
                if ir3 not in allowed:
                    continue
                stored = sd.get(f"{prefix}{ir1.l}_{ir2.l}_{ir3.l}")
                sign = 1.0
                if stored is not None:
                    cg = np.asarray(e3nn.clebsch_gordan(ir1.l, ir2.l, ir3.l))
                    sign = 1.0 if np.sum(stored * cg) > 0 else -1.0
                    if np.max(np.abs(stored - sign * cg)) > 1e-5:
                        raise ValueError(f"layer {t}: the stored Wigner-3j block ({ir1.l}, {ir2.l}, {ir3.l}) is "
                                         "not e3nn-jax's up to a sign")
                signs += [sign] * mul
    return np.asarray(signs)


def _supported(cfg: dict) -> None:
    """Refuse what this reader does not reproduce, naming the key."""
    if not cfg.get("_normalize_sph"):
        raise ValueError("this SevenNet checkpoint uses unnormalised edge harmonics (_normalize_sph: false, "
                         "SevenNet-0 of 22May2024), which equijax does not reproduce yet")
    wanted = {"interaction_type": "nequip", "self_connection_type": "linear", "use_bias_in_linear": False,
              "readout_as_fcn": False, "_normalize_sph": True, "act_radial": "silu",
              "act_scalar": {"e": "silu", "o": "tanh"}}
    for key, value in wanted.items():
        if cfg.get(key, value) != value:
            raise ValueError(f"SevenNet option {key}={cfg[key]!r} is not supported yet (supported: {value!r})")
    if cfg["radial_basis"]["radial_basis_name"] != "bessel":
        raise ValueError(f"SevenNet radial basis {cfg['radial_basis']['radial_basis_name']!r} is not supported")
    if cfg["act_gate"].get("e") not in ("silu", "sigmoid") or cfg["act_gate"].get("o", "tanh") != "tanh":
        raise ValueError(f"SevenNet gate activations {cfg['act_gate']!r} are not supported")
    if not cfg.get("irreps_manual"):
        raise ValueError("SevenNet checkpoints without irreps_manual are not supported yet")


def convert(checkpoint: dict, dtype: str = "float64"):
    """A SevenNet checkpoint (as :func:`equijax.imports.torchzip.load` reads it) -> (config, params).

    Args:
        checkpoint: ``{"config": ..., "model_state_dict": ...}``.
        dtype: precision of the equijax model (``"float64"`` reproduces
            SevenNet run in float64; its own calculator runs float32).

    Returns:
        ``(NequIPConfig, params)``; the charge head, which SevenNet lacks, is
        drawn at random as a new model's is (untrained).
    """
    import jax

    from equijax.models import NequIPConfig, nequip

    cfg, sd = checkpoint["config"], checkpoint["model_state_dict"]
    _supported(cfg)
    if "0_convolution.denominator" not in sd:
        raise ValueError("this SevenNet checkpoint uses the module names of sevenn before 0.9 "
                         "(e.g. '0 convolution'), which equijax does not read yet")
    type_map = {int(z): int(i) for z, i in cfg["_type_map"].items()}
    species = tuple(sorted(type_map, key=type_map.get))
    manual = [e3nn.Irreps(x) for x in cfg["irreps_manual"]]
    n_layers = int(cfg["num_convolution_layer"])
    cutoff = float(cfg["cutoff"])
    l_max = int(cfg["lmax_edge"]) if int(cfg.get("lmax_edge", -1)) > 0 else int(cfg["lmax"])
    se3 = not cfg["is_parity"]
    envelope = cfg["cutoff_function"]
    denominators = tuple(float(sd[f"{t}_convolution.denominator"][0]) for t in range(n_layers))
    shift, scale = (np.broadcast_to(np.asarray(sd[f"rescale_atomic_energy.{k}"], np.float64), (len(species),))
                    for k in ("shift", "scale"))
    config = NequIPConfig(
        species=species, cutoff=cutoff, l_max=l_max, parity=not se3, se3=se3, channels=manual[0][0].mul,
        n_layers=n_layers, n_radial=int(cfg["radial_basis"]["bessel_basis_num"]),
        radial_hidden=tuple(int(x) for x in cfg["weight_nn_hidden_neurons"]),
        envelope_p=int(envelope.get("poly_cut_p_value", 6)),
        cutoff_function="xplor" if envelope["cutoff_function_name"] == "XPLOR" else "polynomial",
        cutoff_on=float(envelope["cutoff_on"]) if envelope["cutoff_function_name"] == "XPLOR" else None,
        avg_num_neighbours=denominators, message_normalization="mean",
        irreps=tuple(str(x) for x in manual[1:]), self_connection="linear", resnet=False,
        gate=cfg["act_gate"]["e"], activation_normalization="e3nn-torch", radial_frequencies="trained",
        readout="linear", readout_hidden=manual[-1].dim // 2, dtype=dtype,
        energy_shift=tuple(float(x) for x in shift), energy_scale=tuple(float(x) for x in scale),
    )
    # the tree and shapes of the model's parameters, without compiling its init; the charge head, which
    # SevenNet lacks, drawn N(0, 1) as init draws it
    shapes = jax.eval_shape(nequip(config).init, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda s: rng.standard_normal(s.shape), shapes)

    def weights(name):
        return np.asarray(sd[name], np.float64)

    n = len(species)
    params["embedding"] = e3nn_linear(weights("onehot_to_feature_x.linear.weight"), f"{n}x0e",
                                      manual[0])["0e"] / np.sqrt(n)
    params["radial_frequencies"] = weights("edge_embedding.basis_function.coeffs")
    irreps_sh = e3nn.Irreps([(1, (l, 1 if se3 else (-1) ** l)) for l in range(l_max + 1)])
    for t in range(n_layers):
        x_in, x_out = manual[t], manual[t + 1]
        gate_in = gate_irreps(x_out)
        radial = [weights(f"{t}_convolution.weight_nn.layer{k}.weight") for k in range(len(config.radial_hidden) + 1)]
        radial[0] = radial[0] * np.sqrt(2.0 / cutoff)  # SevenNet's basis is 2/c sin(wr)/r, equijax's sqrt(2/c) sin(wr)/r
        radial[-1] = radial[-1] * path_signs(sd, t, x_in, irreps_sh, x_out)
        params["layers"][t] = {
            "linear_in": e3nn_linear(weights(f"{t}_self_interaction_1.linear.weight"), x_in, x_in),
            "radial": radial,
            "linear_out": e3nn_linear(weights(f"{t}_self_interaction_2.linear.weight"),
                                      tp_paths(x_in, irreps_sh, x_out), gate_in),
            "self": e3nn_linear(weights(f"{t}_self_connection_intro.linear.weight"), x_in, gate_in),
        }
    hidden = e3nn.Irreps(f"{config.readout_hidden}x0e")
    params["readout"] = {
        "hidden": e3nn_linear(weights("reduce_input_to_hidden.linear.weight"), manual[-1], hidden),
        "out": e3nn_linear(weights("reduce_hidden_to_energy.linear.weight"), hidden, "1x0e"),
    }
    params["shift"], params["scale"] = shift.copy(), scale.copy()
    return config, jax.tree_util.tree_map(lambda a: np.asarray(a, dtype), params)
