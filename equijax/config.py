"""Run configurations: one schema, YAML files, command-line overrides.

Every key of every section is declared once in :data:`SCHEMA` with its type,
default, unit and meaning. :func:`load` reads a YAML file, applies
``dotted.key=value`` overrides and validates the result: an unknown key, a
misspelt key or a value of the wrong type is a :class:`ConfigError` that
names the key, the expected type and the closest known key. The CLI
(``equijax config``) prints the schema; the training loop reads only
validated configs.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, NamedTuple

import yaml

PACKAGE = Path(__file__).resolve().parent


class ConfigError(ValueError):
    """A config that does not fit the schema."""


class Key(NamedTuple):
    """One config key: its type, default, unit and meaning.

    ``type`` is one of ``int``, ``float``, ``bool``, ``str``, ``ints``,
    ``floats``, ``paths`` (a path or a list of paths), ``mapping`` (element
    symbol or Z -> number) or a tuple of allowed strings; ``optional`` also
    admits ``null``.
    """

    type: Any
    default: Any
    doc: str
    unit: str = ""
    optional: bool = False


SCHEMA: dict = {
    "output": Key(str, None, "run folder (the --output option sets it too)", optional=True),
    "data": {
        "train": Key("paths", None, "training files (.xyz/.extxyz, rMD17 .npz, ASE .db); relative paths: "
                                    "working directory first, then the installed package"),
        "test": Key("paths", None, "test files, evaluated with the best parameters at the end", optional=True),
        "valid": Key("paths", None, "validation files (e.g. held-out molecules); default: data.valid_fraction "
                                    "of the training frames", optional=True),
        "valid_fraction": Key(float, 0.1, "fraction of the training frames held out for validation "
                                          "(when data.valid is not given)"),
        "lazy": Key(bool, False, "read frames from disk when a batch needs them (memory bounded by "
                                 "data.cache_size, not by the data set) instead of loading every file"),
        "cache_size": Key(int, 4096, "lazy reading: parsed frames kept in memory", "frames"),
        "max_train": Key(int, None, "use at most this many training frames (learning curves)", optional=True),
        "species": Key("ints", None, "atomic numbers the model knows (default: those in the training data)",
                       optional=True),
        "e0s": Key("mapping", None, "isolated-atom reference energies of the reference method: a JSON file "
                                    "written by experiments/make_data.py, or {symbol: energy}; anchor of the "
                                    "per-element energy shift", "eV", optional=True),
        "bad_frames": Key(("error", "warn", "skip"), "error",
                          "what an implausible training or validation frame does (a force beyond data.max_force, "
                          "atoms closer than data.min_distance, an energy beyond data.energy_outlier_mads): stop "
                          "naming the file, the frame and the value (error), train on it with a warning (warn), "
                          "or leave it out and list it in result.json (skip)"),
        "max_force": Key(float, 50.0, "a force component beyond this marks a bad frame", "eV/Å"),
        "min_distance": Key(float, 0.5, "two atoms closer than this mark a bad frame", "Å"),
        "energy_outlier_mads": Key(float, 50.0, "an energy per atom this many median absolute deviations from the "
                                                "set's (after a per-element linear fit) marks a bad frame",
                                   "MADs"),
        "energy_shift": Key(("auto", "e0s", "least_squares"), "auto",
                            "per-element shift: isolated-atom energies plus the smallest per-element "
                            "binding energies that fit the training compositions (e0s: transferable), or "
                            "a plain least-squares fit (a rank-deficient one is reported); auto: e0s when "
                            "data.e0s is given"),
    },
    "model": {
        "cutoff": Key(float, 5.0, "neighbour cutoff", "Å"),
        "l_max": Key(int, 1, "highest rotation order of features and harmonics (0: invariant model)"),
        "parity": Key(bool, True, "keep both parities (O(3)) or only (-1)^l"),
        "channels": Key(int, 16, "multiplicity of every irrep of the hidden features"),
        "n_layers": Key(int, 3, "interaction layers"),
        "n_radial": Key(int, 8, "Bessel radial basis functions"),
        "radial_hidden": Key("ints", [32, 32], "hidden sizes of the radial MLP"),
        "envelope_p": Key(int, 6, "order of the polynomial cutoff envelope"),
        "readout_hidden": Key(int, 16, "width of the readout's hidden layer"),
        "avg_num_neighbours": Key(float, None, "average neighbour count N (default: from the training data)",
                                  optional=True),
        "message_normalization": Key(("sqrt", "mean"), "sqrt", "divide the neighbour sum of messages by sqrt(N) "
                                                              "(NequIP) or by N (equijax 0.1)"),
        "dtype": Key(("float32", "float64"), "float32", "floating-point precision"),
        # options that published NequIP-family models need (SevenNet, nequip); each works in any model
        "se3": Key(bool, False, "no parity at all (SevenNet's is_parity: false): every irrep even, so a mirror "
                                "image may get another energy; overrides parity"),
        "irreps": Key("strs", None, "hidden irreps of each layer, e.g. [128x0e+64x1e+32x2e, ..., 128x0e] "
                                    "(default: channels of every irrep up to l_max in every layer)", optional=True),
        "self_connection": Key(("species", "linear"), "species",
                               "self-connection: a linear map per species (NequIP) or one linear map (SevenNet)"),
        "resnet": Key(bool, True, "add each layer's input to its output where their irreps agree"),
        "gate": Key(("sigmoid", "silu"), "sigmoid", "activation of the even gates (SevenNet: silu)"),
        "activation_normalization": Key(("e3nn-jax", "e3nn-torch"), "e3nn-jax",
                                        "constants that scale activations to unit second moment: e3nn-jax's "
                                        "quadrature, or e3nn (PyTorch)'s Monte-Carlo ones (models imported "
                                        "from PyTorch)"),
        "cutoff_function": Key(("polynomial", "xplor"), "polynomial",
                               "radial envelope: NequIP's polynomial, or XPLOR's switch from cutoff_on to cutoff"),
        "cutoff_on": Key(float, None, "where the XPLOR switch starts", "Å", optional=True),
        "radial_frequencies": Key(("fixed", "trained"), "fixed", "Bessel frequencies n·π/cutoff, or trained "
                                                                  "from there"),
        "readout": Key(("mlp", "linear"), "mlp", "atomic energies from the last features by linear, SiLU, "
                                                 "linear (mlp) or by two linear maps (SevenNet)"),
        "backend": Key(("auto", "jax", "cuequivariance"), "auto",
                       "message passing: cuequivariance (fused CUDA kernels; pip install 'equijax[cuda13]' or [cuda12]), "
                       "jax (pure JAX), auto (cuequivariance on a GPU where installed, else jax); "
                       "parameters do not depend on it"),
    },
    "train": {
        "batch_size": Key(int, 8, "structures per step (split over all devices); with budget batching, the "
                                  "mean number the budget is sized for"),
        "batching": Key(("fixed", "budget"), "fixed",
                        "fixed: batch_size structures per step, padded for the largest possible batch; "
                        "budget: structures packed per device until a node/edge budget is reached, one "
                        "static padded size, every structure once per epoch (varied molecules)"),
        "budget_nodes": Key(int, None, "budget batching: atoms per device and step (default: batch_size times "
                                       "the mean, at least the largest structure)", "atoms", optional=True),
        "budget_edges": Key(int, None, "budget batching: edges per device and step (default as for nodes)",
                            "edges", optional=True),
        "prefetch": Key(int, 2, "batches built ahead on a worker thread while the device runs (0: none)"),
        "max_steps": Key(int, 4000, "optimiser steps"),
        "learning_rate": Key(float, 0.01, "peak learning rate of Adam"),
        "warmup_steps": Key(int, 50, "linear warm-up steps"),
        "schedule": Key(("cosine", "constant", "plateau"), "cosine", "learning-rate schedule after warm-up"),
        "clip_norm": Key(float, 10.0, "gradient clipping by global norm"),
        "ema_decay": Key(float, 0.99, "decay of the exponential moving average of parameters"),
        "eval_every": Key(int, 250, "steps between validations and checkpoints"),
        "early_stopping_patience": Key(int, 20, "validations without improvement before stopping"),
        "plateau_patience": Key(int, 5, "validations without improvement before the plateau schedule "
                                        "lowers the learning rate"),
        "plateau_factor": Key(float, 0.5, "factor of each plateau reduction"),
        "seed": Key(int, 0, "initialisation, validation split, data order and Hessian-loss directions"),
        "init": Key(str, None, "fine-tune: start from this model file's parameters, architecture and energy "
                               "shifts (the model section is then ignored, except model.backend)", optional=True),
        "hessian_directions": Key(int, 1, "random directions v per structure and step of the Hessian term "
                                          "(one forward-over-reverse pass each)"),
        "hessian_metric": Key(("cartesian", "frequency"), "cartesian",
                              "how the Hessian term measures H v errors: cartesian (eV/Å², every coordinate alike) "
                              "or frequency (in the reference's normal modes, scaled so that errors read as "
                              "harmonic-frequency errors in cm⁻¹: soft modes count as much as they move the "
                              "spectrum; the weight is then in 1/(cm⁻¹)²)"),
        "ensemble": Key(int, 1, "members trained at once in one compiled step (a committee: predictions "
                                "with a spread); member k starts from the initialisation of seed + k, "
                                "all members see the same batches"),
        "ensemble_strategy": Key(("auto", "vmap", "map"), "auto",
                                 "how the step runs over members: vmap (side by side), map (one after "
                                 "another inside the program), auto (map on CPU, vmap on GPU/TPU)"),
        "weights": {
            "energy": Key(float, 1.0, "weight of the per-atom energy MSE", "1/(eV/atom)²"),
            "forces": Key(float, 10.0, "weight of the force-component MSE", "1/(eV/Å)²"),
            "stress": Key(float, 0.0, "weight of the stress-component MSE (periodic data)", "1/(eV/Å³)²"),
            "dipole": Key(float, 0.0, "weight of the dipole MSE (trains the charge head, for IR)", "1/(e·Å)²"),
            "hessian": Key(float, 0.0, "weight of the MSE of Hessian-vector products H v along random directions "
                                       "(needs Hessian labels, e.g. data/*_hessian_*.xyz)",
                              "1/(eV/Å²)², or 1/(cm⁻¹)² with train.hessian_metric=frequency"),
            "dipole_derivative": Key(float, 0.0, "weight of the MSE of dipole derivatives (dμ/dx) v along the Hessian "
                                                 "term's directions (IR intensities; needs the dipole head and "
                                                 "dipole_derivative labels)", "1/e²"),
            "displacement": Key(float, 0.0, "weight of the MSE of H⁺ δF on Hessian-labelled frames: where the force "
                                            "error moves the minimum, to first order (soft modes weigh most; "
                                            "needs a Hessian weight too)", "1/Å²"),
        },
    },
}

def default(name: str):
    """The schema's default of the dotted key ``name`` (``default("model.channels")``): the one source of
    defaults, which the library's own (:class:`equijax.NequIPConfig`, the optimiser, the loss) read."""
    node = SCHEMA
    for part in name.split("."):
        node = node[part]
    if isinstance(node, dict):
        raise KeyError(f"{name} is a section, not a key")
    return tuple(node.default) if isinstance(node.default, list) else node.default


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
               "ints": "a list of integers", "strs": "a list of strings", "floats": "a list of numbers",
               "paths": "a path or a list of paths",
               "mapping": "a JSON file or a mapping {element: number}"}


