"""Initialization and parameterization of Transformers (kexue.fm/archives/8620).

Sampling distributions with a requested standard deviation ``std``:

* normal            N(0, std^2)
* uniform           U[-sqrt(3) std, sqrt(3) std]            (variance (b-a)^2/12 = std^2)
* truncated normal  N(0, s^2) resampled outside +-2s, with s = std / sqrt(gamma) so that the
                    variance is exactly std^2, where
                    gamma = int_{-2}^{2} x^2 e^{-x^2/2} dx / int_{-2}^{2} e^{-x^2/2} dx = 0.7737413...
                    (1/sqrt(gamma) = 1.1368472...). A hand-rolled ``std * truncated_normal(-2, 2)`` has
                    std 0.8796 * std; jax's ``variance_scaling(..., "truncated_normal")`` corrects.

"Stable second moment" init: for y_j = sum_i x_i w_ij over m inputs, E[y^2] = m E[w^2] E[x^2] with no
assumption on the mean of x, so Var(w) = gain / m keeps E[y^2] = E[x^2]; gain 1 is LeCun, gain 2 is He
(ReLU zeroes half the units). Activations whose second moment under N(0,1) is not 1 are rescaled by
1/sqrt(E[f(x)^2]) (E[sigmoid^2] = 0.2933790); SELU's lambda, alpha solve E[selu] = 0, E[selu^2] = 1.

NTK parameterization: weights ~ N(0, 1) and the forward pass multiplies by 1/sqrt(fan_in), so every
parameter is O(1) (same forward statistics as LeCun init).

Every initializer here is a flax initializer ``(key, shape, dtype) -> array``.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Initializer = Callable[..., jax.Array]

_DISTRIBUTIONS = ("normal", "uniform", "truncated_normal")


def truncated_normal_variance(bound: float = 2.0) -> float:
    """Variance gamma of N(0, 1) truncated to [-bound, bound] (kexue.fm/archives/8620).

    gamma = int_{-b}^{b} x^2 phi(x) dx / int_{-b}^{b} phi(x) dx = 1 - 2 b phi(b) / (2 Phi(b) - 1),
    which is 0.7737413 for b = 2 (the post's value; TensorFlow's fixed interval).
    """
    if not bound > 0:
        raise ValueError(f"bound must be > 0, got {bound}")
    phi = math.exp(-0.5 * bound * bound) / math.sqrt(2.0 * math.pi)
    mass = math.erf(bound / math.sqrt(2.0))  # 2 Phi(b) - 1
    return 1.0 - 2.0 * bound * phi / mass


def _check_std(std: float) -> float:
    if not (isinstance(std, (int, float, np.floating)) and std >= 0 and math.isfinite(std)):
        raise ValueError(f"std must be a finite number >= 0, got {std!r}")
    return float(std)


def normal(std: float, mean: float = 0.0) -> Initializer:
    """N(mean, std^2)."""
    std = _check_std(std)

    def init(key, shape, dtype=jnp.float32):
        return (mean + std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

    return init


def uniform(std: float, mean: float = 0.0) -> Initializer:
    """U[mean - sqrt(3) std, mean + sqrt(3) std], whose variance is std^2 (kexue.fm/archives/8620)."""
    std = _check_std(std)
    half = math.sqrt(3.0) * std

    def init(key, shape, dtype=jnp.float32):
        return (mean + jax.random.uniform(key, shape, jnp.float32, -half, half)).astype(dtype)

    return init


def truncated_normal(std: float, mean: float = 0.0, bound: float = 2.0) -> Initializer:
    """Truncated normal on mean +- bound*s with s = std/sqrt(gamma): the empirical std equals ``std``.

    gamma = truncated_normal_variance(bound) (0.7737413 at bound 2; correction 1.1368472).
    """
    std = _check_std(std)
    scale = std / math.sqrt(truncated_normal_variance(bound))

    def init(key, shape, dtype=jnp.float32):
        z = jax.random.truncated_normal(key, -bound, bound, shape, jnp.float32)
        return (mean + scale * z).astype(dtype)

    return init


def sample(distribution: str, std: float) -> Initializer:
    """The initializer of ``distribution`` (one of normal, uniform, truncated_normal) with this std."""
    table = {"normal": normal, "uniform": uniform, "truncated_normal": truncated_normal}
    if distribution not in table:
        raise ValueError(f"distribution must be one of {_DISTRIBUTIONS}, got {distribution!r}")
    return table[distribution](std)


def fan_in(shape: Sequence[int], in_axes: int = 1) -> int:
    """Number of inputs m of a kernel whose first ``in_axes`` axes are inputs."""
    if not 1 <= in_axes < len(shape) + 1:
        raise ValueError(f"in_axes must be in [1, {len(shape)}], got {in_axes}")
    return int(np.prod(shape[:in_axes]))


def second_moment(gain: float = 1.0, distribution: str = "truncated_normal", in_axes: int = 1,
                  extra: float = 1.0) -> Initializer:
    """"Stable E[y^2]" init: Var(w) = extra * gain / fan_in (kexue.fm/archives/8620).

    E[y_j^2] = sum_i E[x_i^2] E[w_ij^2] = m E[w^2] for iid zero-mean weights, so Var(w) = 1/m
    keeps the second moment (LeCun, gain 1) and Var(w) = 2/m does so after a ReLU (He, gain 2).
    ``extra`` multiplies the variance (the T5 attention convention uses 1/sqrt(head_dim) on q and k).
    """
    if distribution not in _DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {_DISTRIBUTIONS}, got {distribution!r}")
    for name, value in (("gain", gain), ("extra", extra)):
        if not (isinstance(value, (int, float, np.floating)) and value > 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if not (isinstance(in_axes, int) and in_axes >= 1):
        raise ValueError(f"in_axes must be an integer >= 1, got {in_axes!r}")

    def init(key, shape, dtype=jnp.float32):
        std = math.sqrt(extra * gain / fan_in(shape, in_axes))
        return sample(distribution, std)(key, shape, dtype)

    return init


def lecun(distribution: str = "truncated_normal", in_axes: int = 1) -> Initializer:
    """LeCun init, Var(w) = 1/fan_in: keeps E[y^2] = E[x^2] through a linear layer."""
    return second_moment(1.0, distribution, in_axes)


def he(distribution: str = "truncated_normal", in_axes: int = 1) -> Initializer:
    """He init, Var(w) = 2/fan_in: keeps E[y^2] through a ReLU layer."""
    return second_moment(2.0, distribution, in_axes)


def ntk_multiplier(shape: Sequence[int], in_axes: int = 1) -> float:
    """The NTK-parameterization forward multiplier 1/sqrt(fan_in) (weights are N(0, 1))."""
    return 1.0 / math.sqrt(fan_in(shape, in_axes))


# ----------------------------------------------------------------------------------------------
# Activation rescaling constants (second moment under a standard normal pre-activation).

def gaussian_expectation(fn: Callable[[np.ndarray], np.ndarray], *, half_width: float = 12.0,
                         panels: int = 1 << 16) -> float:
    """E_{x~N(0,1)}[fn(x)] by composite Simpson on [-w, w] in float64 (numpy).

    The grid has x = 0 on a panel boundary, so functions with a kink at 0 (ReLU, ELU, SELU) are
    integrated at full Simpson order. Tails beyond 12 sigma contribute < 1e-30 for the activations here.
    """
    if panels % 4:
        raise ValueError(f"panels must be a multiple of 4, got {panels}")
    x = np.linspace(-half_width, half_width, panels + 1, dtype=np.float64)
    y = np.asarray(fn(x), dtype=np.float64) * np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    h = x[1] - x[0]
    return float(h / 3.0 * (y[0] + y[-1] + 4.0 * y[1:-1:2].sum() + 2.0 * y[2:-1:2].sum()))


def _np_activation(name: str) -> Callable[[np.ndarray], np.ndarray]:
    table = {
        "sigmoid": lambda x: 1.0 / (1.0 + np.exp(-x)),
        "tanh": np.tanh,
        "relu": lambda x: np.maximum(x, 0.0),
        "gelu": lambda x: 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0))),
        "elu": lambda x: np.where(x > 0, x, np.expm1(np.minimum(x, 0.0))),
        "linear": lambda x: x,
    }
    if name not in table:
        raise ValueError(f"activation must be one of {tuple(table)}, got {name!r}")
    return table[name]


def activation_second_moment(activation: str | Callable[[np.ndarray], np.ndarray]) -> float:
    """E_{x~N(0,1)}[f(x)^2] (kexue.fm/archives/8620): sigmoid 0.2933790, gelu 0.4252, tanh 0.3943.

    ``activation`` is a name (sigmoid, tanh, relu, gelu, elu, linear) or a numpy function.
    """
    fn = _np_activation(activation) if isinstance(activation, str) else activation
    return gaussian_expectation(lambda x: fn(x) ** 2)


def rescale_constant(activation: str | Callable[[np.ndarray], np.ndarray]) -> float:
    """1/sqrt(E[f(x)^2]): multiply the activation by this so its output second moment is 1."""
    return 1.0 / math.sqrt(activation_second_moment(activation))


def selu_constants() -> tuple[float, float]:
    """(lambda, alpha) of SELU, solving E[selu(x)] = 0 and E[selu(x)^2] = 1 under x ~ N(0, 1).

    selu(x) = lambda x for x > 0 and lambda alpha (e^x - 1) for x <= 0. The mean condition is linear
    in alpha, alpha = -E[x; x>0] / E[e^x - 1; x<=0]; then lambda = 1/sqrt(E[g_alpha(x)^2]).
    Result: lambda = 1.0507010, alpha = 1.6732632 (the post's Mathematica Solve).
    """
    pos = gaussian_expectation(lambda x: np.maximum(x, 0.0))
    neg = gaussian_expectation(lambda x: np.expm1(np.minimum(x, 0.0)))
    alpha = -pos / neg
    second = gaussian_expectation(
        lambda x: np.where(x > 0, x, alpha * np.expm1(np.minimum(x, 0.0))) ** 2)
    return 1.0 / math.sqrt(second), alpha
