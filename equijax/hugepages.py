"""Transparent huge pages for XLA's CPU buffers: the ``equijax`` command's fast path.

Why. XLA on CPU allocates each call's temporaries (for the benchmark model
about a gigabyte) with ``malloc``. glibc serves blocks above its mmap
threshold, which it caps at 32 MiB, with a fresh ``mmap`` and returns them
with ``munmap`` when freed, so every call faults its memory in again, one
4 KiB page at a time, and the kernel zero-fills each page
(``experiments/benchmark.py`` records the faults and the system time). glibc's tunable
``glibc.malloc.hugetlb=1`` (glibc ≥ 2.35) asks the kernel for transparent
huge pages on those blocks (``madvise(MADV_HUGEPAGE)``): far fewer faults and
faster calls (docs: results/performance).

How. glibc reads tunables once, when a process starts, so a library cannot
switch this on inside a running interpreter. The ``equijax`` command
therefore restarts itself once, before any work, with the tunable added to
``GLIBC_TUNABLES`` (:func:`restart`); importing equijax changes nothing. In
your own scripts, start Python with it::

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python my_md.py

``EQUIJAX_HUGEPAGES=0`` keeps the command from restarting. Nothing happens
where it cannot help: not Linux with glibc ≥ 2.35, or transparent huge pages
set to ``never`` by the administrator.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb"
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _glibc_ok() -> bool:
    if sys.platform != "linux":
        return False
    name, version = platform.libc_ver()
    try:
        return name == "glibc" and tuple(int(v) for v in version.split(".")[:2]) >= (2, 35)
    except ValueError:
        return False


def _thp_allowed() -> bool:
    """The kernel's THP mode is ``always`` or ``madvise`` (``[madvise]`` marks the active one)."""
    try:
        return "[never]" not in THP_SETTING.read_text()
    except OSError:
        return False


def _tunables(value: str) -> dict:
    """``"a=1:b=2"`` (glibc's ``GLIBC_TUNABLES`` syntax) -> ``{"a": "1", "b": "2"}``."""
    return dict(item.partition("=")[::2] for item in value.split(":") if item)


def environment(env: dict) -> dict | None:
    """``env`` with the tunable added to ``GLIBC_TUNABLES``, or ``None`` if nothing should change.

    ``None`` when the user set the tunable (either way) or opted out with
    ``EQUIJAX_HUGEPAGES=0``. Other tunables already in the variable are kept.
    """
    if env.get("EQUIJAX_HUGEPAGES", "1").lower() in ("0", "off", "false", "no"):
        return None
    tunables = env.get("GLIBC_TUNABLES", "")
    if TUNABLE in _tunables(tunables):
        return None
    return {**env, "GLIBC_TUNABLES": f"{tunables}:{TUNABLE}=1" if tunables else f"{TUNABLE}=1"}


def restart(argv: list, debug: bool = False) -> None:
    """Replace this process by ``python -m equijax.cli ARGV`` with huge pages; returns if not needed.

    Called by the command line before any work (never on import). The new
    process sees the tunable already set, so it runs on and never restarts
    again.
    """
    if not (_glibc_ok() and _thp_allowed()):
        return
    env = environment(dict(os.environ))
    if env is None:
        return
    if debug:
        print(f"equijax: restarting with GLIBC_TUNABLES={env['GLIBC_TUNABLES']} "
              "(EQUIJAX_HUGEPAGES=0 to skip)", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, "-m", "equijax.cli", *argv], env)
    except OSError:  # the interpreter cannot be started again: go on here, without huge pages
        return


def active() -> bool:
    """Whether this process was started with the tunable on (so XLA's big buffers use huge pages)."""
    value = _tunables(os.environ.get("GLIBC_TUNABLES", "")).get(TUNABLE, "0")
    return _glibc_ok() and _thp_allowed() and value not in ("", "0")
