"""Model files and checkpoints: no code runs from a file, and what is saved comes back exactly.

Contract: loading never unpickles or evaluates anything (a crafted pickle or
a zip holding an object array is refused before any of its code can run),
old pickle checkpoints are refused with the conversion command, and save ->
load is bitwise for parameters, EMA, optimiser state and step.
"""

import pickle
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

import equijax
from equijax import checkpoint, cli, training
from equijax.calculator import EquijaxCalculator
from structures import methanol


class Payload:
    """Pickling this object makes unpickling write a marker file: stand-in for any code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


def tiny_model():
    cfg = equijax.NequIPConfig(species=(1, 6, 8), cutoff=3.0, l_max=1, channels=4, n_layers=1, radial_hidden=(8,))
    model = equijax.nequip(cfg)
    return model, model.init(jax.random.PRNGKey(0))


def crafted_files(tmp_path, marker):
    """Model files an attacker could hand over: pickles, and a zip with a pickled object array."""
    model, params = tiny_model()
    pickled = tmp_path / "best.pkl"
    pickled.write_bytes(pickle.dumps({"format": "equijax-checkpoint-1", "config": model.config.to_dict(),
                                      "params": Payload(marker)}))
    renamed = tmp_path / "model.npz"  # a pickle under an innocent name
    renamed.write_bytes(pickled.read_bytes())
    good = checkpoint.save_model(tmp_path / "good.npz", model.config.to_dict(), params)
    with np.load(good) as z:
        arrays = dict(z)
    arrays["a0"] = np.array([Payload(marker)], dtype=object)  # np.savez pickles object arrays
    objects = tmp_path / "objects.npz"
    np.savez(objects, **arrays)
    return [pickled, renamed, objects]


def test_crafted_model_files_are_refused_and_run_no_code(tmp_path):
    marker = tmp_path / "marker"
    # the payload works: plain pickle.load would run it
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()
    marker.unlink()
    for path in crafted_files(tmp_path, marker):
        for load in (checkpoint.load, checkpoint.load_model, equijax.load, EquijaxCalculator):
            with pytest.raises(checkpoint.CheckpointError):
                load(path)
        assert not marker.exists(), f"loading {path.name} ran code"


def test_cli_refuses_crafted_files_with_one_line(tmp_path, capsys):
    # the console script's own function, in this process (a real process's one line: tests/test_config.py)
    marker = tmp_path / "marker"
    data = equijax.config.PACKAGE / "data" / "ethanol_test.xyz"
    for path in crafted_files(tmp_path, marker):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["evaluate", str(path), str(data)])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, err
        assert err.count("\n") == 1 and err.startswith("equijax: error:"), err
        assert "Traceback" not in err
        assert not marker.exists()


def test_old_pickle_checkpoints_need_an_explicit_trusted_conversion(tmp_path):
    model, params = tiny_model()
    old = tmp_path / "best.pkl"  # what equijax 0.1 wrote (its configs had no message_normalization)
    config_01 = {k: v for k, v in model.config.to_dict().items() if k != "message_normalization"}
    old.write_bytes(pickle.dumps({"format": "equijax-checkpoint-1", "config": config_01,
                                  "params": jax.device_get(params), "ema_params": jax.device_get(params)}))
    with pytest.raises(checkpoint.CheckpointError, match="equijax convert .* --trust-pickle"):
        equijax.load(old)
    with pytest.raises(checkpoint.CheckpointError, match="--trust-pickle"):
        checkpoint.convert_pickle(old, tmp_path / "new.npz")
    assert not (tmp_path / "new.npz").exists()
    cli.main(["convert", str(old), str(tmp_path / "new.npz"), "--trust-pickle"])
    back = equijax.load(tmp_path / "new.npz")
    for a, b in zip(jax.tree_util.tree_leaves(back.params), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(a, b)
    # it evaluates as trained: equijax 0.1 divided messages by N, today's default divides by sqrt(N)
    assert back.model.config.message_normalization == "mean"
    g = equijax.build_graph([methanol()], model.config.cutoff)
    as_trained = equijax.nequip(model.config.replace(message_normalization="mean"))
    np.testing.assert_array_equal(back.model.energy(back.params, g), as_trained.energy(params, g))
    assert abs(float(model.energy(params, g)[0] - as_trained.energy(params, g)[0])) > 1e-4


def test_save_load_is_bitwise_for_the_whole_training_state(tmp_path):
    model, params = tiny_model()
    opt = training.optimizer(1e-2, 2, 10)
    state = training.init_state(params, opt)
    grads = jax.tree_util.tree_map(lambda x: 0.1 * x, params)
    updates, opt_state = opt.update(grads, state.opt_state, params)
    state = training.TrainState(optax.apply_updates(params, updates), state.ema_params, opt_state,
                                state.step + 3)
    path = checkpoint.save(tmp_path / "c.npz", config=model.config.to_dict(), params=state.params,
                           ema_params=state.ema_params, opt_state=jax.tree_util.tree_leaves(state.opt_state),
                           step=state.step, plateau={"best": float("inf"), "bad": 1}, note="text")
    back = checkpoint.load(path)
    for key in ("params", "ema_params", "opt_state"):
        original = jax.tree_util.tree_leaves(getattr(state, key) if key != "opt_state" else state.opt_state)
        restored = jax.tree_util.tree_leaves(back[key])
        assert len(original) == len(restored)
        for a, b in zip(original, restored):
            assert np.asarray(a).dtype == b.dtype
            np.testing.assert_array_equal(a, b)
    assert int(back["step"]) == 3 and back["plateau"] == {"best": float("inf"), "bad": 1}
    assert jax.tree_util.tree_structure(back["params"]) == jax.tree_util.tree_structure(jax.device_get(params))
    # the small model file of that checkpoint holds the EMA parameters and no optimiser state
    exported = checkpoint.export_model(path, tmp_path / "model.npz")
    loaded = equijax.load(exported)
    for a, b in zip(jax.tree_util.tree_leaves(loaded.params), jax.tree_util.tree_leaves(state.ema_params)):
        np.testing.assert_array_equal(a, b)
    assert "opt_state" not in loaded.metadata
    with pytest.raises(checkpoint.CheckpointError, match="cannot resume"):
        checkpoint.load(exported)


def test_truncated_and_foreign_files_are_clear_errors(tmp_path):
    model, params = tiny_model()
    path = checkpoint.save_model(tmp_path / "m.npz", model.config.to_dict(), params)
    data_bytes = path.read_bytes()
    path.write_bytes(data_bytes[: len(data_bytes) // 2])
    with pytest.raises(checkpoint.CheckpointError, match="truncated|corrupt"):
        equijax.load(path)
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, x=np.ones(3))
    with pytest.raises(checkpoint.CheckpointError, match="not an equijax"):
        equijax.load(foreign)
    with pytest.raises(FileNotFoundError):
        equijax.load(tmp_path / "missing.npz")


def _rewritten(tmp_path, name, change):
    """A copy of a good model file with ``change(content)`` applied (content: config and params)."""
    model, params = tiny_model()
    content = {"config": model.config.to_dict(), "params": jax.tree_util.tree_map(np.array, params)}  # writable
    change(content)
    return checkpoint.save_model(tmp_path / f"{name}.npz", content["config"], content["params"])


def test_damaged_model_files_are_refused_naming_the_file_and_the_parameter(tmp_path, capsys):
    def params(fn):
        return lambda c: fn(c["params"])

    damages = {  # name: (change, words the message must hold)
        "broadcastable_shift": (params(lambda p: p.update(shift=p["shift"][:1])), "shift has shape (1,)"),
        "nan": (params(lambda p: p["embedding"].__setitem__((0, 0), np.nan)), "embedding holds NaN"),
        "complex": (params(lambda p: p.update(scale=p["scale"].astype(np.complex64))), "scale is complex64"),
        "missing": (params(lambda p: p.pop("readout")), "parameter readout"),
        "wrong_shape": (params(lambda p: p.update(embedding=np.zeros((4, 4), np.float32))), "embedding has shape"),
        "float64_config": (lambda c: c["config"].update(dtype="float64"), "is float32, the model's config says "
                                                                          "float64"),
        "config_type": (lambda c: c["config"].update(l_max="two"), "model.l_max must be an integer"),
    }
    for name, (change, words) in damages.items():
        path = _rewritten(tmp_path, name, change)
        with pytest.raises(checkpoint.CheckpointError) as err:
            equijax.load(path)
        assert str(path) in str(err.value) and words in str(err.value), (name, str(err.value))
    with pytest.raises(SystemExit) as stop:  # and through the command line: one line, exit 2
        cli.main(["evaluate", str(tmp_path / "broadcastable_shift.npz"), str(tmp_path / "missing.xyz")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and "shift has shape (1,)" in err


def test_a_resume_from_a_checkpoint_that_does_not_fit_its_model_names_the_file(tmp_path):
    from equijax import config as config_lib

    cfg = config_lib.load(None, ["data.train=[data/ethanol_train.xyz]", "data.test=null", "data.max_train=16",
                                 "model.channels=4", "model.n_layers=1", "model.radial_hidden=[8]",
                                 "train.batch_size=4", "train.max_steps=4"])
    model_cfg = equijax.NequIPConfig(species=(1, 6, 8), l_max=1, channels=4, n_layers=1, radial_hidden=(8,),
                                     n_radial=8, cutoff=5.0)
    params = jax.tree_util.tree_map(np.asarray, equijax.nequip(model_cfg).init(jax.random.PRNGKey(0)))
    bad = dict(params, embedding=np.zeros((3, 5), np.float32))
    path = checkpoint.save(tmp_path / "run" / "checkpoint.npz", config=model_cfg.to_dict(), params=bad,
                           ema_params=params, opt_state=[], step=np.int32(2),
                           plateau=training.Plateau().state_dict(), run_config=cfg)
    with pytest.raises(checkpoint.CheckpointError) as err:
        training.fit(cfg, tmp_path / "run", progress=False, log=lambda *a: None)
    assert str(path) in str(err.value) and "parameter embedding has shape (3, 5)" in str(err.value)


FLOAT64 = """
import sys
import jax
import numpy as np
from equijax import checkpoint, cli, config, training
overrides = sys.argv[2:]
try:  # the library flips no JAX flag: float64 without x64 is refused, not truncated
    training.fit(config.load(None, overrides), sys.argv[1] + "/lib", progress=False, log=lambda *a: None)
