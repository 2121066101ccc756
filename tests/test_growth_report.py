"""Issue 22: the main job's growth figures, the released-checkpoint scenario and its cached small phase,
warmup-stable-decay schedules and the WSD protocol."""
import json
import math
import shutil

import ml_collections
import numpy as np
import pytest

from configs import upscale as upscale_config
from kexue_jax import config as config_lib
from kexue_jax import experiments, training
from kexue_jax.experiments import upscale as ux

# ------------------------------------------------------------------------------------------------
# The growth figures on hand-built curves.

# B: 10 FLOPs a step, final loss (the target) 1.0 at 400 FLOPs.
SCRATCH = [{"step": s, "flops": 10.0 * s, "val_loss": v} for s, v in ((0, 5.0), (10, 3.0), (20, 2.0), (30, 1.5),
                                                                      (40, 1.0))]


def _upscaled(big_losses, small_loss=2.5):
    """A: a small phase of 10 steps at 2.5 FLOPs a step (25 FLOPs), then the big model at 10 a step."""
    return ([{"step": 0, "flops": 0.0, "val_loss": 5.0}, {"step": 10, "flops": 25.0, "val_loss": small_loss}]
            + [{"step": s, "flops": 25.0 + 10.0 * (s - 10), "val_loss": v} for s, v in big_losses])


def test_growth_figures_of_hand_built_curves():
    a = _upscaled(((20, 2.8), (30, 2.2), (40, 1.4), (50, 0.9)))
    got = ux.growth_figures(a, SCRATCH, widen_step=10)
    # L_w = 2.5: B passes it halfway between step 10 (3.0) and step 20 (2.0)
    assert got["equivalent_step"] == pytest.approx(15.0)
    assert got["head_start_flops"] == pytest.approx(150.0)
    # A reaches the target 1.0 at 325 + 100 x (1.4 - 1.0) / (1.4 - 0.9) = 405 FLOPs; B from 2.5 to 1.0 spends
    # 400 - 150 = 250, A's big phase 405 - 25 = 380
    assert got["after_growth_efficiency"] == pytest.approx(250.0 / 380.0)
    assert got["ceiling"] == pytest.approx(400.0 / (25.0 + 400.0 - 150.0))
    # the loss rises to 2.8 at step 20 and is back at 2.5 at step 20 + 10 x 0.3 / 0.6 = 25: 15 steps after widening
    assert got["forgetting"]["rise"] == pytest.approx(0.3)
    assert got["forgetting"]["recovery_steps"] == pytest.approx(15.0)
    assert ux.family_saving(a, SCRATCH, widen_step=10) == pytest.approx((25.0 + 400.0) / 405.0)
    assert ux.compute_saving(a, SCRATCH, small_flops=25.0)["compute_saving"] == pytest.approx(400.0 / 405.0)


def test_growth_figures_edge_cases():
    # a rise that never comes back, and A never reaches the target
    stuck = _upscaled(((20, 2.9), (30, 2.7)))
    got = ux.growth_figures(stuck, SCRATCH, widen_step=10)
    assert got["forgetting"] == {"rise": pytest.approx(0.4), "recovery_steps": None}
    assert got["after_growth_efficiency"] is None and got["ceiling"] == pytest.approx(400.0 / 275.0)
    # no rise at all
    steady = _upscaled(((20, 2.0), (30, 1.0)))
    assert ux.forgetting(steady, widen_step=10) == {"rise": 0.0, "recovery_steps": 0}
    assert ux.after_growth_efficiency(steady, SCRATCH, widen_step=10) == pytest.approx(250.0 / 200.0)
    # A is below the target when widened: B never gets there, nothing to compare
    ahead = _upscaled(((20, 0.8),), small_loss=0.9)
    got = ux.growth_figures(ahead, SCRATCH, widen_step=10)
    assert got["equivalent_step"] is None and got["head_start_flops"] is None
    assert got["after_growth_efficiency"] is None and got["ceiling"] is None


