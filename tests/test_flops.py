"""Tests for kexue_jax.flops (kexue.fm/archives/8610): counts, crossovers, and agreement with the real model / XLA."""
import json
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kexue_jax import flops
from kexue_jax.nn.linear_attention import DEFAULT_CHUNK_SIZE, linear_attention


# --- post 8610's numbers -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("h,d,sa,quad", [(12, 64, 1536, 4608), (16, 64, 2048, 6144)])
def test_bert_crossovers(h, d, sa, quad):
    assert flops.sa_exceeds_ffn_length(h, d) == sa
    assert flops.quadratic_dominates_length(h, d) == quad
    assert flops.linear_breakeven_length(d, 4) == 1024  # n > 16 d, same d = 64 for base and large


def test_linear_breakeven_general_and_layer_crossover():
    assert flops.linear_breakeven_length(64, 1) == 64  # "saves only when n > d"
    assert flops.linear_breakeven_length(32, 3) == 288
    assert flops.linear_layer_crossover_length(12, 64, 4) == 5632  # 2 (r-1) D + r^2 d
    assert flops.linear_layer_crossover_length(12, 64, 1) == 64


# The digest's table (posts-A section 3, 'Derived numbers'): projections, scores, FFN, score share, SA/FFN.
DIGEST_TABLE = [
    (12, 128, 3.02e8, 2.52e7, 6.04e8, 0.027, 0.54),
    (12, 512, 1.21e9, 4.03e8, 2.42e9, 0.100, 0.67),
    (12, 1536, 3.62e9, 3.62e9, 7.25e9, 0.25, 1.00),
    (12, 4608, 1.09e10, 3.26e10, 2.17e10, 0.50, 2.00),
    (16, 512, 2.15e9, 5.37e8, 4.29e9, 0.077, 0.63),
]


@pytest.mark.parametrize("h,n,proj,scores,ffn,share,ratio", DIGEST_TABLE)
def test_per_part_table_matches_digest(h, n, proj, scores, ffn, share, ratio):
    (row,) = flops.per_part_table(h, 64, [n])
    assert row["projections"] == pytest.approx(proj, rel=5e-3)
    assert row["scores"] == pytest.approx(scores, rel=5e-3)
    assert row["ffn"] == pytest.approx(ffn, rel=5e-3)
    assert row["score_share"] == pytest.approx(share, abs=5e-4)
    assert row["sa_over_ffn"] == pytest.approx(ratio, abs=5.0001e-3)  # 0.625 printed as 0.63
    hd = 64 * h  # closed forms of the post
    assert row["total"] == 12 * n * hd**2 + 2 * n**2 * hd
    assert row["projections"] == 4 * n * hd**2 and row["scores"] == 2 * n**2 * hd and row["ffn"] == 8 * n * hd**2


@pytest.mark.parametrize("h,d,d_model,d_ff,ffn", [(12, 64, None, None, "plain"), (8, 32, 320, 1000, "plain"),
                                                  (4, 64, 256, 700, "gated"), (6, 16, 512, 64, "plain")])
def test_crossover_formulas_against_brute_force(h, d, d_model, d_ff, ffn):
    """The closed forms equal the first integer n where the per-part counts cross (independent search)."""
    dm = d_model or h * d
    f = d_ff or 4 * dm

    def parts(n):
        return flops.layer_mults(n, d_model=dm, num_heads=h, head_dim=d, d_ff=f, ffn=ffn)

    first = lambda pred: next(n for n in range(1, 200000) if pred(parts(n)))
    n_sa = first(lambda p: p["projections"] + p["mixing"] > p["ffn"])
    n_quad = first(lambda p: p["mixing"] > p["projections"] + p["ffn"])
    sa = flops.sa_exceeds_ffn_length(h, d, d_model=d_model, d_ff=d_ff, ffn=ffn)
    quad = flops.quadratic_dominates_length(h, d, d_model=d_model, d_ff=d_ff, ffn=ffn)
    assert n_sa == int(np.floor(sa)) + 1 or (sa == 0 and n_sa == 1)
    assert n_quad == int(np.floor(quad)) + 1


def test_linear_layer_crossover_against_brute_force():
    kw = dict(d_model=768, num_heads=12, head_dim=64, d_ff=3072)
    soft = lambda n: flops.layer_mults(n, **kw)
    lin = lambda n: flops.layer_mults(n, token_mixer="linear", linear_head_multiplier=4, **kw)
    # Ignoring the normaliser (as the formula does), the first n where linear is cheaper:
    cheaper = lambda n: lin(n)["total"] - lin(n)["normaliser"] < soft(n)["total"]
    n = next(n for n in range(1000, 10000) if cheaper(n))
    assert n == flops.linear_layer_crossover_length(12, 64, 4) + 1


