"""UniVAE: a single-Transformer, multi-scale sentence VAE (kexue.fm/archives/8475).

One Transformer reads ``[x; x]`` (the source and a copy of it, the target), segment ids ``[0]*S + [1]*S``.
The first ``L - n_latent`` layers use the *independent* mask (source bidirectional in itself, target causal
in itself, no crossing); the top ``n_latent`` layers use the *UniAE* mask (independent plus key 0, the
source [CLS], for every query), so in those layers the target sees the source only through position 0.
Before each latent layer l:

    mu_l = normalize(Dense_in,l(h_l[:, 0]))                 (a point on S^{z_dim - 1})
    z_l  ~ vMF(mu_l, kappa)   (train)  |  = mu_l (encode)  |  given (decode)
    h_l[:, 0] <- Dense_out,l(z_l)

Later mu's are computed after the earlier latents were injected (hierarchical encoder). With kappa fixed,
KL(vMF(mu, kappa) || uniform) is a constant, so the loss is the target-half next-token cross-entropy only
(no KL term): the model is an autoencoder with noisy spherical codes, and the prior is uniform on each
sphere.

Layout (fixed length, the post's first remedy for "length leakage"): a line is ``[CLS] bytes [SEP]`` padded
with PAD to ``src_len`` = S; the target starts at position S. Loss (``loss``): predictions made at target
positions S + j (j = 0 .. S-2) of the target token j + 1, weighted 1 where that token is a real token
(bytes and [SEP]) and 0 where it is PAD. Decision: the post's code also trains the PAD predictions after
[SEP] (its weight is the segment id); we exclude them, since decoding stops at [SEP] and PAD targets
would only dilute the loss. Padding keys (PAD) are masked, as in the post.

Decoding never needs the source tokens: under the masks a target query sees the source only at key 0
in the latent layers, whose hidden state is Dense_out,l(z_l). So the decoder input is ``[CLS] + target``
with positions ``[0, S, S+1, ...]`` and segments ``[0, 1, 1, ...]``, and its logits equal those of the
full ``[x; x]`` layout (tested). ``decode`` uses a KV cache (``kexue_jax.nn.transformer.init_cache``):
slot 0 is filled once from z (all layers), then one target token per step.

vMF sampling (``vmf_sample``): Wood (1994) rejection sampler for w = <z, mu>, density proportional to
exp(kappa w) (1 - w^2)^((d-3)/2) on (-1, 1), run under ``lax.while_loop`` (exact for any d and kappa >= 0),
then z = w mu + sqrt(1 - w^2) nu, nu uniform on the tangent sphere (post 8404; the post's code uses a table
of 10^7 inverse-CDF quantiles instead).

VQ variant (``quantize=True``; the post: "quantising each [CLS] code instead gives a VQ-VAE: sentence ->
fixed-length discrete code"): each latent layer has a codebook C_l [codebook_size, z_dim] and

    e_l  = normalize(C_l)[k_l],   k_l = argmax_k <mu_l, normalize(C_l)[k]>      (nearest code on the sphere)
    z_l  = mu_l + sg(e_l - mu_l)  (train and encoder mode: straight-through)   |  given (decode)

with no vMF noise; the loss adds the VQ-VAE term (van den Oord et al. 2017, ``vq_loss``). A sentence's
discrete code is (k_l)_l, ``encode_indices``; ``codes_to_z`` maps it back, and the prior is uniform over each
codebook (``sample_prior``).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp

from kexue_jax.nn import init as initializers
from kexue_jax.nn.mixers import mixer_names
from kexue_jax.nn.norms import l2_normalize
from kexue_jax.nn.transformer import Transformer, TransformerConfig, init_cache

Array = jax.Array
METHODS = ("greedy", "beam", "sample")


@dataclasses.dataclass(frozen=True)
class UniVAEConfig:
    """The Transformer plus the latent path. ``model.layer_masks`` is set by ``transformer_config``."""

    model: TransformerConfig
    n_latent: int = 4
    z_dim: int = 16
    kappa: float = 32.0
    src_len: int = 32
    cls_id: int = 258
    sep_id: int = 259
    pad_id: int = 256
    mask_id: int = 257
    word_dropout: float = 0.0
    quantize: bool = False      # VQ variant: nearest codebook row instead of vMF noise
    codebook_size: int = 256    # codes per latent layer (quantize=True)
    commitment: float = 0.25    # beta of the VQ-VAE commitment term (quantize=True)

    def __post_init__(self):
        m = self.model
        for name in ("n_latent", "z_dim", "src_len", "codebook_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"UniVAEConfig.{name} must be a positive integer, got {v!r}")
        if self.n_latent >= m.num_layers:
            raise ValueError(f"UniVAEConfig.n_latent must be < model.num_layers={m.num_layers} (layer 0's [CLS] "
                             f"is a constant embedding, useless as a code), got {self.n_latent}")
        if not (isinstance(self.kappa, (int, float)) and self.kappa >= 0):
            raise ValueError(f"UniVAEConfig.kappa must be a number >= 0, got {self.kappa!r}")
        if not isinstance(self.quantize, bool):
            raise ValueError(f"UniVAEConfig.quantize must be a bool, got {self.quantize!r}")
        if isinstance(self.commitment, bool) or not (isinstance(self.commitment, (int, float))
                                                     and self.commitment >= 0):
            raise ValueError(f"UniVAEConfig.commitment must be a number >= 0, got {self.commitment!r}")
        if self.src_len < 3:
            raise ValueError(f"UniVAEConfig.src_len must be >= 3 ([CLS] x [SEP]), got {self.src_len}")
        if m.position == "learned" and 2 * self.src_len > m.max_len:
            raise ValueError(f"model.max_len must be >= 2 * src_len = {2 * self.src_len} with learned positions, "
                             f"got {m.max_len}")
        if not (m.mixer_spec.dense_mask and m.mixer_spec.kv_cache) or m.position == "relative":
            allowed = mixer_names(dense_mask=True, kv_cache=True)  # ('attention',): its masks and decoding cache
            raise ValueError(f"UniVAE needs model.token_mixer in {allowed} (the masks, KV-cache decoding) and "
                             f"position in ('learned', 'rope', 'none'), got {m.token_mixer!r} / {m.position!r}")
        if m.type_vocab_size == 1:
            raise ValueError("model.type_vocab_size must be 0 or >= 2 (segments 0 and 1), got 1")
        if not (isinstance(self.word_dropout, (int, float)) and 0 <= self.word_dropout < 1):
            raise ValueError(f"UniVAEConfig.word_dropout must be a number in [0, 1), got {self.word_dropout!r}")
        for name in ("cls_id", "sep_id", "pad_id", "mask_id"):
            v = getattr(self, name)
            if not 0 <= v < m.vocab_size:
                raise ValueError(f"UniVAEConfig.{name} must be a token id in [0, {m.vocab_size}), got {v}")

    @property
    def latent_layers(self) -> tuple[int, ...]:
        """Indices of the layers that carry a latent: the top n_latent ones."""
        return tuple(range(self.model.num_layers - self.n_latent, self.model.num_layers))

    def replace(self, **changes) -> "UniVAEConfig":
        return dataclasses.replace(self, **changes)


def layer_masks(num_layers: int, n_latent: int) -> tuple[str, ...]:
    """'independent' for layers l < L - n_latent, 'uniae' above (the post's schedule)."""
    return ("independent",) * (num_layers - n_latent) + ("uniae",) * n_latent


def transformer_config(cfg: UniVAEConfig) -> TransformerConfig:
    return cfg.model.replace(layer_masks=layer_masks(cfg.model.num_layers, cfg.n_latent))


# ------------------------------------------------------------------------------------------------
# Parameters.

def init(key, cfg: UniVAEConfig) -> dict:
    """{"transformer": Transformer params, "latent": {layer_l: {in: Dense d->z, out: Dense z->d
    [, codebook: [codebook_size, z_dim]]}}}.

    Dense kernels: truncated normal with the model's init_std (bert4keras's default, std 0.02), or LeCun
    (variance 1/fan_in) when ``init_std`` is None; zero biases. With ``quantize`` each latent layer also gets
    a codebook of rows normalize(N(0, I)), uniform on the sphere where mu lives (its key is fold_in(k_l, 2),
    so the other tensors are the same with and without quantize)."""
    k_model, k_lat = jax.random.split(key)
    tcfg = transformer_config(cfg)
    s = cfg.src_len
    tokens = jnp.zeros((1, 2 * s), jnp.int32)
    params = Transformer(tcfg).init(k_model, tokens, segment_ids(1, s))["params"]
    d, z = tcfg.d_model, cfg.z_dim
    pdt = tcfg.param_jnp_dtype
    latent = {}
    for l, k in zip(cfg.latent_layers, jax.random.split(k_lat, cfg.n_latent)):
        ki, ko = jax.random.split(k)
        init_in = (initializers.truncated_normal(tcfg.init_std) if tcfg.init_std else
                   initializers.normal(1.0 / math.sqrt(d)))
        init_out = (initializers.truncated_normal(tcfg.init_std) if tcfg.init_std else
                    initializers.normal(1.0 / math.sqrt(z)))
        latent[f"layer_{l}"] = {"in": {"kernel": init_in(ki, (d, z), pdt), "bias": jnp.zeros((z,), pdt)},
                                "out": {"kernel": init_out(ko, (z, d), pdt), "bias": jnp.zeros((d,), pdt)}}
        if cfg.quantize:
            latent[f"layer_{l}"]["codebook"] = l2_normalize(
                jax.random.normal(jax.random.fold_in(k, 2), (cfg.codebook_size, z), jnp.float32)).astype(pdt)
    return {"transformer": params, "latent": latent}


def latent_mean(p_layer, h0):
    """mu_l = normalize(h_l[:, 0] W_in + b_in): [B, d_model] -> [B, z_dim] on the unit sphere."""
    x = h0.astype(jnp.float32) @ p_layer["in"]["kernel"].astype(jnp.float32) + p_layer["in"]["bias"]
    return l2_normalize(x)


def latent_out(p_layer, z):
    """Dense_out,l(z_l): [B, z_dim] -> [B, d_model], written into position 0 before layer l."""
    return z.astype(jnp.float32) @ p_layer["out"]["kernel"].astype(jnp.float32) + p_layer["out"]["bias"]


# ------------------------------------------------------------------------------------------------
# Vector quantisation (the VQ variant).

def nearest_code(codebook, mu):
    """(e, k): the row of normalize(codebook) [K, z_dim] nearest to each unit mu [..., z_dim], and its index.

    k = argmax_k <mu, c_k / |c_k|>; on the sphere ||mu - c||^2 = 2 - 2 <mu, c>, so this is the Euclidean
    nearest code as well (ties: the lowest index)."""
    cb = l2_normalize(jnp.asarray(codebook, jnp.float32))
    k = jnp.argmax(jnp.asarray(mu, jnp.float32) @ cb.T, axis=-1).astype(jnp.int32)
    return cb[k], k


def quantize(codebook, mu, commitment: float = 0.25):
    """VQ-VAE bottleneck (van den Oord et al. 2017) on the sphere, kexue.fm/archives/8475's VQ variant.

    With e = normalize(codebook)[k] the nearest code (``nearest_code``) and sg = stop_gradient:

        z_q  = mu + sg(e - mu)                                (= e in value; d z_q / d mu = I: straight-through)
        loss = ||sg(mu) - e||^2 + commitment ||mu - sg(e)||^2  (codebook term moves e, commitment term moves mu)

    Returns (z_q [..., z_dim], k [...] int32, loss [...]) per row of mu [..., z_dim]."""
    mu = jnp.asarray(mu, jnp.float32)
    e, k = nearest_code(codebook, mu)
    sg = jax.lax.stop_gradient
    z_q = mu + sg(e - mu)
    loss = jnp.sum((sg(mu) - e) ** 2, -1) + commitment * jnp.sum((mu - sg(e)) ** 2, -1)
    return z_q, k, loss


def _codebooks(params, cfg: UniVAEConfig):
    """The codebook of each latent layer, lowest first (requires quantize)."""
    if not cfg.quantize:
        raise ValueError("this needs UniVAEConfig.quantize=True (a codebook per latent layer)")
    return [params["latent"][f"layer_{l}"]["codebook"] for l in cfg.latent_layers]


def vq_loss(params, cfg: UniVAEConfig, mu):
    """Mean over rows and latent layers of ``quantize``'s loss for mu [B, n_latent, z_dim] (a scalar)."""
    return jnp.mean(jnp.stack([quantize(cb, mu[:, i], cfg.commitment)[2]
                               for i, cb in enumerate(_codebooks(params, cfg))], 1))


def codes_to_z(params, cfg: UniVAEConfig, indices):
    """Discrete codes [B, n_latent] (int, in [0, codebook_size)) -> z [B, n_latent, z_dim]: the rows of each
    layer's normalize(codebook)."""
    indices = jnp.asarray(indices)
    if indices.ndim != 2 or indices.shape[1] != cfg.n_latent:
        raise ValueError(f"indices must have shape [batch, n_latent={cfg.n_latent}], got {indices.shape}")
    return jnp.stack([l2_normalize(jnp.asarray(cb, jnp.float32))[indices[:, i]]
                      for i, cb in enumerate(_codebooks(params, cfg))], 1)


# ------------------------------------------------------------------------------------------------
# von Mises-Fisher sampling (Wood 1994).

def _vmf_w(key, kappa, d: int):
    """One draw of w = <z, mu> for vMF(mu, kappa) on S^{d-1}: Wood's rejection sampler in a while_loop.

    b = (d-1) / (2 kappa + sqrt(4 kappa^2 + (d-1)^2)), x0 = (1-b)/(1+b), c = kappa x0 + (d-1) log(1-x0^2);
    repeat Z ~ Beta((d-1)/2, (d-1)/2), U ~ U(0,1), W = (1 - (1+b) Z) / (1 - (1-b) Z) until
    kappa W + (d-1) log(1 - x0 W) - c >= log U. kappa = 0 accepts at once with W = 1 - 2Z (uniform)."""
    kappa = jnp.asarray(kappa, jnp.float32)
    m1 = jnp.float32(d - 1)
    b = m1 / (2.0 * kappa + jnp.sqrt(4.0 * kappa ** 2 + m1 ** 2))
    x0 = (1.0 - b) / (1.0 + b)
    c = kappa * x0 + m1 * jnp.log1p(-x0 ** 2)

    def cond(state):
        return ~state[2]

    def body(state):
        key, _, _ = state
        key, kz, ku = jax.random.split(key, 3)
        zb = jax.random.beta(kz, m1 / 2.0, m1 / 2.0)
        u = jax.random.uniform(ku, minval=jnp.finfo(jnp.float32).tiny)
        w = (1.0 - (1.0 + b) * zb) / (1.0 - (1.0 - b) * zb)
        ok = kappa * w + m1 * jnp.log1p(-jnp.minimum(x0 * w, 1.0 - 1e-7)) - c >= jnp.log(u)
        return key, w, ok

    _, w, _ = jax.lax.while_loop(cond, body, (key, jnp.float32(0.0), jnp.bool_(False)))
    return w


def vmf_sample(key, mu, kappa):
    """z ~ vMF(mu, kappa) for unit mu [..., d] (any d >= 2, kappa >= 0 scalar): exact, jittable, vmappable.

    z = w mu + sqrt(1 - w^2) nu, w from Wood's sampler (``_vmf_w``), nu = normalize(e - <e, mu> mu),
    e ~ N(0, I). Gradients flow to mu (w does not depend on mu: kappa is fixed, kexue.fm/archives/8404)."""
    mu = jnp.asarray(mu)
    d = mu.shape[-1]
    if d < 2:
        raise ValueError(f"vmf_sample needs dimension d >= 2, got mu.shape={mu.shape}")
    batch = mu.shape[:-1]
    k_w, k_e = jax.random.split(key)
    n = math.prod(batch)
    w = jax.vmap(lambda k: _vmf_w(k, kappa, d))(jax.random.split(k_w, max(n, 1)))[:n].reshape(batch)
    w = jax.lax.stop_gradient(w)[..., None]
    mu32 = mu.astype(jnp.float32)
    e = jax.random.normal(k_e, mu.shape, jnp.float32)
    nu = l2_normalize(e - jnp.sum(e * mu32, -1, keepdims=True) * mu32)
    return l2_normalize(w * mu32 + jnp.sqrt(jnp.maximum(1.0 - w ** 2, 0.0)) * nu).astype(mu.dtype)


def vmf_mean_cosine(kappa: float, d: int) -> float:
    """E[<z, mu>] under vMF(mu, kappa) on S^{d-1}: A_d(kappa) = I_{d/2}(kappa) / I_{d/2-1}(kappa) (scipy)."""
    from scipy.special import ive  # noqa: PLC0415 (optional, for checks)

    return 0.0 if kappa == 0 else float(ive(d / 2, kappa) / ive(d / 2 - 1, kappa))


def sample_prior(key, cfg: UniVAEConfig, n: int, params=None):
    """z [n, n_latent, z_dim] from the prior: uniform on each sphere, normalize(N(0, I)) per layer (the post's
    sampling); with ``quantize``, a code uniform over each layer's codebook, k ~ U{0 .. codebook_size - 1},
    z = normalize(codebook)[k] (needs ``params``)."""
    if not cfg.quantize:
        return l2_normalize(jax.random.normal(key, (n, cfg.n_latent, cfg.z_dim), jnp.float32))
    if params is None:
        raise ValueError("sample_prior with UniVAEConfig.quantize=True needs params (the codebooks)")
    return codes_to_z(params, cfg, jax.random.randint(key, (n, cfg.n_latent), 0, cfg.codebook_size))


def slerp(a, b, t):
    """Spherical interpolation of unit vectors a, b [..., d] at t in [0, 1] (linear when they coincide)."""
    cos = jnp.clip(jnp.sum(a * b, -1, keepdims=True), -1.0, 1.0)
    omega = jnp.arccos(cos)
    so = jnp.sin(omega)
    safe = so > 1e-6
    wa = jnp.where(safe, jnp.sin((1 - t) * omega) / jnp.where(safe, so, 1.0), 1 - t)
    wb = jnp.where(safe, jnp.sin(t * omega) / jnp.where(safe, so, 1.0), t)
    return l2_normalize(wa * a + wb * b)


def interpolate(z_a, z_b, steps: int):
    """Slerp per latent layer from z_a to z_b ([n_latent, z_dim] each): [steps, n_latent, z_dim]."""
    if steps < 2:
        raise ValueError(f"interpolate needs steps >= 2, got {steps}")
    t = jnp.linspace(0.0, 1.0, steps)[:, None, None]
    return slerp(jnp.asarray(z_a)[None], jnp.asarray(z_b)[None], t)


# ------------------------------------------------------------------------------------------------
# Layout, forward, loss.

def segment_ids(batch: int, src_len: int):
    """[0]*S + [1]*S for each row."""
    return jnp.broadcast_to(jnp.concatenate([jnp.zeros(src_len, jnp.int32), jnp.ones(src_len, jnp.int32)]),
                            (batch, 2 * src_len))


def _check_tokens(cfg: UniVAEConfig, tokens):
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[1] != cfg.src_len:
        raise ValueError(f"tokens must have shape [batch, src_len={cfg.src_len}], got {tokens.shape}")
    return tokens


def forward(params, cfg: UniVAEConfig, tokens, *, z=None, key=None, target=None,
            return_intermediates: bool = False):
    """Logits [B, 2S, V] of the layout [x; target] (target = x unless given: ``word_dropout`` passes a
    corrupted copy as the decoder's input) and (mu, z) [B, n_latent, z_dim].

    z=None and key given: z_l ~ vMF(mu_l, kappa) (training); z=None, key=None: z_l = mu_l (encoder mode);
    with ``cfg.quantize`` and z=None: z_l = quantize(codebook_l, mu_l)'s straight-through z_q in both modes
    (key unused); z given [B, n_latent, z_dim]: decoder mode (mu is still computed, from the source). With
    ``return_intermediates`` also the Transformer's aux (hidden states per layer).

    Training mode (key given) also applies the model's dropout (``cfg.model.dropout_rate``: the embeddings,
    the attention probabilities and each residual branch) with a key split from ``key``; at rate 0 the key and
    every draw stay as they were. Encoder and decoder modes (key=None) are deterministic."""
    tokens = _check_tokens(cfg, tokens)
    b, s = tokens.shape
    inputs = jnp.concatenate([tokens, tokens if target is None else _check_tokens(cfg, target)], axis=1)
    mus, zs = [], []
    k_drop = None
    if key is not None and cfg.model.dropout_rate > 0:
        key, k_drop = jax.random.split(key)
    keys = None if key is None else jax.random.split(key, cfg.n_latent)

    def make_inject(i, l):
        p = params["latent"][f"layer_{l}"]

        def fn(h0):
            mu = latent_mean(p, h0)
            if z is not None:
                zl = jnp.asarray(z)[:, i].astype(jnp.float32)
            elif cfg.quantize:
                zl = quantize(p["codebook"], mu, cfg.commitment)[0]
            elif keys is not None:
                zl = vmf_sample(keys[i], mu, cfg.kappa)
            else:
                zl = mu
            mus.append(mu)
            zs.append(zl)
            return latent_out(p, zl)
        return fn

    inject = {l: make_inject(i, l) for i, l in enumerate(cfg.latent_layers)}
    out = Transformer(transformer_config(cfg)).apply(
        {"params": params["transformer"]}, inputs, segment_ids(b, s), valid=inputs != cfg.pad_id,
        inject=inject, return_intermediates=return_intermediates, deterministic=k_drop is None,
        rngs=None if k_drop is None else {"dropout": k_drop})
    logits, aux = out if return_intermediates else (out, None)
    res = (logits, jnp.stack(mus, 1), jnp.stack(zs, 1))
    return res + (aux,) if return_intermediates else res


def loss_weights(cfg: UniVAEConfig, tokens):
    """Weights [B, S-1] of the target-half predictions: 1 where the predicted token (x[j+1]) is not PAD."""
    return (jnp.asarray(tokens)[:, 1:] != cfg.pad_id).astype(jnp.float32)


def word_dropout(key, cfg: UniVAEConfig, tokens):
    """The decoder's input copy of ``tokens`` [B, S] with each real token after [CLS] replaced by ``mask_id``
    with probability ``cfg.word_dropout`` (Bowman et al. 2016, "Generating sentences from a continuous
    space"; beyond the post): the decoder cannot lean on the teacher-forced prefix alone and has to read z.
    [CLS] and PAD are kept; the targets of the loss are the clean tokens."""
    drop = jax.random.bernoulli(key, cfg.word_dropout, tokens.shape)
    drop &= (tokens != cfg.pad_id) & (jnp.arange(tokens.shape[1]) > 0)
    return jnp.where(drop, cfg.mask_id, tokens)


def loss_terms(params, cfg: UniVAEConfig, tokens, key, *, vq: bool = True):
    """(sum of target-half next-token NLL, number of predictions) with z ~ vMF(mu, kappa) and, when
    ``cfg.word_dropout`` > 0, the decoder's inputs corrupted by ``word_dropout``; no KL term.
    ``key=None``: z = mu and clean inputs (the noiseless reconstruction loss, for evaluation).

    With ``cfg.quantize`` (z = the straight-through code, key unused) and ``vq``, the sum also holds
    count x ``vq_loss``, so that sum / count = mean NLL + vq_loss; ``vq=False`` gives the NLL alone."""
    tokens = _check_tokens(cfg, tokens)
    s = cfg.src_len
    target = None
    if key is not None and cfg.word_dropout > 0:
        key, k_drop = jax.random.split(key)
        target = word_dropout(k_drop, cfg, tokens)
    logits, mu, _ = forward(params, cfg, tokens, key=key, target=target)
    pred = logits[:, s:2 * s - 1].astype(jnp.float32)  # target positions S .. 2S-2 predict x[1 .. S-1]
    logp = jax.nn.log_softmax(pred, -1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
    w = loss_weights(cfg, tokens)
    total, count = jnp.sum(nll * w), jnp.sum(w)
    if cfg.quantize and vq:
        total = total + count * vq_loss(params, cfg, mu)
    return total, count


def loss(params, cfg: UniVAEConfig, tokens, key):
    """Mean target-half next-token cross-entropy (nats/token) under vMF-noised latents (+ vq_loss with
    ``quantize``)."""
    total, count = loss_terms(params, cfg, tokens, key)
    return total / jnp.maximum(count, 1.0)


def _encode(params, cfg: UniVAEConfig, tokens):
    """(z [B, n_latent, z_dim], codes [B, n_latent] or None) from the source alone (the target never reaches
    the source rows): z = mu, or with ``quantize`` z = the nearest code e (exactly) and its index."""
    tokens = _check_tokens(cfg, tokens)
    zs, ks = [], []

    def make_inject(l):
        p = params["latent"][f"layer_{l}"]

        def fn(h0):
            zl = latent_mean(p, h0)
            if cfg.quantize:
                zl, k = nearest_code(p["codebook"], zl)
                ks.append(k)
            zs.append(zl)
            return latent_out(p, zl)
        return fn

    Transformer(transformer_config(cfg)).apply(
        {"params": params["transformer"]}, tokens, jnp.zeros_like(tokens), valid=tokens != cfg.pad_id,
        inject={l: make_inject(l) for l in cfg.latent_layers})
    return jnp.stack(zs, 1), (jnp.stack(ks, 1) if ks else None)


def encode(params, cfg: UniVAEConfig, tokens):
    """z [B, n_latent, z_dim] from the source alone: mu, or its nearest code with ``quantize``."""
    return _encode(params, cfg, tokens)[0]


def encode_indices(params, cfg: UniVAEConfig, tokens):
    """The discrete code of each sentence, int32 [B, n_latent] (``quantize`` only); codes_to_z inverts it."""
    _codebooks(params, cfg)  # the quantize check
    return _encode(params, cfg, tokens)[1]


# ------------------------------------------------------------------------------------------------
# Decoding.

def _z_inject(params, cfg: UniVAEConfig, z):
    z = jnp.asarray(z, jnp.float32)
    if z.ndim != 3 or z.shape[1:] != (cfg.n_latent, cfg.z_dim):
        raise ValueError(f"z must have shape [batch, n_latent={cfg.n_latent}, z_dim={cfg.z_dim}], got {z.shape}")
    return {l: latent_out(params["latent"][f"layer_{l}"], z[:, i]) for i, l in enumerate(cfg.latent_layers)}


def decoder_logits(params, cfg: UniVAEConfig, z, target):
    """Uncached decoder: logits [B, T, V] for the target prefix ``target`` [B, T] (target[:, 0] = [CLS]),
    from the layout [CLS] + target with positions [0, S, S+1, ...]: the whole prefix is recomputed."""
    b, t = target.shape
    tokens = jnp.concatenate([jnp.full((b, 1), cfg.cls_id, jnp.int32), target.astype(jnp.int32)], 1)
    seg = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), jnp.ones((b, t), jnp.int32)], 1)
    pos = jnp.broadcast_to(jnp.concatenate([jnp.zeros(1, jnp.int32), cfg.src_len + jnp.arange(t, dtype=jnp.int32)]),
                           (b, t + 1))
    logits = Transformer(transformer_config(cfg)).apply(
        {"params": params["transformer"]}, tokens, seg, positions=pos, inject=_z_inject(params, cfg, z))
    return logits[:, 1:]


