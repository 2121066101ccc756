"""The post-8620 training study (kexue_jax/experiments/init_study.py) on its :tiny grid, end to end."""
import json
import math
import os
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs.init_study import get_config
from kexue_jax.experiments import init_study
from kexue_jax.nn import init as init_lib
from kexue_jax.nn.norms import deepnorm_alpha

FIELDS = ("residual", "depth", "warmup", "lr", "attn_scale", "head_dim", "parameterization", "final_norm",
          "truncation_correction", "val_loss", "final_val_loss", "initial_val_loss", "diverged",
          "grad_norm_per_layer", "alpha", "steps", "alpha_ramp_steps")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("init_study"))
    config = get_config("tiny")
    report = init_study.run(config, workdir)
    return config, workdir, report


def test_tiny_report_has_one_complete_record_per_cell(tiny_run):
    config, workdir, report = tiny_run
    cells = init_study.grid(config, init_study.validate(config))
    runs = report["runs"]
    assert [r["name"] for r in runs] == [c.name for c in cells] and len(runs) == 26
    with open(os.path.join(workdir, "report.json"), encoding="utf-8") as f:
        assert len(json.load(f)["runs"]) == len(runs)
    assert {r["section"] for r in runs} == set(init_study.SECTIONS)
    for r in runs:
        for field in FIELDS:
            assert field in r, (r["name"], field)
        assert sorted(int(t) for t in r["val_loss"]) == [0, 6, 12]
        assert r["initial_val_loss"] == pytest.approx(math.log(260), abs=1.5)  # about uniform over bytes at init
        assert sorted(r["grad_norm_per_layer"]) == ["0", "6"]
        assert len(r["grad_norm_per_layer"]["0"]) == r["depth"]
        assert 2.5 < r["unigram_val_loss"] < 4.5 and r["at_unigram"] == (
            not r["diverged"] and r["final_val_loss"] > r["unigram_val_loss"] - init_study.UNIGRAM_MARGIN)
        if not r["diverged"]:
            assert r["final_val_loss"] < r["initial_val_loss"]
    # every residual wiring trained and the table shows each cell
    table = open(os.path.join(workdir, "table.md"), encoding="utf-8").read()
    for res in init_study.RESIDUALS:
        assert f"| {res} |" in table
    assert os.path.getsize(os.path.join(workdir, "loss_curves.png")) > 10_000


def test_alpha_trajectories_and_initial_gradients(tiny_run):
    _, _, report = tiny_run
    by = {r["name"]: r for r in report["runs"]}
    ramp = by["alpha_L1_w0_lr0.002"]
    assert ramp["alpha"] == {"0": 0.0, "6": 1.0, "12": 1.0}  # min(1, t / 6), never trained
    assert ramp["grad_norm_per_layer"]["0"] == [0.0]  # alpha_0 = 0: no gradient reaches the blocks
    rz = by["rezero_L1_w0_lr0.002"]
    assert rz["alpha"]["0"] == [0.0]  # ReZero: trainable, 0 at init ...
    assert all(abs(a) > 1e-3 for a in rz["alpha"]["12"])  # ... and it moved
    assert by["deepnorm_L1_w0_lr0.002"]["alpha"]["12"] == pytest.approx(deepnorm_alpha(1))
    assert by["pre_L1_w0_lr0.002"]["alpha"]["0"] is None
    assert min(by["pre_L1_w0_lr0.002"]["grad_norm_per_layer"]["0"]) > 0


def test_attention_entropy_at_init_tracks_the_scale(tiny_run):
    _, _, report = tiny_run
    att = {r["attn_scale"]: r for r in report["runs"] if r["section"] == "attention"}
    # Var(q.k) = d without a scale: the rows are much sharper than with 1/sqrt(d) (post 8620's trigger)
    assert att["none"]["entropy_init"] < 0.6 * att["sqrt"]["entropy_init"]
    assert att["sqrt"]["entropy_init"] < att["sqrt"]["entropy_uniform"] == pytest.approx(
        np.mean(np.log(np.arange(1, 17))))


def test_rerun_resumes_cell_by_cell(tiny_run, capsys):
    config, workdir, report = tiny_run
    victim = report["runs"][3]["name"]
    cell = next(c for c in init_study.grid(config, init_study.validate(config)) if c.name == victim)
    os.remove(init_study.cell_path(os.path.join(workdir, "cells"), cell, config))
    again = init_study.run(config, workdir)
    out = capsys.readouterr().out
    assert out.count("final val") == 1 and victim in out  # only the deleted cell ran again
    old = {r["name"]: r for r in report["runs"]}
    new = {r["name"]: r for r in again["runs"]}
    assert old.keys() == new.keys()
    np.testing.assert_allclose(new[victim]["final_val_loss"], old[victim]["final_val_loss"], rtol=1e-5)


