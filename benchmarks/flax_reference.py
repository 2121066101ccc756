"""A plain flax.linen GPT and a plain optax AdamW training step: the yardstick for the project's step.

The model is the one ``TransformerConfig.preset("gpt", ...)`` builds, written the way a flax user would write
it from scratch (nothing of ``kexue_jax`` in the model or the step):

    h_0 = E[tokens] + P[:n]                                        (token + learned position embeddings)
    h_{l+1} = h_l + Attn(LN(h_l)),  then  h_{l+1} += MLP(LN(h_{l+1}))   (Pre-LN blocks, eps 1e-5, biases)
    Attn(x) = softmax(q k^T / sqrt(d) + causal mask) v,  q, k, v = x W_{q,k,v} + b  ([D, H, d] kernels)
    MLP(x) = GELU_erf(x W_1 + b_1) W_2 + b_2
    logits = LN_f(h_L) E^T                                         (tied output embedding)
    loss = mean over tokens of -log softmax(logits)[target]        (float32)

and the step is ``value_and_grad`` + ``optax.chain(clip_by_global_norm, adamw)`` with weight decay on the
tensors of rank >= 2 and a linear-warmup cosine schedule: the same update as
``kexue_jax.training.make_optimizer`` (clip -> Adam -> decoupled decay -> -lr).

Compute runs in ``GPTConfig.dtype`` (bfloat16 for the pod sizes); parameters, norms' statistics, the softmax of
the attention and the loss stay float32. ``attention="auto"`` calls ``jax.nn.dot_product_attention`` with
``is_causal=True`` (XLA's fused attention); ``"cudnn"`` forces cuDNN's flash kernel (GPU, half precision);
``"einsum"`` writes the softmax out.

The only bridge to the project is :func:`params_from_project` / :func:`config_from_project`, which read a
``kexue_jax`` parameter tree and config by name (no import of the project), so that both steps can be fed
the same parameters and batch; ``benchmarks/device_suite.py`` and ``tests/test_device_suite.py`` compare them.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

ATTENTION = ("auto", "xla", "cudnn", "einsum")


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Shapes of the reference GPT (defaults: GPT-2 small on bytes)."""

    vocab_size: int = 260
    num_layers: int = 12
    d_model: int = 768
    num_heads: int = 12
    head_dim: int = 64
    d_ff: int = 3072
    max_len: int = 1024
    norm_eps: float = 1e-5
    init_std: float = 0.02
    dtype: str = "float32"
    attention: str = "auto"

    def __post_init__(self):
        for name in ("vocab_size", "num_layers", "d_model", "num_heads", "head_dim", "d_ff", "max_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.attention not in ATTENTION:
            raise ValueError(f"GPTConfig.attention must be one of {ATTENTION}, got {self.attention!r}")
        jnp.dtype(self.dtype)  # raises on an unknown dtype name


def causal_attention(q, k, v, implementation: str = "auto"):
    """softmax(q k^T / sqrt(d), causal) v for q, k, v [B, L, H, d]; the softmax in float32."""
    if implementation != "einsum":
        impl = None if implementation == "auto" else implementation
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)
    n, d = q.shape[1], q.shape[-1]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(d)
    causal = jnp.tril(jnp.ones((n, n), bool))
    probs = jax.nn.softmax(jnp.where(causal, logits, jnp.finfo(jnp.float32).min), axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)


class Block(nn.Module):
    """x + Attn(LN_1(x)), then + MLP(LN_2(.)): one Pre-LN layer."""

    cfg: GPTConfig

    @nn.compact
    def __call__(self, x):
        c = self.cfg

        def dense(features, name, axis=-1):
            return nn.DenseGeneral(features, axis=axis, dtype=c.dtype,
                                   kernel_init=nn.initializers.normal(c.init_std), name=name)

        h = nn.LayerNorm(c.norm_eps, dtype=c.dtype, name="ln_1")(x)
        q, k, v = (dense((c.num_heads, c.head_dim), name)(h) for name in ("query", "key", "value"))
        x = x + dense(c.d_model, "attn_proj", axis=(-2, -1))(causal_attention(q, k, v, c.attention))
        h = nn.LayerNorm(c.norm_eps, dtype=c.dtype, name="ln_2")(x)
        return x + dense(c.d_model, "mlp_proj")(nn.gelu(dense(c.d_ff, "fc")(h), approximate=False))


class GPT(nn.Module):
    """tokens int [B, L] -> logits [B, L, vocab] (see the module docstring)."""

    cfg: GPTConfig

    @nn.compact
    def __call__(self, tokens):
        c = self.cfg
        wte = nn.Embed(c.vocab_size, c.d_model, dtype=c.dtype, embedding_init=nn.initializers.normal(c.init_std),
                       name="wte")
        wpe = self.param("wpe", nn.initializers.normal(c.init_std), (c.max_len, c.d_model))
        x = wte(tokens) + wpe[: tokens.shape[1]].astype(c.dtype)
        for i in range(c.num_layers):
            x = Block(c, name=f"h_{i}")(x)
        return wte.attend(nn.LayerNorm(c.norm_eps, dtype=c.dtype, name="ln_f")(x))


