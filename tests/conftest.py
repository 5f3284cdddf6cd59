"""Test setup: the CPU backend with 8 fake devices, so sharding is exercised on one machine.

JAX's persistent compilation cache is on for the whole session (and, through the environment,
for the subprocesses tests start): programs compiled by one test file, or by a `diffusax.main`
subprocess, are reused by the next instead of compiled again on these two slow cores.
"""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
JAX_CACHE = os.path.join(tempfile.gettempdir(), f"diffusax-test-jax-cache-{os.getuid()}")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", JAX_CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_enable_x64", False)