def test_a_cell_in_progress_resumes_from_its_checkpoint(tmp_path, capsys):
    """A cell killed between checkpoints goes on from its last one (not from step 0) and ends with the record of a
    cell never interrupted."""
    from kexue_jax import checkpoint as ckpt_lib
    from kexue_jax import training

    config = get_config("tiny")
    cell = next(c for c in init_study.grid(config, init_study.validate(config)) if c.name == "rezero_L1_w0_lr0.002")
    corpus = training.load_corpus(config.data)
    val = [{k: jnp.asarray(v) for k, v in b.items()}
           for b in training.eval_host_batches(corpus, config.data, config.train.eval_batches, int(config.seed))]
    whole = init_study.run_cell(cell, config, corpus, val, str(tmp_path / "whole"))
    init_study.run_cell(cell, config, corpus, val, str(tmp_path / "cut"), stop_after=8)  # killed after step 8
    assert ckpt_lib.Checkpointer(tmp_path / "cut" / "checkpoints").all_steps() == [6]
    capsys.readouterr()
    again = init_study.run_cell(cell, config, corpus, val, str(tmp_path / "cut"))
    assert "resumed from step 6" in capsys.readouterr().out
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in whole.items() if k != "seconds"}
    assert sorted(again["grad_norm_per_layer"]) == ["0", "6"] and len(again["alpha"]["12"]) == 1  # ReZero's alpha


def test_rerun_with_other_settings_trains_its_own_cells(tiny_run, tmp_path, capsys):
    """A rerun in the same workdir at another batch size and width reused 24 of 26 cells trained at the old
    settings (only names containing d_model changed); each cell is now keyed by every setting that trains it."""
    _, workdir, _ = tiny_run
    shutil.copytree(workdir, tmp_path, dirs_exist_ok=True)
    config = get_config("tiny")
    # 1 cell (pre_L1_w0_lr0.001), trained by the fixture's run
    config.study.sections, config.study.param_lrs, config.study.parameterizations = ("param",), (1e-3,), ("standard",)
    init_study.run(config, str(tmp_path))
    assert capsys.readouterr().out.count("final val") == 0
    config.data.batch_size, config.model.d_model = 8, 48
    again = init_study.run(config, str(tmp_path))
    assert capsys.readouterr().out.count("final val") == 1  # trained anew, not reused
    assert {(r["d_model"], r["name"]) for r in again["runs"]} == {(48, c.name) for c in
                                                                  init_study.grid(config, init_study.validate(config))}
    assert len(again["runs"]) == 1 and len(os.listdir(tmp_path / "cells")) == 26 + 1  # the old cells are kept, unmixed
    config.train.plot, config.study.report_only = False, True  # settings that do not train: same cells
    assert [r["name"] for r in init_study.run(config, str(tmp_path))["runs"]] == [r["name"] for r in again["runs"]]


def test_lr_schedule_and_truncation_helpers():
    from kexue_jax import training

    config = get_config("tiny")
    cells = init_study.grid(config, init_study.validate(config))
    cell = next(c for c in cells if c.warmup == 3 and c.lr == 2e-3)
    lr = training.make_schedule(init_study.cell_optim(cell, config), config.train.steps)
    # make_schedule's warmup t / w from 0 (the study's own copy ramped (t + 1) / w), then cosine to lr x 0.1
    np.testing.assert_allclose([float(lr(t)) for t in (0, 1, 3, 12)], [0.0, 2e-3 / 3, 2e-3, 2e-4], rtol=1e-6)
    params = {"a": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}, "embed": {"token": jnp.ones((3, 2))}}
    out = init_study.uncorrect_truncation(params)
    assert float(out["a"]["kernel"][0, 0]) == pytest.approx(math.sqrt(init_lib.truncated_normal_variance()))
    assert float(out["a"]["kernel"][0, 0]) == pytest.approx(1 / 1.1368472, rel=1e-6)
    assert float(out["a"]["bias"][0]) == 1.0 and float(out["embed"]["token"][0, 0]) == 1.0


