"""Several processes train as one: ``equijax train --distributed``, launched as docs/how-to/many-processes.md says.

Contract: two processes on this machine (one CPU device each, JAX's
distributed runtime with a local coordinator, gloo collectives) give the
losses and parameters of one process with two devices on the same global
batches (packed to a budget from lazily read frames, each process building
only the shards of its own devices); only process 0 writes files; a run killed in both processes
resumes from the checkpoint across processes and ends where the
uninterrupted run ends. Faults end cleanly: processes that do not share one
run folder are refused at start-up, in one line each; a process killed by
SIGKILL makes the other exit non-zero within the heartbeat bound with one
line, and the last checkpoint still loads.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from equijax import checkpoint

OVERRIDES = ["data.train=[data/ethanol_train.xyz]", "data.test=null", "data.max_train=16", "data.valid_fraction=0.2",
             "model.channels=4", "model.n_layers=1", "model.radial_hidden=[8]", "train.batch_size=4",
             "train.max_steps=10", "train.eval_every=4", "train.warmup_steps=2",
             # the scale path: frames read lazily, packed to a budget, each process building only its own shards
             "train.batching=budget", "data.lazy=true"]

# stage 1: the API in both processes, killed at step 6 (last checkpoint: step 4); counts who wrote what
KILLED = textwrap.dedent("""
    import json, sys
    from equijax import checkpoint, config, training
    training.init_distributed()
    import jax
    writes = []
    real = checkpoint._write
    checkpoint._write = lambda path, kind, content: writes.append(kind) or real(path, kind, content)
    class Killed(Exception):
        pass
    def kill(step, state):
        if step == 6:
            raise Killed
    try:
        training.fit(config.load(None, sys.argv[2:]), sys.argv[1], progress=False, callback=kill)
    except Killed:
        print(json.dumps({"process": jax.process_index(), "devices": jax.device_count(), "writes": writes}))
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_two(command, tmp_path, per_process=lambda i: []):
    port = _free_port()
    procs = []
    for i in range(2):
        env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                   JAX_PROCESS_ID=str(i), JAX_PLATFORMS="cpu", EQUIJAX_HEARTBEAT_TIMEOUT="10", EQUIJAX_HUGEPAGES="0")
        procs.append(subprocess.Popen(command + per_process(i), env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs


def _two_processes(command, tmp_path):
    procs = _start_two(command, tmp_path)
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return [out for out, _ in outs]


def test_two_processes_train_as_one_and_resume_across_processes(tmp_path):
    run = str(tmp_path / "two")
    outs = _two_processes([sys.executable, "-c", KILLED, run, *OVERRIDES], tmp_path)
    reports = sorted((json.loads(o.strip().splitlines()[-1]) for o in outs), key=lambda r: r["process"])
    assert [r["devices"] for r in reports] == [2, 2]
    assert reports[1]["writes"] == [] and "equijax-checkpoint" in reports[0]["writes"]  # process 0 writes
    assert int(checkpoint.load(tmp_path / "two" / "checkpoint.npz")["step"]) == 4

    # stage 2: the documented launch, resuming from the checkpoint of stage 1
    _two_processes([sys.executable, "-m", "equijax.cli", "train", "--distributed", "--no-progress", "--output", run,
                    *OVERRIDES], tmp_path)
    # the same global batches on one process with two devices, uninterrupted
    env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "equijax.cli", "train", "--no-progress", "--output",
                           str(tmp_path / "one"), *OVERRIDES], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    a, b = checkpoint.load(tmp_path / "two" / "checkpoint.npz"), checkpoint.load(tmp_path / "one" / "checkpoint.npz")
    assert int(a["step"]) == int(b["step"]) == 10
    for x, y in zip(jax.tree_util.tree_leaves(a["params"]), jax.tree_util.tree_leaves(b["params"])):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    losses = [[json.loads(line)["train_loss"] for line in open(tmp_path / run / "metrics.jsonl")]
              for run in ("two", "one")]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-6)
    assert not list((tmp_path / "two").glob("*.tmp"))


CLI = [sys.executable, "-m", "equijax.cli", "train", "--distributed", "--no-progress"]


def test_a_run_folder_per_process_is_refused_at_start_up_in_one_line(tmp_path):
    procs = _start_two(CLI + OVERRIDES, tmp_path, lambda i: ["--output", str(tmp_path / f"own{i}")])
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 2, err[-2000:]
        last = err.strip().splitlines()[-1]
        assert last.startswith("equijax: error:") and "do not see the run folder" in last, err[-2000:]
        assert "Traceback" not in err, err[-2000:]
    assert not (tmp_path / "own0" / "checkpoint.npz").exists()


@pytest.mark.parametrize("dies", [1, 0])  # a worker, or process 0 (the coordinator and the writer)
def test_a_killed_process_stops_the_other_within_the_bound_and_the_checkpoint_survives(tmp_path, dies):
    run = tmp_path / "two"
    procs = _start_two(CLI + ["--output", str(run)] + OVERRIDES + ["train.max_steps=100000"], tmp_path)
    started = time.time()
    while not (run / "checkpoint.npz").exists() and time.time() - started < 240:
        time.sleep(0.2)
    assert (run / "checkpoint.npz").exists(), procs[0].communicate(timeout=5)[1][-2000:]
    procs[dies].send_signal(signal.SIGKILL)
    killed = time.time()
    survivor = procs[1 - dies]
    _, err = survivor.communicate(timeout=120)
    assert time.time() - killed < 60  # the bound (heartbeat timeout 10 s; gloo notices at the next step)
    assert survivor.returncode == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("equijax: error: another process of this distributed run stopped"), err[-3000:]
    assert "Traceback" not in err and "@ 0x" not in err, err[-3000:]  # one line: no Python or C++ trace
    assert int(checkpoint.load(run / "checkpoint.npz")["step"]) >= 4  # still resumable