def _type_name(t) -> str:
    return f"one of {', '.join(t)}" if isinstance(t, tuple) else _TYPE_NAMES[t]


def _check_value(name: str, key: Key, value):
    if value is None:
        if key.optional or key.default is None:
            return None
        raise ConfigError(f"{name} must be {_type_name(key.type)}, not null")
    t = key.type
    if t is float and isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value.strip()):
        value = float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string; it is plainly a number
    ok = {
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        bool: lambda v: isinstance(v, bool),
        str: lambda v: isinstance(v, str),
        "ints": lambda v: isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v),
        "floats": lambda v: isinstance(v, list) and all(isinstance(x, (int, float)) for x in v),
        "strs": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
        "paths": lambda v: isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v)),
        "mapping": lambda v: isinstance(v, str) or (isinstance(v, dict) and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in v.values())),
    }.get(t, lambda v: isinstance(v, str) and v in t)
    if not ok(value):
        raise ConfigError(f"{name} must be {_type_name(t)}, got {value!r} ({type(value).__name__})")
    if t is float:
        return float(value)
    if t == "paths" and isinstance(value, str):
        return [value]
    if t == "mapping" and isinstance(value, dict):
        return {str(k): float(v) for k, v in value.items()}  # JSON-able: string keys
    return value


def _all_names(schema, prefix="") -> list:
    out = []
    for k, v in schema.items():
        out += _all_names(v, prefix + k + ".") if isinstance(v, dict) else [prefix + k]
    return out