def init_params(cfg: GPTConfig, key, seq_len: int = 8):
    return GPT(cfg).init(key, jnp.zeros((1, seq_len), jnp.int32))["params"]


def loss_fn(cfg: GPTConfig, params, batch) -> jax.Array:
    """Mean token cross-entropy (float32) of ``batch = {"inputs", "targets"}`` (int [B, L] each)."""
    logits = GPT(cfg).apply({"params": params}, batch["inputs"])
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["targets"]).mean()


def make_optimizer(*, lr: float, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.1,
                   b1: float = 0.9, b2: float = 0.99, eps: float = 1e-8, weight_decay: float = 0.1,
                   clip_norm: float | None = 1.0) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW (decay on rank >= 2 tensors) with lr(t): linear 0 -> lr over the
    warmup, then cosine to lr x min_lr_ratio at ``total_steps``."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps, max(total_steps, warmup_steps + 1),
                                                  end_value=lr * min_lr_ratio)
    adamw = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                        mask=lambda p: jax.tree_util.tree_map(lambda x: x.ndim >= 2, p))
    return adamw if clip_norm is None else optax.chain(optax.clip_by_global_norm(clip_norm), adamw)


def make_train_step(cfg: GPTConfig, tx: optax.GradientTransformation):
    """step((params, opt_state), batch) -> ((params, opt_state), loss); jit it with the state donated."""
    def step(state, batch):
        params, opt_state = state
        loss, grads = jax.value_and_grad(lambda p: loss_fn(cfg, p, batch))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    return step


# ---------------------------------------------------------------------------------------------------------------
# The bridge: a kexue_jax config and parameter tree read by name (the project is not imported).
# ---------------------------------------------------------------------------------------------------------------

#: TransformerConfig fields that must hold these values for the reference to be the same model.
_GPT_FIELDS = dict(position="learned", type_vocab_size=0, embed_norm=False, residual="pre", activation="gelu",
                   ffn="plain", use_bias=True, head="lm", tie_embeddings=True, attn_scale="sqrt", mask="causal",
                   norm="layernorm", token_mixer="attention", parameterization="standard", layer_masks=(),
                   param_dtype="float32")


def config_from_project(cfg: Any, attention: str = "auto") -> GPTConfig:
    """The reference config of a ``kexue_jax`` TransformerConfig of the "gpt" preset; ValueError naming every
    field that makes it another model (dropout must be 0: the reference step is deterministic)."""
    wrong = {k: getattr(cfg, k, None) for k, v in _GPT_FIELDS.items() if getattr(cfg, k, None) != v}
    if getattr(cfg, "final_norm", None) not in (None, True):
        wrong["final_norm"] = cfg.final_norm
    if getattr(cfg, "dropout_rate", 0.0) != 0.0:
        wrong["dropout_rate"] = cfg.dropout_rate
    if wrong:
        raise ValueError(f"the flax reference is the 'gpt' preset; these fields differ: {wrong} "
                         f"(expected {({k: _GPT_FIELDS.get(k, 'None/True or 0.0') for k in wrong})})")
    return GPTConfig(vocab_size=cfg.vocab_size, num_layers=cfg.num_layers, d_model=cfg.d_model,
                     num_heads=cfg.num_heads, head_dim=cfg.head_dim, d_ff=cfg.d_ff, max_len=cfg.max_len,
                     norm_eps=float(cfg.norm_eps), init_std=cfg.init_std or 0.02, dtype=cfg.dtype,
                     attention=attention)


def params_from_project(params: dict, cfg: GPTConfig) -> dict:
    """The reference tree holding the same arrays as a ``kexue_jax`` GPT tree (renamed, not copied):

        embed/token -> wte/embedding, embed/position -> wpe, final_norm -> ln_f, and per layer i
        (layer_i -> h_i): attn_norm -> ln_1, attn/{query,key,value} -> {query,key,value}, attn/out ->
        attn_proj, ffn_norm -> ln_2, ffn/wi -> fc, ffn/wo -> mlp_proj.
    Checked against the reference's own shapes (ValueError on any difference)."""
    ref = {"wte": {"embedding": params["embed"]["token"]}, "wpe": params["embed"]["position"],
           "ln_f": dict(params["final_norm"])}
    for i in range(cfg.num_layers):
        layer = params[f"layer_{i}"]
        attn = layer["attn"]
        ref[f"h_{i}"] = {"ln_1": dict(layer["attn_norm"]), "query": dict(attn["query"]), "key": dict(attn["key"]),
                         "value": dict(attn["value"]), "attn_proj": dict(attn["out"]),
                         "ln_2": dict(layer["ffn_norm"]), "fc": dict(layer["ffn"]["wi"]),
                         "mlp_proj": dict(layer["ffn"]["wo"])}
    want = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))
    got_shapes = jax.tree_util.tree_map(jnp.shape, ref)
    want_shapes = jax.tree_util.tree_map(lambda s: s.shape, want)
    if got_shapes != want_shapes:
        raise ValueError(f"the project's parameters do not fit the reference {cfg}: {got_shapes} != {want_shapes}")
    return ref


__all__ = ["GPTConfig", "GPT", "causal_attention", "init_params", "loss_fn", "make_optimizer", "make_train_step",
           "config_from_project", "params_from_project", "ATTENTION"]
