"""The same potential in another floating-point precision."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@functools.lru_cache(maxsize=8)
def _rebuilt(config):
    from equijax.models import build

    return build(config)  # cached: repeated analyses reuse compiled functions


def float64_model(model, params):
    """The same potential evaluated in float64 (needs ``jax_enable_x64``).

    A float32 model is rebuilt from its config with the architecture's
    standard blocks; a float64 model is returned as it is (it may carry its
    own interaction block).

    Raises:
        RuntimeError: float64 is not enabled in JAX.
    """
    if not jax.config.jax_enable_x64:
        raise RuntimeError("float64 is not enabled: the equijax commands take --float64 (vibrate and phonons "
                           "always use it); in Python call jax.config.update('jax_enable_x64', True) first")
    if model.config.dtype == "float64":
        return model, params
    model64 = _rebuilt(model.config.replace(dtype="float64"))  # a committee's config rebuilds the committee
    params64 = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), params)
    return model64, params64
