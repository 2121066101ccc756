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


def jl_distortion(N: int, n: int, *, dim: int = 1024, eps=(0.1, 0.25, 0.5), seed: int = 0,
                  block: int = 1024) -> dict:
    """Distortion of N random unit vectors' pairwise geometry under a random Gaussian projection to n
    dimensions: the Johnson-Lindenstrauss check of the dimension formula n > 8.33 ln N (kexue.fm/archives/8711;
    the JL bounds of kexue.fm/archives/8706).

    x_1..x_N are uniform on the unit sphere of R^dim; A in R^{n x dim} has i.i.d. N(0, 1/n) entries (post
    8706's projection). For every pair i < j it measures the inner-product error
    D_ij = <A x_i, A x_j> - <x_i, x_j> and the squared-distance ratio ||A(x_i - x_j)||^2 / ||x_i - x_j||^2.
    What the formulas predict (returned beside the measurements):

    * D_ij has mean 0 and variance (1 + <x_i, x_j>^2) / n, so rms(D) = sqrt((1 + m2) / n), m2 the mean
      squared cosine of the pairs (about 1 / dim); mean |D| = rms sqrt(2 / pi);
    * the largest |D| of P = N(N-1)/2 pairs is about rms sqrt(2 ln P) (Gaussian tails, union bound), so at
      n = 8.33 ln N it tends to sqrt(4 / 8.33) = 0.69 for large N: the formula's dimension keeps every inner
      product to about +-0.7, not to a small eps;
    * JL: n >= 24 ln N / eps^2 (post 8706; 16 ln N / eps^2 "is enough") keeps every squared distance within
      (1 +- eps), so ``eps_jl24`` / ``eps_jl16`` = sqrt(24 ln N / n) / sqrt(16 ln N / n) is the eps the lemma
      guarantees at this n (above 1: nothing); at n = 8.33 ln N it is 1.70 / 1.39.

    Returns a JSON-ready dict: the inputs, ``bound`` (8.33 ln N) and ``min_dim``; ``ip_max`` / ``ip_mean`` /
    ``ip_rms`` of |D| and their ``*_predicted`` values; ``dist_max`` (max |ratio - 1|); ``ip_within`` /
    ``dist_within``: {eps: fraction of pairs with |D| <= eps, resp. |ratio - 1| <= eps}, and
    ``ip_within_predicted`` = erf(eps / (rms sqrt 2)); ``norm_max`` (max | ||A x_i||^2 - 1 |); ``eps_jl24``,
    ``eps_jl16``. Work O(N^2 (dim + n)) in row blocks of ``block`` (memory
    O(block N)); NumPy float64, deterministic in ``seed``.
    """
    N = _check_int("N", N, 2)
    n = _check_int("n", n, 1)
    dim = _check_int("dim", dim, 2)
    block = _check_int("block", block, 1)
    eps = tuple(_check_positive("eps", e) for e in np.atleast_1d(eps).tolist())
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = x @ (rng.standard_normal((dim, n)) / math.sqrt(n))  # rows A x_i (A^T drawn as [dim, n])
    ny = np.sum(y * y, axis=1)
    pairs = N * (N - 1) // 2
    ip_abs_sum = ip_sq_sum = cos_sq_sum = ip_max = dist_max = 0.0
    ip_hits, dist_hits = np.zeros(len(eps)), np.zeros(len(eps))
    limits = np.asarray(eps)[:, None]
    for lo in range(0, N - 1, block):
        hi = min(lo + block, N)
        g, h = x[lo:hi] @ x.T, y[lo:hi] @ y.T
        rows, cols = np.nonzero(np.arange(lo, hi)[:, None] < np.arange(N)[None, :])  # pairs i < j
        c, d = g[rows, cols], h[rows, cols] - g[rows, cols]
        ratio = (ny[lo:hi][rows] + ny[cols] - 2.0 * h[rows, cols]) / (2.0 - 2.0 * c) - 1.0
        ip_abs_sum += float(np.sum(np.abs(d)))
        ip_sq_sum += float(np.sum(d * d))
        cos_sq_sum += float(np.sum(c * c))
        ip_max = max(ip_max, float(np.max(np.abs(d))))
        dist_max = max(dist_max, float(np.max(np.abs(ratio))))
        ip_hits += np.sum(np.abs(d)[None, :] <= limits, axis=1)
        dist_hits += np.sum(np.abs(ratio)[None, :] <= limits, axis=1)
    rms_predicted = math.sqrt((1.0 + cos_sq_sum / pairs) / n)
    return {
        "N": N, "n": n, "dim": dim, "seed": seed, "pairs": pairs,
        "bound": dimension_bound(N), "min_dim": min_dim(N),
        "ip_max": ip_max, "ip_mean": ip_abs_sum / pairs, "ip_rms": math.sqrt(ip_sq_sum / pairs),
        "ip_rms_predicted": rms_predicted, "ip_mean_predicted": rms_predicted * math.sqrt(2.0 / math.pi),
        "ip_max_predicted": rms_predicted * math.sqrt(2.0 * math.log(pairs)) if pairs > 1 else rms_predicted,
        "dist_max": dist_max, "norm_max": float(np.max(np.abs(ny - 1.0))),
        "ip_within": {f"{e:g}": float(k / pairs) for e, k in zip(eps, ip_hits)},
        "ip_within_predicted": {f"{e:g}": math.erf(e / (rms_predicted * math.sqrt(2.0))) for e in eps},
        "dist_within": {f"{e:g}": float(k / pairs) for e, k in zip(eps, dist_hits)},
        "eps_jl24": math.sqrt(24.0 * math.log(N) / n), "eps_jl16": math.sqrt(16.0 * math.log(N) / n),
    }


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
