"""Tests for kexue_jax.dims: the dimension formula n > 8.33 ln N (kexue.fm/archives/7695, 8711)."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
from scipy import integrate, special

from kexue_jax import dims

# Post 7695's table of h_n.
POST_TABLE = {32: -7.77471, 64: -15.4734, 96: -23.1726, 128: -30.8718, 256: -61.6692, 512: -123.264}


@pytest.mark.parametrize("n,expected", sorted(POST_TABLE.items()))
def test_h_n_reproduces_post_table(n, expected):
    # 5 significant figures, as printed in the post.
    assert float(f"{dims.h_n(n):.6g}") == pytest.approx(expected, rel=6e-6)


@pytest.mark.parametrize("n", [2, 3, 7, 32, 200])
def test_h_n_against_scipy_quadrature(n):
    # Independent computation: scipy.integrate.quad of the unnormalised density, tilted by e^{n (cos t - 1)}.
    w = lambda t: np.sin(t) ** (n - 2) * np.exp(n * (np.cos(t) - 1.0))
    kw = dict(limit=500, epsabs=0.0, epsrel=1e-13)
    z0 = integrate.quad(lambda t: np.sin(t) ** (n - 2), 0, np.pi, **kw)[0]
    z1 = integrate.quad(w, 0, np.pi, **kw)[0]
    m1 = integrate.quad(lambda t: n * np.cos(t) * w(t), 0, np.pi, **kw)[0]
    expected = math.log(z1 / z0) + n - m1 / z1
    assert dims.h_n(n) == pytest.approx(expected, rel=1e-8)  # trapezoid is O(h^2) for odd n-2 only


def test_h_2_closed_form_bessel():
    # n = 2: the angle is uniform, E[e^{2 cos t}] = I0(2) and E[2 cos t e^{2 cos t}] = 2 I1(2).
    expected = math.log(special.i0(2.0)) - 2.0 * special.i1(2.0) / special.i0(2.0)
    assert dims.h_n(2) == pytest.approx(expected, rel=1e-10)


def test_asymptote_half_log_golden_ratio():
    assert dims.ENTROPY_SLOPE == pytest.approx(0.240606, abs=5e-7)
    assert dims.EXACT_CONSTANT == pytest.approx(8.3123, abs=1e-4)
    assert dims.h_n_asymptote(100) == pytest.approx(-24.0606, abs=1e-4)
    # h_n / n -> -0.240606 from below: digest measures -0.2430 at 32 and -0.2408 at 512.
    assert dims.h_n(32) / 32 == pytest.approx(-0.2430, abs=5e-5)
    assert dims.h_n(512) / 512 == pytest.approx(-0.2408, abs=5e-5)
    assert abs(dims.h_n(8192) / 8192 + dims.ENTROPY_SLOPE) < 2e-5
    ratios = [dims.h_n(n) / n for n in (32, 128, 512, 2048)]
    assert all(a < b for a, b in zip(ratios, ratios[1:]))


def test_entropy_worked_example():
    # Post 7695: n = 64, N = 1e5 -> H = ln 1e10 - 15.4734 = 7.55245; n = 128 already negative.
    assert dims.entropy_estimate(64, 100000) == pytest.approx(7.55245, abs=1e-5)
    assert dims.entropy_estimate(128, 100000) < 0


@pytest.mark.parametrize("N,expected,bound,exact", [
    (100000, 96, 95.90, 95.70), (5000000, 128, 128.49, 128.22), (512, 52, 51.97, 51.86)])
def test_min_dim_examples(N, expected, bound, exact):
    assert dims.min_dim(N) == expected
    assert dims.min_dim(N, constant=dims.EXACT_CONSTANT) == expected
    assert dims.dimension_bound(N) == pytest.approx(bound, abs=0.005)
    assert dims.dimension_bound(N, dims.EXACT_CONSTANT) == pytest.approx(exact, abs=0.005)


def test_entropy_min_dim_is_the_crossing():
    n = dims.entropy_min_dim(100000)
    assert n == 96
    assert dims.entropy_estimate(n, 100000) < 0 <= dims.entropy_estimate(n - 1, 100000)


def test_head_size_for_length():
    assert dims.head_size_for_length(512) == 52
    assert dims.head_size_for_length(512, multiple_of=64) == 64
    assert dims.head_size_for_length(512, multiple_of=8) == 56


@pytest.mark.parametrize("call,exc,word", [
    (lambda: dims.h_n(1), ValueError, "n"),
    (lambda: dims.h_n(3.5), TypeError, "n"),
    (lambda: dims.min_dim(0), ValueError, "N"),
    (lambda: dims.min_dim(1), ValueError, "N"),
    (lambda: dims.min_dim(100, constant=-1), ValueError, "constant"),
    (lambda: dims.min_dim(float("nan")), TypeError, "N"),
    (lambda: dims.head_size_for_length(512, multiple_of=0), ValueError, "multiple_of"),
    (lambda: dims.entropy_min_dim(1e300, max_dim=64), ValueError, "max_dim"),
])
def test_bad_input_raises(call, exc, word):
    with pytest.raises(exc, match=word):
        call()


def test_cli_prints_dimension_first():
    out = subprocess.run([sys.executable, "-m", "kexue_jax.dims", "100000"], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out[0] == "96"
    info = json.loads(out[1])
    assert info["bound"] == pytest.approx(95.9027, abs=1e-4)
    bad = subprocess.run([sys.executable, "-m", "kexue_jax.dims", "-5"], capture_output=True, text=True)
    assert bad.returncode != 0 and "N must be" in bad.stderr


def test_jl_distortion_at_the_formula_dimension_matches_the_gaussian_prediction():
    """Post 8711's check: N = 200 random unit vectors (R^512) projected to n = min_dim(N) = 44 = 8.33 ln N.
    Tolerances (from 30 seeds: rms and mean |D| within 5%, max within -11% / +31%, fractions within 0.02):
    rms and mean |D| within 10% of sqrt((1 + m2) / n) and its sqrt(2/pi) multiple, the max within 40% of
    rms sqrt(2 ln P), the fraction of pairs within eps within 0.04 of erf(eps / (rms sqrt 2))."""
    N = 200
    r = dims.jl_distortion(N, dims.min_dim(N), dim=512, seed=0)
    assert r["n"] == 44 and r["pairs"] == N * (N - 1) // 2
    assert r["ip_rms"] == pytest.approx(r["ip_rms_predicted"], rel=0.10)
    assert r["ip_rms_predicted"] == pytest.approx(1 / math.sqrt(44), rel=0.01)  # m2 ~ 1/dim
    assert r["ip_mean"] == pytest.approx(r["ip_mean_predicted"], rel=0.10)
    assert r["ip_max"] == pytest.approx(r["ip_max_predicted"], rel=0.40)
    for eps in ("0.1", "0.25", "0.5"):
        assert r["ip_within"][eps] == pytest.approx(r["ip_within_predicted"][eps], abs=0.04)
    # the formula's numbers: at n = 8.33 ln N the worst pair is off by about sqrt(4 / 8.33) = 0.69 ...
    assert r["ip_max_predicted"] == pytest.approx(math.sqrt(4 / 8.33), abs=0.05)
    # ... and the JL bounds guarantee nothing there (eps > 1): sqrt(24 / 8.33) = 1.70, sqrt(16 / 8.33) = 1.39
    assert r["eps_jl24"] == pytest.approx(math.sqrt(24 / 8.33), rel=0.01) and r["eps_jl16"] > 1


def test_jl_distortion_keeps_every_pair_within_eps_above_the_jl_bound():
    """n >= 16 ln N / eps^2 (post 8706's "enough" JL bound), eps = 0.5: every squared distance of the
    N = 200 vectors within (1 +- 0.5) (30 seeds: the worst pair at 0.38 or less)."""
    N, eps = 200, 0.5
    n = math.ceil(16 * math.log(N) / eps ** 2)
    r = dims.jl_distortion(N, n, dim=512, eps=(eps,), seed=0)
    assert r["dist_max"] < eps and r["dist_within"]["0.5"] == 1.0 and r["eps_jl16"] <= eps
    blocked = dims.jl_distortion(N, n, dim=512, eps=(eps,), seed=0, block=37)  # blocks change only rounding
    assert blocked.keys() == r.keys() and all(blocked[k] == pytest.approx(v, rel=1e-12) for k, v in r.items())
    with pytest.raises(ValueError, match="N must be"):
        dims.jl_distortion(1, 4)