def _validate(section: dict, schema: dict, prefix: str) -> dict:
    if not isinstance(section, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'the config'} must be a mapping of keys, got {section!r}")
    out = {}
    for k, value in section.items():
        name = prefix + str(k)
        if k not in schema:
            close = difflib.get_close_matches(str(k), [str(x) for x in schema], n=1, cutoff=0.6)
            if not close:  # a key put in the wrong section: train.cutoff -> model.cutoff
                everywhere = {n.rsplit(".", 1)[-1]: n for n in _all_names(SCHEMA)}
                close = [everywhere[m] for m in difflib.get_close_matches(str(k), list(everywhere), n=1, cutoff=0.8)]
            else:
                close = [prefix + close[0]]
            hint = f"; did you mean {close[0]}?" if close else f"; known keys: {', '.join(map(str, schema))}"
            raise ConfigError(f"unknown config key {name}{hint}")
        spec = schema[k]
        out[k] = _validate(value or {}, spec, name + ".") if isinstance(spec, dict) else _check_value(name, spec, value)
    for k, spec in schema.items():  # defaults for what is not given
        if k not in out:
            out[k] = _validate({}, spec, prefix + k + ".") if isinstance(spec, dict) else spec.default
    return out


def validate(config: dict) -> dict:
    """The config with every key checked and defaults filled in.

    Raises:
        ConfigError: an unknown key (with the closest known one), a value of
            the wrong type (with the expected type), a missing required key.
    """
    config = _validate(config or {}, SCHEMA, "")
    if not config["data"]["train"]:
        raise ConfigError("data.train is required: the training files")
    if not 0.0 < config["data"]["valid_fraction"] < 1.0:
        raise ConfigError(f"data.valid_fraction must lie between 0 and 1, got {config['data']['valid_fraction']}")
    for name in ("train.batch_size", "train.max_steps", "train.eval_every", "train.ensemble",
                 "train.hessian_directions", "model.channels",
                 "model.n_layers", "model.n_radial"):
        section, key = name.split(".")
        if config[section][key] < 1:
            raise ConfigError(f"{name} must be at least 1, got {config[section][key]}")
    if config["model"]["l_max"] < 0 or config["model"]["cutoff"] <= 0:
        raise ConfigError("model.l_max must be >= 0 and model.cutoff > 0")
    _check_rules(config)
    return config