def test_growth_figures_aggregate_and_print():
    a = _upscaled(((20, 2.8), (30, 2.2), (40, 1.4), (50, 0.9)))
    per_seed = [{"seed": s, **ux.growth_figures(a, SCRATCH, widen_step=10)} for s in (0, 1)]
    per_seed[1]["forgetting"] = {"rise": 0.5, "recovery_steps": None}
    agg = ux.aggregate(per_seed)
    assert agg["ceiling"]["mean"] == pytest.approx(400.0 / 275.0) and agg["ceiling"]["std"] == 0.0
    assert agg["forgetting"]["rise"]["mean"] == pytest.approx(0.4)
    assert agg["forgetting"]["recovery_steps"] == {"mean": 15.0, "std": None, "n": 1,
                                                   "values": [per_seed[0]["forgetting"]["recovery_steps"], None]}
    table = ux.format_table(agg)
    assert "after-growth efficiency (B / A FLOPs to target)" in table and "ceiling: saving if A only" in table
    assert "forgetting: steps until back at that loss" in table


# ------------------------------------------------------------------------------------------------
# Warmup-stable-decay.

def _optim(**kw):
    return ml_collections.ConfigDict({**dict(lr=1e-2, warmup_steps=10, schedule="wsd", min_lr_ratio=0.1,
                                             decay_fraction=0.2, decay_shape=None), **kw})


@pytest.mark.parametrize("shape", [None, "1-sqrt"])
def test_wsd_schedule_follows_its_formula(shape):
    optim = _optim(decay_shape=shape)
    sched = training.make_schedule(optim, 100)   # D = 20: stable until step 80

    def want(t):
        x = np.clip((t - 80) / 20, 0.0, 1.0)
        drop = np.sqrt(x) if shape == "1-sqrt" else x
        return 1e-2 * min(1.0, t / 10) * (1.0 - 0.9 * drop)

    for t in (0, 5, 10, 50, 80, 85, 90, 95, 99, 100, 130):
        assert float(sched(t)) == pytest.approx(want(t), rel=1e-6, abs=1e-12), t
    assert float(sched(90)) == pytest.approx(1e-2 * (0.55 if shape is None else 1 - 0.9 * np.sqrt(0.5)))


def test_cooling_down_a_stable_run_is_the_shorter_wsd_run():
    optim = _optim()
    stable = training.make_schedule(optim, 100)
    for budget in (30, 50, 100):
        start = budget - training.wsd_decay_steps(optim, budget)
        cooled = training.cooldown_schedule(stable, optim, start, budget)
        direct = training.make_schedule(optim, budget)
        assert [float(cooled(t)) for t in range(0, 120, 3)] == pytest.approx([float(direct(t))
                                                                              for t in range(0, 120, 3)])
    assert training.wsd_decay_steps(_optim(decay_fraction=None), 100) == 20  # None: 0.2


@pytest.mark.parametrize("field,value,message", [
    ("decay_fraction", 0.0, r"config.optim.decay_fraction must be None \(0.2\) or a number in \(0, 1\]"),
    ("decay_fraction", 1.5, r"config.optim.decay_fraction must be"),
    ("decay_shape", "cosine", r"config.optim.decay_shape must be None \(linear\) or one of \('linear', '1-sqrt'\)"),
    ("schedule", "step", r"config.optim.schedule must be one of \('cosine', 'linear', 'constant', 'wsd'\)"),
])
def test_wsd_config_errors(field, value, message):
    c = upscale_config.get_config("tiny")
    c.optim.schedule = "wsd"
    config_lib.validate(c)
    c.optim[field] = value
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.validate(c)


def test_a_job_stored_before_the_new_fields_resumes():
    c = upscale_config.get_config("default")
    stored = config_lib.to_dict(c)
    for field in ("scenario", "small_lr", "small_steps", "small_cache", "big_lr", "big_warmup", "big_schedule",
                  "protocol", "wsd_budgets"):
        del stored["upscale"][field]
    del stored["optim"]["decay_fraction"], stored["optim"]["decay_shape"]
    assert config_lib.config_changes(stored, c) == []   # None, or the value that does what the code did before
    c.upscale.scenario = "released"
    assert config_lib.config_changes(stored, c) == ["upscale.scenario: '(absent)' -> 'released'"]
    ident = config_lib.identity(c)
    assert ident["upscale.scenario"] == "released" and "upscale.protocol" not in ident and "train.steps" not in ident


