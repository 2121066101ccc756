"""Closed-form logistic / softmax regression from a generative view (kexue.fm/archives/8578).

Post 8578 ("linear models from a probabilistic view: does logistic regression have an analytic
solution?") assumes the class conditionals are Gaussians with one *shared* covariance (this is LDA):
``p(x|i) = N(x; mu_i, Sigma)``. Then ``ln p(i|x)`` is linear in ``x`` and the dense + softmax layer has
the closed form (row vectors throughout, as in the post)::

    w_i = mu_i Sigma^-1,      b_i = ln p_i - 1/2 mu_i Sigma^-1 mu_i^T

with ``p_i`` the class frequencies and ``mu_i`` the class means. ``Sigma`` is matched to the second
moment of the data mixture: ``Sigma = Sigma~ + mu~^T mu~ - sum_i p_i mu_i^T mu_i``; after whitening
(post 8069: ``mu~ = 0, Sigma~ = I``) this is ``Sigma = I - sum_i p_i mu_i^T mu_i``, which is exactly the
pooled within-class (maximum-likelihood) covariance. For two classes the difference of the two softmax
rows is the logistic-regression solution ``w = (mu_1 - mu_0) Sigma^-1``,
``b = 1/2 (mu_0 Sigma^-1 mu_0^T - mu_1 Sigma^-1 mu_1^T) + ln(p_1/p_0)``.

Library:

* :class:`LinearClassifier` (``W [d, k]``, ``b [k]``; ``logits``, ``predict``) and :func:`binary_form`.
* :func:`whitening`, :func:`class_statistics`, :func:`shared_covariance`, :func:`inverse_covariance`,
  :func:`closed_form_weights`, :func:`fold_whitening`: the steps of the post's algorithm, composed by
  :func:`fit`.
* :func:`fit_gd`: the gradient-descent baseline on the same (whitened) features with optax: the post's
  setting (Adam 1e-3, 10 epochs, batch 32, no regularisation, last weights) by default, or a fairer one
  (decoupled weight decay, early stopping on a validation split) through its arguments.

The post's two tables (GD vs the closed form on tabular data and on lines of Shakespeare) are an
experiment: ``kexue_jax.experiments.analytic`` (``python -m kexue_jax.experiments.analytic``).

Conventions and choices (documented deviations from the author's code):

* Whitening uses the maximum-likelihood covariance (``ddof=0``; the author's code uses ``np.cov``,
  ``ddof=1``), so the whitened data has covariance exactly ``I`` and ``I - sum p_i mu_i^T mu_i`` is exactly
  the pooled within-class covariance (the ``ddof=1`` mixture is off by ``I/n``).
* Directions of (numerically) zero training variance, e.g. constant features, are dropped by the
  whitening (scale 0) instead of producing ``1/sqrt(0)``; there ``Sigma`` is the identity and ``W`` is 0.
* A class absent from the training set (``p_i = 0``) gets ``W[:, i] = 0`` and ``b_i = -inf``: it is never
  predicted (its prior is zero), and its softmax probability is 0.
* A singular ``Sigma + ridge I`` (e.g. a feature that determines the class, so the within-class variance
  in that direction is 0) raises :class:`SingularCovarianceError` telling the user to set ``ridge > 0``;
  under ``jax.jit`` (where no value can raise) the returned ``W, b`` are NaN instead.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

Array = Any

__all__ = [
    "LinearClassifier", "SingularCovarianceError", "binary_form", "whitening", "class_statistics",
    "shared_covariance", "inverse_covariance", "closed_form_weights", "fold_whitening", "fit",
    "fit_gd", "accuracy", "split_indices", "FOLIO_GENRE", "GENRES", "spoken_lines", "byte_histogram",
    "shakespeare_dataset", "tabular_dataset", "compare_methods", "format_table", "main", "POST_GD",
    "FAIR_GD", "METHODS", "FEATURES",
]


# ----------------------------------------------------------------------------------------------
# The classifier
# ----------------------------------------------------------------------------------------------

@functools.partial(jax.tree_util.register_dataclass, data_fields=["W", "b"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class LinearClassifier:
    """A dense + softmax classifier on raw features: ``logits = x W + b`` (a pytree of ``W``, ``b``).

    ``W`` is ``[d, k]`` and ``b`` is ``[k]``; ``b_i = -inf`` marks a class that can never be predicted.
    """

    W: Array
    b: Array

    @property
    def num_classes(self) -> int:
        return self.W.shape[-1]

    def logits(self, x: Array) -> Array:
        """``x W + b`` for ``x`` of shape ``[..., d]``."""
        return jnp.asarray(x, self.W.dtype) @ self.W + self.b

    def predict(self, x: Array) -> Array:
        """``argmax_i (x W + b)_i``: the predicted class ids, shape ``[...]``."""
        return jnp.argmax(self.logits(x), axis=-1)


class SingularCovarianceError(ValueError):
    """The shared covariance ``Sigma + ridge I`` is singular: set ``ridge > 0``."""


def binary_form(clf: LinearClassifier) -> tuple[Array, Array]:
    """The logistic-regression form ``p(1|x) = sigmoid(x w + b)`` of a two-class softmax classifier.

    Differencing the softmax rows (kexue.fm/archives/8578): ``w = W[:, 1] - W[:, 0]``, ``b = b_1 - b_0``;
    for the closed form this is ``w = (mu_1 - mu_0) Sigma^-1``,
    ``b = 1/2 (mu_0 Sigma^-1 mu_0^T - mu_1 Sigma^-1 mu_1^T) + ln(p_1/p_0)``.
    """
    if not isinstance(clf, LinearClassifier):
        raise TypeError(f"clf must be a LinearClassifier, got {type(clf).__name__}")
    if clf.W.shape[-1] != 2:
        raise ValueError(f"binary_form: clf must have exactly 2 classes, got num_classes={clf.W.shape[-1]}")
    return clf.W[:, 1] - clf.W[:, 0], clf.b[1] - clf.b[0]


def accuracy(clf: LinearClassifier, x: Array, y: Array) -> float:
    """Fraction of rows of ``x`` whose predicted class equals ``y``."""
    y = np.asarray(y)
    if y.ndim != 1 or np.shape(x)[0] != y.shape[0]:
        raise ValueError(f"accuracy: x [n, d] and y [n] must have the same n, got {np.shape(x)} and {y.shape}")
    return float(np.mean(np.asarray(clf.predict(x)) == y))


# ----------------------------------------------------------------------------------------------
# Input checks (static ones always; value checks only when the values are concrete, i.e. not traced)
# ----------------------------------------------------------------------------------------------

def _concrete(value) -> np.ndarray | None:
    """``value`` as numpy when it is concrete, ``None`` when it is a tracer (inside ``jax.jit``)."""
    try:
        return np.asarray(value)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return None


def _check_xy(x, y, num_classes, *, name: str = "x") -> tuple[Array, Array, int]:
    """Validated ``(x float [n, d], y int32 [n], num_classes)``."""
    x = jnp.asarray(x)
    y = jnp.asarray(y)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [n, d], got shape {x.shape}")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"y must be a 1-D array of n={x.shape[0]} labels (one per row of {name}), "
                         f"got shape {y.shape}")
    if x.shape[0] < 2:
        raise ValueError(f"{name} must have at least 2 rows, got {x.shape[0]}")
    if not (jnp.issubdtype(y.dtype, jnp.integer) or y.dtype == jnp.bool_):
        raise TypeError(f"y must hold integer class ids 0..num_classes-1, got dtype {y.dtype}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        if jnp.issubdtype(x.dtype, jnp.complexfloating):
            raise TypeError(f"{name} must be real, got dtype {x.dtype}")
        x = x.astype(jnp.result_type(float))
    y_values = _concrete(y)
    if num_classes is None:
        if y_values is None:
            raise ValueError("num_classes must be given (a static int) when y is traced, e.g. under jax.jit")
        num_classes = int(y_values.max()) + 1
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    num_classes = int(num_classes)
    if y_values is not None and (y_values.min() < 0 or y_values.max() >= num_classes):
        raise ValueError(f"y must hold class ids in [0, num_classes={num_classes}), "
                         f"got values in [{y_values.min()}, {y_values.max()}]")
    x_values = _concrete(x)
    if x_values is not None and not np.all(np.isfinite(x_values)):
        raise ValueError(f"{name} must be finite (it contains NaN or inf)")
    return x, y.astype(jnp.int32), num_classes


def _check_nonnegative(name: str, value) -> None:
    v = _concrete(value)
    if v is not None and (v.shape != () or not np.isfinite(v) or v < 0):
        raise ValueError(f"{name} must be a finite scalar >= 0, got {value!r}")


# ----------------------------------------------------------------------------------------------
# The closed form, step by step
# ----------------------------------------------------------------------------------------------

def whitening(x: Array, *, rtol: float | None = None) -> tuple[Array, Array]:
    """Whitening fitted on ``x`` (post 8069, as used in 8578): ``z = (x - mu) K`` has mean 0, covariance I.

    ``mu = mean(x)``, ``cov = (x - mu)^T (x - mu) / n`` (maximum likelihood, ``ddof=0``),
    ``cov = U diag(s) U^T`` (the SVD of a symmetric PSD matrix is its eigendecomposition) and
    ``K = U diag(1/sqrt(s))``. Directions with ``s <= rtol * max(s)`` (default ``rtol = d * eps``) carry
    no training variance; their scale is set to 0 (they are dropped) instead of ``1/sqrt(0)``.

    Returns ``(mu [d], K [d, d])``.
    """
    x = jnp.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"x must be a 2-D array [n, d], got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.result_type(float))
    n, d = x.shape
    if rtol is None:
        rtol = d * float(jnp.finfo(x.dtype).eps)
    mu = jnp.mean(x, axis=0)
    xc = x - mu
    cov = xc.T @ xc / n
    s, U = jnp.linalg.eigh(cov)
    keep = s > rtol * jnp.max(s)
    scale = jnp.where(keep, jax.lax.rsqrt(jnp.where(keep, s, 1.0)), 0.0)
    return mu, U * scale


def class_statistics(z: Array, y: Array, num_classes: int) -> tuple[Array, Array]:
    """Class priors ``p_i = mean(y == i)`` ``[k]`` and class means ``mu_i = mean(z[y == i])`` ``[k, d]``.

    An absent class has ``p_i = 0`` and ``mu_i = 0``.
    """
    onehot = jax.nn.one_hot(y, num_classes, dtype=z.dtype)  # [n, k]
    counts = onehot.sum(axis=0)
    means = (onehot.T @ z) / jnp.maximum(counts, 1.0)[:, None]
    return counts / z.shape[0], means


def shared_covariance(total_cov: Array, total_mean: Array, priors: Array, means: Array) -> Array:
    """The shared class covariance by moment matching (kexue.fm/archives/8578).

    ``Sigma = Sigma~ + mu~^T mu~ - sum_i p_i mu_i^T mu_i = Sigma~ - sum_i p_i (mu_i - mu~)^T (mu_i - mu~)``
    (the two agree because ``sum_i p_i mu_i = mu~``; the centred form avoids cancellation). With whitened
    features (``mu~ = 0``, ``Sigma~ = I``) it is the post's ``I - sum_i p_i mu_i^T mu_i``. With ML moments
    it equals the pooled within-class covariance ``1/n sum_n (x_n - mu_{y_n})^T (x_n - mu_{y_n})``.
    """
    centred = means - total_mean
    return total_cov - jnp.einsum("kd,k,ke->de", centred, priors, centred)


def inverse_covariance(cov: Array, ridge: float = 0.0) -> tuple[Array, Array]:
    """``(Sigma + ridge I)^-1`` by eigendecomposition, and whether ``Sigma + ridge I`` is singular.

    Singular means its smallest eigenvalue is ``<= d * eps * (largest eigenvalue)``.
    """
    lam, V = jnp.linalg.eigh(cov)
    lam = lam + ridge
    tol = cov.shape[0] * jnp.finfo(cov.dtype).eps * jnp.max(jnp.abs(lam))
    singular = lam[0] <= tol
    return (V / lam) @ V.T, singular


def closed_form_weights(priors: Array, means: Array, cov_inv: Array) -> tuple[Array, Array]:
    """``W[:, i] = (mu_i Sigma^-1)^T`` and ``b_i = ln p_i - 1/2 mu_i Sigma^-1 mu_i^T`` (kexue.fm/archives/8578).

    ``W`` is ``[d, k]``, ``b`` is ``[k]``; a class with ``p_i = 0`` gets ``b_i = -inf`` (never predicted).
    """
    W = cov_inv @ means.T  # cov_inv is symmetric, so (mu_i Sigma^-1)^T = Sigma^-1 mu_i^T
    quad = jnp.einsum("kd,dk->k", means, W)
    present = priors > 0
    b = jnp.where(present, jnp.log(jnp.where(present, priors, 1.0)) - 0.5 * quad, -jnp.inf)
    return W, b


def fold_whitening(W: Array, b: Array, mu: Array, K: Array) -> tuple[Array, Array]:
    """Weights acting on raw ``x`` from weights acting on ``z = (x - mu) K``.

    ``z W + b = x (K W) + (b - mu K W)``.
    """
    W_raw = K @ W
    return W_raw, b - mu @ W_raw


@functools.partial(jax.jit, static_argnames=("num_classes", "whiten", "identity_cov"))
def _closed_form(x, y, ridge, *, num_classes: int, whiten: bool, identity_cov: bool):
    """Steps 1-4 of :func:`fit` on validated arrays: ``(W, b, Sigma, singular)``."""
    n, d = x.shape
    eye = jnp.eye(d, dtype=x.dtype)
    if whiten:
        mu, K = whitening(x)
        z = (x - mu) @ K
        total_mean, total_cov = jnp.zeros(d, x.dtype), eye
    else:
        z = x
        total_mean = jnp.mean(x, axis=0)
        total_cov = (x - total_mean).T @ (x - total_mean) / n
    priors, means = class_statistics(z, y, num_classes)
    cov = eye if identity_cov else shared_covariance(total_cov, total_mean, priors, means)
    cov_inv, singular = inverse_covariance(cov, ridge)
    W, b = closed_form_weights(priors, means, cov_inv)
    if whiten:
        W, b = fold_whitening(W, b, mu, K)
    return W, b, cov, singular


def fit(x: Array, y: Array, *, num_classes: int | None = None, whiten: bool = True,
        identity_cov: bool = False, ridge: float = 0.0) -> LinearClassifier:
    """The closed-form softmax (logistic) regression of kexue.fm/archives/8578, acting on raw ``x``.

    1. (``whiten=True``) whiten with the training statistics: ``z = (x - mu) K`` (:func:`whitening`).
    2. class priors ``p_i`` and means ``mu_i`` of ``z`` (:func:`class_statistics`).
    3. ``Sigma = I - sum_i p_i mu_i^T mu_i`` (:func:`shared_covariance`; in raw space the same moment
       formula with the data's mean and covariance), or ``Sigma = I`` with ``identity_cov=True`` (the
       author's first version, 2021-07-22). ``ridge`` adds ``ridge * I`` to ``Sigma`` (in the working
       space: whitened coordinates if ``whiten``).
    4. ``w_i = mu_i Sigma^-1``, ``b_i = ln p_i - 1/2 mu_i Sigma^-1 mu_i^T`` (:func:`closed_form_weights`),
       then the whitening folded into ``W, b`` (:func:`fold_whitening`).

    Args:
      x: features ``[n, d]``; use float64 (``jax.config.update("jax_enable_x64", True)``) for accuracy.
      y: integer labels ``[n]`` in ``[0, num_classes)``.
      num_classes: number of classes (static under ``jax.jit``); default ``max(y) + 1``. Classes absent
        from ``y`` get logit ``-inf``.
      whiten: fit in whitened coordinates (recommended by the post: better conditioned). With ML
        moments the whitened and raw fits have the same logits up to a per-row shift.
      identity_cov: use ``Sigma = I`` (in the working space) instead of the moment-matched ``Sigma``.
      ridge: ``>= 0`` added to the diagonal of ``Sigma``.

    Raises:
      SingularCovarianceError: ``Sigma + ridge I`` is singular (when not traced); under ``jax.jit`` the
        returned ``W, b`` are NaN instead.
    """
    x, y, num_classes = _check_xy(x, y, num_classes)
    _check_nonnegative("ridge", ridge)
    W, b, cov, singular = _closed_form(x, y, jnp.asarray(ridge, x.dtype), num_classes=num_classes,
                                       whiten=bool(whiten), identity_cov=bool(identity_cov))
    is_singular = _concrete(singular)
    if is_singular is None:  # traced: cannot raise, so make the failure visible
        W = jnp.where(singular, jnp.nan, W)
        b = jnp.where(singular, jnp.nan, b)
    elif is_singular:
        lam = np.linalg.eigvalsh(np.asarray(cov, np.float64))
        raise SingularCovarianceError(
            f"the shared covariance Sigma + ridge*I is singular (eigenvalues of Sigma in "
            f"[{lam[0]:.3g}, {lam[-1]:.3g}], ridge={ridge}): some direction has no within-class variance "
            f"(e.g. a feature that determines the class). Set ridge > 0, e.g. ridge=1e-3"
            f"{' (in whitened units)' if whiten else ''}.")
    return LinearClassifier(W, b)


# ----------------------------------------------------------------------------------------------
# Gradient-descent baseline (optax)
# ----------------------------------------------------------------------------------------------

def _mean_cross_entropy(params: dict, z: Array, y: Array, weights: Array) -> Array:
    """Weighted mean softmax cross-entropy of ``z W + b`` (weights 0 mark padding rows)."""
    logits = z @ params["W"] + params["b"]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return jnp.sum(ce * weights) / jnp.sum(weights)


def _adamw(learning_rate: float, weight_decay: float) -> optax.GradientTransformation:
    """Adam with decoupled weight decay on ``W`` only (``weight_decay=0`` is plain Adam)."""
    return optax.adamw(learning_rate, weight_decay=weight_decay, mask={"W": True, "b": False})


@functools.partial(jax.jit, static_argnames=("num_classes", "whiten", "learning_rate", "weight_decay",
                                             "compute_dtype"))
def _gd_init(x, key, *, num_classes: int, whiten: bool, learning_rate: float, weight_decay: float,
             compute_dtype):
    """Whitening ``(mu, K)`` (in ``x``'s dtype), whitened ``z`` and Glorot-uniform / zero parameters (in
    ``compute_dtype``), and the optimizer state."""
    d = x.shape[1]
    if whiten:
        mu, K = whitening(x)
    else:
        mu, K = jnp.zeros(d, x.dtype), jnp.eye(d, dtype=x.dtype)
    params = {"W": jax.nn.initializers.glorot_uniform()(key, (d, num_classes), compute_dtype),
              "b": jnp.zeros(num_classes, compute_dtype)}
    z = ((x - mu) @ K).astype(compute_dtype)
    return mu, K, z, params, _adamw(learning_rate, weight_decay).init(params)


@functools.partial(jax.jit, static_argnames=("learning_rate", "weight_decay", "batch_size"))
def _gd_epoch(params, opt_state, key, z, y, *, learning_rate: float, weight_decay: float, batch_size: int):
    """One shuffled pass over ``(z, y)`` in minibatches; the last, partial batch is a masked mean."""
    optimizer = _adamw(learning_rate, weight_decay)
    n = z.shape[0]
    steps = -(-n // batch_size)
    perm = jax.random.permutation(key, n)
    idx = jnp.concatenate([perm, jnp.zeros(steps * batch_size - n, perm.dtype)]).reshape(steps, batch_size)
    mask = (jnp.arange(steps * batch_size) < n).astype(z.dtype).reshape(steps, batch_size)

    def step(carry, batch):
        params, opt_state = carry
        i, m = batch
        loss, grads = jax.value_and_grad(_mean_cross_entropy)(params, z[i], y[i], m)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), (idx, mask))
    return params, opt_state, jnp.mean(losses)


@jax.jit
def _gd_validate(params, z, y):
    """Validation cross-entropy and accuracy of ``z W + b``."""
    loss = _mean_cross_entropy(params, z, y, jnp.ones(z.shape[0], z.dtype))
    return loss, jnp.mean(jnp.argmax(z @ params["W"] + params["b"], -1) == y)


def fit_gd(x: Array, y: Array, *, key: Array, num_classes: int | None = None, whiten: bool = True,
           learning_rate: float = 1e-3, epochs: int = 10, batch_size: int = 32,
           weight_decay: float = 0.0, validation: tuple[Array, Array] | None = None,
           patience: int | None = None, compute_dtype=None) -> tuple[LinearClassifier, dict]:
    """Softmax regression by minibatch gradient descent (optax AdamW) on the same features as :func:`fit`.

    Minimises the mean cross-entropy ``-1/N sum_n ln softmax(z_n W + b)_{y_n}`` on whitened features
    ``z`` (``whiten=True``, the whitening of :func:`fit`), Glorot-uniform ``W`` and zero ``b`` (Keras'
    ``Dense``), then folds the whitening into the returned classifier.

    * Defaults are the post's baseline (kexue.fm/archives/8578, author's code): Adam, lr 1e-3, 10 epochs,
      batch 32, no regularisation, the last weights. (The post's binary tasks used a 1-unit sigmoid
      layer; here every task uses the k-unit softmax, the same model family.)
    * A fairer baseline: ``weight_decay > 0`` (decoupled, AdamW, on ``W`` only), ``validation=(x_val,
      y_val)`` -- the weights of the epoch with the lowest validation cross-entropy are returned -- and
      ``patience`` (stop after that many epochs without improvement).

    ``compute_dtype`` (default: ``x``'s dtype): dtype of the optimisation, e.g. float32 with float64
    ``x`` -- the whitening is then fitted in float64 (near-null directions of an ill-conditioned ``x``
    are otherwise decided by float32 round-off) and the returned classifier is in ``x``'s dtype.

    Returns ``(classifier, history)``; ``history`` has ``train_loss`` and (with ``validation``)
    ``valid_loss`` / ``valid_accuracy`` per epoch, ``best_epoch`` (1-based) and ``epochs_run``.
    """
    x, y, num_classes = _check_xy(x, y, num_classes)
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if not (isinstance(learning_rate, (int, float)) and math.isfinite(learning_rate) and learning_rate > 0):
        raise ValueError(f"learning_rate must be a finite float > 0, got {learning_rate!r}")
    if not (isinstance(weight_decay, (int, float)) and math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a finite float >= 0, got {weight_decay!r}")
    if patience is not None:
        if validation is None:
            raise ValueError("patience needs validation=(x_val, y_val) to monitor")
        if isinstance(patience, bool) or not isinstance(patience, (int, np.integer)) or patience < 1:
            raise ValueError(f"patience must be None or an int >= 1, got {patience!r}")
    if validation is not None:
        if not (isinstance(validation, (tuple, list)) and len(validation) == 2):
            raise ValueError("validation must be a pair (x_val, y_val)")
        x_val, y_val, _ = _check_xy(validation[0], validation[1], num_classes, name="validation x")
        if x_val.shape[1] != x.shape[1]:
            raise ValueError(f"validation x must have d={x.shape[1]} columns like x, got {x_val.shape[1]}")
        x_val = x_val.astype(x.dtype)
    if compute_dtype is None:
        compute_dtype = x.dtype
    compute_dtype = jnp.dtype(compute_dtype)
    if not jnp.issubdtype(compute_dtype, jnp.floating):
        raise ValueError(f"compute_dtype must be a floating dtype (float32, float64, ...), got {compute_dtype}")
    if not (isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
            or isinstance(key, jax.Array) and key.shape == (2,) and key.dtype == jnp.uint32):
        raise TypeError("key must be a jax PRNG key (jax.random.key(seed) or jax.random.PRNGKey(seed))")

    init_key, shuffle_key = jax.random.split(key)
    hyper = {"learning_rate": float(learning_rate), "weight_decay": float(weight_decay)}
    mu, K, z, params, opt_state = _gd_init(x, init_key, num_classes=num_classes, whiten=bool(whiten),
                                           compute_dtype=compute_dtype, **hyper)
    history: dict = {"train_loss": []}
    if validation is not None:
        z_val = ((x_val - mu) @ K).astype(compute_dtype)
        history.update(valid_loss=[], valid_accuracy=[])
    best, best_loss, since_best = params, math.inf, 0
    epoch = 0
    for epoch in range(1, int(epochs) + 1):
        params, opt_state, loss = _gd_epoch(params, opt_state, jax.random.fold_in(shuffle_key, epoch), z, y,
                                            batch_size=int(batch_size), **hyper)
        history["train_loss"].append(float(loss))
        if validation is None:
            best = params
            continue
        vloss, vacc = (float(v) for v in _gd_validate(params, z_val, y_val))
        history["valid_loss"].append(vloss)
        history["valid_accuracy"].append(vacc)
        if vloss < best_loss:
            best, best_loss, since_best = params, vloss, 0
            history["best_epoch"] = epoch
        else:
            since_best += 1
            if patience is not None and since_best >= patience:
                break
    history["epochs_run"] = epoch
    history.setdefault("best_epoch", epoch)
    W, b = fold_whitening(best["W"].astype(x.dtype), best["b"].astype(x.dtype), mu, K)
    return LinearClassifier(W, b), history


if __name__ == "__main__":  # the experiment moved: forward ``python -m kexue_jax.analytic ...`` to it
    import sys

    from kexue_jax.experiments import analytic as _experiment

    print("note: the experiment is `python -m kexue_jax.experiments.analytic`; forwarding to it", file=sys.stderr)
    sys.exit(_experiment.main())
