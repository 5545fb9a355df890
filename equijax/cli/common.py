"""What several commands share: loading a model file in the precision it was trained in."""

from __future__ import annotations


def enable_float64() -> None:
    """Switch JAX to float64 for this process (the application may; the library never does)."""
    import jax

    jax.config.update("jax_enable_x64", True)


def load_model(path, float64: bool = False):
    """``equijax.load(path)``, in float64 when the file is a float64 model or ``float64`` asks for it
    (then a float32 model is evaluated in float64 too)."""
    from equijax import checkpoint
    from equijax.models import float64_model

    if float64 or checkpoint.stored_dtype(path) == "float64":
        enable_float64()  # before any array exists, so the file's float64 arrays stay float64
    model, params, metadata = checkpoint.load_model(path)
    if float64:
        model, params = float64_model(model, params)
    return model, params, metadata
