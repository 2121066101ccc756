"""muP, measured: the coordinate check and the learning-rate transfer study (Tensor Programs V, arXiv:2203.03466;
beyond kexue.fm/archives/8620, whose standard and NTK parameterizations need their rates retuned with width).

Coordinate check (microsoft/mup's ``get_coord_data``): train a few Adam steps at several widths with the same
learning rate and record, after each step, the mean |x| of every layer's output: the embedding, each block's
token-mixer (attention) and FFN outputs, and the logits. Under muP every curve stays in a constant band as the
width grows; under the standard parameterization the logits (and the outputs fed by an O(1) update of a wide
matrix) grow with width.

Transfer study: the main job's model (``configs/upscale.py`` default: BERT-style, next-byte prediction) at
several widths, trained over a x2 grid of learning rates under both parameterizations; the best rate per width.
``benchmarks/mup_transfer.py`` runs it; ``benchmarks/mup_coord_check.py`` plots the coordinate check.
"""
from __future__ import annotations

import copy
import math
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kexue_jax import config as config_lib
from kexue_jax import data as data_lib
from kexue_jax import training
from kexue_jax.nn import Transformer, TransformerConfig


def width_config(base: TransformerConfig, d_model: int, *, head_dim: int | None = None) -> TransformerConfig:
    """``base`` at width ``d_model``: d_ff and head_dim (num_heads fixed) scale with d_model / base.d_model, as
    ``upscale.widen`` grows a model with grow="head_dim"; muP's base width stays ``base.mup_base_d_model``."""
    r = d_model / base.d_model
    return base.replace(d_model=d_model, d_ff=int(round(base.d_ff * r)),
                        head_dim=head_dim or int(round(base.head_dim * r)))


def layer_outputs(cfg: TransformerConfig, params, tokens) -> dict[str, jax.Array]:
    """{name: mean |x|} of every layer output: ``embedding`` (entering the first block), ``layer_i/mixer`` (the
    token mixer's output, before the residual), ``layer_i/ffn`` and ``logits``."""
    logits, state = Transformer(cfg).apply({"params": params}, tokens, return_intermediates=True,
                                           capture_intermediates=True, mutable=["intermediates"])
    logits, aux = logits
    inter = state["intermediates"]
    out = {"embedding": jnp.mean(jnp.abs(aux["hidden"][0]))}
    for i in range(cfg.num_layers):
        layer = inter[f"layer_{i}"]
        mixer = layer["attn" if "attn" in layer else "mixer"]["__call__"][0][0]
        out[f"layer_{i}/mixer"] = jnp.mean(jnp.abs(mixer))
        out[f"layer_{i}/ffn"] = jnp.mean(jnp.abs(layer["ffn"]["__call__"][0]))
    out["logits"] = jnp.mean(jnp.abs(logits))
    return out


def coord_data(base: TransformerConfig, widths: Sequence[int], *, lr: float, steps: int = 4, batch_size: int = 8,
               seq_len: int = 32, seed: int = 0, optim=None) -> dict:
    """The coordinate check: for each width, ``steps`` Adam steps (``training.make_optimizer`` with the model's
    per-tensor rates, constant ``lr``, no warmup or weight decay) on random-byte next-token batches, recording
    ``layer_outputs`` before training and after every step. Returns {width: {name: [value at t = 0..steps]}}
    (float64 numpy lists). The same data and seed at every width."""
    import ml_collections  # noqa: PLC0415

    optim = optim or ml_collections.ConfigDict(dict(
        lr=lr, warmup_steps=0, schedule="constant", min_lr_ratio=1.0, weight_decay=0.0, b1=0.9, b2=0.99,
        eps=1e-8, clip_norm=None))
    rng = np.random.default_rng(seed)
    toks = jnp.asarray(rng.integers(0, base.vocab_size, (steps + 1, batch_size, seq_len + 1)), jnp.int32)
    result = {}
    for width in widths:
        cfg = width_config(base, width)
        model = Transformer(cfg)
        tx = training.make_optimizer(optim, steps, model_cfg=cfg)
        params, opt_state = jax.jit(lambda key, x, model=model, tx=tx: (
            lambda p: (p, tx.init(p)))(model.init(key, x)["params"]))(jax.random.PRNGKey(seed), toks[0, :, :-1])

        @jax.jit
        def step(p, s, batch, cfg=cfg, model=model, tx=tx):
            """(outputs of p on the batch's inputs, p after one Adam step on the batch, new state)."""
            def loss(q):
                logits = model.apply({"params": q}, batch[:, :-1]).astype(jnp.float32)
                return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), batch[:, 1:, None], -1))
            outs = layer_outputs(cfg, p, batch[:, :-1])
            u, s = tx.update(jax.grad(loss)(p), s, p)
            return outs, optax.apply_updates(p, u), s

        record: dict[str, list[float]] = {}
        for t in range(steps + 1):  # the outputs at t are measured on batch t, before the update of step t + 1
            outs, params, opt_state = step(params, opt_state, toks[t])
            for k, v in outs.items():
                record.setdefault(k, []).append(float(v))
        result[int(width)] = record
    return result


