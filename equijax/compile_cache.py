"""A persistent cache of compiled XLA programs, so that first calls cost seconds.

JAX can keep every compiled program on disk, keyed by the program, the
compiler options and the machine; a second process that asks for the same
computation loads it instead of compiling. The library never turns this on
by itself (importing equijax flips no JAX flag): the command line and
:class:`equijax.calculator.EquijaxCalculator` call :func:`enable`, and
anyone else may.

Where: ``$EQUIJAX_CACHE_DIR``, else ``$XDG_CACHE_HOME/equijax/xla``, else
``~/.cache/equijax/xla``. ``EQUIJAX_CACHE_DIR=off`` disables it. Entries
are XLA executables written by JAX itself; equijax deserialises nothing
else from there.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import jax


def default_dir() -> Path | None:
    """The cache folder the CLI and the calculator use; ``None`` when switched off."""
    explicit = os.environ.get("EQUIJAX_CACHE_DIR")
    if explicit:
        return None if explicit.lower() in ("off", "0", "none", "false") else Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "equijax" / "xla"


def enable(path=None) -> Path | None:
    """Use a persistent compilation cache at ``path`` (default :func:`default_dir`).

    Keeps a cache the user already configured in JAX. Every program is
    cached, however quick its compilation, since a model's small programs
    add up. Returns the folder in use, or ``None`` (switched off, or the
    folder cannot be created).
    """
    current = jax.config.jax_compilation_cache_dir
    if current:
        return Path(current)
    path = default_dir() if path is None else Path(path).expanduser()
    if path is None:
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None  # a read-only home: compile as before
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    # a cache miss is normal; JAX reports some as warnings that would alarm a user
    logging.getLogger("jax._src.compilation_cache").setLevel(logging.ERROR)
    logging.getLogger("jax._src.compiler").setLevel(logging.ERROR)
    # XLA:CPU logs every cache hit on some AMD processors as an error: it compares the compiler's
    # tuning flags (+prefer-no-gather, +prefer-no-scatter) with the host's instruction sets; the
    # programs are this machine's own. Only XLA's C++ messages below FATAL are silenced.
    try:
        from jax._src.lib import utils

        utils.absl_set_min_log_level(3)
    except (ImportError, AttributeError):  # a JAX without it: messages stay
        pass
    return path
