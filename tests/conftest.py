"""Test configuration: 8 virtual CPU devices (for the sharding tests) and
float32 everywhere."""

import os
import shutil
import tempfile

# The tests compile many identical programs (one optimizer on the same shapes
# in several tests); a compilation cache shared by the run's processes compiles
# each once. The first process (pytest, or xdist's controller) makes a
# directory that its workers inherit, and removes it at the end. A cache
# directory of the caller's own is used and kept. Before JAX is imported.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(
      prefix="optax_shampoo4_tests_")
  os.environ["OPTAX_SHAMPOO4_TEST_CACHE_OWNER"] = str(os.getpid())
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")

# Must happen before JAX creates its CPU backend.
os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"

# Importing the package applies the jaxlib 0.10 CPU workaround first.
import optax_shampoo4  # noqa: E402,F401


def pytest_sessionfinish():
  if os.environ.get("OPTAX_SHAMPOO4_TEST_CACHE_OWNER") == str(os.getpid()):
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
