"""Run configs and the command line: every mistake is named, nothing is silently ignored.

Contract: unknown or misspelt keys, values of the wrong type and resumes with
a changed config are one-line errors that name the key (and the closest known
one); overrides may stand anywhere on the command line; every CLI command
given bad input exits non-zero with one line on stderr and no traceback.
"""

import subprocess
import sys

import pytest

from equijax import cli, config as config_lib, training


@pytest.mark.parametrize("overrides, message", [
    (["model.chanels=8"], "unknown config key model.chanels; did you mean model.channels"),
    (["train.max_stepz=2"], "unknown config key train.max_stepz; did you mean train.max_steps"),
    (["train.cutoff=4.0"], "unknown config key train.cutoff; did you mean model.cutoff"),
    (["model.l_max=two"], "model.l_max must be an integer, got 'two'"),
    (["model.parity=1"], "model.parity must be true or false"),
    (["model.dtype=float16"], "model.dtype must be one of float32, float64"),
    (["train.weights.forcez=1"], "did you mean train.weights.forces"),
    (["data.valid_fraction=1.5"], "between 0 and 1"),
    (["model.radial_hidden=[8, x]"], "model.radial_hidden must be a list of integers"),
    (["model"], "not of the form"),
])
def test_bad_configs_name_the_key(overrides, message):
    with pytest.raises(config_lib.ConfigError, match=message.replace("[", r"\[")):
        config_lib.load(None, overrides)


def test_defaults_fill_in_and_the_shipped_configs_are_valid():
    default = config_lib.load()
    assert default["train"]["max_steps"] == 4000 and default["data"]["e0s"].endswith("e0s_gfn2-xtb.json")
    metals = config_lib.load("metals.yaml")
    assert metals["train"]["weights"]["stress"] > 0
    assert metals["train"]["plateau_factor"] == 0.5  # not in the file: the schema's default
    assert set(default) == set(config_lib.SCHEMA)
    for shipped in sorted((config_lib.PACKAGE / "configs").glob("*.yaml")):  # every shipped recipe validates
        assert set(config_lib.load(shipped.name)) == set(config_lib.SCHEMA), shipped.name
    # YAML 1.1 reads 1e-4 (no dot) as a string: a number key takes it as the number it plainly is
    assert config_lib.load(None, ["train.weights.hessian=1e-4"])["train"]["weights"]["hessian"] == 1e-4
    with pytest.raises(config_lib.ConfigError, match="must be a number"):
        config_lib.load(None, ["train.weights.hessian=1e-4x"])


def cli_run(capsys, *argv):
    with pytest.raises(SystemExit) as exc:
        cli.main(list(argv))
    err = capsys.readouterr().err
    return exc.value.code, err


QUICK = ["data.train=[data/ethanol_train.xyz]", "data.test=null", "data.max_train=8", "model.channels=2",
         "model.n_layers=1", "model.radial_hidden=[4]", "model.l_max=0", "train.max_steps=2",
         "train.eval_every=2", "train.batch_size=4", "--no-progress"]


def test_overrides_anywhere_and_changed_resume(tmp_path, capsys):
    out = str(tmp_path / "run")
    cli.main(["train", QUICK[0], "--output", out, *QUICK[1:]])  # an override after an option
    assert (tmp_path / "run" / "model.npz").exists()
    capsys.readouterr()
    code, err = cli_run(capsys, "train", *QUICK, "train.seed=1", "--output", out)
    assert code == 2 and err.count("\n") == 1
    assert "train.seed: 0 -> 1" in err and "--restart" in err and "--accept-changes" in err
    cli.main(["train", *QUICK, "train.max_steps=4", "--output", out, "--accept-changes"])
    assert "resuming with a changed config: train.max_steps: 2 -> 4" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["train", "model.chanels=8"], "did you mean model.channels"),
    (["train", "nope.yaml"], "no such config file"),
    (["train", "--bogus"], "unrecognized arguments"),
    (["config", "train.max_stepz=1"], "did you mean train.max_steps"),
    (["evaluate", "missing.npz", "x.xyz"], "no such file"),
    (["vibrate", "missing.npz", "x.xyz"], "no such file"),
    (["phonons", "missing.npz", "x.cif"], "no such file"),
    (["export", "missing.npz", "out.npz"], "no such file"),
    (["convert", "missing.pkl", "out.npz"], "--trust-pickle"),
    (["vibrate"], "required"),
    (["frobnicate"], "invalid choice"),
])
def test_every_command_fails_with_one_line(capsys, argv, message):
    code, err = cli_run(capsys, *argv)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("equijax: error:") and message in err, err
    assert "Traceback" not in err


def test_bad_structure_and_data_files_through_the_cli(tmp_path, capsys):
    from ase import Atoms
    import ase.io

    model = tmp_path / "m.npz"
    cli.main(["train", *QUICK, "--output", str(tmp_path / "run")])
    (tmp_path / "run" / "model.npz").rename(model)
    ase.io.write(tmp_path / "u.xyz", Atoms("HU", positions=[[0, 0, 0], [0, 0, 1.5]]))
    (tmp_path / "truncated.xyz").write_text("5\nProperties=species:S:1:pos:R:3 energy=1.0\nH 0 0 0\n")
    capsys.readouterr()
    for argv, message in ((["vibrate", str(model), str(tmp_path / "u.xyz")], "unknown"),
                          (["evaluate", str(model), str(tmp_path / "truncated.xyz")], "truncated"),
                          (["phonons", str(model), str(tmp_path / "u.xyz")], "periodic"),
                          (["evaluate", str(tmp_path / "truncated.xyz"), str(tmp_path / "u.xyz")], "not an equijax")):
        code, err = cli_run(capsys, *argv)
        assert code == 2 and err.count("\n") == 1 and message in err, (argv, err)


def test_a_real_process_prints_one_line_and_debug_shows_the_traceback():
    run = lambda *a: subprocess.run([sys.executable, "-m", "equijax.cli", *a], capture_output=True, text=True,
                                    timeout=120)
    plain = run("train", "model.l_max=two")
    assert plain.returncode == 2 and plain.stderr == "equijax: error: model.l_max must be an integer, got 'two' (str)\n"
    debug = run("--debug", "train", "model.l_max=two")
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_fit_validates_its_config(tmp_path):
    cfg = config_lib.load(None, QUICK[:-1])
    cfg["model"]["chanels"] = 4
    with pytest.raises(config_lib.ConfigError, match="model.chanels"):
        training.fit(cfg, tmp_path / "r", progress=False, log=lambda *a: None)
