"""Test configuration: simulate 8 CPU devices before anything touches jax, compile fast, and use fp64 where asked."""
import os

os.environ.setdefault("XLA_FLAGS", "")
# Most of the suite's time is XLA compiling many small configurations: at LLVM -O0 that costs about 35% less CPU
# time (measured on the training, UniVAE and init-study tests, which also run slightly faster: tiny models). The
# HLO passes are the same; results agree within every tolerance here. KEXUE_TEST_XLA_O0=0 keeps XLA's default.
_flags = os.environ["XLA_FLAGS"]
if os.environ.get("KEXUE_TEST_XLA_O0", "1") != "0" and "xla_backend_optimization_level" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_backend_optimization_level=0").strip()
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import atexit  # noqa: E402
import contextlib  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

# KEXUE_TEST_XLA_CACHE=1: a compilation cache of this test session only (a fresh folder, removed at exit). A test
# that builds a computation some earlier test already compiled, in a new jit, loads the executable instead of
# compiling it again. Off by default: with jax 0.10.2 on CPU, writing entries (executable.serialize()) crashed the
# whole session natively in 4 of 5 full runs, always in the float64 tests of test_upscale.py or test_training.py.
if os.environ.get("KEXUE_TEST_XLA_CACHE", "0") == "1":
    _XLA_CACHE = tempfile.mkdtemp(prefix="kexue_jax_tests_xla_cache_")
    atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
    jax.config.update("jax_compilation_cache_dir", _XLA_CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.3)  # the expensive compilations only
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

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