def growth_exponent(data: dict, name: str, t: int = -1) -> float:
    """The slope of log(mean |x|) against log(width) for layer output ``name`` at step ``t`` (least squares over
    the widths of ``coord_data``): about 0 when the coordinate size does not depend on width, 1 when it grows
    like the width."""
    widths = sorted(data)
    x = np.log(np.asarray(widths, np.float64))
    y = np.log(np.asarray([data[w][name][t] for w in widths], np.float64))
    return float(np.polyfit(x, y, 1)[0])


def coord_band(data: dict, name: str, t: int = -1) -> float:
    """max / min over widths of the mean |x| of ``name`` at step ``t`` (1 = identical at every width)."""
    vals = [data[w][name][t] for w in data]
    return float(max(vals) / min(vals))


# ------------------------------------------------------------------------------------------------
# The learning-rate transfer study (one LM run per (parameterization, width, lr, seed)).

def transfer_config(base_config, *, parameterization: str, width: int, lr: float, seed: int, steps: int,
                    base_width: int):
    """A copy of ``base_config`` (an ``lm``-experiment ConfigDict, e.g. configs/upscale.py's model and data) for
    one run of the transfer study: the model at ``width`` (heads fixed, head_dim, d_ff scaled), under
    ``parameterization`` ("standard" or "mup", muP's base ``base_width``), ``lr``, ``seed``, ``steps``."""
    c = copy.deepcopy(base_config)
    c.unlock()
    c.experiment = "lm"
    model = config_lib.model_config(c.model)
    cfg = width_config(model, width)
    c.model.update(d_model=cfg.d_model, d_ff=cfg.d_ff, head_dim=cfg.head_dim, parameterization=parameterization)
    if parameterization == "mup":
        c.model.update(mup_base_d_model=base_width, attn_scale="mup")
    c.optim.lr = float(lr)
    c.seed = int(seed)
    c.train.steps = int(steps)
    c.lock()
    return c


def run_transfer(config, workdir: str) -> list[dict]:
    """One run of the study through the project's training loop (resumable); returns its eval history."""
    return training.train(config, workdir).history


def best_rates(runs: list[dict]) -> dict:
    """{parameterization: {width: {"lr": best lr, "loss": mean final loss over its seeds, "std": sample std or
    None, "n": seeds}}} from run records {parameterization, width, lr, seed, final_loss} (a diverged run has
    final_loss NaN/inf and never wins)."""
    table: dict = {}
    for r in runs:
        key = (r["parameterization"], r["width"], r["lr"])
        table.setdefault(key, []).append(r["final_loss"])
    out: dict = {}
    for (param, width, lr), losses in table.items():
        finite = [x for x in losses if math.isfinite(x)]
        mean = float(np.mean(finite)) if len(finite) == len(losses) else math.inf
        std = float(np.std(finite, ddof=1)) if len(finite) > 1 and mean < math.inf else None
        cur = out.setdefault(param, {}).get(width)
        if cur is None or mean < cur["loss"]:
            out[param][width] = {"lr": lr, "loss": mean, "std": std, "n": len(losses)}
    return out


def final_loss(history: list[dict]) -> float:
    """The last validation loss of a run (inf if the run never evaluated or ended non-finite)."""
    vals = [h["val_loss"] for h in history if "val_loss" in h]
    return float(vals[-1]) if vals and math.isfinite(vals[-1]) else math.inf


def workdir_for(root: str, parameterization: str, width: int, lr: float, seed: int) -> str:
    return os.path.join(root, f"{parameterization}_d{width}_lr{lr:g}_s{seed}")


__all__ = ["width_config", "layer_outputs", "coord_data", "growth_exponent", "coord_band", "transfer_config",
           "run_transfer", "best_rates", "final_loss", "workdir_for", "data_lib"]