def prefill(params, cfg: UniVAEConfig, z, max_len: int):
    """A KV cache of 1 + max_len slots with slot 0 (the source [CLS], h_l[:, 0] = Dense_out,l(z_l)) written."""
    b = z.shape[0]
    tcfg = transformer_config(cfg)
    cache = init_cache(tcfg, b, max_len + 1)
    cls = jnp.full((b, 1), cfg.cls_id, jnp.int32)
    _, v = Transformer(tcfg).apply({"params": params["transformer"], "cache": cache}, cls,
                                   jnp.zeros((b, 1), jnp.int32), positions=jnp.zeros((b, 1), jnp.int32),
                                   inject=_z_inject(params, cfg, z), cache_index=0, mutable=["cache"])
    return v["cache"]


def decode_step(params, cfg: UniVAEConfig, cache, token, t):
    """One cached step: target token ``token`` [B] at target index t (position S + t, slot 1 + t) ->
    (logits [B, V] for target index t + 1, new cache)."""
    b = token.shape[0]
    logits, v = Transformer(transformer_config(cfg)).apply(
        {"params": params["transformer"], "cache": cache}, token[:, None].astype(jnp.int32),
        jnp.ones((b, 1), jnp.int32), positions=jnp.full((b, 1), cfg.src_len + t, jnp.int32),
        cache_index=1 + t, mutable=["cache"])
    return logits[:, 0].astype(jnp.float32), v["cache"]


