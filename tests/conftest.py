"""Test configuration: simulate 8 CPU devices before anything touches jax, and use fp64 where asked."""
import os

os.environ.setdefault("XLA_FLAGS", "")
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
