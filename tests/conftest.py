"""Test configuration: float64 available, NaNs and infs are errors, cheap compilations."""

import os

# The suite is dominated by XLA compilations of small programs: the lowest backend optimisation level
# (compile 19.4 -> 9.6 s for the physics-test model), then XLA:CPU's classic code generation with its
# fast-compile preset (-> 7.1 s; experiments/results/test_compile_flags.json); no fast math, so the numbers
# stay IEEE arithmetic and every tolerance below still holds. Set before JAX starts its backend; subprocesses
# (notebook kernels, the CLI, the sharded and distributed runs) inherit it.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
                           " --xla_llvm_disable_expensive_passes=true --xla_cpu_use_fusion_emitters=false"
                           " --xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_COMPILE").strip()

import shutil  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

# The suite is mostly compilation, and many tests compile the same small programs (a killed run and its
# resume; the same tiny config in several files; the CLI in subprocesses). One persistent compilation cache
# per test run, shared by both workers and every subprocess they start (EQUIJAX_CACHE_DIR is what the CLI
# and the notebooks' calculators read), compiles each program once. Never the user's ~/.cache/equijax.
# The controller imports this file first and makes the folder; the workers it spawns inherit the variable.
if "EQUIJAX_TEST_CACHE" not in os.environ:
    os.environ["EQUIJAX_TEST_CACHE"] = tempfile.mkdtemp(prefix="equijax-tests-")
CACHE = Path(os.environ["EQUIJAX_TEST_CACHE"]) / "xla"
os.environ["EQUIJAX_CACHE_DIR"] = str(CACHE)

import jax  # noqa: E402
import pytest  # noqa: E402

from equijax import compile_cache  # noqa: E402

compile_cache.enable(CACHE)
jax.config.update("jax_enable_x64", True)  # tests only; the library flips no flags
# NaN and inf checks are switched on where a test asks for them (padding, training steps), not for the whole
# suite: checking every output of every call made the suite about 30% slower (tests/test_model.py, 45 -> 33 s)


def pytest_unconfigure(config):
    if not hasattr(config, "workerinput"):  # the controller (or a run without workers): the run is over
        shutil.rmtree(os.environ["EQUIJAX_TEST_CACHE"], ignore_errors=True)


@pytest.fixture
def nan_checks():
    """JAX raises FloatingPointError where any operation makes a NaN or an inf, for one test."""
    with jax.debug_nans(True), jax.debug_infs(True):
        yield


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
