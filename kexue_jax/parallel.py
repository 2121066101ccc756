"""Meshes, shardings and the pmap data-parallel mode.

Default mode ("sharded"): ``jax.jit`` over a ``jax.sharding.Mesh`` with axes ("data", "fsdp"). The batch
is split over both axes (every device holds different rows); parameters and optimizer state are
replicated over "data" and, when ``fsdp > 1``, split over "fsdp" along their largest divisible axis
(ZeRO-3 / FSDP: XLA inserts the all-gathers and reduce-scatters). State is born sharded:
``jax.jit(init, out_shardings=...)``.

"pmap" mode: the classic replicated data parallelism (``jax.pmap`` with ``lax.psum`` of gradients), kept
because users ask for it; it gives the same numbers as the sharded mode (tests).

Nothing here touches devices at import time.
"""
from __future__ import annotations

import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MODES = ("sharded", "pmap")
BATCH_AXES = ("data", "fsdp")

#: dense bf16 peak FLOP/s per device for MFU (vendor figures, no sparsity); other devices are measured.
#: The first key contained in the lower-cased ``device_kind`` wins, so the PCIe / NVL H100 come first.
_PEAK_FLOPS = {"v4": 275e12, "v5 lite": 197e12, "v5e": 197e12, "v5p": 459e12, "v6": 918e12,
               "h100 pcie": 756e12, "h100 nvl": 835e12,
               "h100": 989e12, "h200": 989e12, "a100": 312e12, "l4": 121e12}


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
    """A ("data", "fsdp") mesh. ``data=-1`` uses every device (``devices`` or ``jax.devices()``);
    otherwise the first data x fsdp devices (e.g. ``data=1`` for a single-device run)."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if isinstance(fsdp, bool) or not isinstance(fsdp, int) or fsdp < 1 or n % fsdp:
        raise ValueError(f"parallel.fsdp must be a positive divisor of the device count {n}, got {fsdp}")
    if data == -1:
        data = n // fsdp
    if isinstance(data, bool) or not isinstance(data, int) or data < 1 or data * fsdp > n:
        raise ValueError(f"parallel.data must be -1 (all devices) or a positive integer with data x fsdp <= "
                         f"the device count {n}, got data={data}, fsdp={fsdp}")
    if data * fsdp < n and jax.process_count() > 1:
        raise ValueError("parallel.data=-1 is required with several processes (every device takes part)")
    return jax.make_mesh((data, fsdp), BATCH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2,
                         devices=devices[:data * fsdp])


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows of a batch split over every device (both mesh axes)."""
    return NamedSharding(mesh, P(BATCH_AXES))


def param_spec(shape, fsdp: int, min_size: int = 2 ** 14) -> P:
    """FSDP rule: split the largest axis divisible by ``fsdp`` when the tensor has >= min_size entries."""
    if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % fsdp == 0:
            spec = [None] * len(shape)
            spec[axis] = "fsdp"
            return P(*spec)
    return P()


def state_shardings(abstract_state, mesh: Mesh, min_size: int = 2 ** 14):
    """NamedShardings for every leaf of a (params or train-state) tree, by the FSDP rule."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree_util.tree_map(lambda x: NamedSharding(mesh, param_spec(jnp.shape(x), fsdp, min_size)),
                                  abstract_state)


def init_sharded(init_fn, mesh: Mesh, *args):
    """Run ``init_fn(*args)`` under jit with out_shardings from ``state_shardings``: born sharded."""
    abstract = jax.eval_shape(init_fn, *args)
    return jax.jit(init_fn, out_shardings=state_shardings(abstract, mesh))(*args)


# ------------------------------------------------------------------------------------------------
# pmap mode.

def replicate(tree, devices=None):
    """Put a copy of ``tree`` on every local device (leading axis = device), for pmap."""
    devices = list(jax.local_devices() if devices is None else devices)
    sharding = NamedSharding(Mesh(np.array(devices), ("replica",)), P("replica"))

    def one(x):
        x = jnp.asarray(x)
        shards = [jax.device_put(x[None], d) for d in devices]
        return jax.make_array_from_single_device_arrays((len(devices),) + x.shape, sharding, shards)

    return jax.tree_util.tree_map(one, tree)


def unreplicate(tree):
    """The first replica of a pmap-replicated tree."""
    return jax.tree_util.tree_map(lambda x: x[0], tree)


def split_for_pmap(batch: dict, num_devices: int) -> dict:
    """[b, ...] -> [devices, b / devices, ...] (host arrays)."""
    def split(x):
        x = np.asarray(x)
        if x.shape[0] % num_devices:
            raise ValueError(f"batch of {x.shape[0]} rows is not divisible by {num_devices} local devices")
        return x.reshape((num_devices, x.shape[0] // num_devices) + x.shape[1:])
    return {k: split(v) for k, v in batch.items()}


# ------------------------------------------------------------------------------------------------
# Peak FLOP/s for MFU.

@functools.lru_cache(maxsize=None)
def _measured_peak(platform: str, n: int = 1024, repeats: int = 5) -> float:
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


def vendor_peak_flops(device=None) -> tuple[float | None, str | None]:
    """(dense bf16 peak FLOP/s, the table key that matched ``device.device_kind``) for a known TPU/GPU,
    else (None, None): the figure an MFU against the chip's peak divides by."""
    device = jax.devices()[0] if device is None else device
    kind = getattr(device, "device_kind", "").lower()
    for name, flops in _PEAK_FLOPS.items():
        if name in kind:
            return flops, name
    return None, None


def peak_flops_per_device(device=None) -> float:
    """Peak FLOP/s of one device: the vendor bf16 figure for known TPUs/GPUs, else a measured fp32
    matmul (1024^3, best of 5) for CPUs. Used only for the MFU estimate in the progress line."""
    device = jax.devices()[0] if device is None else device
    flops, _ = vendor_peak_flops(device)
    return flops if flops is not None else _measured_peak(device.platform)


def describe(mesh: Mesh | None = None) -> dict[str, Any]:
    """A small summary of the devices (for logs and benchmark JSON)."""
    d = jax.devices()[0]
    out = {"backend": jax.default_backend(), "device_kind": d.device_kind, "devices": jax.device_count(),
           "processes": jax.process_count(), "jax": jax.__version__}
    if mesh is not None:
        out["mesh"] = dict(mesh.shape)
    return out
