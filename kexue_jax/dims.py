"""The dimension formula n > 8.33 ln N (kexue.fm/archives/7695, kexue.fm/archives/8711).

Post 7695 (minimum entropy VI) models Skip-Gram as p(w_i, w_j) = e^{<u_i, v_j>} / Z with u, v uniform on the
sphere of radius sqrt(n) (each coordinate of size ~1), so <u, v> = n cos(theta) with the angle density

    p_n(theta) = Gamma(n/2) / (Gamma((n-1)/2) sqrt(pi)) * sin^{n-2}(theta),  theta in [0, pi].

Replacing the sums over the N^2 word pairs by N^2 times an expectation gives the entropy H ~ 2 ln N + h_n with

    h_n = ln E[e^{n cos theta}] - E[n cos theta e^{n cos theta}] / E[e^{n cos theta}],

and h_n ~ -(1/2) ln(phi) n = -0.240606 n for large n (Laplace's method; phi the golden ratio).  Asking for
H < 0 ("n dimensions comfortably hold N items") gives n > 2 ln N / 0.24 = 8.33 ln N; the unrounded coefficient
gives 2 / (0.5 ln phi) = 8.312.  Post 8706/8711 applies the same count to attention (a_ij = softmax_j <q_i, k_j>):
head_size > 8.33 ln L, i.e. 52 for L = 512.

All logs are natural logs (post 7695 says so).
"""

from __future__ import annotations

import argparse
import json
import math
import numbers
import sys

import numpy as np

GOLDEN_RATIO = (1.0 + math.sqrt(5.0)) / 2.0
# -h_n / n for large n: (1/2) ln(phi) = 0.240606...
ENTROPY_SLOPE = 0.5 * math.log(GOLDEN_RATIO)
# The post's constant (2 / 0.24, the coefficient rounded to 0.24) and the unrounded one (2 / 0.240606 = 8.312).
POST_CONSTANT = 8.33
EXACT_CONSTANT = 2.0 / ENTROPY_SLOPE


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)


def _check_positive(name: str, value, minimum: float = 0.0, strict: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite real number, got {value!r}")
    if (value <= minimum) if strict else (value < minimum):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum}, got {value}")
    return float(value)


def _logsumexp(x: np.ndarray) -> float:
    m = np.max(x)
    return float(m + np.log(np.sum(np.exp(x - m))))


def h_n(n: int, *, num_points: int = 20001) -> float:
    """The entropy term h_n of post 7695 (kexue.fm/archives/7695), by numerical integration over the angle.

        h_n = ln E[e^{n cos t}] - E[n cos t e^{n cos t}] / E[e^{n cos t}],   t ~ p_n(t) oc sin^{n-2} t on [0, pi].

    Computed in log space (log-sum-exp) with the trapezoidal rule on `num_points` equally spaced angles; the
    integrands vanish with all their derivatives at 0 and pi for n > 2, so the rule converges exponentially.
    The normaliser of p_n cancels: ln E[e^{n cos t}] = LSE(log w + n cos t) - LSE(log w), log w = (n-2) ln sin t.
    Post's table: h_32 = -7.77471, h_64 = -15.4734, ..., h_512 = -123.264.
    """
    n = _check_int("n", n, 2)
    num_points = _check_int("num_points", num_points, 3)
    t = np.linspace(0.0, math.pi, num_points)[1:-1]  # the end points carry zero weight for n > 2
    log_w = (n - 2) * np.log(np.sin(t))
    if n == 2:  # uniform angle: the end points carry half weight in the trapezoidal rule
        t = np.linspace(0.0, math.pi, num_points)
        log_w = np.zeros_like(t)
        log_w[[0, -1]] = math.log(0.5)
    x = n * np.cos(t)
    log_z = _logsumexp(log_w + x) - _logsumexp(log_w)  # ln E[e^{x}]
    # E[x e^x] / E[e^x] is the mean of x under weights w e^x (x may be negative: take a weighted average).
    p = np.exp(log_w + x - np.max(log_w + x))
    mean_x = float(np.sum(p * x) / np.sum(p))
    return log_z - mean_x


def h_n_asymptote(n) -> float:
    """Large-n asymptote of h_n (kexue.fm/archives/7695): h_n ~ -(1/2) ln(phi) n = -0.240606 n.

    Laplace's method: ln sin t + cos t peaks at cos t* = 1/phi, and the tilted mean of cos t tends to 1/phi.
    """
    n = _check_positive("n", n)
    return -ENTROPY_SLOPE * n


