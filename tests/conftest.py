"""Test configuration: float64 available, NaNs and infs are errors, cheap compilations."""

import os

# The suite is dominated by XLA compilations of small programs: the lowest backend optimisation level
# compiles ~25% faster; the numbers stay IEEE arithmetic, so every tolerance below still holds.
# Set before JAX starts its backend; subprocesses (notebook kernels, the sharded run) inherit it.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
                           " --xla_llvm_disable_expensive_passes=true").strip()

# the CLI and the calculator keep compiled programs in ~/.cache/equijax: not the tests' business
os.environ["EQUIJAX_CACHE_DIR"] = "off"

import jax  # noqa: E402
import pytest

jax.config.update("jax_enable_x64", True)  # tests only; the library flips no flags
jax.config.update("jax_debug_nans", True)
jax.config.update("jax_debug_infs", True)


@pytest.fixture(scope="session")
def small_config():
    """A small float64 NequIP with every feature on (l_max=2, parity) and 3 layers.

    Three layers, because pseudoscalar channels first reach the energy in
    the third: with fewer, any parity bug is invisible (tests/controls.py).
    """
    from equijax import NequIPConfig

    return NequIPConfig(species=(1, 6, 8, 29), cutoff=3.5, l_max=2, parity=True, channels=4,
                        n_layers=3, n_radial=6, radial_hidden=(8,), avg_num_neighbours=8.0,
                        readout_hidden=4, dtype="float64")


@pytest.fixture(scope="session")
def small_model(small_config):
    import equijax

    model = equijax.nequip(small_config)
    return model, model.init(jax.random.PRNGKey(1))
