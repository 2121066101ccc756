"""Tests for kexue_jax.experiments.attention_rank (a check of the d > 8.33 ln L reading of posts 8706/8711)."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kexue_jax.experiments import attention_rank as ar


def test_target_is_row_stochastic_and_sharpens_with_temperature():
    key = jax.random.PRNGKey(0)
    soft, sharp = (np.asarray(ar.random_attention_target(key, 32, t), np.float64) for t in (1.0, 0.1))
    np.testing.assert_allclose(soft.sum(-1), 1.0, rtol=1e-5)
    assert np.all(soft > 0)
    entropy = lambda p: float(np.mean(-np.sum(p * np.log(np.maximum(p, 1e-300)), -1)))
    assert entropy(sharp) < 0.5 * entropy(soft) < 0.5 * math.log(32)


def test_row_kl_and_uniform_baseline_against_numpy():
    p = np.asarray(ar.random_attention_target(jax.random.PRNGKey(1), 6, 0.7), np.float64)
    logits = np.asarray(jax.random.normal(jax.random.PRNGKey(2), (6, 6)), np.float64)
    a = np.exp(logits - logits.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    expected = np.mean(np.sum(p * (np.log(p) - np.log(a)), -1))
    assert float(ar.row_kl(jnp.asarray(p, jnp.float32), jnp.asarray(logits, jnp.float32))) == pytest.approx(
        expected, rel=1e-5)
    assert float(ar.kl_to_uniform(jnp.asarray(p, jnp.float32))) == pytest.approx(
        math.log(6) + np.mean(np.sum(p * np.log(p), -1)), rel=1e-5)


def test_attention_logits_parameterisations():
    q = jax.random.normal(jax.random.PRNGKey(3), (5, 4))
    k = jax.random.normal(jax.random.PRNGKey(4), (5, 4))
    sphere = np.asarray(ar.attention_logits(q, k, "sphere"))
    assert np.max(np.abs(sphere)) <= 4 + 1e-5  # |<q,k>| <= |q||k| = d
    np.testing.assert_allclose(np.diag(np.asarray(ar.attention_logits(q, q, "sphere"))), 4.0, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(ar.attention_logits(q, k, "free")), np.asarray(q @ k.T) / 2.0, rtol=1e-5)


@pytest.mark.parametrize("norm", ["sphere", "free"])
def test_fit_improves_with_head_size_and_is_deterministic(norm):
    target = ar.random_attention_target(jax.random.PRNGKey(0), 8, 1.0)
    base = float(ar.kl_to_uniform(target))
    kl = {d: ar.fit_attention(target, d, key=jax.random.PRNGKey(1), steps=300, norm=norm) for d in (2, 4, 8)}
    assert kl[2] > kl[4] > kl[8]
    assert kl[8] < 0.05 * base  # d = L fits a random 8 x 8 attention matrix almost exactly
    assert ar.fit_attention(target, 4, key=jax.random.PRNGKey(1), steps=300, norm=norm) == kl[4]


def test_grid_and_saturation_dim():
    assert ar.head_dim_grid(16) == [1, 2, 3, 4, 6, 8, 11, 16]
    assert ar.head_dim_grid(300) == [1, 2, 3, 4, 6, 8, 11, 16, 23, 32, 45, 64, 128, 256, 300]
    ds, r = [1, 2, 4, 8], [0.1, 0.5, 0.9, 0.99]
    assert ar.saturation_dim(ds, r, 0.9) == pytest.approx(4.0)
    assert ar.saturation_dim(ds, r, 0.7) == pytest.approx(math.exp(math.log(2) + 0.5 * math.log(2)))
    assert ar.saturation_dim(ds, r, 0.05) == 1.0
    assert ar.saturation_dim(ds, r, 0.999) is None


def test_sweep_tiny_and_cli(tmp_path):
    res = ar.sweep((8,), (1.0,), ("free",), steps=100, max_head_dim=4, log=lambda s: None)
    (curve,) = res["curves"]
    assert curve["head_dims"] == [1, 2, 3, 4] and len(curve["kl"]) == 4
    assert curve["formula_8_33_ln_L"] == pytest.approx(8.33 * math.log(8))
    assert ar.main(["--out-dir", str(tmp_path), "--lengths", "8", "--temperatures", "1.0", "--norms", "free",
                    "--steps", "50", "--max-head-dim", "2"]) == 0
    saved = json.loads((tmp_path / "attention_rank.json").read_text())
    assert saved["curves"][0]["head_dims"] == [1, 2]
    assert (tmp_path / "attention_rank.png").stat().st_size > 1000


@pytest.mark.parametrize("call,word", [
    (lambda: ar.random_attention_target(jax.random.PRNGKey(0), 1, 1.0), "length"),
    (lambda: ar.random_attention_target(jax.random.PRNGKey(0), 4, 0.0), "temperature"),
    (lambda: ar.attention_logits(jnp.ones((2, 2)), jnp.ones((2, 2)), "cosine"), "norm"),
    (lambda: ar.fit_attention(jnp.ones((3, 4)) / 4, 2, key=jax.random.PRNGKey(0)), "target"),
    (lambda: ar.fit_attention(jnp.ones((4, 4)) / 4, 0, key=jax.random.PRNGKey(0)), "head_dim"),
    (lambda: ar.fit_attention(jnp.ones((4, 4)) / 4, 2, key=jax.random.PRNGKey(0), steps=0), "steps"),
    (lambda: ar.fit_attention(jnp.ones((4, 4)) / 4, 2, key=jax.random.PRNGKey(0), norm="x"), "norm"),
    (lambda: ar.fit_attention(jnp.ones((4, 4)) / 4, 2, key=jax.random.PRNGKey(0), learning_rate=0.0),
     "learning_rate"),
])
def test_bad_arguments(call, word):
    with pytest.raises(ValueError, match=word):
        call()
