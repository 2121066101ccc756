"""The mixer study's transfer with few labels (kexue.fm/archives/8431: do mixers with learned fixed token matrices
transfer as attention does?): the word-order task, the nested label subsets, their config errors, and the
``:tiny`` study end to end with its report keys and a finished rerun that trains nothing."""
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from configs import mixers as mixers_config
from kexue_jax.experiments import mixers as study_lib


def _study_config(variant="tiny", **study):
    c = mixers_config.get_config(variant)
    c.study.update(study)
    return c


def test_label_subset_is_seeded_nested_and_of_the_right_size():
    a = {f: study_lib.label_subset(4000, f, 0) for f in (0.01, 0.1, 1.0)}
    assert [len(a[f]) for f in (0.01, 0.1, 1.0)] == [40, 400, 4000]
    for f, idx in a.items():
        np.testing.assert_array_equal(idx, study_lib.label_subset(4000, f, 0))  # deterministic
        assert np.all(np.diff(idx) > 0) and idx[0] >= 0 and idx[-1] < 4000  # sorted, distinct, in range
    assert set(a[0.01]) <= set(a[0.1]) <= set(a[1.0])  # nested
    assert not np.array_equal(study_lib.label_subset(4000, 0.01, 1), a[0.01])  # another seed, other lines
    assert len(study_lib.label_subset(64, 0.001, 0)) == 1  # at least one line


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_label_subset_refuses_fractions_outside_0_1(fraction):
    with pytest.raises(ValueError, match=r"config\.study\.ft_label_fractions entries must be in \(0, 1\]"):
        study_lib.label_subset(4000, fraction, 0)


def test_order_task_is_seeded_balanced_and_needs_word_order():
    study = _study_config(ft_seq_len=128).study  # long enough for most lines whole
    a, b = study_lib.order_lines(study, 0), study_lib.order_lines(study, 0)
    for split in ("train", "test"):
        for x, y in zip(a[split], b[split]):
            np.testing.assert_array_equal(x, y)
    assert a["num_classes"] == 2 and len(a["train"][2]) == 64 and len(a["test"][2]) == 64
    labels = np.concatenate([a["train"][2], a["test"][2]])
    assert labels.sum() == len(labels) // 2  # exactly half of the lines shuffled
    other = study_lib.order_lines(study, 1)
    assert not np.array_equal(other["train"][0], a["train"][0])
    # a label-0 text is a spoken line, a label-1 text the words of a spoken line in another order (lines the
    # crop to ft_seq_len bytes left whole)
    from kexue_jax import data as data_lib
    spoken = {" ".join(t.split()) for t in study_lib._all_spoken_lines()[0]}
    bags = {tuple(sorted(t.split())) for t in spoken}
    ids, real, y = a["train"]
    whole = real.sum(1) < real.shape[1]
    assert whole.sum() >= 48
    for row, label in zip(ids[whole], y[whole]):
        text = data_lib.decode(row)
        assert tuple(sorted(text.split())) in bags and len(text.split()) >= study_lib.ORDER_MIN_WORDS
        if label == 0:
            assert text in spoken
    shuffled_but_spoken = [data_lib.decode(r) in spoken for r, lab in zip(ids[whole], y[whole]) if lab == 1]
    assert sum(shuffled_but_spoken) <= 1  # a shuffle is (all but by chance) no spoken line