def test_ffn_gated_and_head_counts():
    assert flops.ffn_mults(10, 8, 32, "plain") == 2 * 10 * 8 * 32
    assert flops.ffn_mults(10, 8, 32, "gated") == 3 * 10 * 8 * 32
    assert flops.head_mults(10, 8, 100, "lm") == 10 * 8 * 100
    assert flops.head_mults(10, 8, 100, "mlm") == 10 * 8 * 100 + 10 * 8 * 8
    assert flops.head_mults(10, 8, 100, "none") == 0


# --- measured counts: the real linear attention and the real Transformer ----------------------------------------

@pytest.mark.parametrize("n,causal,chunk", [(50, False, 16), (50, True, 16), (48, True, 16), (10, True, 64)])
def test_linear_attention_mults_match_implementation(n, causal, chunk):
    q = jnp.ones((1, n, 3, 8))
    v = jnp.ones((1, n, 3, 8))
    measured = flops.count_matmul_mults(lambda q, k, v: linear_attention(q, k, v, causal=causal, chunk_size=chunk),
                                        q, q, v)
    assert measured == sum(flops.linear_attention_mults(n, 3, 8, causal=causal, chunk_size=chunk).values())
    assert flops.DEFAULT_LINEAR_CHUNK_SIZE == DEFAULT_CHUNK_SIZE


def _model(preset, seq_len, batch=2, **overrides):
    from kexue_jax.nn import Transformer, TransformerConfig

    fields = dict(vocab_size=260, num_layers=2, d_model=256, num_heads=4, head_dim=64, d_ff=1024, max_len=256)
    fields.update(overrides)
    cfg = TransformerConfig.preset(preset, **fields)
    model = Transformer(cfg)
    tokens = (jnp.arange(batch * seq_len, dtype=jnp.int32) % cfg.vocab_size).reshape(batch, seq_len)
    # Abstract parameters (shapes only): tracing and lowering need no values.
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)["params"]
    return cfg, (lambda p, t: model.apply({"params": p}, t)), params, tokens


@pytest.mark.parametrize("preset,n,overrides", [
    ("bert", 128, {}), ("gpt", 96, {}), ("t5", 64, dict(ffn="gated")),
    ("gpt", 200, dict(token_mixer="linear", linear_head_multiplier=2)),  # causal chunked, padded 200 -> 256
    ("bert", 64, dict(token_mixer="linear")),
    ("gpt", 64, dict(num_heads=3, head_dim=40, d_ff=300, d_model=200, tie_embeddings=False)),
])
def test_model_mults_equal_transformer_jaxpr(preset, n, overrides):
    cfg, apply, params, tokens = _model(preset, n, **overrides)
    assert flops.count_matmul_mults(apply, params, tokens) == flops.model_mults(cfg, n, batch_size=2)["total"]


def test_training_flops_equal_three_forward_passes_of_jaxpr():
    cfg, apply, params, tokens = _model("bert", 64)
    loss = lambda p, t: optax.softmax_cross_entropy_with_integer_labels(apply(p, t), t).mean()
    measured = flops.count_matmul_mults(jax.grad(loss), params, tokens)
    assert 2 * measured == flops.training_flops(cfg, 64, batch_size=2)
    assert flops.training_flops(cfg, 64, 2) == 3 * flops.forward_flops(cfg, 64, 2)


# cost_analysis also counts elementwise work (exact GELU, softmax, norms): use widths where matmuls dominate.
@pytest.mark.parametrize("preset,overrides", [
    ("bert", dict(d_model=512, num_heads=8, d_ff=2048)),
    ("t5", dict(ffn="gated")),
    ("bert", dict(d_model=512, num_heads=8, d_ff=2048, token_mixer="linear")),
])
def test_xla_cost_analysis_agrees_within_5_percent(preset, overrides):
    n = 256
    cfg, apply, params, tokens = _model(preset, n, **overrides)
    xla = flops.xla_flops(jax.jit(apply).lower(params, tokens).compile())
    ratio = xla / flops.forward_flops(cfg, n, batch_size=2)
    assert 1.0 <= ratio < 1.05, ratio  # >= 1: all matmuls are counted; the excess is elementwise work


def test_xla_cost_analysis_training_step_within_5_percent():
    n = 256
    cfg, apply, params, tokens = _model("bert", n, d_model=512, num_heads=8, d_ff=2048)
    loss = lambda p, t: optax.softmax_cross_entropy_with_integer_labels(apply(p, t), t).mean()
    xla = flops.xla_flops(jax.jit(jax.grad(loss)).lower(params, tokens).compile())
    assert 1.0 <= xla / flops.training_flops(cfg, n, batch_size=2) < 1.05


