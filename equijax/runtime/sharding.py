"""Data parallelism over a device mesh: replicated states, batches split on their shard axis.

Parameters are replicated and a batch's leading (shard) axis is split over
a one-dimensional ``jax.sharding.Mesh`` named ``"data"``; ``jit``
partitions the computation. Over several processes each one feeds the
shards of its own devices.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def host(tree):
    """Host (numpy) copies of replicated arrays, also in a run of several processes.

    A replicated global array spans devices this process cannot read, but
    every process holds all of it: its first local shard is the value.
    """
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(x.addressable_data(0))
        return np.asarray(jax.device_get(x))

    return jax.tree_util.tree_map(one, tree)


def data_mesh(devices=None) -> Mesh:
    """A 1-D mesh named ``"data"`` over all (global) devices."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    return Mesh(devices, ("data",))


def replicate(tree, mesh: Mesh):
    return jax.device_put(tree, NamedSharding(mesh, P()))


def shard(stacked, mesh: Mesh, local: bool = False):
    """Split a stacked batch's leading (shard) axis over the mesh.

    With ``local=False`` every host holds the same global batch (same
    files, same seed); on several hosts each one hands over only the shards
    of its own devices (``jax.devices()`` lists devices process by process).
    With ``local=True`` the batch holds only this process's shards (it built
    nothing else). JAX assembles the global array.
    """
    sharding = NamedSharding(mesh, P("data"))
    if jax.process_count() == 1:
        return jax.device_put(stacked, sharding)
    per_host = jax.local_device_count()
    start = jax.process_index() * per_host

    def local_part(x):
        x = np.asarray(x)
        if local:
            return jax.make_array_from_process_local_data(sharding, x, (mesh.size,) + x.shape[1:])
        return jax.make_array_from_process_local_data(sharding, x[start : start + per_host], x.shape)

    return jax.tree_util.tree_map(local_part, stacked)
