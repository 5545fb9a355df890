"""Several processes training together: JAX's distributed runtime, started from the environment."""

from __future__ import annotations

import os

import jax


def init_distributed() -> None:
    """Start JAX's distributed runtime for a run of several processes.

    Reads ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0),
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` when they are set (JAX
    itself reads only the first); without them, JAX detects the cluster
    (SLURM, Open MPI, ...). Cross-process collectives of CPU devices go
    through gloo, so several processes of one machine train together too.

    Raises:
        ValueError: a malformed variable, or an incomplete cluster description.
    """
    kwargs = {}
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        kwargs["coordinator_address"] = os.environ["JAX_COORDINATOR_ADDRESS"]
    for name, key in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
        if os.environ.get(name):
            try:
                kwargs[key] = int(os.environ[name])
            except ValueError:
                raise ValueError(f"{name} must be an integer, got {os.environ[name]!r}") from None
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # affects CPU devices only
    try:
        jax.distributed.initialize(**kwargs)
    except ValueError as err:
        raise ValueError(f"jax.distributed.initialize: {err} (set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and "
                         "JAX_PROCESS_ID, or run under SLURM)") from err