def _check_rules(config: dict) -> None:
    """The rules between keys: every one of them is here, checked before any data is read."""
    data, train = config["data"], config["train"]
    weights = train["weights"]
    if data["energy_shift"] == "e0s" and data["e0s"] is None:
        raise ConfigError("data.energy_shift=e0s needs data.e0s (isolated-atom energies)")
    if train["init"] and train["ensemble"] != 1:
        raise ConfigError("train.init fine-tunes one model: use train.ensemble=1")
    for key, what in (("dipole_derivative", "shares the Hessian term's directions"),
                      ("displacement", "needs the Hessian labels of the Hessian term")):
        if weights[key] > 0 and weights["hessian"] <= 0:
            raise ConfigError(f"train.weights.{key} {what}: give train.weights.hessian > 0 too")
    if any(w < 0 for w in weights.values()):
        raise ConfigError(f"loss weights must not be negative, got {weights}")


def _section_type(name: str, schema: dict):
    fields = [(k, _section_type(k.capitalize(), v) if isinstance(v, dict) else object) for k, v in schema.items()]
    return NamedTuple(name, fields)


#: the typed form of a validated config: ``Sections(output, data, model, train)``, ``train.weights`` nested
Sections = _section_type("Sections", SCHEMA)


def sections(config: dict):
    """A validated config as typed, read-only sections: ``s.train.batch_size``, ``s.train.weights.forces``.

    Raises:
        ConfigError: as :func:`validate` (the config is validated first).
    """
    config = validate(config)

    def build(cls, values):
        return cls(**{k: build(cls.__annotations__[k], v) if isinstance(v, dict) and k in _nested(cls) else v
                      for k, v in values.items()})

    return build(Sections, config)