@pytest.mark.slow
def test_tiny_study_writes_the_fraction_transfer_and_a_rerun_trains_nothing(tmp_path, monkeypatch):
    c = _study_config(mixers=("attention", "fnet"), speed_rounds=0)
    seen = []
    real_finetune = study_lib.finetune

    def spy(cfg, params, data, config, workdir, mesh, fc=None):
        seen.append((cfg.token_mixer, os.path.basename(workdir), hashlib.sha256(data["train"][0].tobytes()).hexdigest(),
                     len(data["train"][2])))
        return real_finetune(cfg, params, data, config, workdir, mesh, fc)

    monkeypatch.setattr(study_lib, "finetune", spy)
    study_lib.run(c, str(tmp_path))
    r = json.loads((tmp_path / "report.json").read_text())
    ft = r["fraction_task"]
    assert ft["task"] == "order" and ft["num_classes"] == 2 and ft["steps"] == 2 and ft["train_lines"] == 64
    rows = r["transfer_fractions"]
    assert [(t["mixer"], t["fraction"], t["labelled_lines"]) for t in rows] == [
        ("attention", 0.1, 6), ("attention", 1.0, 64), ("fnet", 0.1, 6), ("fnet", 1.0, 64)]
    for t in rows:
        assert 0.0 <= t["pretrained"] <= 1.0 and 0.0 <= t["scratch"] <= 1.0
        assert t["gain"] == pytest.approx(t["pretrained"] - t["scratch"])
    # the same labelled lines for every mixer and both arms of a fraction
    by_dir = {}
    for mixer, name, digest, n in seen:
        by_dir.setdefault(name, set()).add((digest, n))
    assert {"order_f0.1_pretrained", "order_f0.1_scratch", "order_f1_pretrained", "order_f1_scratch"} <= set(by_dir)
    assert all(len(v) == 1 for v in by_dir.values())
    assert by_dir["order_f0.1_pretrained"] == by_dir["order_f0.1_scratch"]
    table = (tmp_path / "table.md").read_text()
    assert "Word order of a line" in table and "| attention | 10% (6) |" in table and "| fnet | 100% (64) |" in table
    stored = json.loads((tmp_path / "attention_mlm" / "order_f0.1_pretrained" / "config.json").read_text())
    assert stored["data"]["label_fraction"] == 0.1 and stored["data"]["labelled_lines"] == 6
    # a finished study reruns from its files: the same report, no fine-tune trains again
    metrics = tmp_path / "fnet_mlm" / "order_f0.1_scratch" / "metrics.jsonl"
    before = metrics.read_text()
    t0 = time.perf_counter()
    study_lib.run(c, str(tmp_path))
    rerun_s = time.perf_counter() - t0
    again = json.loads((tmp_path / "report.json").read_text())
    assert again["transfer_fractions"] == rows and again["transfer"] == r["transfer"]
    assert metrics.read_text() == before
    print(f"rerun of the finished tiny study: {rerun_s:.1f} s")


def test_transfer_seed_summary_groups_by_mixer_and_fraction():
    """benchmarks/mixer_transfer_seeds.py: seed_stats of each figure per (mixer, fraction), seeds kept in order."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import mixer_transfer_seeds as mts  # noqa: PLC0415

    rows = [{"mixer": "attention", "fraction": 0.1, "seed": s, "pretrained": p, "scratch": q, "gain": p - q}
            for s, p, q in [(0, 0.66, 0.48), (1, 0.72, 0.49), (2, 0.74, 0.50)]]
    rows.append({"mixer": "fnet", "fraction": 0.1, "seed": 0, "pretrained": 0.70, "scratch": 0.80, "gain": -0.10})
    s = mts.summarize(rows)
    assert [(x["mixer"], x["seeds"]) for x in s] == [("attention", [0, 1, 2]), ("fnet", [0])]
    gains = [0.66 - 0.48, 0.72 - 0.49, 0.74 - 0.50]
    np.testing.assert_allclose(s[0]["gain"]["mean"], np.mean(gains), rtol=1e-12)
    np.testing.assert_allclose(s[0]["gain"]["std"], np.std(gains, ddof=1), rtol=1e-12)
    assert s[1]["gain"]["std"] is None and s[1]["gain"]["n"] == 1
    md = mts.table(s)
    assert "| attention | 10% | 3 | 0.707 ± 0.042 |" in md and "| fnet | 10% | 1 | 0.700 | 0.800 | **-0.100** |" in md