@pytest.mark.parametrize("warmup,shape", [(None, None), (0, None), (4, "wsd"), (0, "linear")])
def test_big_phase_warmup_and_shape_against_their_formula(warmup, shape):
    """The released big phase's rate at global step t = s + tau (s = 30, the small phase's end): peak big_lr,
    a linear warmup over W = big_warmup (optim.warmup_steps = 5 when None; none at 0), then the decay of
    big_schedule (optim.schedule "cosine" when None) over big_steps = 20 to min_lr_ratio x peak."""
    c = upscale_config.get_config("tiny")
    c.upscale.update(scenario="released", small_steps=30, schedule="restart", big_steps=20, big_lr=1e-3,
                     big_warmup=warmup, big_schedule=shape)
    c.optim.update(min_lr_ratio=0.1, decay_fraction=0.25)
    ux.check_scenario(c)
    sched = ux.big_phase_schedule(c)
    w, peak, total, r = (5 if warmup is None else warmup), 1e-3, 20, 0.1

    def expected(tau):
        if tau < w:
            return peak * tau / w
        x = (tau - w) / (total - w)
        if shape == "wsd":   # constant, then a linear decay over the last 0.25 x 20 = 5 steps
            return peak * (1 - (1 - r) * min(max((tau - 15) / 5, 0.0), 1.0))
        if shape == "linear":
            return peak * (1 - (1 - r) * min(x, 1.0))
        return peak * (r + (1 - r) * 0.5 * (1 + math.cos(math.pi * min(x, 1.0))))
    got = [float(sched(30 + tau)) for tau in range(0, 24)]
    np.testing.assert_allclose(got, [expected(tau) for tau in range(0, 24)], rtol=1e-5, atol=1e-12)


def test_wsd_budgets_in_steps():
    assert ux.wsd_budget_steps((1.0, 0.5, 10), 40) == [10, 20, 40]
    assert ux.wsd_budget_steps(None, 100) == [25, 50, 75, 100]
    assert ux.wsd_decay_starts(_optim(decay_fraction=0.25), [20, 40]) == [15, 30]
    for bad in ((0.5, 20), (0,), (1.5,), (41,), (), (True,)):
        with pytest.raises(ValueError, match="config.upscale.wsd_budgets must be None or distinct budgets"):
            ux.wsd_budget_steps(bad, 40)


# ------------------------------------------------------------------------------------------------
# Fields of the new scenario and protocol, refused before anything runs.

