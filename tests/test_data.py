"""Tests for kexue_jax.data: corpus, byte tokenizer, split by play, deterministic batches, global arrays."""
import re

import chex
import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kexue_jax import data


@pytest.fixture(scope="module")
def plays():
    return data.load_plays()


# ---------------------------------------------------------------------------------------- corpus

def test_embedded_corpus_size_and_format(plays):
    names = [p.name for p in plays]
    assert len(plays) > 30
    assert names == sorted(names) and len(set(names)) == len(names)
    assert "hamlet" in names
    total = sum(len(p.text.encode("utf-8")) for p in plays)
    assert total > 4_000_000
    text = "\n".join(p.text for p in plays)
    speakers = re.findall(r"^[A-Z][A-Za-z .&',-]*:$", text, flags=re.M)
    assert len(speakers) > 20_000
    assert "HAMLET:" in speakers
    assert not re.search(r"^#", text, flags=re.M)
    for markup in ("**", "_", "[", "]", "\\"):
        assert markup not in text, markup
    files = data.shakespeare_play_files()
    assert [f.stem for f in files if f.suffix == ".md"] and len(files) == len(plays)
    hamlet = next(p for p in plays if p.name == "hamlet").text
    assert "HAMLET:\nTo be, or not to be: that is the question:\n" in hamlet
    assert hamlet.startswith("BERNARDO:\nWho's there?\n\nFRANCISCO:\n")


def test_play_markdown_to_text_exact():
    md = (
        "# A Play\n\n## ACT I\n\n### SCENE I. A wood.\n\n"
        "_Enter A, with\nothers_\n\n"
        "**A**  \nFirst line,  \nsecond line \\-- still.  \n_\\[Aside]_  \n\n"
        "_Exit B_\n\n"
        "After the exit.  \n\n"
        "**B & C**  \n*[Reads.]*  \nHail!  \n\n"
        "*Exeunt.*\n"
    )
    expected = "A:\nFirst line,\nsecond line -- still.\nAfter the exit.\n\nB & C:\nHail!\n"
    assert data.play_markdown_to_text(md) == expected


# ---------------------------------------------------------------------------------------- tokenizer

def test_encode_decode_round_trip_non_ascii():
    text = "Ünïcödé — 科学空间 🙂\nTo be, or not to be"
    ids = data.encode(text)
    assert ids.dtype == np.int32 and ids.ndim == 1
    np.testing.assert_array_equal(ids, np.array(list(text.encode("utf-8"))))
    assert data.decode(ids) == text
    # specials are dropped, invalid UTF-8 is replaced
    with_specials = np.concatenate([[data.CLS], ids[:3], [data.MASK, data.PAD, data.SEP]])
    assert data.decode(with_specials) == text[:2]  # "Ü" is 2 bytes, "n" 1
    assert data.decode([0xFF, ord("a")]) == "\ufffda"
    assert data.VOCAB_SIZE == 260 and (data.PAD, data.MASK, data.CLS, data.SEP) == (256, 257, 258, 259)


def test_decode_rejects_out_of_range_ids():
    with pytest.raises(ValueError, match="ids must lie in"):
        data.decode([1, 260])
    with pytest.raises(TypeError, match="text must be a str"):
        data.encode(b"bytes")


# ---------------------------------------------------------------------------------------- split

def test_split_is_by_play_and_deterministic(plays):
    train, val = data.split_plays(plays, val_fraction=0.1, seed=0)
    assert len(val) == round(0.1 * len(plays)) and len(train) + len(val) == len(plays)
    assert {p.name for p in train}.isdisjoint({p.name for p in val})
    # independent of input order; same seed -> same split; another seed -> another split
    shuffled = [plays[i] for i in np.random.default_rng(5).permutation(len(plays))]
    assert data.split_plays(shuffled, 0.1, 0) == (train, val)
    assert data.split_plays(plays, 0.1, 1)[1] != val
    train_tokens, val_tokens = data.split_corpus(plays, 0.1, 0)
    assert train_tokens.dtype == np.int32 and val_tokens.dtype == np.int32
    assert data.decode(val_tokens) == "\n\n".join(p.text for p in val)
    assert data.decode(train_tokens) == "\n\n".join(p.text for p in train)