def _check_decode(cfg: UniVAEConfig, method: str, max_len: int | None, beam_size: int, key):
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    max_len = cfg.src_len - 1 if max_len is None else max_len
    if not isinstance(max_len, int) or not 1 <= max_len <= cfg.src_len - 1:
        raise ValueError(f"max_len must be an integer in [1, src_len - 1 = {cfg.src_len - 1}], got {max_len!r}")
    if method == "sample" and key is None:
        raise ValueError("method='sample' needs a PRNG key")
    if method == "beam" and (not isinstance(beam_size, int) or beam_size < 1):
        raise ValueError(f"beam_size must be a positive integer, got {beam_size!r}")
    return max_len


def _finish(cfg: UniVAEConfig, tokens, done_before):
    """PAD after the first [SEP] (a row that already stopped keeps emitting PAD)."""
    return jnp.where(done_before, cfg.pad_id, tokens)


def decode(params, cfg: UniVAEConfig, z, *, method: str = "greedy", max_len: int | None = None, key=None,
           temperature: float = 1.0, beam_size: int = 4, cached: bool = True):
    """Generate target tokens [B, max_len] from z [B, n_latent, z_dim] (first token after [CLS]; [SEP] ends
    a row, PAD after it). greedy = the post's beam search with topk=1; beam keeps ``beam_size`` hypotheses
    (sum of log-probs); sample draws from softmax(logits / temperature). ``cached=False`` recomputes the
    whole prefix each step (reference for the KV cache; greedy/sample only)."""
    max_len = _check_decode(cfg, method, max_len, beam_size, key)
    z = jnp.asarray(z, jnp.float32)
    if method == "beam":
        if not cached:
            raise ValueError("cached=False is implemented for greedy and sample only")
        return _beam_decode(params, cfg, z, max_len, beam_size)
    b = z.shape[0]
    key = jax.random.PRNGKey(0) if key is None else key

    def choose(logits, t):
        if method == "greedy":
            return jnp.argmax(logits, -1).astype(jnp.int32)
        return jax.random.categorical(jax.random.fold_in(key, t), logits / temperature, -1).astype(jnp.int32)

    out0 = jnp.full((b, max_len), cfg.pad_id, jnp.int32)
    done0 = jnp.zeros((b,), bool)
    cls = jnp.full((b,), cfg.cls_id, jnp.int32)
    if cached:
        cache0 = prefill(params, cfg, z, max_len)

        def body(t, state):
            cache, out, prev, done = state
            logits, cache = decode_step(params, cfg, cache, prev, t)
            tok = _finish(cfg, choose(logits, t), done)
            return cache, out.at[:, t].set(tok), tok, done | (tok == cfg.sep_id)

        _, out, _, _ = jax.lax.fori_loop(0, max_len, body, (cache0, out0, cls, done0))
        return out

    def body_uncached(t, state):
        out, done = state
        target = jnp.concatenate([cls[:, None], out], 1)[:, :max_len]  # fixed shape; causal: later slots unseen
        logits = jax.lax.dynamic_index_in_dim(decoder_logits(params, cfg, z, target), t, 1, keepdims=False)
        tok = _finish(cfg, choose(logits.astype(jnp.float32), t), done)
        return out.at[:, t].set(tok), done | (tok == cfg.sep_id)

    out, _ = jax.lax.fori_loop(0, max_len, body_uncached, (out0, done0))
    return out