except config.ConfigError as err:
    print("refused:", err)
assert not jax.config.jax_enable_x64
cli.main(["train", *overrides, "--output", sys.argv[1] + "/cli", "--no-progress"])  # the command switches x64 on
content = checkpoint.load_model(sys.argv[1] + "/cli/model.npz")
leaves = jax.tree_util.tree_leaves(content.params)
print("dtypes:", sorted({str(x.dtype) for x in leaves}))
print("beyond float32:", any(np.any(np.asarray(x) != np.asarray(x).astype(np.float32)) for x in leaves))
"""


def test_float64_runs_train_save_and_evaluate_in_float64(tmp_path):
    overrides = ["data.train=[data/ethanol_train.xyz]", "data.test=null", "data.max_train=8", "model.channels=4",
                 "model.n_layers=1", "model.radial_hidden=[8]", "model.l_max=1", "train.batch_size=4",
                 "train.max_steps=2", "train.eval_every=2", "train.warmup_steps=1", "model.dtype=float64"]
    env = {k: v for k, v in __import__("os").environ.items() if k != "JAX_ENABLE_X64"}
    out = subprocess.run([sys.executable, "-c", FLOAT64, str(tmp_path), *overrides], capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "refused: model.dtype=float64 needs float64 enabled" in out.stdout
    assert "dtypes: ['float64']" in out.stdout and "beyond float32: True" in out.stdout, out.stdout
    assert "truncated to dtype float32" not in out.stderr
    # a float64 file evaluates in float64 (this process has x64 on; the calculator keeps the file's precision)
    calc = EquijaxCalculator(tmp_path / "cli" / "model.npz")
    assert calc.dtype == np.float64 and calc.params["embedding"].dtype == np.float64
    assert np.asarray(calc._efs(calc.params, calc._graph(methanol())).energy).dtype == np.float64
