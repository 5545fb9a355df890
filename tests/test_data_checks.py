"""Data are checked before training: absurd labels and impossible geometries are named, never trained on.

Contracts: a frame with an energy of 1e10 eV, a NaN force or two atoms closer
than ``data.min_distance`` is refused with its file and frame (also when
frames are read lazily and batched by budget); ``data.bad_frames=skip`` leaves
such frames out and lists them in ``result.json``, ``warn`` trains on them
with a warning; the shipped data sets pass. The frames are real (GFN2-xTB
ethanol), one of them damaged on purpose.
"""

import json

import ase.io
import numpy as np
import pytest

from equijax import config as config_lib, io, training
from equijax.loader import checks

DATA = config_lib.PACKAGE / "data"


def damaged(tmp_path, how: str, frame: int = 7, n: int = 40):
    """The first ``n`` ethanol training frames with frame ``frame`` damaged."""
    frames = ase.io.read(DATA / "ethanol_train.xyz", index=f":{n}")
    a = frames[frame]
    results = dict(a.calc.results)
    if how == "energy":
        results["energy"] = 1e10
    elif how == "nan_force":
        results["forces"] = results["forces"].copy()
        results["forces"][3, 1] = np.nan
    elif how == "close":
        a.positions[8] = a.positions[0] + [0.3, 0.0, 0.0]  # an H 0.3 Å from the first C
    a.calc.results = results
    path = tmp_path / f"ethanol_{how}.xyz"
    ase.io.write(path, frames, format="extxyz")
    return path


def run_config(path, tmp_path, **data):
    cfg = config_lib.load(None, [
        f"data.train=[{path}]", "data.test=null", "data.valid_fraction=0.2", "data.lazy=true",
        "train.batching=budget", "model.channels=4", "model.n_layers=1", "model.radial_hidden=[8]",
        "model.l_max=1", "train.batch_size=4", "train.max_steps=2", "train.eval_every=2", "train.warmup_steps=1",
    ])
    cfg["data"].update(data)
    return cfg


@pytest.mark.parametrize("how, words", [("energy", ("1e+10 eV", "median absolute deviations")),
                                        ("close", ("0.3 Å apart", "data.min_distance"))])
def test_an_absurd_energy_or_a_too_close_pair_stops_the_run_naming_file_frame_and_value(tmp_path, how, words):
    path = damaged(tmp_path, how)
    with pytest.raises(ValueError) as err:  # lazy reading and budget batching, as the issue found it
        training.fit(run_config(path, tmp_path), tmp_path / "run", progress=False, log=lambda *a: None)
    message = str(err.value)
    assert f"{path}: frame 7" in message and all(w in message for w in words), message
    assert not (tmp_path / "run" / "model.npz").exists()


def test_a_nan_force_is_refused_at_reading_with_file_and_frame(tmp_path):
    path = damaged(tmp_path, "nan_force")
    with pytest.raises(ValueError, match=rf"{path}: frame 7: label 'forces' contains NaN"):
        io.read(path)
    from equijax import loader

    lazy = loader.open_files([path])
    with pytest.raises(ValueError, match=rf"{path}: frame 7"):
        [lazy[k] for k in range(len(lazy))]


def test_skip_leaves_bad_frames_out_and_lists_them_and_warn_keeps_them(tmp_path):
    path = damaged(tmp_path, "energy", frame=11)
    lines = []
    result = training.fit(run_config(path, tmp_path, bad_frames="skip"), tmp_path / "run", progress=False,
                          log=lines.append)
    assert [s["frame"] for s in result["skipped_frames"]] == [f"{path}: frame 11"]
    assert json.loads((tmp_path / "run" / "result.json").read_text())["skipped_frames"] == result["skipped_frames"]
    assert any(line.startswith(f"skipped: {path}: frame 11") for line in lines)
    frames = io.read(path)
    logged = []
    keep, problems = checks.check(frames, lambda k: f"frame {k}", checks.Limits(), "warn", logged.append)
    assert keep == list(range(len(frames))) and [p.index for p in problems] == [11] and logged[0].startswith("warning")


@pytest.mark.parametrize("name", ["default", "hessian_finetune", "metals", "qm9"])
def test_the_shipped_training_sets_pass_the_checks(name):
    cfg = config_lib.load(f"{name}.yaml")
    frames = io.read_many(config_lib.data_paths(cfg["data"]["train"]))
    keep, problems = checks.check(frames, str, checks.Limits(), "error")
    assert not problems and len(keep) == len(frames)