def _beam_decode(params, cfg: UniVAEConfig, z, max_len: int, k: int):
    """Beam search over B x k hypotheses sharing one KV cache (rows reordered by beam each step)."""
    b = z.shape[0]
    zk = jnp.repeat(z, k, axis=0)
    cache0 = prefill(params, cfg, zk, max_len)
    scores0 = jnp.tile(jnp.concatenate([jnp.zeros(1), jnp.full(k - 1, -jnp.inf)]), (b, 1))  # [B, k]
    out0 = jnp.full((b, k, max_len), cfg.pad_id, jnp.int32)
    done0 = jnp.zeros((b, k), bool)
    prev0 = jnp.full((b * k,), cfg.cls_id, jnp.int32)

    def body(t, state):
        cache, out, prev, done, scores = state
        logits, cache = decode_step(params, cfg, cache, prev, t)
        logp = jax.nn.log_softmax(logits, -1).reshape(b, k, -1)
        v = logp.shape[-1]
        pad_only = jnp.full((v,), -jnp.inf).at[cfg.pad_id].set(0.0)
        logp = jnp.where(done[..., None], pad_only, logp)  # a finished hypothesis only extends with PAD, free
        cand = (scores[..., None] + logp).reshape(b, k * v)
        scores, idx = jax.lax.top_k(cand, k)
        beam, tok = idx // v, (idx % v).astype(jnp.int32)
        out = jnp.take_along_axis(out, beam[..., None], 1).at[:, :, t].set(tok)
        done = jnp.take_along_axis(done, beam, 1) | (tok == cfg.sep_id)
        rows = (jnp.arange(b)[:, None] * k + beam).reshape(-1)
        cache = jax.tree_util.tree_map(lambda x: jnp.take(x, rows, axis=0), cache)
        return cache, out, tok.reshape(-1), done, scores

    _, out, _, _, scores = jax.lax.fori_loop(0, max_len, body, (cache0, out0, prev0, done0, scores0))
    best = jnp.argmax(scores, -1)
    return jnp.take_along_axis(out, best[:, None, None], 1)[:, 0]


