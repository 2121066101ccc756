"""The maximal update parameterization (muP) for Adam: per-tensor learning rates (beyond kexue.fm/archives/8620).

Post 8620 derives why the standard and NTK parameterizations need their learning rate retuned as a model
grows. muP (Yang et al., Tensor Programs V, arXiv:2203.03466; reference code microsoft/mup) chooses the
init, the forward multipliers and the per-tensor Adam learning rates so that every layer's update moves its
output by Theta(1) per coordinate at any width: the best hyperparameters of a small model transfer to a wide
one. With the width multiplier m = d_model / mup_base_d_model (``TransformerConfig.width_mult``), the table
for Adam (TP5, Table 3, in microsoft/mup's "base shape" form, so that m = 1 is the standard parameterization
with 1/d attention):

    tensor                                       init variance            forward mult.   Adam lr
    input-like: embeddings, biases, norm gains   base (init_std^2 or       1               lr
      (one or no axis grows with width)          1/base_d_model)
    hidden: q, k, v, out, FFN in/gate/out,       init_std^2 / m, or        1               lr / m
      MLM dense, mixers' feature matrices        1 / fan_in
      (two axes grow with width)
    readout: untied head W [D, V]                base (init_std^2, or      1 / m           lr
                                                 m / fan_in)
    readout: tied embedding (MuSharedReadout)    as the embedding          logits x 1/m    lr
    attention logits                             q.k / d_head  (attn_scale="mup")

Fixed-size tensors (token-axis matrices of the mixers, relative-position tables) keep the standard rule.
A tensor is "hidden" when two of its axes grow with width; ``hidden_tensors`` finds them the way
microsoft/mup's ``set_base_shapes`` does, by comparing the parameter shapes of the model with those of the
same model at twice the width.

Widening (kexue.fm/archives/8444, ``kexue_jax.upscale``) under muP keeps m's base: the widened model has
m' = k m, its hidden learning rates are lr / (k m), and the readout's 1/m becomes 1/(k m). The hidden
vectors of the widened model are rep(h) (not rep(h)/sqrt(k) as under the standard parameterization), the
Theta(1) coordinates muP asks for; then a hidden kernel is rep(W)/k, every vector a pure repeat, and Adam's
first step on the widened model is exactly the widened image of the small model's step with the big model's
own muP learning rates (``mup_lr_scales(big)`` / ``mup_lr_scales(small)`` = 1/k on the hidden kernels, which
is ``upscale.update_scales``): no extra multiplier after widening.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kexue_jax.nn.transformer import Transformer, TransformerConfig

Path = tuple[str, ...]


def _path_names(path) -> Path:
    return tuple(getattr(p, "key", getattr(p, "name", str(p))) for p in path)


@functools.lru_cache(maxsize=64)
def _param_shapes(cfg: TransformerConfig) -> dict[Path, tuple[int, ...]]:
    tree = jax.eval_shape(lambda key: Transformer(cfg).init(key, jnp.zeros((1, 1), jnp.int32))["params"],
                          jax.random.PRNGKey(0))
    return {_path_names(p): tuple(v.shape) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def hidden_tensors(cfg: TransformerConfig) -> dict[Path, bool]:
    """{parameter path: True if it is a muP hidden (matrix-like) tensor}: two or more of its axes grow when
    d_model, d_ff and head_dim double (microsoft/mup's infshape with two infinite dimensions)."""
    wide = cfg.replace(d_model=2 * cfg.d_model, d_ff=2 * cfg.d_ff, head_dim=2 * cfg.head_dim,
                       mup_base_d_model=None, parameterization="standard" if cfg.parameterization == "mup"
                       else cfg.parameterization)
    small = _param_shapes(cfg.replace(mup_base_d_model=None, parameterization=wide.parameterization))
    big = _param_shapes(wide)
    return {p: sum(a != b for a, b in zip(shape, big[p])) >= 2 for p, shape in small.items()}


def mup_lr_scales(params, cfg: TransformerConfig):
    """Per-tensor Adam learning-rate multipliers of muP (a params-shaped tree of float32 scalars): 1/m on the
    hidden tensors (``hidden_tensors``), 1 elsewhere, m = ``cfg.width_mult``. Pass it to
    ``training.make_optimizer(lr_scales=...)``; the step of tensor i is then lr x scale_i (decoupled weight
    decay included, as microsoft/mup's MuAdamW does)."""
    if cfg.parameterization != "mup":
        raise ValueError(f"mup_lr_scales needs TransformerConfig.parameterization='mup', got "
                         f"{cfg.parameterization!r}")
    hidden = hidden_tensors(cfg)
    m = cfg.width_mult

    def one(path, x):
        names = _path_names(path)
        if names not in hidden:
            raise ValueError(f"mup_lr_scales: {'/'.join(names)} is not a parameter of Transformer(cfg)")
        return jnp.asarray(1.0 / m if hidden[names] else 1.0, jnp.float32)

    return jax.tree_util.tree_map_with_path(one, params)
