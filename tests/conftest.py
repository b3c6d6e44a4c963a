"""Test setup: 8 fake CPU devices, set before JAX starts, so sharding is exercised."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

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