def as_source(cfg: UniVAEConfig, generated):
    """Decoder output [B, T] -> source layout [B, S]: [CLS] + tokens (up to [SEP]) padded with PAD."""
    b, t = generated.shape
    src = jnp.full((b, cfg.src_len), cfg.pad_id, jnp.int32).at[:, 0].set(cfg.cls_id)
    return src.at[:, 1:1 + min(t, cfg.src_len - 1)].set(generated[:, :cfg.src_len - 1])


def reconstruct(params, cfg: UniVAEConfig, tokens, **decode_kw):
    """decode(encode(tokens)): the reconstruction from mu (no noise), or from its code with ``quantize``."""
    return decode(params, cfg, encode(params, cfg, tokens), **decode_kw)


def resample(params, cfg: UniVAEConfig, tokens, layers: Sequence[int], key, **decode_kw):
    """Encode, re-draw the chosen latent layers (indices into ``cfg.latent_layers``, 0 = lowest) from the
    uniform prior (``sample_prior``: the sphere, or the codebook with ``quantize``), keep the others, decode
    (``decode_kw``; method="sample" draws with fold_in(key, 1) unless a ``key`` is given there). Returns
    (tokens [B, T], z [B, n_latent, z_dim])."""
    layers = tuple(layers)
    if not layers or any(not (isinstance(i, int) and 0 <= i < cfg.n_latent) for i in layers):
        raise ValueError(f"layers must be a non-empty list of latent indices in [0, n_latent={cfg.n_latent}), "
                         f"got {layers}")
    z = encode(params, cfg, tokens)
    fresh = sample_prior(key, cfg, z.shape[0], params)
    chosen = jnp.zeros((cfg.n_latent,), bool).at[jnp.array(layers)].set(True)
    z = jnp.where(chosen[None, :, None], fresh, z)
    decode_kw.setdefault("key", jax.random.fold_in(key, 1))  # for method="sample"
    return decode(params, cfg, z, **decode_kw), z


__all__ = ["UniVAEConfig", "layer_masks", "transformer_config", "init", "latent_mean", "latent_out", "nearest_code",
           "quantize", "vq_loss", "codes_to_z", "vmf_sample", "vmf_mean_cosine", "sample_prior", "slerp",
           "interpolate", "segment_ids", "forward", "loss_weights", "word_dropout", "loss_terms", "loss", "encode",
           "encode_indices", "decoder_logits", "prefill", "decode_step", "decode", "as_source", "reconstruct",
           "resample", "METHODS"]
