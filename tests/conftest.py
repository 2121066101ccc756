"""Test configuration: simulate 8 CPU devices before anything touches jax, and use fp64 where asked."""
import os

os.environ.setdefault("XLA_FLAGS", "")
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import contextlib  # noqa: E402

import pytest  # noqa: E402


@contextlib.contextmanager
def enable_x64():
    """float64 for the duration of a block (jax.enable_x64 where available, else the config flag)."""
    ctx = getattr(jax, "enable_x64", None)
    if ctx is not None:
        with ctx(True):
            yield
        return
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)


@pytest.fixture
def x64():
    """Run one test in float64 without affecting the others."""
    with enable_x64():
        yield
