"""UniVAE (kexue.fm/archives/8475): the post's claims 1-4, the vMF sampler, the loss, the KV cache."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kexue_jax import univae as U
from kexue_jax.nn import TransformerConfig, masks
from kexue_jax.nn.transformer import Transformer, init_cache

PAD, CLS, SEP = 256, 258, 259


def _cfg(**kw):
    model = TransformerConfig.preset("gpt", num_layers=3, d_model=32, num_heads=2, head_dim=16, d_ff=64, max_len=32,
                                     type_vocab_size=2, **kw)
    return U.UniVAEConfig(model=model, n_latent=2, z_dim=8, src_len=12)


def _tokens(key, b=3, s=12, lengths=(6, 10, 3)):
    tok = np.array(jax.random.randint(key, (b, s), 0, 256))
    for i, n in enumerate(lengths[:b]):
        tok[i, 0], tok[i, n + 1], tok[i, n + 2:] = CLS, SEP, PAD
    return jnp.asarray(tok)


@pytest.fixture(scope="module")
def model():
    cfg = _cfg()
    params = jax.jit(U.init, static_argnums=1)(jax.random.PRNGKey(0), cfg)
    # larger weights and non-zero biases than at init, so that z matters everywhere it can
    return cfg, jax.tree_util.tree_map(lambda x: 4.0 * x + 0.05, params)


def _forward(params, cfg, tok, **kw):
    """U.forward under jit (eager flax is slow on the shared CPU)."""
    key, z = kw.pop("key", None), kw.pop("z", None)
    return jax.jit(lambda p, t, k, z: U.forward(p, cfg, t, key=k, z=z, **kw))(params, tok, key, z)


# -- claim 1: the masks -----------------------------------------------------------------------

def test_claim1_masks_on_s_000111():
    s = jnp.array([[0, 0, 0, 1, 1, 1]])
    rows = lambda m: [set(np.flatnonzero(np.asarray(m)[0, 0, i]).tolist()) for i in range(6)]  # noqa: E731
    assert rows(masks.unilm(s))[4] == {0, 1, 2, 3, 4}
    ind, ae = rows(masks.independent(s)), rows(masks.uniae(s))
    assert ind[:3] == [{0, 1, 2}] * 3 and ind[4] == {3, 4}
    assert ae[4] == {0, 3, 4} and ae[:3] == ind[:3]
    assert U.layer_masks(12, 4) == ("independent",) * 8 + ("uniae",) * 4
    assert U.transformer_config(_cfg()).layer_masks == ("independent",) + ("uniae",) * 2


# -- claim 2: in decode mode the logits see the source only through z ---------------------------

def test_claim2_decoder_logits_ignore_source_tokens(model):
    cfg, params = model
    s = cfg.src_len
    z = U.sample_prior(jax.random.PRNGKey(3), cfg, 3)
    a = _tokens(jax.random.PRNGKey(1))
    b = _tokens(jax.random.PRNGKey(2), lengths=(2, 9, 7))  # other source tokens and other padding
    tcfg = U.transformer_config(cfg)
    inject = {l: U.latent_out(params["latent"][f"layer_{l}"], z[:, i]) for i, l in enumerate(cfg.latent_layers)}

    def run(src, tgt):
        seq = jnp.concatenate([src, tgt], 1)
        return np.asarray(jax.jit(lambda seq: Transformer(tcfg).apply(
            {"params": params["transformer"]}, seq, U.segment_ids(3, s), valid=seq != PAD, inject=inject))(seq))
    ra, rb = run(a, a), run(b, a)
    assert not np.array_equal(ra[:, :s], rb[:, :s])  # the source half did change
    np.testing.assert_array_equal(ra[:, s:], rb[:, s:])  # bitwise equal target half
    # and the decoder's own layout ([CLS] + target at positions 0, S, S+1, ...) gives the same logits
    la, _, _ = _forward(params, cfg, a, z=z)
    np.testing.assert_allclose(np.asarray(la[:, s:]), ra[:, s:], atol=2e-5)
    valid = np.asarray(a != PAD)[..., None]
    dec = jax.jit(lambda z, a: U.decoder_logits(params, cfg, z, a))(z, a)
    np.testing.assert_allclose(np.where(valid, np.asarray(dec), 0),
                               np.where(valid, ra[:, s:], 0), atol=2e-5)


# -- claim 3: below the latent layers the target half does not depend on z ------------------------

def test_claim3_lower_layers_independent_of_z(model):
    cfg, params = model
    tok = _tokens(jax.random.PRNGKey(1))
    outs = [_forward(params, cfg, tok, z=U.sample_prior(jax.random.PRNGKey(k), cfg, 3), return_intermediates=True)
            for k in (5, 6)]
    s, first = cfg.src_len, cfg.latent_layers[0]
    (la, _, _, aux_a), (lb, _, _, aux_b) = outs
    for l in range(first + 1):  # states output by layers 0 .. first-1, and the input of the first latent layer
        np.testing.assert_array_equal(np.asarray(aux_a["hidden"][l][:, s:]), np.asarray(aux_b["hidden"][l][:, s:]))
    assert float(jnp.max(jnp.abs(aux_a["hidden"][first + 1][:, s:] - aux_b["hidden"][first + 1][:, s:]))) > 1e-3
    assert float(jnp.max(jnp.abs(la[:, s:] - lb[:, s:]))) > 1e-3


# -- claim 4: mu on the unit sphere; vMF samples have the Bessel-ratio mean -----------------------

def test_claim4_mu_unit_norm_and_encode_equals_encoder_mode(model):
    cfg, params = model
    tok = _tokens(jax.random.PRNGKey(1))
    mu = jax.jit(lambda t: U.encode(params, cfg, t))(tok)
    chex.assert_shape(mu, (3, cfg.n_latent, cfg.z_dim))
    np.testing.assert_allclose(np.linalg.norm(np.asarray(mu), axis=-1), 1.0, atol=1e-6)
    _, mu_full, z_full = _forward(params, cfg, tok)
    np.testing.assert_allclose(np.asarray(mu), np.asarray(mu_full), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(mu_full), np.asarray(z_full))  # encoder mode: z = mu
    _, mu_t, z_t = _forward(params, cfg, tok, key=jax.random.PRNGKey(0))
    np.testing.assert_allclose(np.linalg.norm(np.asarray(z_t), axis=-1), 1.0, atol=1e-5)
    assert float(jnp.min(jnp.sum(z_t * mu_t, -1))) < 0.999  # training mode adds noise


@pytest.mark.parametrize("d", [3, 16, 64])
def test_vmf_mean_cosine_matches_bessel_ratio(d):
    n = 4000
    mu = U.l2_normalize(jax.random.normal(jax.random.PRNGKey(d), (d,)))
    sample = jax.jit(lambda k, kappa: U.vmf_sample(k, jnp.broadcast_to(mu, (n, d)), kappa))
    for kappa in (0.0, 8.0, 32.0, 128.0):
        z = np.asarray(sample(jax.random.PRNGKey(int(kappa)), kappa), np.float64)
        np.testing.assert_allclose(np.linalg.norm(z, axis=-1), 1.0, atol=1e-5)
        w = z @ np.asarray(mu, np.float64)
        want = U.vmf_mean_cosine(kappa, d)
        se = w.std() / np.sqrt(n)
        assert abs(w.mean() - want) < 5 * se + 1e-4, (d, kappa, w.mean(), want, se)


def test_vmf_vmappable_and_gradient_flows_to_mu():
    mus = U.l2_normalize(jax.random.normal(jax.random.PRNGKey(0), (5, 7, 16)))
    keys = jax.random.split(jax.random.PRNGKey(1), 5)
    z = jax.jit(jax.vmap(lambda k, m: U.vmf_sample(k, m, 32.0)))(keys, mus)
    chex.assert_shape(z, (5, 7, 16))
    np.testing.assert_allclose(np.linalg.norm(np.asarray(z), axis=-1), 1.0, atol=1e-5)
    g = jax.jit(jax.grad(lambda m: jnp.sum(U.vmf_sample(keys[0], U.l2_normalize(m), 32.0)[..., 0])))(mus[0])
    assert np.all(np.isfinite(np.asarray(g))) and float(jnp.abs(g).sum()) > 0
    with pytest.raises(ValueError, match="d >= 2"):
        U.vmf_sample(keys[0], jnp.ones((3, 1)), 1.0)


# -- the loss ------------------------------------------------------------------------------------

def test_loss_counts_target_predictions_and_excludes_padding(model):
    cfg, params = model
    tok = _tokens(jax.random.PRNGKey(1))
    (total, count), (logits, _, _) = jax.jit(lambda t: (U.loss_terms(params, cfg, t, None),
                                                        U.forward(params, cfg, t)))(tok)  # z = mu: no vMF
    assert float(count) == (6 + 1) + (10 + 1) + (3 + 1)  # bytes + [SEP] of each line
    s = cfg.src_len
    logp = jax.nn.log_softmax(logits[:, s:2 * s - 1], -1)
    nll = -jnp.take_along_axis(logp, tok[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(float(total), float(jnp.sum(nll * (tok[:, 1:] != PAD))), rtol=1e-5)


def test_word_dropout_masks_only_real_decoder_inputs_at_the_rate(model):
    cfg, params = model
    cfg = cfg.replace(word_dropout=0.3)
    tok = _tokens(jax.random.PRNGKey(1), b=3, lengths=(10, 10, 10))
    tok = jnp.tile(tok, (400, 1))                                     # 1200 rows of 10 bytes + [SEP]
    out = np.asarray(U.word_dropout(jax.random.PRNGKey(2), cfg, tok))
    t = np.asarray(tok)
    changed = out != t
    assert np.all(out[changed] == cfg.mask_id)
    assert not changed[:, 0].any() and not changed[t == PAD].any()      # [CLS] and PAD are kept
    real = (t != PAD) & (np.arange(t.shape[1]) > 0)
    rate, n = changed[real].mean(), real.sum()
    assert abs(rate - 0.3) < 4 * np.sqrt(0.3 * 0.7 / n)                  # binomial: within 4 standard errors
    # the loss: clean targets, corrupted decoder inputs (changes the NLL), evaluation (key=None) untouched
    small = tok[:3]
    key = jax.random.PRNGKey(5)
    clean = jax.jit(lambda p, t: U.loss_terms(p, cfg.replace(word_dropout=0.0), t, key))(params, small)
    noisy = jax.jit(lambda p, t: U.loss_terms(p, cfg, t, key))(params, small)
    assert float(clean[1]) == float(noisy[1]) and float(clean[0]) != float(noisy[0])
    chex.assert_trees_all_equal(jax.jit(lambda p, t: U.loss_terms(p, cfg, t, None))(params, small),
                                jax.jit(lambda p, t: U.loss_terms(p, cfg.replace(word_dropout=0.0), t, None))(
                                    params, small))
    with pytest.raises(ValueError, match="word_dropout must be a number in"):
        cfg.replace(word_dropout=1.0)


# -- KV cache ------------------------------------------------------------------------------------

def test_model_dropout_applies_in_training_mode_only(model):
    """``model.dropout_rate`` reaches the Transformer when a key is given (training), not in encoder/decoder
    modes; at rate 0 the training draws are the ones of the model without the field (key not split)."""
    cfg, params = model
    drop = cfg.replace(model=cfg.model.replace(dropout_rate=0.5))
    tok = _tokens(jax.random.PRNGKey(1))
    z = jnp.asarray(U.encode(params, cfg, tok))                      # fixed z: only dropout can differ
    a = _forward(params, drop, tok, z=z, key=jax.random.PRNGKey(3))[0]
    b = _forward(params, drop, tok, z=z, key=jax.random.PRNGKey(4))[0]
    assert float(jnp.max(jnp.abs(a - b))) > 1e-2                     # two dropout masks, two outputs
    chex.assert_trees_all_equal(_forward(params, drop, tok, z=z)[0], _forward(params, cfg, tok, z=z)[0])
    chex.assert_trees_all_equal(_forward(params, drop.replace(model=cfg.model.replace(dropout_rate=0.0)), tok,
                                         key=jax.random.PRNGKey(3)),
                                _forward(params, cfg, tok, key=jax.random.PRNGKey(3)))


@pytest.mark.parametrize("method", ["greedy", "sample"])
def test_cached_decoding_equals_uncached(model, method):
    cfg, params = model
    z = U.sample_prior(jax.random.PRNGKey(4), cfg, 6)
    kw = dict(method=method, key=jax.random.PRNGKey(9), max_len=11)
    a = np.asarray(jax.jit(lambda z: U.decode(params, cfg, z, **kw))(z))
    b = np.asarray(jax.jit(lambda z: U.decode(params, cfg, z, cached=False, **kw))(z))
    np.testing.assert_array_equal(a, b)
    assert len({tuple(r) for r in a}) > 1  # outputs depend on z


def test_cached_step_logits_equal_uncached_logits(model):
    cfg, params = model
    z = U.sample_prior(jax.random.PRNGKey(4), cfg, 2)
    target = jnp.concatenate([jnp.full((2, 1), CLS), _tokens(jax.random.PRNGKey(2), b=2)[:, 1:9]], 1)
    full = jax.jit(lambda z, x: U.decoder_logits(params, cfg, z, x))(z, target)
    cache = jax.jit(lambda z: U.prefill(params, cfg, z, target.shape[1]))(z)
    step_fn = jax.jit(lambda c, x, t: U.decode_step(params, cfg, c, x, t))
    for t in range(target.shape[1]):
        step, cache = step_fn(cache, target[:, t], t)
        np.testing.assert_allclose(np.asarray(step), np.asarray(full[:, t]), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_beam_of_one_is_greedy_and_beam_is_at_least_as_likely(model):
    cfg, params = model
    z = U.sample_prior(jax.random.PRNGKey(4), cfg, 4)
    dec = jax.jit(lambda z, method, k: U.decode(params, cfg, z, method=method, beam_size=k, max_len=8),
                  static_argnums=(1, 2))
    greedy = dec(z, "greedy", 1)
    np.testing.assert_array_equal(np.asarray(dec(z, "beam", 1)), np.asarray(greedy))

    def score(out):
        target = jnp.concatenate([jnp.full((4, 1), CLS), out[:, :-1]], 1)
        logp = jax.nn.log_softmax(jax.jit(lambda z, x: U.decoder_logits(params, cfg, z, x))(z, target), -1)
        lp = jnp.take_along_axis(logp, out[..., None], -1)[..., 0]
        alive = jnp.cumsum(out == SEP, 1) - (out == SEP) == 0  # up to and including the first [SEP]
        return np.asarray(jnp.sum(lp * alive, 1))
    beam = dec(z, "beam", 4)
    assert np.all(score(beam) >= score(greedy) - 1e-4)


def test_generic_kv_cache_matches_full_forward():
    cfg = TransformerConfig.preset("bert", num_layers=2, d_model=32, num_heads=2, head_dim=16, d_ff=64, max_len=16,
                                   position="rope", mask="unilm")
    tok = jax.random.randint(jax.random.PRNGKey(1), (2, 9), 0, 260)
    seg = jnp.array([[0] * 4 + [1] * 5] * 2)
    m = Transformer(cfg)
    p = jax.jit(m.init)(jax.random.PRNGKey(0), tok, seg)["params"]
    full = jax.jit(m.apply)({"params": p}, tok, seg)
    step = jax.jit(lambda c, x, s, t: m.apply({"params": p, "cache": c}, x, s, cache_index=t, mutable=["cache"]))
    out, v = step(init_cache(cfg, 2, 9), tok[:, :4], seg[:, :4], 0)
    outs, cache = [out], v["cache"]
    for t in range(4, 9):
        o, v = step(cache, tok[:, t:t + 1], seg[:, t:t + 1], t)
        outs.append(o)
        cache = v["cache"]
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(full), atol=1e-5)
    with pytest.raises(ValueError, match="init_cache"):
        m.apply({"params": p}, tok[:, :1], seg[:, :1], cache_index=0, mutable=["cache"])


# -- the rest of the API -------------------------------------------------------------------------

def test_resample_keeps_other_layers_and_interpolate_ends(model):
    cfg, params = model
    tok = _tokens(jax.random.PRNGKey(1))
    mu = jax.jit(lambda t: U.encode(params, cfg, t))(tok)
    out, z = jax.jit(lambda t, k: U.resample(params, cfg, t, [0], k, max_len=6))(tok, jax.random.PRNGKey(2))
    chex.assert_shape(out, (3, 6))
    np.testing.assert_array_equal(np.asarray(z[:, 1]), np.asarray(mu[:, 1]))
    assert float(jnp.max(jnp.abs(z[:, 0] - mu[:, 0]))) > 1e-2
    path = U.interpolate(mu[0], mu[1], 5)
    chex.assert_shape(path, (5, cfg.n_latent, cfg.z_dim))
    np.testing.assert_allclose(np.asarray(path[0]), np.asarray(mu[0]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(path[-1]), np.asarray(mu[1]), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(path), axis=-1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="latent indices"):
        U.resample(params, cfg, tok, [2], jax.random.PRNGKey(2))


def test_config_errors_name_the_field():
    m = TransformerConfig.preset("gpt", num_layers=4, max_len=32)
    with pytest.raises(ValueError, match="n_latent"):
        U.UniVAEConfig(model=m, n_latent=4, src_len=12)
    with pytest.raises(ValueError, match="max_len"):
        U.UniVAEConfig(model=m, n_latent=2, src_len=20)
    with pytest.raises(ValueError, match="kappa"):
        U.UniVAEConfig(model=m, n_latent=2, src_len=12, kappa=-1.0)
    cfg = U.UniVAEConfig(model=m, n_latent=2, src_len=12)
    with pytest.raises(ValueError, match="method"):
        U.decode({}, cfg, jnp.zeros((1, 2, 16)), method="topp")
    with pytest.raises(ValueError, match="max_len"):
        U.decode({}, cfg, jnp.zeros((1, 2, 16)), max_len=12)
    # the mixers of kexue.fm/archives/8431 have neither the dense masks nor a KV cache (their registry entries)
    for mixer in ("linear", "gmlp"):
        with pytest.raises(ValueError, match=r"UniVAE needs model.token_mixer in \('attention',\)"):
            U.UniVAEConfig(model=m.replace(token_mixer=mixer, mask="causal"), n_latent=2, src_len=12)
    gmlp = m.replace(token_mixer="gmlp", mask="causal")
    tok = jnp.zeros((1, 3), jnp.int32)
    params = Transformer(gmlp).init(jax.random.PRNGKey(0), tok)["params"]
    with pytest.raises(ValueError, match=r"cache_index \(KV-cache decoding\) needs .*token_mixer in \('attention',\)"):
        Transformer(gmlp).apply({"params": params, "cache": init_cache(gmlp, 1, 3)}, tok, cache_index=0,
                                mutable=["cache"])


# -- the VQ variant ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vq_model():
    cfg = _cfg().replace(quantize=True, codebook_size=16)
    params = jax.jit(U.init, static_argnums=1)(jax.random.PRNGKey(0), cfg)
    return cfg, jax.tree_util.tree_map(lambda x: 4.0 * x + 0.05, params)  # as ``model``: codebook rows not unit


def _np_nearest(codebook, mu):
    cb = np.asarray(codebook, np.float64)
    cb = cb / np.linalg.norm(cb, axis=-1, keepdims=True)
    k = np.argmax(np.asarray(mu, np.float64) @ cb.T, -1)
    return cb[k], k


def test_vq_init_adds_unit_codebooks_and_keeps_the_other_tensors():
    cfg = _cfg()
    plain, vq = (jax.jit(U.init, static_argnums=1)(jax.random.PRNGKey(0), c)
                 for c in (cfg, cfg.replace(quantize=True, codebook_size=16)))
    for l in cfg.latent_layers:
        cb = vq["latent"][f"layer_{l}"].pop("codebook")
        chex.assert_shape(cb, (16, cfg.z_dim))
        np.testing.assert_allclose(np.linalg.norm(np.asarray(cb), axis=-1), 1.0, atol=1e-6)
    chex.assert_trees_all_equal(plain, vq)


def test_vq_quantize_nearest_straight_through_and_loss():
    cb = jax.random.normal(jax.random.PRNGKey(0), (16, 8)) * 3.0  # rows of any norm: quantize normalizes
    mu = U.l2_normalize(jax.random.normal(jax.random.PRNGKey(1), (5, 8)))
    g = jax.random.normal(jax.random.PRNGKey(2), (5, 8))
    beta = 0.25
    z_q, k, loss = U.quantize(cb, mu, beta)
    e, k_np = _np_nearest(cb, mu)
    chex.assert_shape((z_q, k, loss), ((5, 8), (5,), (5,)))
    np.testing.assert_array_equal(np.asarray(k), k_np)
    np.testing.assert_allclose(np.asarray(z_q), e, atol=1e-6)
    np.testing.assert_allclose(np.asarray(loss), (1 + beta) * np.sum((np.asarray(mu) - e) ** 2, -1), rtol=1e-5)
    # straight-through: d sum(z_q * g) / d mu = g
    np.testing.assert_allclose(np.asarray(jax.grad(lambda m: jnp.sum(U.quantize(cb, m)[0] * g))(mu)),
                               np.asarray(g), atol=1e-6)
    # the stop-gradients: d loss / d mu = 2 beta (mu - e); d loss / d codebook does not depend on beta
    np.testing.assert_allclose(np.asarray(jax.grad(lambda m: jnp.sum(U.quantize(cb, m, beta)[2]))(mu)),
                               2 * beta * (np.asarray(mu) - e), atol=1e-5)
    d_cb = [np.asarray(jax.grad(lambda c, b=b: jnp.sum(U.quantize(c, mu, b)[2]))(cb)) for b in (0.0, 5.0)]
    np.testing.assert_allclose(d_cb[0], d_cb[1], atol=1e-6)
    assert np.abs(d_cb[0]).sum() > 0


def test_vq_loss_terms_add_the_vq_loss(vq_model):
    cfg, params = vq_model
    tok = _tokens(jax.random.PRNGKey(1))
    (total, count), (nll, count0), (_, mu, z), vq = jax.jit(lambda t: (
        U.loss_terms(params, cfg, t, jax.random.PRNGKey(0)), U.loss_terms(params, cfg, t, None, vq=False),
        U.forward(params, cfg, t), U.vq_loss(params, cfg, U.forward(params, cfg, t)[1])))(tok)
    assert float(count) == float(count0) == 7 + 11 + 4
    want = np.mean([(1 + cfg.commitment) * np.sum((np.asarray(mu[:, i]) -
                                                    _np_nearest(params["latent"][f"layer_{l}"]["codebook"],
                                                                mu[:, i])[0]) ** 2, -1)
                    for i, l in enumerate(cfg.latent_layers)])
    np.testing.assert_allclose(float(vq), want, rtol=1e-5)
    assert want > 0.01
    np.testing.assert_allclose(float(total / count), float(nll / count) + want, rtol=1e-5)  # key: no noise
    for i, l in enumerate(cfg.latent_layers):  # forward's z = the code of its mu
        np.testing.assert_allclose(np.asarray(z[:, i]),
                                   _np_nearest(params["latent"][f"layer_{l}"]["codebook"], mu[:, i])[0], atol=1e-6)


def test_vq_encode_gives_codebook_rows_and_codes_round_trip(vq_model):
    cfg, params = vq_model
    tok = _tokens(jax.random.PRNGKey(1))
    z, idx, rec = jax.jit(lambda t: (U.encode(params, cfg, t), U.encode_indices(params, cfg, t),
                                     U.reconstruct(params, cfg, t, max_len=8)))(tok)
    chex.assert_shape((z, idx), ((3, cfg.n_latent, cfg.z_dim), (3, cfg.n_latent)))
    assert idx.dtype == jnp.int32 and int(idx.min()) >= 0 and int(idx.max()) < cfg.codebook_size
    for i, l in enumerate(cfg.latent_layers):
        rows = U.l2_normalize(params["latent"][f"layer_{l}"]["codebook"])[idx[:, i]]
        np.testing.assert_array_equal(np.asarray(z[:, i]), np.asarray(rows))  # exact codebook rows
    _, _, z_fwd = _forward(params, cfg, tok)
    np.testing.assert_allclose(np.asarray(z_fwd), np.asarray(z), atol=1e-5)  # = forward's encoder mode
    back = U.codes_to_z(params, cfg, idx)
    np.testing.assert_array_equal(np.asarray(back), np.asarray(z))
    dec = jax.jit(lambda z: U.decode(params, cfg, z, max_len=8))(back)
    np.testing.assert_array_equal(np.asarray(dec), np.asarray(rec))
    # the prior: uniform codes, and resample draws codes for the chosen layer only
    prior = U.sample_prior(jax.random.PRNGKey(3), cfg, 64, params)
    cos = jnp.einsum("nd,kd->nk", prior[:, 0], U.l2_normalize(params["latent"][f"layer_{cfg.latent_layers[0]}"]
                                                              ["codebook"]))
    np.testing.assert_allclose(np.asarray(jnp.max(cos, -1)), 1.0, atol=1e-6)
    assert len(set(np.asarray(jnp.argmax(cos, -1)).tolist())) > 8
    _, zr = jax.jit(lambda t, k: U.resample(params, cfg, t, [1], k, max_len=6))(tok, jax.random.PRNGKey(2))
    np.testing.assert_array_equal(np.asarray(zr[:, 0]), np.asarray(z[:, 0]))
    with pytest.raises(ValueError, match="params"):
        U.sample_prior(jax.random.PRNGKey(3), cfg, 2)
    with pytest.raises(ValueError, match="quantize"):
        U.encode_indices(params, _cfg(), tok)


def test_vq_training_steps_reduce_the_loss(vq_model):
    import optax

    cfg = vq_model[0]
    params = jax.jit(U.init, static_argnums=1)(jax.random.PRNGKey(0), cfg)
    tok = jnp.concatenate([_tokens(jax.random.PRNGKey(k)) for k in range(3)])
    tx = optax.adam(3e-3)

    @jax.jit
    def step(p, o):
        (s, n), g = jax.value_and_grad(lambda p: U.loss_terms(p, cfg, tok, None), has_aux=True)(p)
        u, o = tx.update(jax.tree_util.tree_map(lambda x: x / n, g), o, p)
        return optax.apply_updates(p, u), o, s / n

    p, o, losses = params, tx.init(params), []
    for _ in range(30):
        p, o, v = step(p, o)
        losses.append(float(v))
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.5, losses
    name = f"layer_{cfg.latent_layers[0]}"
    assert float(jnp.abs(p["latent"][name]["codebook"] - params["latent"][name]["codebook"]).max()) > 1e-4


def test_vq_config_errors_name_the_field():
    m = TransformerConfig.preset("gpt", num_layers=4, max_len=32)
    with pytest.raises(ValueError, match="codebook_size"):
        U.UniVAEConfig(model=m, n_latent=2, src_len=12, quantize=True, codebook_size=0)
    with pytest.raises(ValueError, match="commitment"):
        U.UniVAEConfig(model=m, n_latent=2, src_len=12, quantize=True, commitment=-1.0)
    with pytest.raises(ValueError, match="quantize"):
        U.codes_to_z({}, U.UniVAEConfig(model=m, n_latent=2, src_len=12), jnp.zeros((1, 2), jnp.int32))


def test_vq_config_threads_through_the_job():
    from kexue_jax.experiments import univae as job

    c = _tiny_config()
    assert job.univae_config(c).quantize is False
    c.univae.update(quantize=True, codebook_size=32, commitment=0.5)
    cfg, _ = job.validate(c)
    assert (cfg.quantize, cfg.codebook_size, cfg.commitment) == (True, 32, 0.5)
    c.univae.codebook_size = 0
    with pytest.raises(ValueError, match="codebook_size"):
        job.validate(c)


# -- the train.py job ----------------------------------------------------------------------------

def _tiny_config():
    from configs import univae as univae_configs

    return univae_configs.get_config("tiny")


@pytest.mark.slow
def test_tiny_run_loss_falls_below_unigram_entropy_and_resumes(tmp_path):
    from kexue_jax import metrics
    from kexue_jax.experiments import univae as job

    c = _tiny_config()
    job.train(c, str(tmp_path), stop_after=100)
    assert job.ckpt_lib.Checkpointer(str(tmp_path / "checkpoints")).latest_step() == 75
    cfg, params, _, va_lines = job.train(c, str(tmp_path))  # resumes at 75, runs to 150
    rec = metrics.read_metrics(tmp_path)
    assert [r["step"] for r in rec if "val_loss" in r] == [0, 75, 150]
    tokens = job.to_tokens(va_lines, cfg.src_len)[:, 1:]
    counts = np.bincount(tokens[tokens != PAD], minlength=260).astype(float)
    p = counts[counts > 0] / counts.sum()
    unigram = float(-(p * np.log(p)).sum())  # nats/token of the held-out target tokens (bytes + [SEP])
    final = [r["val_loss"] for r in rec if "val_loss" in r][-1]
    assert final < unigram - 0.3, (final, unigram)


@pytest.mark.slow
def test_tiny_job_writes_samples_and_report(tmp_path):
    import json

    from kexue_jax.experiments import univae as job

    report = job.run(_tiny_config(), str(tmp_path))
    text = (tmp_path / "samples.md").read_text()
    assert text.count("## ") == 4 and text.count("  - `") == 2 * 5 * 5
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["reconstruction"]["n"] == 32 and 0.0 <= saved["reconstruction"]["byte_accuracy"] <= 1.0
    assert set(saved["multiscale"]) >= {"lowest", "highest", "supports_claim"}
    # latent layers numbered as the CLI's --layers (0 = lowest); the Transformer layer under each beside it
    assert saved["multiscale"]["layers"] == {"lowest": 0, "highest": 1}
    assert saved["multiscale"]["transformer_layers"] == {"lowest": 1, "highest": 2}
    assert "(`--layers 0`; Transformer layer 1)" in text
    assert saved["prior"]["bits_per_byte_heldout"] > 0 and report["prior"]["n"] == 16


@pytest.mark.slow
def test_tiny_vq_job_reports_codebook_use(tmp_path):
    from kexue_jax.experiments import univae as job

    c = _tiny_config()
    c.univae.quantize, c.eval.lm_variant = True, ""
    report = job.run(c, str(tmp_path))
    assert len(report["codes_used"]) == 2 and all(1 <= n <= min(32, 256) for n in report["codes_used"])
    assert "z uniform over each codebook" in (tmp_path / "samples.md").read_text()


def test_edit_distance_and_reconstruction_metrics():
    from kexue_jax.experiments import univae as job

    assert job.edit_distance(b"kitten", b"sitting") == 3 and job.edit_distance(b"", b"abc") == 3
    src = job.to_tokens(["abc", "hello"], 8)
    out = np.array(src[:, 1:])
    out[1, 2] = ord("x")
    m = job.reconstruction_metrics(src, out, PAD)
    assert m["exact_match"] == 0.5 and abs(m["byte_accuracy"] - 9 / 10) < 1e-9
    assert job.to_text(out[0]) == "abc"
    assert job.distinct_lines([type("P", (), {"text": "HAMLET:\nTo be, or not\n\nHAMLET:\nTo be, or not\nab\n"})()],
                              20, 3) == ["To be, or not"]


def test_long_lines_split_into_word_pieces_for_training_only():
    from configs import univae as univae_configs
    from kexue_jax.experiments import univae as job

    line = "To be, or not to be, that is the question: whether tis nobler"
    assert job.line_pieces(line, 30) == ["To be, or not to be, that is", "the question: whether tis", "nobler"]
    assert job.line_pieces("short line", 30) == ["short line"]
    assert job.line_pieces("a " + "x" * 12 + " b c", 10) == ["a", "b c"]   # a word over the limit is left out
    long = " ".join([line] * 3)
    pieces = job.line_pieces(long, 17)
    assert " ".join(pieces) == long and all(len(p.encode()) <= 17 for p in pieces)  # every word kept, in order
    assert all(len(f"{a} {b.split()[0]}".encode()) > 17 for a, b in zip(pieces, pieces[1:]))  # greedy packing
    plays = [type("P", (), {"text": f"HAMLET:\n{line}\nab cd ef\nTo be, or not to be, that is\n"})()]
    assert job.distinct_lines(plays, 30, 3) == ["ab cd ef", "To be, or not to be, that is"]
    assert job.distinct_lines(plays, 30, 8, "split") == ["To be, or not to be, that is", "the question: whether tis",
                                                          "ab cd ef"]             # "nobler" < 8 bytes, repeats once
    with pytest.raises(ValueError, match="long_lines must be one of"):
        job.distinct_lines(plays, 30, 3, "wrap")
    c = univae_configs.get_config("tiny")
    c.data.long_lines = "wrap"
    with pytest.raises(ValueError, match=r"config.data.long_lines must be one of \('drop', 'split'\)"):
        job.validate(c)
    c.data.long_lines = "split"
    tr, va = job.load_lines(c)
    c.data.long_lines = "drop"
    tr0, va0 = job.load_lines(c)
    assert va == va0 and set(tr0) < set(tr) and len(tr) > 5 * len(tr0)   # held-out lines unchanged


def test_minilm_variant_uses_wordpiece_and_matches_the_checkpoint():
    pytest.importorskip("tokenizers")
    from configs import univae as univae_configs
    from kexue_jax import hf
    from kexue_jax.experiments import univae as job

    try:
        hf.minilm_path()
    except (FileNotFoundError, ModuleNotFoundError) as e:
        pytest.skip(f"all-MiniLM-L6-v2 not installed: {e}")
    c = univae_configs.get_config("minilm")
    cfg, vocab = job.validate(c)
    assert (vocab.cls_id, vocab.sep_id, vocab.pad_id) == (101, 102, 0)
    row = job.to_tokens(["To be, or not to be"], cfg.src_len, vocab)[0]
    assert row[0] == 101 and 102 in row and job.to_text(row, vocab) == "to be, or not to be"
    abstract = jax.eval_shape(lambda k: U.init(k, cfg), jax.random.PRNGKey(0))
    hf_cfg, _ = hf.load_bert(hf.minilm_path(), head="none")
    assert (hf_cfg.num_layers, hf_cfg.d_model, hf_cfg.vocab_size) == (6, 384, 30522)
    assert abstract["transformer"]["embed"]["token"].shape == (30522, 384)
    c.univae.init_from = "bert"
    with pytest.raises(ValueError, match="init_from"):
        job.validate(c)
