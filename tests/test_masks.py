"""Tests for kexue_jax.nn.masks: the UniLM / UniAE / independent mask algebra (kexue.fm/archives/6933, 8475).

Independent reference: a plain numpy double loop over (i, j) written from the digest's rules."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kexue_jax.nn import Transformer, TransformerConfig, masks

S = np.array([[0, 0, 0, 1, 1, 1]])


def _m(mask):
    mask = np.asarray(mask)
    assert mask.dtype == np.bool_ and mask.ndim == 4 and mask.shape[1] == 1
    return mask[0, 0].astype(int)


# -- the digest's cases on s = [0,0,0,1,1,1] --------------------------------------------------------------

def test_unilm_on_digest_example():
    expected = np.array([[1, 1, 1, 0, 0, 0],
                         [1, 1, 1, 0, 0, 0],
                         [1, 1, 1, 0, 0, 0],
                         [1, 1, 1, 1, 0, 0],
                         [1, 1, 1, 1, 1, 0],   # target row 4 sees cols 0-4
                         [1, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(_m(masks.unilm(S)), expected)


def test_independent_on_digest_example():
    expected = np.array([[1, 1, 1, 0, 0, 0],   # source rows see cols 0-2
                         [1, 1, 1, 0, 0, 0],
                         [1, 1, 1, 0, 0, 0],
                         [0, 0, 0, 1, 0, 0],
                         [0, 0, 0, 1, 1, 0],   # target row 4 sees cols 3-4
                         [0, 0, 0, 1, 1, 1]])
    np.testing.assert_array_equal(_m(masks.independent(S)), expected)


def test_uniae_on_digest_example():
    expected = np.array([[1, 1, 1, 0, 0, 0],   # source rows unchanged
                         [1, 1, 1, 0, 0, 0],
                         [1, 1, 1, 0, 0, 0],
                         [1, 0, 0, 1, 0, 0],
                         [1, 0, 0, 1, 1, 0],   # target row 4 sees cols {0, 3, 4}
                         [1, 0, 0, 1, 1, 1]])
    np.testing.assert_array_equal(_m(masks.uniae(S)), expected)


def test_causal_and_bidirectional():
    np.testing.assert_array_equal(_m(masks.causal(S)), np.tril(np.ones((6, 6), int)))
    np.testing.assert_array_equal(_m(masks.bidirectional(S)), np.ones((6, 6), int))
    # causal only looks at the shape: any ids give the same mask
    np.testing.assert_array_equal(masks.causal(jnp.full((2, 6), 7)), masks.causal(jnp.zeros((2, 6), int)))


def test_segment_cumsum_is_c():
    np.testing.assert_array_equal(masks.segment_cumsum(S), [[0, 0, 0, 1, 2, 3]])


# -- padding and composition --------------------------------------------------------------------------------

def test_padding_keys_and_queries():
    valid = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], bool)
    keys = np.asarray(masks.padding(valid))
    assert keys.shape == (2, 1, 6, 6) and keys.dtype == np.bool_
    np.testing.assert_array_equal(keys[:, 0], np.broadcast_to(valid[:, None, :], (2, 6, 6)))
    both = np.asarray(masks.padding(valid, queries=True))
    np.testing.assert_array_equal(both[:, 0], valid[:, :, None] & valid[:, None, :])


def test_and_or_compose_elementwise_and_ignore_none():
    valid = np.array([[1, 1, 1, 1, 1, 0]], bool)
    pad = masks.padding(valid)
    a = np.asarray(masks.and_(masks.unilm(S), pad))
    np.testing.assert_array_equal(a, np.asarray(masks.unilm(S)) & np.asarray(pad))
    assert a[0, 0, 5, 5] == 0 and a[0, 0, 5, 4] == 1
    o = np.asarray(masks.or_(masks.independent(S), masks.causal(S)))
    np.testing.assert_array_equal(o, np.asarray(masks.independent(S)) | np.asarray(masks.causal(S)))
    np.testing.assert_array_equal(masks.and_(None, masks.causal(S), None), masks.causal(S))
    np.testing.assert_array_equal(masks.or_(masks.causal(S)), masks.causal(S))
    # broadcasting: a [1, 1, 1, L] key mask with a [B, 1, L, L] mask
    keys = jnp.asarray([True] * 5 + [False])[None, None, None, :]
    assert masks.and_(masks.bidirectional(jnp.zeros((3, 6))), keys).shape == (3, 1, 6, 6)
    with pytest.raises(ValueError, match="and_"):
        masks.and_()
    with pytest.raises(ValueError, match="or_"):
        masks.or_(None)


# -- packed documents -----------------------------------------------------------------------------------------

def test_packed_documents_block_diagonal_cumsum_and_uniae_first_key():
    # two documents in one row, each [src src tgt tgt tgt] / [src src tgt]
    s = np.array([[0, 0, 1, 1, 1, 0, 0, 1]])
    doc = np.array([[1, 1, 1, 1, 1, 2, 2, 2]])
    np.testing.assert_array_equal(masks.segment_cumsum(s, doc), [[0, 0, 1, 2, 3, 0, 0, 1]])
    np.testing.assert_array_equal(masks.document_start(doc), [[0, 0, 0, 0, 0, 5, 5, 5]])
    block = np.zeros((8, 8), int)
    block[:5, :5] = 1
    block[5:, 5:] = 1
    np.testing.assert_array_equal(_m(masks.same_document(doc)), block)
    np.testing.assert_array_equal(_m(masks.bidirectional(s, doc)), block)
    np.testing.assert_array_equal(_m(masks.causal(s, doc)), np.tril(block))
    ua = _m(masks.uniae(s, doc))
    # document 2's target row 7 sees its own first key 5 and itself, nothing of document 1
    np.testing.assert_array_equal(ua[7], [0, 0, 0, 0, 0, 1, 0, 1])
    # document 1's target row 3 sees key 0 and target keys 2-3
    np.testing.assert_array_equal(ua[3], [1, 0, 1, 1, 0, 0, 0, 0])
    # unilm in document 2: its source (5, 6) bidirectional, target row 7 sees 5-7; none of document 1
    np.testing.assert_array_equal(_m(masks.unilm(s, doc))[5:, :], [[0] * 5 + [1, 1, 0], [0] * 5 + [1, 1, 0],
                                                                   [0] * 5 + [1, 1, 1]])


# -- independent numpy loop reference on random ids --------------------------------------------------------------

def np_reference(kind, s, doc):
    b, n = s.shape
    out = np.zeros((b, 1, n, n), bool)
    for r in range(b):
        start, c = np.zeros(n, int), np.zeros(n, int)
        for i in range(n):
            new_doc = i == 0 or doc[r, i] != doc[r, i - 1]
            start[i] = i if new_doc else start[i - 1]
            c[i] = s[r, i] + (0 if new_doc else c[i - 1])
        for i in range(n):
            for j in range(n):
                same = doc[r, i] == doc[r, j]
                rule = {"causal": j <= i,
                        "bidirectional": True,
                        "unilm": c[j] <= c[i],
                        "independent": s[r, j] == s[r, i] and c[j] <= c[i],
                        "uniae": (s[r, j] == s[r, i] and c[j] <= c[i]) or j == start[i]}[kind]
                out[r, 0, i, j] = same and rule
    return out


def _random_ids(seed, b=3, n=24, structured=True):
    rng = np.random.default_rng(seed)
    doc = np.zeros((b, n), int)
    s = np.zeros((b, n), int)
    for r in range(b):
        cuts = np.sort(rng.choice(np.arange(1, n), size=rng.integers(0, 4), replace=False))
        bounds = [0, *cuts, n]
        for d, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
            doc[r, lo:hi] = d + 1
            if structured:  # source then target inside each document
                split = rng.integers(lo, hi + 1)
                s[r, split:hi] = 1
            else:
                s[r, lo:hi] = rng.integers(0, 2, hi - lo)
    return s, doc


@pytest.mark.parametrize("kind", masks.MASKS)
@pytest.mark.parametrize("seed,structured", [(0, True), (1, True), (2, False)])
def test_matches_numpy_loop_reference(kind, seed, structured):
    s, doc = _random_ids(seed, structured=structured)
    got = np.asarray(masks.make(kind, s, doc))
    assert got.shape == (3, 1, 24, 24) and got.dtype == np.bool_
    np.testing.assert_array_equal(got, np_reference(kind, s, doc))
    # without documents: one document per row
    np.testing.assert_array_equal(np.asarray(masks.make(kind, s)), np_reference(kind, s, np.ones_like(s)))


def test_masks_jit_and_errors():
    s, doc = _random_ids(3)
    for kind in masks.MASKS:
        np.testing.assert_array_equal(jax.jit(functools.partial(masks.make, kind))(s, doc),
                                      masks.make(kind, s, doc))
    with pytest.raises(ValueError, match=r"mask must be one of \('causal', 'bidirectional', 'unilm', 'uniae', "
                                         r"'independent'\)"):
        masks.make("prefix", s)
    with pytest.raises(ValueError, match="segment_ids must have shape"):
        masks.unilm(np.zeros(6, int))
    with pytest.raises(ValueError, match="document_ids must have shape"):
        masks.unilm(np.zeros((1, 6), int), np.zeros(6, int))
    with pytest.raises(ValueError, match="valid must have shape"):
        masks.padding(np.ones(6, bool))


# -- the UniAE bottleneck for a whole model (kexue.fm/archives/8475) ---------------------------------------------

L_SRC = 8
SEG = jnp.asarray([[0] * L_SRC + [1] * L_SRC] * 2)


def _config(mask):
    return TransformerConfig(vocab_size=40, num_layers=3, d_model=32, num_heads=2, head_dim=16, d_ff=64,
                             max_len=2 * L_SRC, type_vocab_size=2, mask=mask, residual="pre", init_std=None)


@functools.lru_cache(maxsize=None)
def _params():
    tokens = jnp.zeros((2, 2 * L_SRC), jnp.int32)
    return jax.jit(Transformer(_config("uniae")).init)(jax.random.key(0, impl="rbg"), tokens, SEG)["params"]


@functools.lru_cache(maxsize=None)
def _model(mask):
    """A jitted forward of a 3-layer model with this mask (the mask is not a parameter: params shared)."""
    model, params = Transformer(_config(mask)), _params()
    inject = {i: jnp.full((2, 32), 0.1 * i) for i in (1, 2)}  # fixed latents at the inputs of layers 1, 2

    @jax.jit
    def run(tok, inj):
        return model.apply({"params": params}, tok, SEG, inject=inj)

    return run, inject


def _tokens(seed):
    return jax.random.randint(jax.random.key(seed), (2, 2 * L_SRC), 1, 40)


def test_uniae_bottleneck_target_outputs_ignore_source_tokens_1_to_end():
    run, inject = _model("uniae")
    t1 = _tokens(1)
    t2 = t1.at[:, 1:L_SRC].set(_tokens(2)[:, 1:L_SRC])  # new source except position 0
    y1, y2 = run(t1, inject), run(t2, inject)
    # target positions: the same to the last bit (masked keys get exactly zero weight)
    np.testing.assert_array_equal(y1[:, L_SRC:], y2[:, L_SRC:])
    assert float(jnp.abs(y1[:, :L_SRC] - y2[:, :L_SRC]).max()) > 1e-3  # the source side does change
    # controls that make the test able to fail: (a) position 0 of the source does reach the target
    t3 = t1.at[:, 0].set((t1[:, 0] + 1) % 40)
    assert float(jnp.abs(run(t3, inject)[:, L_SRC:] - y1[:, L_SRC:]).max()) > 1e-3
    # (b) without overwriting position 0 at layers >= 1 the [CLS] state carries the whole source
    assert float(jnp.abs(run(t1, {})[:, L_SRC:] - run(t2, {})[:, L_SRC:]).max()) > 1e-3
    # (c) under unilm the target sees every source token
    run_u, _ = _model("unilm")
    assert float(jnp.abs(run_u(t1, inject)[:, L_SRC:] - run_u(t2, inject)[:, L_SRC:]).max()) > 1e-3