def test_split_by_document_needs_two_and_a_valid_fraction_one_document_splits_by_bytes():
    docs = [data.Play("a", "x"), data.Play("b", "y")]
    train, val = data.split_plays(docs, val_fraction=0.9)  # clamped to n - 1 = 1 validation document
    assert len(train) == 1 and len(val) == 1
    with pytest.raises(ValueError, match="at least 2 documents"):
        data.split_plays(docs[:1])
    with pytest.raises(ValueError, match="val_fraction"):
        data.split_corpus(docs, val_fraction=1.0)
    # one document: the last 10% of its bytes, from the nearest line start on
    text = "".join(f"line {i:02d}\n" for i in range(50))  # 50 lines of 8 bytes
    train_tokens, val_tokens = data.split_corpus([data.Play("one", text)], 0.1)
    assert data.decode(val_tokens) == text[360:] and data.decode(train_tokens) == text[:360]
    assert data.split_document("ab", 0.5) == ("a", "b")
    assert data.split_document("üü", 0.5) == ("ü", "ü")  # never inside a UTF-8 character
    with pytest.raises(ValueError, match="at least 2 bytes"):
        data.split_document("a", 0.1)


# ---------------------------------------------------------------------------------------- batches

TOKENS = np.arange(10_000, dtype=np.int32)  # every window is recognisable by its first id


def test_batch_building_blocks():
    np.testing.assert_array_equal(data.batch_rng(4, 9).random(3), np.random.default_rng([4, 9]).random(3))
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        data.batch_rng(-1, 0)
    assert data.process_rows(12, 1, 4) == slice(3, 6)
    assert data.process_rows(12) == slice(0, 12)
    starts = data.crop_starts(np.random.default_rng(0), n_tokens=10, window=8, batch_size=1000)
    assert set(starts.tolist()) == {0, 1, 2}  # uniform over [0, n - window], both ends reachable
    np.testing.assert_array_equal(data.gather_windows(TOKENS, np.array([0, 5]), 3), [[0, 1, 2], [5, 6, 7]])
    plays = [data.Play("a", "x y"), data.Play("b", "z")]
    assert data.decode(data.concat_tokens(plays)) == "x y\n\nz"


def test_bert_corruption_exact():
    ids = np.array([[10, 11, 12, 13, 14]])
    u_select = np.array([[0.10, 0.05, 0.01, 0.50, 0.14]])
    u_kind = np.array([[0.50, 0.85, 0.95, 0.10, 0.79]])
    random_bytes = np.array([[1, 2, 3, 4, 5]])
    inputs, weights = data.bert_corruption(ids, u_select, u_kind, random_bytes)
    np.testing.assert_array_equal(inputs, [[data.MASK, 2, 12, 13, data.MASK]])
    np.testing.assert_array_equal(weights, [[1, 1, 1, 0, 1]])
    maskable = np.array([[False, True, True, True, True]])
    inputs, weights = data.bert_corruption(ids, u_select, u_kind, random_bytes, maskable=maskable)
    np.testing.assert_array_equal(inputs, [[10, 2, 12, 13, data.MASK]])
    np.testing.assert_array_equal(weights, [[0, 1, 1, 0, 1]])
    with pytest.raises(ValueError, match="mask_token_frac \\+ random_token_frac must be <= 1"):
        data.bert_corruption(ids, u_select, u_kind, random_bytes, mask_token_frac=0.95)