def entropy_estimate(n: int, N) -> float:
    """The approximate entropy H ~ 2 ln N + h_n of N items in n dimensions (kexue.fm/archives/7695).

    Post's worked example: n = 64, N = 1e5 gives 7.55245; a negative value means n dimensions "hold" N items.
    """
    N = _check_positive("N", N, 1.0, strict=False)
    return 2.0 * math.log(N) + h_n(n)


def dimension_bound(N, constant: float = POST_CONSTANT) -> float:
    """The real-valued bound n > constant * ln N (kexue.fm/archives/7695, kexue.fm/archives/8711).

    constant = 8.33 (the post: 2 / 0.24) or EXACT_CONSTANT = 2 / ((1/2) ln phi) = 8.312.
    """
    N = _check_positive("N", N, 1.0)
    constant = _check_positive("constant", constant)
    return constant * math.log(N)


def min_dim(N, constant: float = POST_CONSTANT) -> int:
    """Embedding dimension for N items by the formula n > 8.33 ln N (kexue.fm/archives/8711), as the post reads it.

    The post rounds constant * ln N to the nearest integer: N = 1e5 -> 95.90 -> 96, N = 5e6 -> 128.49 -> 128,
    L = 512 -> 51.97 -> 52 (with EXACT_CONSTANT = 8.312: 95.70, 128.22, 51.86 -> 96, 128, 52).
    """
    return int(math.floor(dimension_bound(N, constant) + 0.5))


def entropy_min_dim(N, *, max_dim: int = 1 << 16) -> int:
    """Smallest integer n with 2 ln N + h_n < 0 using the numerical h_n, not its asymptote (kexue.fm/archives/7695).

    The criterion before the linear approximation h_n ~ -0.2406 n; h_n/n is slightly below -0.2406 at small n,
    so this lands at or just below the 8.312 ln N bound.  Bisection on n (h_n is decreasing in n).
    """
    N = _check_positive("N", N, 1.0)
    max_dim = _check_int("max_dim", max_dim, 2)
    target = -2.0 * math.log(N)
    if h_n(max_dim) >= target:
        raise ValueError(f"N={N} needs more than max_dim={max_dim} dimensions; raise max_dim")
    lo, hi = 1, max_dim  # invariant: h(lo) >= target (or lo < 2), h(hi) < target
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if mid >= 2 and h_n(mid) < target:
            hi = mid
        else:
            lo = mid
    return hi


def head_size_for_length(seq_len, constant: float = POST_CONSTANT, multiple_of: int = 1) -> int:
    """Recommended attention head size for sequence length L: d > 8.33 ln L (kexue.fm/archives/8706, 8711).

    Attention rows a_ij = e^{<q_i,k_j>} / sum_j e^{<q_i,k_j>} have the Skip-Gram form with N = L items, so the
    head size needs about constant * ln L dimensions (L = 512 -> 52, "64 is enough").  `multiple_of` rounds the
    answer up to a hardware-friendly multiple (e.g. 8, 64).
    """
    seq_len = _check_positive("seq_len", seq_len, 1.0)
    multiple_of = _check_int("multiple_of", multiple_of, 1)
    d = min_dim(seq_len, constant)
    return int(-(-d // multiple_of) * multiple_of)


def summary(N, constant: float = POST_CONSTANT) -> dict:
    """All the numbers of the formula for N items, as a JSON-ready dict (used by the CLI)."""
    n = min_dim(N, constant)
    return {
        "N": N,
        "min_dim": n,
        "constant": constant,
        "bound": dimension_bound(N, constant),
        "bound_exact_constant": dimension_bound(N, EXACT_CONSTANT),
        "min_dim_exact_constant": min_dim(N, EXACT_CONSTANT),
        "entropy_min_dim": entropy_min_dim(N),
        "h_n_at_min_dim": h_n(n),
        "entropy_estimate_at_min_dim": entropy_estimate(n, N),
        "head_size_multiple_of_8": head_size_for_length(N, constant, multiple_of=8),
    }


def main(argv=None) -> int:
    """CLI: `python -m kexue_jax.dims N [--constant C]`; first line the dimension, then a JSON of the details."""
    parser = argparse.ArgumentParser(prog="python -m kexue_jax.dims", description=__doc__.splitlines()[0])
    parser.add_argument("N", type=float, help="number of items (vocabulary size, or sequence length for heads)")
    parser.add_argument("--constant", type=float, default=POST_CONSTANT,
                        help=f"constant in n > C ln N (post: {POST_CONSTANT}; exact: {EXACT_CONSTANT:.4f})")
    args = parser.parse_args(argv)
    N = int(args.N) if float(args.N).is_integer() else args.N
    try:
        info = summary(N, args.constant)
    except (TypeError, ValueError) as e:
        parser.error(str(e))
    print(info["min_dim"])
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
