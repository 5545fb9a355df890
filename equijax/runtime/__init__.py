"""The machine a run uses: processes, devices, meshes, memory.

* :mod:`~equijax.runtime.distributed`: :func:`init_distributed`, several processes as one run.
* :mod:`~equijax.runtime.sharding`: the data mesh, replicated states and sharded batches.
* :mod:`~equijax.runtime.devices`: :func:`machine_info` for results files, and memory checks of compiled programs.
"""

from equijax.runtime.devices import check_memory, machine_info, memory_available, memory_needed
from equijax.runtime.distributed import check_shared_folder, init_distributed, lost_peer
from equijax.runtime.sharding import data_mesh, host, replicate, shard

__all__ = ["check_memory", "check_shared_folder", "lost_peer", "data_mesh", "host", "init_distributed", "machine_info", "memory_available",
           "memory_needed", "replicate", "shard"]