def test_model_mults_reads_fields_with_defaults():
    cfg = types.SimpleNamespace(num_layers=3, d_model=768, num_heads=12, head_dim=64, d_ff=3072, vocab_size=1000)
    m = flops.model_mults(cfg, 512)
    assert m["total"] == 3 * (12 * 512 * 768**2 + 2 * 512**2 * 768) + 512 * 768 * 1000
    assert m["head"] == 512 * 768 * 1000 and m["scores"] == 3 * 12 * 512**2 * 64


# --- the measuring tools ------------------------------------------------------------------------------------------

def test_count_matmul_mults_primitives():
    a, b = jnp.ones((3, 4)), jnp.ones((4, 5))
    assert flops.count_matmul_mults(jnp.matmul, a, b) == 60
    assert flops.count_matmul_mults(lambda x, y: jnp.einsum("bij,bjk->bik", x, y),
                                    jnp.ones((2, 3, 4)), jnp.ones((2, 4, 5))) == 120
    scan = lambda x: jax.lax.scan(lambda c, w: (c @ w, None), x, jnp.ones((7, 4, 4)))[0]
    assert flops.count_matmul_mults(scan, jnp.ones((3, 4))) == 7 * 48
    cond = lambda p, x: jax.lax.cond(p, lambda x: x @ jnp.ones((4, 4)), lambda x: x, x)
    assert flops.count_matmul_mults(cond, True, jnp.ones((3, 4))) == 48
    loop = lambda x: jax.lax.while_loop(lambda c: c[0, 0] < 10, lambda c: c @ jnp.ones((4, 4)), x)
    with pytest.raises(ValueError, match="while"):
        flops.count_matmul_mults(loop, jnp.ones((4, 4)))


def test_xla_flops_accepts_dict_or_list():
    fake = lambda cost: types.SimpleNamespace(cost_analysis=lambda: cost)
    assert flops.xla_flops(fake({"flops": 10.0})) == 10.0
    assert flops.xla_flops(fake([{"flops": 10.0}, {"flops": 5.0}])) == 15.0
    real = jax.jit(jnp.matmul).lower(jnp.ones((8, 16)), jnp.ones((16, 32))).compile()
    assert flops.xla_flops(real) == 2 * 8 * 16 * 32


# --- errors and CLI -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("call,exc,word", [
    (lambda: flops.sa_exceeds_ffn_length(0, 64), ValueError, "num_heads"),
    (lambda: flops.quadratic_dominates_length(12, -1), ValueError, "head_dim"),
    (lambda: flops.sa_exceeds_ffn_length(12, 64, d_ff=0), ValueError, "d_ff"),
    (lambda: flops.sa_exceeds_ffn_length(12, 64, ffn="moe"), ValueError, "ffn"),
    (lambda: flops.linear_breakeven_length(64, 0), ValueError, "multiplier"),
    (lambda: flops.layer_mults(0, d_model=8, num_heads=2, head_dim=4, d_ff=16), ValueError, "n"),
    (lambda: flops.layer_mults(8, d_model=8, num_heads=2, head_dim=4, d_ff=16, token_mixer="mamba"),
     ValueError, "token_mixer"),
    (lambda: flops.head_mults(8, 8, 10, head="seq2seq"), ValueError, "head"),
    (lambda: flops.projection_mults(8, 8.0, 2, 4), TypeError, "d_model"),
    (lambda: flops.linear_attention_mults(8, 2, 4, causal=True, chunk_size=0), ValueError, "chunk_size"),
])
def test_bad_arguments(call, exc, word):
    with pytest.raises(exc, match=word):
        call()


def test_cli():
    run = lambda *a: subprocess.run([sys.executable, "-m", "kexue_jax.flops", *a], capture_output=True, text=True)
    res = run("--heads", "12", "--head-dim", "64", "--seq-len", "512", "4608")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert (out["sa_exceeds_ffn"], out["quadratic_dominates"], out["linear_breakeven"]) == (1536, 4608, 1024)
    assert [r["n"] for r in out["table"]] == [512, 4608] and out["table"][0]["score_share"] == pytest.approx(0.1)
    res = run("--heads", "16", "--head-dim", "64", "--ffn", "gated", "--d-ff", "2048")
    assert json.loads(res.stdout)["sa_exceeds_ffn"] == 1024 * (3 * 2048 - 4 * 1024) / 2048
    bad = run("--heads", "0", "--head-dim", "64")
    assert bad.returncode == 2 and "--heads must be a positive integer" in bad.stderr
