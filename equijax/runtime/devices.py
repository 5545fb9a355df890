"""The machine: what a result was measured on, and how much memory a compiled program needs and has."""

from __future__ import annotations

import os
import platform

import jax


def machine_info() -> dict:
    """Where a result was measured: processor, cores, JAX version and devices (for result files)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "jax": jax.__version__, "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()]}


def memory_needed(compiled) -> int | None:
    """Bytes a compiled step holds at its peak (arguments, outputs, temporaries), if XLA says."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001: not every backend reports it
        return None
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)


def memory_available(device=None) -> int | None:
    """Bytes free on ``device`` (an accelerator's limit, or the host's available memory)."""
    device = device or jax.devices()[0]
    if device.platform != "cpu":
        try:
            stats = device.memory_stats() or {}
            return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
        except Exception:  # noqa: BLE001
            return None
    try:
        with open("/proc/meminfo") as f:
            info = {l.split(":")[0]: l.split()[1] for l in f}
        return int(info["MemAvailable"]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def check_memory(compiled, members: int, device=None, what: str = "train.ensemble") -> None:
    """Raise a clear error when a compiled K-member step cannot fit in memory.

    Raises:
        MemoryError: with the need, the room and the largest K that fits.
    """
    need, room = memory_needed(compiled), memory_available(device)
    if need is None or room is None or need <= room:
        return
    per_member = need / members
    fits = int(room // per_member)
    raise MemoryError(f"{what}={members} needs about {need / 2**30:.1f} GiB per step and the device has "
                      f"{room / 2**30:.1f} GiB free: use {what}={max(fits, 1)} or fewer, or a smaller batch")