def _nested(cls) -> set:
    return {k for k, t in cls.__annotations__.items() if isinstance(t, type) and issubclass(t, tuple)}


def apply_overrides(config: dict, overrides=()) -> dict:
    """Apply ``dotted.key=value`` strings (values parsed as YAML) to a raw config."""
    config = dict(config or {})
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        key, value = item.split("=", 1)
        node = config
        parts = key.strip().split(".")
        for p in parts[:-1]:
            child = node.get(p)
            node[p] = dict(child) if isinstance(child, dict) else {}
            node = node[p]
        try:
            node[parts[-1]] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({err})") from err
    return config


def resolve(path) -> Path:
    """A config path as given, else a config shipped with the package."""
    path = Path(path)
    if not path.exists() and (PACKAGE / "configs" / path.name).exists():
        path = PACKAGE / "configs" / path.name
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such config file")
    return path


def read(path=None) -> dict:
    """The raw (unvalidated) YAML of a config file (default: the shipped ``default.yaml``)."""
    path = resolve(path) if path else PACKAGE / "configs" / "default.yaml"
    try:
        with open(path) as f:
            config = yaml.safe_load(f) or {}  # safe_load: no Python objects from YAML tags
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: a config is a mapping of sections (data, model, train)")
    return config


def load(path=None, overrides=()) -> dict:
    """Read a YAML config, apply overrides and validate (see :func:`validate`).

    Overrides are ``dotted.key=value`` strings; values are parsed as YAML
    (``train.max_steps=200``, ``model.radial_hidden=[16,16]``).
    """
    return validate(apply_overrides(read(path), overrides))


def diff(old: dict, new: dict, prefix="") -> list[str]:
    """Lines ``key: old -> new`` for every leaf that differs."""
    out = []
    for k in sorted(set(old) | set(new), key=str):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += diff(a, b, prefix + str(k) + ".")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def describe(schema=SCHEMA, prefix="") -> str:
    """The schema as text: key, type, default, unit and meaning (``equijax config``)."""
    lines = []
    for k, spec in schema.items():
        if isinstance(spec, dict):
            lines.append(f"\n{prefix}{k}:" if not prefix else f"{prefix}{k}:")
            lines.append(describe(spec, prefix + k + "."))
            continue
        unit = f" [{spec.unit}]" if spec.unit else ""
        default = "null" if spec.default is None else spec.default
        lines.append(f"  {prefix}{k} = {default}{unit}  ({_type_name(spec.type)}"
                     f"{', or null' if spec.optional else ''})\n      {spec.doc}")
    return "\n".join(lines)


def data_paths(paths) -> list[Path]:
    """Resolve data paths: as given (cwd), else inside the installed package."""
    out = []
    for p in [paths] if isinstance(paths, (str, Path)) else paths:
        p = Path(p)
        if not p.exists() and (PACKAGE / p).exists():
            p = PACKAGE / p
        out.append(p)
    return out


def read_e0s(value) -> dict:
    """Isolated-atom energies ``{Z: eV}`` from a JSON file or a mapping
    (keys: element symbols or atomic numbers).

    Raises:
        ConfigError: unknown elements, non-numeric energies, a bad file.
    """
    import json

    from ase.data import atomic_numbers

    if isinstance(value, (str, Path)):
        path = data_paths(value)[0]
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such isolated-atom energy file (data.e0s)")
        try:
            content = json.loads(path.read_text())
            value = content["energies"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ConfigError(f"{path}: not an isolated-atom energy file ({err}); expected "
                              '{"method": ..., "units": "eV", "energies": {"H": ...}}') from err
    out = {}
    for k, v in dict(value).items():
        z = int(k) if str(k).isdigit() else atomic_numbers.get(str(k))
        if z is None or not isinstance(v, (int, float)) or isinstance(v, bool):
            raise ConfigError(f"data.e0s: bad entry {k!r}: {v!r} (element symbol or Z -> energy in eV)")
        out[z] = float(v)
    return out
