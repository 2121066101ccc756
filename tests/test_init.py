"""Tests for kexue_jax.nn.init: sampling distributions, second-moment init, activation constants, NTK
(kexue.fm/archives/8620). Independent references: numpy fp64 quadrature and the post's published numbers."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kexue_jax.nn import init
from kexue_jax.nn.attention import Dense

N_SAMPLES = 10**6


def _np_trapezoid_gaussian(fn, lo, hi, n=400_001):
    """int_lo^hi fn(x) phi(x) dx by the trapezoid rule on a fine fp64 grid (independent of init's Simpson)."""
    x = np.linspace(lo, hi, n)
    y = fn(x) * np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    return float(np.sum((y[1:] + y[:-1]) * 0.5 * np.diff(x)))


# -- sampling distributions -----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["normal", "uniform", "truncated_normal"])
@pytest.mark.parametrize("std", [0.02, 1.7])
def test_empirical_std_within_1_percent(name, std):
    x = np.asarray(getattr(init, name)(std)(jax.random.key(1), (N_SAMPLES,), jnp.float32), np.float64)
    assert abs(x.std() / std - 1.0) < 0.01
    assert abs(x.mean()) < 0.01 * std  # zero mean; s.e. of the mean is std/1000


def test_sample_dispatches_by_name_and_mean_shift():
    for name in ("normal", "uniform", "truncated_normal"):
        a = init.sample(name, 0.5)(jax.random.key(2), (1000,))
        b = getattr(init, name)(0.5)(jax.random.key(2), (1000,))
        np.testing.assert_array_equal(a, b)
    x = np.asarray(init.normal(0.5, mean=3.0)(jax.random.key(3), (N_SAMPLES,)), np.float64)
    assert abs(x.mean() - 3.0) < 0.01 and abs(x.std() / 0.5 - 1) < 0.01


def test_uniform_support_is_plus_minus_sqrt3_std():
    std = 0.3
    x = np.asarray(init.uniform(std)(jax.random.key(4), (N_SAMPLES,)))
    half = math.sqrt(3) * std
    assert np.all(np.abs(x) <= half * (1 + 1e-6))
    assert np.abs(x).max() > 0.999 * half  # the support really reaches +-sqrt(3) std


def test_truncated_normal_gamma_and_correction_factor():
    # gamma = int_{-2}^{2} x^2 phi / int_{-2}^{2} phi, by independent numpy quadrature and the post's value.
    num = _np_trapezoid_gaussian(lambda x: x * x, -2.0, 2.0)
    den = _np_trapezoid_gaussian(np.ones_like, -2.0, 2.0)
    assert init.truncated_normal_variance(2.0) == pytest.approx(num / den, abs=1e-9)
    assert init.truncated_normal_variance(2.0) == pytest.approx(0.7737413, abs=5e-8)
    assert 1.0 / math.sqrt(init.truncated_normal_variance(2.0)) == pytest.approx(1.1368472, abs=5e-8)
    num3 = _np_trapezoid_gaussian(lambda x: x * x, -3.0, 3.0)
    den3 = _np_trapezoid_gaussian(np.ones_like, -3.0, 3.0)
    assert init.truncated_normal_variance(3.0) == pytest.approx(num3 / den3, abs=1e-9)


def test_truncated_normal_bound_and_hand_rolled_undershoot():
    std = 0.02
    ours = np.asarray(init.truncated_normal(std)(jax.random.key(5), (N_SAMPLES,)), np.float64)
    s = std * 1.1368472  # the scale of the underlying normal; truncation at +-2s
    assert np.all(np.abs(ours) <= 2 * s * (1 + 1e-6))
    assert np.abs(ours).max() > 0.999 * 2 * s
    hand = np.asarray(std * jax.random.truncated_normal(jax.random.key(5), -2.0, 2.0, (N_SAMPLES,)), np.float64)
    assert hand.std() / std == pytest.approx(0.8796, abs=0.003)  # sqrt(gamma) = 0.87962566
    assert ours.std() / std == pytest.approx(1.0, abs=0.003)
    # jax's own variance_scaling(truncated_normal) corrects too (the post's JAX note).
    vs = jax.nn.initializers.variance_scaling(std**2, "fan_in", "truncated_normal")(
        jax.random.key(6), (1, N_SAMPLES))
    assert float(np.std(vs)) / std == pytest.approx(1.0, abs=0.01)


# -- stable second moment: LeCun and He ------------------------------------------------------------

# E[y^2] is an expectation over the weights as well as the inputs. One network is not enough for
# non-zero-mean inputs or ReLU: the common mean vector passes every layer as one direction whose norm
# fluctuates by O(1/sqrt(width)) per layer. So we average over an ensemble of NETS independent networks
# (largest layer-10 deviation over 10 seeds: 1.7% linear and 3.5% ReLU with 8192 nets; the linear tests
# use 4096 nets, where it scales to ~2.4%).
WIDTH, BATCH, NETS, DEPTH = 32, 2, 8192, 10


@functools.partial(jax.jit, static_argnums=(0, 1))
def _second_moments_through_depth(kernel_init, activation, x, key):
    """E[x_l^2] for l = 1..DEPTH, x_{l+1} = act(x_l W_l), W_l from kernel_init, averaged over the
    x.shape[0] independent nets of the ensemble."""
    def layer(x, k):
        w = jax.vmap(lambda kk: kernel_init(kk, (WIDTH, WIDTH), jnp.float32))(jax.random.split(k, x.shape[0]))
        x = activation(jnp.einsum("nbi,nio->nbo", x, w))
        return x, jnp.mean(x * x)

    return jax.lax.scan(layer, x, jax.random.split(key, DEPTH))[1]


def _inputs(kind):
    z = jax.random.normal(jax.random.key(8), (NETS, BATCH, WIDTH))
    if kind == "zero_mean":
        return z
    return jnp.abs(z)  # all positive, mean 0.80, E[x^2] = 1


def _identity(y):
    return y


@pytest.mark.parametrize("distribution,inputs", [
    ("normal", "all_positive"), ("truncated_normal", "all_positive"), ("uniform", "zero_mean")])
def test_lecun_preserves_second_moment_through_10_linear_layers(distribution, inputs):
    m = np.asarray(_second_moments_through_depth(init.lecun(distribution), _identity,
                                                 _inputs(inputs)[: NETS // 2], jax.random.key(7)))
    assert np.all(np.abs(m - 1.0) < 0.05), m


@pytest.mark.parametrize("distribution,inputs", [("truncated_normal", "all_positive"), ("normal", "zero_mean")])
def test_he_preserves_second_moment_through_10_relu_layers(distribution, inputs):
    m = np.asarray(_second_moments_through_depth(init.he(distribution), jax.nn.relu, _inputs(inputs),
                                                 jax.random.key(7)))
    assert np.all(np.abs(m - 1.0) < 0.05), m


def test_lecun_with_relu_decays_as_half_per_layer():
    # The control: without He's factor 2 the second moment halves at every ReLU layer.
    m = np.asarray(_second_moments_through_depth(init.lecun("normal"), jax.nn.relu, _inputs("zero_mean"),
                                                 jax.random.key(7)))
    np.testing.assert_allclose(m, 0.5 ** np.arange(1, DEPTH + 1), rtol=0.05)
    assert m[-1] < 0.002  # far outside the 5% band the other tests allow


def test_second_moment_init_variance_and_fan_in_axes():
    w = init.second_moment(2.0, "normal", in_axes=2, extra=0.25)(jax.random.key(9), (16, 32, 2000))
    # Var = extra * gain / (16 * 32)
    assert float(jnp.var(w)) == pytest.approx(0.25 * 2.0 / 512, rel=0.01)
    assert init.fan_in((16, 32, 2000), 2) == 512 and init.fan_in((7, 3), 1) == 7


# -- NTK parameterization --------------------------------------------------------------------------

def test_ntk_dense_has_lecun_forward_statistics():
    # Same keys: NTK draws z ~ N(0,1) and multiplies the output by 1/sqrt(m); LeCun draws z/sqrt(m). The two
    # forward passes then agree to rounding, so the statistics measured in the LeCun tests carry over.
    ntk = Dense((WIDTH,), use_bias=False, kernel_init=init.normal(1.0),
                multiplier=init.ntk_multiplier((WIDTH, WIDTH)))
    lecun = Dense((WIDTH,), use_bias=False, kernel_init=init.lecun("normal"))
    x = {"ntk": _inputs("all_positive")[:256], "lecun": _inputs("all_positive")[:256]}
    for k in jax.random.split(jax.random.key(10), DEPTH):
        keys = jax.random.split(k, 256)
        for name, layer in (("ntk", ntk), ("lecun", lecun)):
            params = jax.vmap(layer.init, in_axes=(0, None))(keys, x[name][0])
            x[name] = jax.vmap(layer.apply)(params, x[name])
            if name == "ntk":
                assert float(jnp.std(params["params"]["kernel"])) == pytest.approx(1.0, abs=0.01)
            else:
                assert float(jnp.std(params["params"]["kernel"])) == pytest.approx(WIDTH**-0.5, rel=0.01)
        np.testing.assert_allclose(x["ntk"], x["lecun"], rtol=1e-4, atol=1e-5)
    assert init.ntk_multiplier((WIDTH, WIDTH)) == pytest.approx(1 / math.sqrt(WIDTH))
    assert init.ntk_multiplier((4, 8, 3), in_axes=2) == pytest.approx(1 / math.sqrt(32))
    assert float(jnp.mean(x["ntk"] ** 2)) == pytest.approx(1.0, abs=0.3)  # 256 nets only: loose


# -- activation rescaling constants ---------------------------------------------------------------

def test_sigmoid_second_moment_post_value():
    assert init.activation_second_moment("sigmoid") == pytest.approx(0.2933790, abs=1e-7)
    indep = _np_trapezoid_gaussian(lambda x: (1 / (1 + np.exp(-x))) ** 2, -14, 14)
    assert init.activation_second_moment("sigmoid") == pytest.approx(indep, abs=1e-10)


def test_gelu_tanh_relu_second_moments():
    assert abs(init.activation_second_moment("gelu") - 0.4252) < 5e-5
    assert abs(init.activation_second_moment("tanh") - 0.3943) < 5e-5
    assert init.activation_second_moment("relu") == pytest.approx(0.5, abs=1e-12)
    assert init.activation_second_moment("linear") == pytest.approx(1.0, abs=1e-12)
    assert init.activation_second_moment(np.abs) == pytest.approx(1.0, abs=1e-12)  # a callable


def test_rescaled_sigmoid_has_unit_second_moment_monte_carlo():
    c = init.rescale_constant("sigmoid")
    assert c == pytest.approx(1 / math.sqrt(0.2933790), rel=1e-7)
    z = jax.random.normal(jax.random.key(11), (N_SAMPLES,))
    assert float(jnp.mean((c * jax.nn.sigmoid(z)) ** 2)) == pytest.approx(1.0, abs=0.005)


def test_selu_constants_post_values_and_jax():
    lam, alpha = init.selu_constants()
    assert lam == pytest.approx(1.0507010, abs=1e-6)
    assert alpha == pytest.approx(1.6732632, abs=1e-6)
    # they solve E[selu] = 0 and E[selu^2] = 1 (independent trapezoid quadrature)
    selu = lambda x: lam * np.where(x > 0, x, alpha * np.expm1(np.minimum(x, 0)))
    assert _np_trapezoid_gaussian(selu, -14, 14) == pytest.approx(0.0, abs=1e-8)
    assert _np_trapezoid_gaussian(lambda x: selu(x) ** 2, -14, 14) == pytest.approx(1.0, abs=1e-8)
    # jax.nn.selu uses the same constants: selu(1) = lambda, selu(-inf) = -lambda alpha.
    assert float(jax.nn.selu(jnp.float32(1.0))) == pytest.approx(lam, abs=1e-6)
    assert -float(jax.nn.selu(jnp.float32(-60.0))) / lam == pytest.approx(alpha, abs=1e-6)


# -- bad arguments ----------------------------------------------------------------------------------

@pytest.mark.parametrize("call,field", [
    (lambda: init.normal(-1.0), "std"),
    (lambda: init.uniform(float("nan")), "std"),
    (lambda: init.truncated_normal("0.1"), "std"),
    (lambda: init.truncated_normal(1.0, bound=0.0), "bound"),
    (lambda: init.truncated_normal_variance(-1.0), "bound"),
    (lambda: init.sample("laplace", 1.0), "distribution"),
    (lambda: init.second_moment(distribution="cauchy"), "distribution"),
    (lambda: init.lecun("cauchy"), "distribution"),
    (lambda: init.second_moment(gain=0.0), "gain"),
    (lambda: init.second_moment(extra=-1.0), "extra"),
    (lambda: init.fan_in((3, 4), in_axes=0), "in_axes"),
    (lambda: init.fan_in((3, 4), in_axes=3), "in_axes"),
    (lambda: init.gaussian_expectation(np.cos, panels=6), "panels"),
    (lambda: init.activation_second_moment("swish"), "activation"),
])
def test_bad_arguments_raise_value_error_naming_the_field(call, field):
    with pytest.raises(ValueError, match=field):
        call()


def test_distribution_error_lists_allowed_values():
    with pytest.raises(ValueError) as e:
        init.sample("laplace", 1.0)
    for allowed in ("normal", "uniform", "truncated_normal"):
        assert allowed in str(e.value)