@pytest.mark.parametrize("fields,message", [
    ({"scenario": "pretrained"}, r"config.upscale.scenario must be one of \('grow_during', 'released'\)"),
    ({"small_lr": 1e-3}, "config.upscale.small_lr is used with upscale.scenario='released' only"),
    ({"small_cache": "/tmp/x"}, "config.upscale.small_cache is used with upscale.scenario='released' only"),
    ({"scenario": "released", "schedule": "continue"},
     r"config.upscale.schedule must be one of \('restart', 'rewind'\) with upscale.scenario='released'"),
    ({"scenario": "released", "small_steps": 0}, "config.upscale.small_steps must be None"),
    ({"scenario": "released", "small_lr": -1.0}, r"config.upscale.small_lr must be None \(optim.lr\) or a number"),
    ({"scenario": "released", "small_steps": 3}, "config.upscale.small_steps=3 must be >= optim.warmup_steps=5"),
    ({"big_lr": 0.0}, r"config.upscale.big_lr must be None \(optim.lr x lr_multiplier\) or a number > 0"),
    ({"big_warmup": -1}, r"config.upscale.big_warmup must be None \(optim.warmup_steps\) or an integer >= 0"),
    ({"big_schedule": "step"}, r"config.upscale.big_schedule must be None \(optim.schedule\) or one of"),
    ({"big_warmup": 0, "schedule": "continue"}, "shape a schedule that starts afresh after widening"),
    ({"big_warmup": 20, "schedule": "restart", "big_steps": 10}, "big_warmup=20 must be <= the big phase's planned"),
    ({"protocol": "budget"}, r"config.upscale.protocol must be one of \('to_target', 'wsd'\)"),
    ({"wsd_budgets": (0.5, 1.0)}, "config.upscale.wsd_budgets is used with upscale.protocol='wsd' only"),
    ({"protocol": "wsd"}, "config.optim.schedule must be 'wsd' with upscale.protocol='wsd', got 'cosine'"),
])
def test_scenario_and_protocol_config_errors(tmp_path, fields, message):
    c = upscale_config.get_config("tiny")
    c.upscale.update(fields)
    with pytest.raises(ValueError, match=message):
        experiments.run(c, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()


def test_wsd_protocol_config_errors(tmp_path):
    c = upscale_config.get_config("tiny")   # 40 steps, widen at 25
    c.optim.schedule = "wsd"
    c.upscale.update(protocol="wsd", wsd_budgets=(0.5, 1.0))
    with pytest.raises(ValueError, match=r"config.upscale.wsd_budgets: the first budget \(20 steps\) cools down from "
                                         r"step 16, not after upscale.widen_at=25"):
        experiments.run(c, str(tmp_path / "w"))
    c.upscale.update(wsd_budgets=(0.8, 1.0), scenario="released", schedule="restart")
    with pytest.raises(ValueError, match="config.upscale.scenario must be 'grow_during' with upscale.protocol='wsd'"):
        experiments.run(c, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()


# ------------------------------------------------------------------------------------------------
# The released scenario end to end (tiny), and its cached small phase.

NEW_KEYS = ("equivalent_step", "head_start_flops", "after_growth_efficiency", "ceiling", "forgetting",
            "family_saving", "compute_saving", "compute_saving_given_small", "small_phase")
REPORT_KEYS = ("max_abs_logit_diff", "loss_before_widen", "loss_after_widen", "final_loss_upscaled",
               "final_loss_scratch", "flops_to_target_upscaled", "flops_to_target_scratch", "saving_curve",
               "loss_gap_at_equal_flops", "seeds", "cap_hit", "copy_cosine", "unigram_entropy", "curves")


def _released(cache, **fields):
    """:tiny with one layer, the released small model trained 8 steps, B 8 steps."""
    c = upscale_config.get_config("tiny")
    c.model.num_layers = 1
    c.optim.warmup_steps = 2
    c.train.update(steps=8, eval_every=4, log_every=4, checkpoint_every=8)
    c.upscale.update(scenario="released", small_steps=8, small_lr=6e-3, schedule="restart", big_steps=8,
                     noise_db=-10.0, small_cache=str(cache))
    c.upscale.update(fields)
    return c


@pytest.fixture(scope="module")
def released_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("released")
    c = _released(root / "cache")
    report = experiments.run(c, str(root / "first"))
    return root, c, report


def test_released_tiny_run_writes_every_key(released_run, capsys):
    root, c, report = released_run
    saved = json.loads((root / "first" / "report.json").read_text())
    for key in REPORT_KEYS + NEW_KEYS:
        assert key in saved, key
    # the small model trained its own 8 steps (its own schedule) and was widened at their end
    assert saved["settings"]["scenario"] == "released" and saved["small_phase"]["steps"] == 8
    a = saved["curves"]["upscaled (A)"]
    assert [h["step"] for h in a][:3] == [0, 4, 8] and a[2]["flops"] == pytest.approx(saved["widen_flops"])
    assert saved["loss_after_widen"] == pytest.approx(saved["loss_before_widen"], abs=1e-5)
    assert (root / "first" / "compute.png").read_bytes()[:4] == b"\x89PNG"
    assert saved["small_phase"]["dir"] == ux.small_phase_dir(c, str(root / "first"))
    assert saved["small_phase"]["dir"].startswith(str(root / "cache"))
    if saved["flops_to_target_upscaled"] is not None:
        fa, fb, small = saved["flops_to_target_upscaled"], saved["flops_to_target_scratch"], saved["widen_flops"]
        assert saved["compute_saving_given_small"] == pytest.approx(fb / (fa - small))
        assert saved["family_saving"] == pytest.approx((small + fb) / fa)


def test_released_small_phase_is_reused_for_big_phase_fields_and_refused_when_copied(released_run, capsys):
    root, first, _ = released_run
    small_dir = ux.small_phase_dir(first, str(root / "first"))
    metrics = (root / "cache" / small_dir.rsplit("/", 1)[-1] / "metrics.jsonl")
    before = metrics.read_text()
    # only big-phase fields differ (and arm B is read from the first job): the cached small phase is resumed
    second = _released(root / "cache", big_lr=1e-3, big_steps=6, baseline=str(root / "first"))
    second.train.plot = False
    assert ux.small_phase_dir(second, str(root / "second")) == small_dir
    capsys.readouterr()
    report = experiments.run(second, str(root / "second"))
    out = capsys.readouterr().out
    assert report["small_phase"]["resumed_from"] == 8 and "[A small (released)] resumed from step 8" in out
    assert "[A small (released)] step" not in out and metrics.read_text() == before  # nothing trained again
    assert not (root / "second" / "b_scratch").exists()
    # a small-phase field differs: another cache entry; a copy of this one under that name is refused, by field
    third = _released(root / "cache", small_lr=1.2e-2)
    other = ux.small_phase_dir(third, str(root / "third"))
    assert other != small_dir
    shutil.copytree(small_dir, other)
    with pytest.raises(config_lib.ConfigError, match=r"config.upscale.small_cache: .* holds a small phase of another "
                                                     r"config, not reused \(upscale.small_lr: 0.006 -> 0.012\)"):
        experiments.run(third, str(root / "third"))
    assert not (root / "third").exists()


def test_small_phase_config_keeps_only_the_small_phase():
    c = _released("/tmp/unused")
    key = ux.small_phase_dir(c, "w")
    for field, value in (("big_lr", 1e-3), ("big_steps", 3), ("lr_multiplier", 1.0), ("noise_db", -20.0),
                         ("factor", 4), ("cap", 3.0)):
        other = _released("/tmp/unused", **{field: value})
        assert ux.small_phase_dir(other, "w") == key, field
    lr_only = _released("/tmp/unused", small_lr=None)
    lr_only.optim.lr = 6e-3   # small_lr None = optim.lr: the same small phase
    assert ux.small_phase_dir(lr_only, "w") == key
    for section, field, value in (("upscale", "small_steps", 9), ("upscale", "small_lr", 1e-3), ("seed", None, 1),
                                  ("model", "d_model", 64), ("optim", "weight_decay", 0.0), ("data", "seq_len", 32)):
        other = _released("/tmp/unused")
        if field is None:
            other[section] = value
        else:
            other[section][field] = value
        assert ux.small_phase_dir(other, "w") != key, (section, field)


# ------------------------------------------------------------------------------------------------
# The WSD protocol end to end (tiny).

@pytest.mark.slow
def test_wsd_protocol_tiny_cools_down_both_arms_at_each_budget(tmp_path, capsys):
    """9 phases (each compiles its step): about 40 s on an idle 2-core CPU, hence slow."""
    c = upscale_config.get_config("tiny")
    c.optim.update(schedule="wsd", decay_fraction=0.25, warmup_steps=1)
    c.train.update(steps=8, eval_every=2, log_every=2, checkpoint_every=8, plot=False)
    c.upscale.update(protocol="wsd", wsd_budgets=(0.5, 1.0), widen_at=2, noise_db=-10.0)
    report = experiments.run(c, str(tmp_path))
    assert report["wsd_budgets"] == [4, 8] and report["wsd_decay_starts"] == [3, 6]
    for name in ("upscaled (A)", "scratch (B)"):
        pts = report["cooled"][name]
        assert [p["budget"] for p in pts] == [4, 8] and [p["step"] for p in pts] == [4, 8]
        # every cooled point ends its own decay; the stable run stops at the last decay start
        assert report["curves"][name][-1]["step"] == 6
    b = report["cooled"]["scratch (B)"]
    assert report["final_loss_scratch"] == b[-1]["val_loss"] and report["target_loss"] == b[-1]["val_loss"]
    assert b[0]["flops"] == pytest.approx(b[1]["flops"] / 2)
    assert [p["budget"] for p in report["wsd_points"]] == [4, 8]
    assert (tmp_path / "b_stable_cooled_to_4").is_dir() and (tmp_path / "a_big_stable_cooled_to_8").is_dir()
    assert "cooled down at 8 steps: loss A / B" in ux.format_table(report)
    # a rerun resumes every phase (stable runs and cooldowns) and trains nothing
    capsys.readouterr()
    again = experiments.run(c, str(tmp_path))
    out = capsys.readouterr().out
    assert "cooled to 8] resumed from step 8" in out and "] step " not in out
    assert again["cooled"] == report["cooled"]


def test_released_variant_restarts_at_b_rate_without_warmup():
    """``configs/upscale.py:released``: the default's models; the small model's own 1500-step run at 6e-3, widened
    at its end; the big phase at 3e-3 from its first step (no warmup), cosine to 10% over 750 steps."""
    c = upscale_config.get_config("released")
    d = upscale_config.get_config("default")
    assert config_lib.to_dict(c.model) == config_lib.to_dict(d.model) and c.train.steps == d.train.steps == 1500
    ux.check_scenario(c)
    assert ux.widen_step(c) == 1500 and ux.small_lr(c) == 6e-3 and ux.big_phase_steps(c) == 750
    sched = ux.big_phase_schedule(c)
    np.testing.assert_allclose([float(sched(1500 + t)) for t in (0, 375, 750, 900)],
                               [3e-3, 3e-3 * (0.1 + 0.9 * 0.5), 3e-4, 3e-4], rtol=1e-5)
