"""The public face: every documented name imports, one source of defaults, the flax shell is the model.

Contracts: the names the documentation promises (``equijax.nequip``,
``NequIPConfig``, ``Potential``, ``build_graph``, ``load``, ``physics.*``,
``equijax.training.*``, ``equijax.data.Dataset``, the calculator, the CLI's
commands) keep working across moves; the library's defaults are the run
config schema's; a flax module around a potential gives its energies,
forces and parameter tree; only :mod:`equijax.plots` imports matplotlib.
"""

import importlib
from pathlib import Path

import jax
import numpy as np
import pytest
from ase.build import molecule

import equijax
from equijax import config as config_lib, physics

PACKAGE = Path(equijax.__file__).parent

DOCUMENTED = {
    "equijax": ["nequip", "NequIPConfig", "Potential", "build_graph", "from_ase", "Structure", "load", "physics",
                "training", "data", "graph", "io", "layers", "checkpoint", "config", "ensemble"],
    "equijax.physics": ["energy_and_forces", "energy_forces_stress", "hessian", "hessian_chunked",
                        "hessian_columns", "hessian_vector_product", "energy_forces_hvp", "with_positions", "strain"],
    "equijax.training": ["fit", "LossWeights", "Terms", "loss_fn", "optimizer", "train_step", "ensemble_train_step",
                         "init_state", "initial_params", "TrainState", "evaluator", "evaluate", "metrics", "Plateau",
                         "init_distributed", "data_mesh", "replicate", "shard", "host", "machine_info",
                         "hessian_directions", "reference_hvp", "frequency_basis", "newton_step", "WAVENUMBER",
                         "HESSIAN_METRICS", "set_lr_factor", "lr_factor", "CHECKPOINT_NAME", "MODEL_NAME"],
    "equijax.data": ["Dataset", "statistics", "Statistics", "energy_shift"],
    "equijax.models": ["nequip", "NequIPConfig", "Potential", "build", "float64_model"],
    "equijax.calculator": ["EquijaxCalculator"],
    "equijax.vibrations": ["vibrate", "vibrate_many", "hessian_2d", "project_hessian", "rigid_body_basis",
                           "float64_model", "finite_difference_hessian", "vibrate_reference", "normal_mode_samples",
                           "match_modes", "member_frequencies"],
    "equijax.phonons": ["force_constants", "frequencies", "band_structure"],
    "equijax.md": ["simulate", "Frames", "MDError", "Result", "ENSEMBLES", "LOG_COLUMNS", "read_trajectory",
                   "integrators", "neighbours", "potential"],
    "equijax.ensemble": ["committee", "predict", "force_spread", "variance", "stack", "member", "over_members"],
    "equijax.calibration": ["errors", "summary", "calibration", "force_calibration", "spearman"],
    "equijax.loader": ["Dataset", "Budget", "open_files", "Prefetcher", "budget_plan", "fixed_plan"],
    "equijax.cli": ["main", "parser"],
    "equijax.flax": ["PotentialModule", "as_variables", "params_of"],
}


@pytest.mark.parametrize("module", sorted(DOCUMENTED))
def test_every_documented_name_imports(module):
    m = importlib.import_module(module)
    missing = [name for name in DOCUMENTED[module] if not hasattr(m, name)]
    assert not missing, f"{module} lacks {missing}"


def test_every_cli_command_is_there():
    from equijax import cli

    text = cli.parser().format_help()
    for command in ("train", "config", "evaluate", "vibrate", "phonons", "md", "export", "convert"):
        assert command in text


def test_the_library_takes_its_defaults_from_the_schema():
    import dataclasses

    from equijax import training

    cfg = equijax.NequIPConfig()
    for field in dataclasses.fields(cfg):
        key = config_lib.SCHEMA["model"].get(field.name)
        if key is not None and key.default is not None:  # null in the schema: computed from the data
            assert getattr(cfg, field.name) == config_lib.default("model." + field.name), field.name
    weights = training.LossWeights()
    for name in weights._fields:
        assert getattr(weights, name) == config_lib.default("train.weights." + name)
    plateau = training.Plateau()
    assert (plateau.patience, plateau.factor, plateau.stop_patience) == (
        config_lib.default("train.plateau_patience"), config_lib.default("train.plateau_factor"),
        config_lib.default("train.early_stopping_patience"))
    import inspect

    for fn, keys in ((training.optimizer, {"learning_rate": "train.learning_rate", "warmup_steps": "train.warmup_steps",
                                           "total_steps": "train.max_steps", "schedule": "train.schedule",
                                           "clip_norm": "train.clip_norm"}),
                     (training.train_step, {"ema_decay": "train.ema_decay", "seed": "train.seed",
                                            "hessian_directions_k": "train.hessian_directions",
                                            "hessian_metric": "train.hessian_metric"})):
        signature = inspect.signature(fn)
        for arg, key in keys.items():
            assert signature.parameters[arg].default == config_lib.default(key), (fn.__name__, arg)


def test_only_the_plots_module_imports_matplotlib():
    importers = [p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")
                 if "matplotlib" in p.read_text() and p.name != "plots.py"]
    assert not importers, importers


def test_the_flax_shell_is_the_functional_model():
    from equijax import flax as eqx_flax

    # a small model: this checks the wrapping, not the physics (tests/test_model.py does)
    model = equijax.nequip(equijax.NequIPConfig(species=(1, 6, 8), cutoff=4.0, l_max=1, channels=4, n_layers=1,
                                                radial_hidden=(8,), dtype="float64"))
    params = model.init(jax.random.PRNGKey(1))
    graph = equijax.build_graph([molecule("CH3CH2OH")], model.config.cutoff, species=model.config.species,
                                dtype=np.float64)
    module = eqx_flax.PotentialModule(model)
    fresh = jax.eval_shape(module.init, jax.random.PRNGKey(3), graph)  # shapes only: nothing to compile
    assert jax.tree_util.tree_structure(eqx_flax.params_of(fresh)) == jax.tree_util.tree_structure(params)
    assert [x.shape for x in jax.tree_util.tree_leaves(eqx_flax.params_of(fresh))] == \
        [x.shape for x in jax.tree_util.tree_leaves(params)]
    variables = eqx_flax.as_variables(params)
    assert eqx_flax.params_of(variables) is params

    @jax.jit
    def through_flax(variables, graph):
        return (module.apply(variables, graph), module.apply(variables, graph, method="forces"),
                module.apply(variables, graph, method="atomic_energies"))

    energy, forces, atomic = through_flax(variables, graph)
    e_ref, f_ref = jax.jit(physics.energy_and_forces(model.energy))(params, graph)
    np.testing.assert_allclose(energy, e_ref, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(forces, f_ref, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(atomic.sum(), e_ref[0], rtol=1e-12)