def test_lm_batch_targets_are_next_bytes_and_crops_follow_seed_step():
    b = data.lm_batch(TOKENS, step=7, seed=3, batch_size=16, seq_len=32)
    assert b["inputs"].shape == (16, 32) and b["inputs"].dtype == np.int32
    np.testing.assert_array_equal(b["targets"], b["inputs"] + 1)  # next id of an arange
    starts = np.random.default_rng([3, 7]).integers(0, len(TOKENS) - 33 + 1, size=16)
    np.testing.assert_array_equal(b["inputs"], starts[:, None] + np.arange(32))
    # on real text: targets are inputs shifted by one
    text_tokens = data.encode("The quality of mercy is not strain'd. " * 20)
    t = data.lm_batch(text_tokens, step=0, seed=0, batch_size=4, seq_len=16)
    np.testing.assert_array_equal(t["targets"][:, :-1], t["inputs"][:, 1:])


def test_batches_are_pure_functions_of_seed_and_step():
    kw = dict(batch_size=8, seq_len=16)
    for fn in (data.lm_batch, data.mlm_batch):
        a = fn(TOKENS, step=5, seed=0, **kw)
        chex.assert_trees_all_equal(a, fn(TOKENS, step=5, seed=0, **kw))
        assert not np.array_equal(a["inputs"], fn(TOKENS, step=6, seed=0, **kw)["inputs"])
        assert not np.array_equal(a["inputs"], fn(TOKENS, step=5, seed=1, **kw)["inputs"])


@pytest.mark.parametrize("fn", [data.lm_batch, data.mlm_batch])
def test_process_slices_concatenate_to_the_global_batch(fn):
    kw = dict(step=11, seed=2, batch_size=12, seq_len=24)
    full = fn(TOKENS, **kw)
    parts = [fn(TOKENS, process_index=i, process_count=4, **kw) for i in range(4)]
    assert parts[0]["inputs"].shape == (3, 24)
    for k in full:
        np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), full[k])
    with pytest.raises(ValueError, match="divisible by process_count"):
        fn(TOKENS, process_index=0, process_count=5, **kw)


def test_batch_argument_errors():
    with pytest.raises(ValueError, match="need at least 101"):
        data.lm_batch(TOKENS[:50], step=0, seed=0, batch_size=2, seq_len=100)
    with pytest.raises(ValueError, match="step must be a non-negative int"):
        data.lm_batch(TOKENS, step=-1, seed=0, batch_size=2, seq_len=8)
    with pytest.raises(ValueError, match="process_index"):
        data.lm_batch(TOKENS, step=0, seed=0, batch_size=4, seq_len=8, process_index=2, process_count=2)


def test_mlm_masking_rates_within_binomial_tolerance():
    """15% selected; of those 80% MASK, 10% random byte (equal to the original w.p. 1/256), 10% kept.
    Tolerance: 4 binomial standard deviations (a false failure has probability ~6e-5 per check)."""
    tokens = np.random.default_rng(0).integers(0, 256, size=200_000).astype(np.int32)
    b = data.mlm_batch(tokens, step=0, seed=0, batch_size=128, seq_len=512, add_cls=True)
    inputs, targets, w = b["inputs"], b["targets"], b["weights"]
    assert w.dtype == np.float32 and set(np.unique(w)) <= {0.0, 1.0}
    assert (inputs[:, 0] == data.CLS).all() and (targets[:, 0] == data.CLS).all() and (w[:, 0] == 0).all()
    np.testing.assert_array_equal(inputs[w == 0], targets[w == 0])
    n = w[:, 1:].size
    rate = w[:, 1:].mean()
    assert abs(rate - 0.15) < 4 * np.sqrt(0.15 * 0.85 / n), rate
    sel = w == 1
    k = sel.sum()
    is_mask = inputs[sel] == data.MASK
    kept = inputs[sel] == targets[sel]
    other = ~is_mask & ~kept
    for observed, p in ((is_mask.mean(), 0.8), (kept.mean(), 0.1 + 0.1 / 256),
                        (other.mean(), 0.1 * 255 / 256)):
        assert abs(observed - p) < 4 * np.sqrt(p * (1 - p) / k), (observed, p)
    random_bytes = inputs[sel][other]
    assert random_bytes.max() < 256
    # uniform on 0..255: mean 127.5, sd 73.9
    assert abs(random_bytes.mean() - 127.5) < 4 * 73.9 / np.sqrt(random_bytes.size)