def test_cells_of_one_model_share_their_optimizer_whatever_their_lr_and_warmup():
    """cell_optimizer: one tx for every cell (so one compiled step per model), the cell's lr and warmup in its state;
    its updates equal those of make_optimizer(cell_optim(cell)), the cell's own schedule compiled in."""
    from kexue_jax import training

    config = get_config("tiny")
    cells = [c for c in init_study.grid(config, init_study.validate(config)) if c.model.residual == "pre"]
    picked = [next(c for c in cells if (c.lr, c.warmup) == lw) for lw in ((2e-3, 0), (2e-3, 3), (1e-2, 0))]
    params = {"dense": {"kernel": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3), "bias": jnp.ones(3)}}
    txs = []
    for cell in picked:
        tx, state = init_study.cell_optimizer(cell, config, params)
        txs.append(tx)
        hyper = state.hyperparams
        assert float(hyper["lr"]) == np.float32(cell.lr) and int(hyper["warmup_steps"]) == cell.warmup
        optim = init_study.cell_optim(cell, config)
        own, lr = training.make_optimizer(optim, config.train.steps), training.make_schedule(optim, config.train.steps)
        ours = [float(init_study.cell_schedule(t, cell.lr, cell.warmup, 12, 0.1)) for t in range(15)]
        np.testing.assert_allclose(ours, [float(lr(t)) for t in range(15)], rtol=1e-6)
        own_state, p, q = own.init(params), params, params
        for t in range(5):  # the same steps, warmup and decay included
            grads = jax.tree_util.tree_map(lambda x: jnp.cos(x * (t + 1)), p)
            u, state = tx.update(grads, state, p)
            v, own_state = own.update(grads, own_state, q)
            p, q = optax.apply_updates(p, u), optax.apply_updates(q, v)
            assert float(optax.tree.norm(u)) > 0 or (cell.warmup and t == 0)  # lr_0 = 0 under a warmup
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9), p, q)
    assert txs[0] is txs[1] is txs[2]


def test_study_config_errors_name_the_field(tmp_path):
    config = get_config("tiny")
    config.study.residuals = ("pre", "sandwich")
    with pytest.raises(ValueError, match=r"config.study.residuals must be a subset of"):
        init_study.run(config, str(tmp_path))
    config = get_config("tiny")
    config.model.init_std = 0.02
    with pytest.raises(ValueError, match="config.model.init_std must be None"):
        init_study.validate(config)
    with pytest.raises(ValueError, match="variant must be one of"):
        get_config("huge")
    assert not os.listdir(tmp_path)  # nothing written before the error


def _seed_record(name, loss, *, diverged=False, at_unigram=False):
    return {"name": name, "final_val_loss": loss, "diverged": diverged, "at_unigram": at_unigram}


def test_seed_summary_reports_mean_std_or_how_many_collapsed(tmp_path):
    """benchmarks/init_study_seeds.py: mean ± sample std when no seed collapsed, else "k of n collapsed"."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import init_study_seeds as iss  # noqa: PLC0415

    s = iss.cell_summary([_seed_record("a", 2.0), _seed_record("a", 2.2), _seed_record("a", 2.4)])
    assert s["collapsed"] == 0 and s["n"] == 3 and s["text"] == "2.200 ± 0.200"
    np.testing.assert_allclose(s["final_val_loss"]["std"], np.std([2.0, 2.2, 2.4], ddof=1), rtol=1e-12)
    s = iss.cell_summary([_seed_record("b", 3.29, at_unigram=True), _seed_record("b", 2.5),
                          _seed_record("b", float("nan"), diverged=True)])
    assert (s["collapsed"], s["text"]) == (2, "2 of 3 collapsed (others 2.500)")
    assert [p["collapsed"] for p in s["per_seed"]] == [True, False, True]
    # collect: only cells every seed ran, seed 0 from the grid's report, the others from the groups' reports
    (tmp_path / "deep_s1").mkdir()
    json.dump({"runs": [_seed_record("x", 2.0)]}, open(tmp_path / "deep_s1" / "report.json", "w"))
    json.dump({"runs": [_seed_record("x", 2.1), _seed_record("y", 2.3)]}, open(tmp_path / "seed0.json", "w"))
    got = iss.collect(str(tmp_path / "seed0.json"), str(tmp_path), [1])
    assert list(got) == ["x"] and [r["seed"] for r in got["x"]] == [0, 1]
    cmd = iss.command("deep", 2, "w")
    assert "--config.seed=2" in cmd and "--config.study.depths=(48,)" in cmd
