"""kexue_jax.reporting: the atomic JSON write, seed statistics, markdown tables, the plotting guard and the
unigram baseline."""
import builtins
import json
import math
import os

import numpy as np
import pytest

from kexue_jax import reporting


def test_write_json_atomic_writes_the_same_text_as_json_dumps(tmp_path):
    obj = {"a": [1, 2.5, None], "b": {"c": "d"}}
    reporting.write_json_atomic(tmp_path / "r.json", obj, indent=2)
    assert (tmp_path / "r.json").read_text() == json.dumps(obj, indent=2)
    reporting.write_json_atomic(tmp_path / "r.json", obj, indent=1, newline=True)
    assert (tmp_path / "r.json").read_text() == json.dumps(obj, indent=1) + "\n"
    reporting.write_json_atomic(str(tmp_path / "r.json"), obj, indent=None)
    assert json.loads((tmp_path / "r.json").read_text()) == obj
    assert os.listdir(tmp_path) == ["r.json"]


def test_a_write_that_fails_midway_leaves_the_old_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "report.json"
    reporting.write_json_atomic(path, {"step": 1})
    # serialization fails on the second write: the old report stays, no temporary file is left behind
    with pytest.raises(TypeError):
        reporting.write_json_atomic(path, {"step": 2, "bad": object()})
    assert json.loads(path.read_text()) == {"step": 1} and os.listdir(tmp_path) == ["report.json"]

    # a crash while the temporary file is being written (after part of the text): the same
    real_fsync = os.fsync

    def crash(fd):
        raise OSError("disk gone")
    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk gone"):
        reporting.write_json_atomic(path, {"step": 3})
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert json.loads(path.read_text()) == {"step": 1} and os.listdir(tmp_path) == ["report.json"]
    reporting.write_json_atomic(path, {"step": 4})
    assert json.loads(path.read_text()) == {"step": 4}


@pytest.mark.parametrize("values", [[0.7], [0.7, 0.9], [1.0, 2.0, 4.5], [85.91, 86.02, 85.4, 85.77]])
def test_seed_stats_matches_numpy(values):
    got = reporting.seed_stats(values)
    assert got["mean"] == pytest.approx(np.mean(values), rel=1e-15) and got["n"] == len(values)
    assert got["values"] == values
    if len(values) == 1:
        assert got["std"] is None
    else:
        assert got["std"] == pytest.approx(np.std(values, ddof=1), rel=1e-15)
    json.dumps(got)


def test_seed_stats_skips_seeds_that_have_no_value_and_rounds_nothing():
    got = reporting.seed_stats([0.123456789, None, np.float64(0.2)])
    assert got == {"mean": pytest.approx((0.123456789 + 0.2) / 2), "std": pytest.approx(np.std([0.123456789, 0.2],
                                                                                                ddof=1)),
                   "n": 2, "values": [0.123456789, None, 0.2]}
    assert type(got["values"][2]) is float  # numpy scalars become plain numbers (JSON)
    assert reporting.seed_stats([None, None]) == {"mean": None, "std": None, "n": 0, "values": [None, None]}
    assert reporting.seed_stats([]) == {"mean": None, "std": None, "n": 0, "values": []}


def test_markdown_table():
    assert reporting.markdown_table(["a", "b"], [[1, "x"], [2.5, "|"]]) == (
        "| a | b |\n|---|---|\n| 1 | x |\n| 2.5 | | |\n")
    assert reporting.markdown_table(("only",), []) == "| only |\n|---|\n"


def test_figure_is_none_with_one_line_when_matplotlib_is_missing(monkeypatch, capsys):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert reporting.figure(figsize=(3, 2)) is None
    assert capsys.readouterr().out == "matplotlib is not installed: no plot written\n"


def test_figure_draws_and_saves_when_matplotlib_is_there(tmp_path):
    pytest.importorskip("matplotlib")
    fig = reporting.figure(figsize=(3, 2), dpi=50)
    ax = fig.subplots()
    ax.plot([0, 1], [1, 0])
    fig.savefig(tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_unigram_loss():
    assert reporting.unigram_loss(np.array([0, 0, 1, 1])) == pytest.approx(math.log(2))
    train, val = np.array([0, 0, 0, 1], np.uint8), np.array([1, 2], np.uint8)
    # add-one over the 3 byte values seen in either: p = (4, 2, 1) / 7
    want = -np.mean(np.log(np.array([2.0, 1.0]) / 7.0))
    assert reporting.unigram_loss(train, val, add_one=True) == pytest.approx(want, rel=1e-15)
    assert reporting.unigram_loss(train, np.array([0, 1])) == pytest.approx(-np.mean(np.log([0.75, 0.25])))