def test_eval_batches_non_overlapping_spread_and_stable():
    batches = data.eval_batches(TOKENS, batch_size=4, seq_len=50, num_batches=3)
    chex.assert_trees_all_equal(batches, data.eval_batches(TOKENS, batch_size=4, seq_len=50, num_batches=3))
    assert len(batches) == 3
    starts = np.concatenate([b["inputs"][:, 0] for b in batches])
    # windows k_j = floor(j K / n) * L with K = 9999 // 50 = 199, n = 12
    np.testing.assert_array_equal(starts, (np.arange(12) * 199 // 12) * 50)
    assert np.all(np.diff(starts) >= 50)
    for b in batches:
        np.testing.assert_array_equal(b["targets"], b["inputs"] + 1)
        np.testing.assert_array_equal(b["inputs"], b["inputs"][:, :1] + np.arange(50))
    parts = [data.eval_batches(TOKENS, batch_size=4, seq_len=50, num_batches=3, process_index=i,
                               process_count=2) for i in range(2)]
    for j in range(3):
        np.testing.assert_array_equal(
            np.concatenate([parts[0][j]["inputs"], parts[1][j]["inputs"]]), batches[j]["inputs"])
    with pytest.raises(ValueError, match="max num_batches=49"):
        data.eval_batches(TOKENS, batch_size=4, seq_len=50, num_batches=50)


# ---------------------------------------------------------------------------------------- user files

def test_user_files_file_folder_glob(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("Bee text ü\n", encoding="utf-8")
    (tmp_path / "sub" / "a.txt").write_text("Ay text\n", encoding="utf-8")
    (tmp_path / "sub" / "c.md").write_text("See\n", encoding="utf-8")
    (tmp_path / ".hidden").write_bytes(b"\xff\xfe")  # skipped in folders

    one = data.load_plays(tmp_path / "b.txt")
    assert one == [data.Play("b.txt", "Bee text ü\n")]
    folder = data.load_plays(str(tmp_path))
    assert [p.name for p in folder] == ["b.txt", "sub/a.txt", "sub/c.md"]
    assert folder[1].text == "Ay text\n"
    globbed = data.load_plays(str(tmp_path / "**" / "*.txt"))
    assert [p.text for p in globbed] == ["Bee text ü\n", "Ay text\n"]
    assert [p.name for p in globbed] == sorted(p.name for p in globbed)


def test_user_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"abc\xffdef")
    with pytest.raises(ValueError, match=r"bad\.txt.*not valid UTF-8 \(byte offset 3"):
        data.load_plays(bad)
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b" \n")
    with pytest.raises(ValueError, match=r"empty\.txt.*is empty"):
        data.load_plays(empty)
    with pytest.raises(ValueError, match=r"nope\.txt.*does not exist"):
        data.load_plays(tmp_path / "nope.txt")
    with pytest.raises(ValueError, match=r"\*\.zzz.*matched no files"):
        data.load_plays(str(tmp_path / "*.zzz"))
    with pytest.raises(ValueError, match=r"bad\.txt"):  # a folder reports the offending file too
        data.load_plays(tmp_path)


# ---------------------------------------------------------------------------------------- global arrays

def test_to_global_on_8_device_mesh():
    assert jax.device_count() == 8
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    local = data.mlm_batch(TOKENS, step=0, seed=0, batch_size=16, seq_len=8)
    out = data.to_global(local, sharding)
    assert set(out) == {"inputs", "targets", "weights"}
    for k, v in out.items():
        assert isinstance(v, jax.Array) and v.shape == (16, 8) and v.dtype == local[k].dtype
        assert v.sharding == sharding
        np.testing.assert_array_equal(np.asarray(v), local[k])
        for shard in v.addressable_shards:
            assert shard.data.shape == (2, 8)
            np.testing.assert_array_equal(np.asarray(shard.data), local[k][shard.index])
