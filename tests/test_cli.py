"""End to end through the command line: train, evaluate, vibrate, phonons, export.

Contract: the documented commands run on the shipped data and write what
they promise (model file, metrics, plots, modes, spectra, band structures).
"""

import json
import os
import subprocess
import sys

import pytest
from ase.build import molecule
import ase.io

from equijax import cli, config as config_lib


def test_help_is_helpful(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    for word in ("train", "evaluate", "vibrate", "units"):
        assert word in text


def test_train_evaluate_vibrate(tmp_path, capsys):
    out = tmp_path / "run"
    cli.main(["train", "data.train=[data/ethanol_train.xyz]", "data.test=[data/ethanol_test.xyz]",
              "data.max_train=24", "model.channels=4", "model.n_layers=1", "model.radial_hidden=[8]",
              "train.max_steps=12", "train.eval_every=6", "train.batch_size=6", "train.weights.dipole=1.0", "--output", str(out), "--no-progress"])
    text = capsys.readouterr().out
    assert "force  MAE" in text and "zero forces" in text
    assert (out / "model.npz").exists() and (out / "learning_curve.png").exists()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    cli.main(["evaluate", str(out / "model.npz"), str(config_lib.PACKAGE / "data" / "ethanol_test.xyz"),
              "--output", str(tmp_path / "eval")])
    rows = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert rows[0]["frames"] == 100 and (tmp_path / "eval" / "ethanol_test_parity.png").exists()
    ase.io.write(tmp_path / "water.xyz", molecule("H2O"))
    cli.main(["vibrate", str(out / "model.npz"), str(tmp_path / "water.xyz"), "--output", str(tmp_path / "vib"), "--ir"])
    assert len((tmp_path / "vib" / "ir_km_per_mol.txt").read_text().splitlines()) == 1 + 3
    assert len((tmp_path / "vib" / "frequencies_cm.txt").read_text().splitlines()) == 1 + 3
    cli.main(["export", str(out / "checkpoint.npz"), str(tmp_path / "exported.npz")])
    assert (tmp_path / "exported.npz").stat().st_size < (out / "checkpoint.npz").stat().st_size
    assert (tmp_path / "vib" / "spectrum.png").exists() and (tmp_path / "vib" / "modes.xyz").exists()


def test_bad_input_file_is_a_clear_cli_error(tmp_path, capsys):
    bad = tmp_path / "bad.xyz"
    bad.write_text("5\nProperties=species:S:1:pos:R:3 energy=1.0\nH 0 0 0\n")
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", f"data.train=[{bad}]", "--output", str(tmp_path / "r"), "--no-progress"])
    assert exc.value.code == 2
    assert "equijax: error:" in capsys.readouterr().err


def test_phonons_command(tmp_path, capsys):
    import jax
    from ase.build import bulk

    import equijax

    cfg = equijax.NequIPConfig(species=(29,), cutoff=3.0, l_max=1, channels=4, n_layers=1, radial_hidden=(8,))
    model = equijax.nequip(cfg)
    ckpt = equijax.checkpoint.save_model(tmp_path / "cu.npz", cfg.to_dict(), model.init(jax.random.PRNGKey(0)))
    ase.io.write(tmp_path / "cu.cif", bulk("Cu", "fcc", a=3.6))
    cli.main(["phonons", str(ckpt), str(tmp_path / "cu.cif"), "--supercell", "2", "2", "2", "--npoints", "20",
              "--output", str(tmp_path / "ph")])
    assert "Γ-point" in capsys.readouterr().out
    assert (tmp_path / "ph" / "band_structure.png").exists()


def test_console_restarts_once_with_huge_pages(tmp_path):
    """The console script adds glibc's huge-page tunable for XLA's buffers, once; Python callers never restart."""
    from equijax import hugepages

    env = hugepages.environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert hugepages.environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None  # the user's choice stands
    assert hugepages.environment({"EQUIJAX_HUGEPAGES": "0"}) is None
    if not (hugepages._glibc_ok() and hugepages._thp_allowed()):
        pytest.skip("no glibc >= 2.35 with transparent huge pages here")
    missing = str(tmp_path / "missing.npz")
    # the hook runs only if this very process (not a restarted one) reaches exit
    script = ("import atexit, sys; from equijax import cli, hugepages; "
              "atexit.register(lambda: print('NOT RESTARTED', file=sys.stderr)); "
              f"sys.argv = ['equijax', '--debug', 'evaluate', {missing!r}, {missing!r}]; cli.main()")
    base = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    for extra, restarts in (({}, 1), ({"EQUIJAX_HUGEPAGES": "0"}, 0)):
        proc = subprocess.run([sys.executable, "-c", script], env={**base, **extra}, capture_output=True,
                              text=True, timeout=120)
        # once, not again in the new process (which sees the tunable set)
        assert proc.stderr.count("restarting with GLIBC_TUNABLES=glibc.malloc.hugetlb=1") == restarts, proc.stderr
        assert ("NOT RESTARTED" in proc.stderr) == (restarts == 0)
        assert "no such file" in proc.stderr  # the restarted process did the work
