"""A killed MD run loses nothing: its files end on complete frames, and ``--resume`` continues exactly.

Contracts: a kill between chunks, or in the middle of appending a chunk,
leaves trajectories whose committed frames read back (``md.read_trajectory``;
ASE reads the files whole unless the kill fell inside the append itself);
a resumed run writes the trajectory of an uninterrupted one (float64, 1e-10:
the state, thermostat, random keys and neighbour list are restored bitwise);
``equijax md`` killed by SIGKILL at random moments leaves files ASE reads and
``--resume`` completes them to the uninterrupted run's.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import ase.io
import numpy as np
import pytest

import equijax
from equijax import md
from equijax.md import output as md_output
from equijax.models import float64_model

MODEL = Path(equijax.__file__).parent / "data" / "ethanol_md_model.npz"
ETHANOL = Path(equijax.__file__).parent / "data" / "ethanol_test.xyz"
RUN = dict(ensemble="nvt-langevin", temperature=300.0, timestep=0.5, steps=24, interval=2, chunk_frames=3,
           replicas=2, seed=3, progress=False)


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def model64():
    model, params, _ = equijax.load(MODEL)
    return float64_model(model, params)


def positions(folder, replicas=2):
    return [np.array([a.positions for a in md.read_trajectory(folder / n)])
            for n in md_output.trajectory_names(replicas)]


def test_a_run_killed_between_chunks_or_inside_an_append_resumes_exactly(model64, tmp_path, monkeypatch):
    model, params = model64
    atoms = ase.io.read(ETHANOL, index=0)
    md.simulate(model, params, atoms, output=tmp_path / "whole", **RUN)
    whole = positions(tmp_path / "whole")

    # killed after its second chunk
    chunks = []

    def kill_after_two(frames):
        chunks.append(frames)
        if len(chunks) == 2:
            raise Killed
    with pytest.raises(Killed):
        md.simulate(model, params, atoms, output=tmp_path / "cut", on_chunk=kill_after_two, **RUN)
    assert [len(p) for p in positions(tmp_path / "cut")] == [6, 6]  # two chunks of three frames

    # killed in the middle of appending its third chunk: half of the bytes reach the file
    def torn(fd, data):
        os.write(fd, bytes(data)[: len(data) // 2])
        raise Killed
    monkeypatch.setattr(md_output, "_write", torn)
    with pytest.raises(Killed):
        md.simulate(model, params, atoms, output=tmp_path / "cut", resume=True, **RUN)
    monkeypatch.undo()
    first = tmp_path / "cut" / "trajectory_000.extxyz"
    assert first.stat().st_size > md_output.read_state(tmp_path / "cut")["lengths"][0]  # a torn tail is there
    assert len(md.read_trajectory(first)) == 6  # and is not read

    md.simulate(model, params, atoms, output=tmp_path / "cut", resume=True, **RUN)
    for a, b in zip(whole, positions(tmp_path / "cut")):
        assert a.shape == b.shape == (12, 9, 3)
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-10)
    for name in md_output.trajectory_names(2):  # after the resume the files read whole, with ASE too
        assert len(ase.io.read(tmp_path / "cut" / name, index=":")) == 12
    log = np.genfromtxt(tmp_path / "cut" / "md_log.csv", delimiter=",", names=True)
    assert len(log) == 24 and list(log["step"][log["replica"] == 0]) == list(range(2, 25, 2))

    with pytest.raises(ValueError, match="other settings"):  # a resume with other settings is refused
        md.simulate(model, params, atoms, output=tmp_path / "cut", resume=True, **{**RUN, "temperature": 400.0})


def test_sigkill_of_the_command_at_random_moments_leaves_readable_files_and_resume_completes(tmp_path):
    common = ["md", str(MODEL), str(ETHANOL), "--steps", "1000", "--interval", "1", "--replicas", "2",
              "--no-progress", "--seed", "5"]
    env = {**os.environ, "EQUIJAX_HUGEPAGES": "0"}
    command = [sys.executable, "-m", "equijax.cli"] + common
    subprocess.run(command + ["--output", str(tmp_path / "whole")], env=env, check=True, timeout=300,
                   stdout=subprocess.DEVNULL)  # compiles; the others load its programs from the suite's cache
    whole = positions(tmp_path / "whole")
    command += ["--output", str(tmp_path / "cut")]
    rng = np.random.default_rng(0)
    state = tmp_path / "cut" / md_output.STATE_NAME
    for kill in range(2):  # a fresh run, then its resume, each killed
        proc = subprocess.Popen(command + (["--resume"] if kill else []), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        committed = md_output.read_state(tmp_path / "cut")["done"] if kill else 0
        started = time.time()
        while time.time() - started < 120 and (not state.exists()
                                               or md_output.read_state(tmp_path / "cut")["done"] <= committed):
            time.sleep(0.05)  # wait for a chunk past the last one, then kill at a random moment
        time.sleep(rng.uniform(0.0, 0.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        for name in md_output.trajectory_names(2):
            frames = ase.io.read(tmp_path / "cut" / name, index=":")  # every complete frame reads, with ASE
            assert 0 < len(frames) <= 1000
    out = subprocess.run(command + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    for a, b in zip(whole, positions(tmp_path / "cut")):
        np.testing.assert_array_equal(b, a)  # float32, the same programs: bit for bit
