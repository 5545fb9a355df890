"""Several processes training together: JAX's distributed runtime, started from the environment.

A run is only as robust as its weakest process. When one dies, the others
meet the loss at their next collective (gloo reports the broken connection
at once) or, between collectives, when the coordination service misses the
dead process's heartbeats for ``heartbeat_timeout`` seconds; the ``equijax``
command then stops every survivor with one line and a non-zero exit, without
waiting for JAX's shutdown barrier (which would wait for the dead process).
Checkpoints are written atomically by process 0 alone, so the last one
resumes.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import jax
import numpy as np

#: seconds without a process's heartbeat before the run counts it as dead (``EQUIJAX_HEARTBEAT_TIMEOUT``)
HEARTBEAT_TIMEOUT = 60
#: words of the errors JAX raises when another process of the run is gone
PEER_LOST = ("Gloo", "gloo", "heartbeat", "coordination service", "Connection reset", "UNAVAILABLE")


def init_distributed(heartbeat_timeout: int | None = None) -> None:
    """Start JAX's distributed runtime for a run of several processes.

    Reads ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0),
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` when they are set (JAX
    itself reads only the first); without them, JAX detects the cluster
    (SLURM, Open MPI, ...). Cross-process collectives of CPU devices go
    through gloo, so several processes of one machine train together too.

    Args:
        heartbeat_timeout: seconds without a heartbeat before a process
            counts as dead (default ``$EQUIJAX_HEARTBEAT_TIMEOUT``, else
            :data:`HEARTBEAT_TIMEOUT`); also the bound on the shutdown wait.

    Raises:
        ValueError: a malformed variable, or an incomplete cluster description.
    """
    kwargs = {}
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        kwargs["coordinator_address"] = os.environ["JAX_COORDINATOR_ADDRESS"]
    for name, key in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id"),
                      ("EQUIJAX_HEARTBEAT_TIMEOUT", "heartbeat_timeout_seconds")):
        if os.environ.get(name):
            try:
                kwargs[key] = int(os.environ[name])
            except ValueError:
                raise ValueError(f"{name} must be an integer, got {os.environ[name]!r}") from None
    if heartbeat_timeout is not None:
        kwargs["heartbeat_timeout_seconds"] = int(heartbeat_timeout)
    kwargs.setdefault("heartbeat_timeout_seconds", HEARTBEAT_TIMEOUT)
    kwargs["shutdown_timeout_seconds"] = kwargs["heartbeat_timeout_seconds"]
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # affects CPU devices only
    try:
        jax.distributed.initialize(**kwargs)
    except ValueError as err:
        raise ValueError(f"jax.distributed.initialize: {err} (set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and "
                         "JAX_PROCESS_ID, or run under SLURM)") from err


def check_shared_folder(folder) -> None:
    """Refuse, in every process at once, a run whose processes do not share ``folder``.

    Process 0 alone writes the run's files and every process resumes from
    its checkpoint, so all of them need the same folder (a shared
    filesystem, or one machine). Process 0 leaves a random token there and
    every process looks for it; one line names the processes that do not
    see it. Nothing to do in a run of one process.

    Raises:
        ValueError: some process does not see process 0's folder.
    """
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    folder = Path(folder)
    path = folder / ".equijax-run"
    token = np.frombuffer(secrets.token_bytes(8), np.uint8) if jax.process_index() == 0 else np.zeros(8, np.uint8)
    token = np.asarray(multihost_utils.broadcast_one_to_all(token), np.uint8)
    if jax.process_index() == 0:
        path.write_bytes(token.tobytes())
    multihost_utils.sync_global_devices("equijax: run folder marked")
    seen = path.exists() and path.read_bytes() == token.tobytes()
    flags = np.asarray(multihost_utils.process_allgather(np.array([seen]))).ravel()
    if jax.process_index() == 0:
        path.unlink(missing_ok=True)
    if not flags.all():
        missing = [int(k) for k in np.nonzero(~flags)[0]]
        raise ValueError(f"process(es) {missing} do not see the run folder {folder} that process 0 writes: give "
                         "every process the same --output on a filesystem they share (process 0 alone writes it)")


def lost_peer(err: BaseException) -> bool:
    """Whether ``err`` is JAX's report that another process of a distributed run is gone."""
    return jax.process_count() > 1 and any(word in str(err) for word in PEER_LOST)
