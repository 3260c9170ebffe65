"""Test configuration: 8 virtual CPU devices (for the sharding tests) and
float32 everywhere."""

import os

# Must happen before JAX creates its CPU backend.
os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"

# Importing the package applies the jaxlib 0.10 CPU workaround first.
import optax_shampoo4  # noqa: E402,F401
