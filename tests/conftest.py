"""Test setup: 8 fake CPU devices, set before JAX starts, so sharding is exercised."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    _flags += " --xla_force_host_platform_device_count=8"
# Tests compile far more than they compute: XLA's backend optimisation level 0 cut the CPU time
# of tests/test_decode.py by ~30% here (88 s vs 126 s). MC_JAX_TEST_XLA_OPT=1 turns it off.
if os.environ.get("MC_JAX_TEST_XLA_OPT", "0") == "0" and "xla_backend_optimization_level" not in _flags:
    _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = _flags.strip()

import pytest  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", default=False,
                     help="run long property-test settings (many more random sequences)")


def pytest_configure(config):
    if config.getoption("--slow"):
        os.environ["MC_JAX_SLOW_TESTS"] = "1"


@pytest.fixture(scope="session")
def slow(request):
    return bool(request.config.getoption("--slow"))


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """After each test module: drop JAX's compiled executables and mc_jax's step caches. One
    process runs the whole suite, and every compiled CPU executable keeps memory mappings; past
    the kernel's vm.max_map_count (65,530 here) XLA's next compile crashes (seen as a segfault
    in a late test once the suite grew)."""
    yield
    import gc

    import jax

    from mc_jax.training import loop, step

    step._STEP_CACHE.clear()
    loop._COMPILED.clear()
    jax.clear_caches()
    gc.collect()
