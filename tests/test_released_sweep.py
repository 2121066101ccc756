"""benchmarks/released_sweep.py (issue 22): the settings it runs, their names, and how it picks and merges them
(pure functions, no training; the runs themselves are the job's, tested in test_growth_report.py)."""
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rs():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import released_sweep  # noqa: PLC0415
    return released_sweep


def test_setting_overrides_are_the_jobs_released_fields(rs):
    ov = rs.setting_overrides({**rs.CENTRE, "lr_x": 1.0, "warmup": "x3", "shape": "wsd"}, 6e-3, 750, 50)
    assert ov == {"upscale.scenario": "released", "upscale.schedule": "restart", "upscale.big_steps": 375,
                  "upscale.small_steps": 750, "upscale.big_lr": 6e-3, "upscale.big_warmup": 150,
                  "upscale.big_schedule": "wsd", "upscale.noise_db": -10.0, "upscale.symmetry": "zero_sum"}
    assert rs.setting_overrides({**rs.CENTRE, "warmup": 0, "steps_frac": 1 / 3, "small_x": 2.0}, 6e-3, 750,
                                50)["upscale.big_warmup"] == 0
    assert rs.setting_overrides({**rs.CENTRE, "steps_frac": 1 / 3, "small_x": 2.0}, 6e-3, 750, 50)[
        "upscale.small_steps"] == 1500


@pytest.mark.parametrize("levels", [{}, {"lr_x": 1.0}, {"lr_x": 0.25, "warmup": 0}, {"noise_db": None},
                                    {"steps_frac": 1 / 3, "shape": "wsd"}, {"warmup": "x3", "symmetry": "fan_out"}])
def test_label_names_the_levels_off_the_centre_and_parses_back(rs, levels):
    setting = {**rs.CENTRE, **levels}
    text = rs.label(setting)
    assert text == ("centre" if not levels else text) and (text != "centre") == bool(levels)
    parsed = {**rs.CENTRE, **rs.parse_label(text)}
    assert parsed.keys() == setting.keys()
    for k, v in setting.items():
        assert parsed[k] == pytest.approx(v, rel=1e-3) if isinstance(v, float) else parsed[k] == v


def test_combined_takes_the_best_level_of_each_factor_and_the_centre_on_ties(rs):
    results = [{"label": "centre", "seed": 0, "compute_saving_given_small": 1.5},
               {"label": rs.label({**rs.CENTRE, "lr_x": 1.0}), "seed": 0, "compute_saving_given_small": 2.0},
               {"label": rs.label({**rs.CENTRE, "lr_x": 0.25}), "seed": 0, "compute_saving_given_small": None},
               {"label": rs.label({**rs.CENTRE, "warmup": 0}), "seed": 0, "compute_saving_given_small": 1.5},
               {"label": rs.label({**rs.CENTRE, "lr_x": 2.0}), "seed": 1, "compute_saving_given_small": 9.0}]
    assert rs.combined(results) == {**rs.CENTRE, "lr_x": 1.0}


def test_merged_rows_are_renamed_around_this_sweeps_centre(rs, tmp_path):
    rows = [{"name": "A/centre/s0", "overrides": {"seed": 0}}, {"name": "A/warmup=0/s1", "overrides": {"seed": 1}},
            {"name": "B/released/lr0.006/s0", "overrides": {"seed": 0}}]
    (tmp_path / "sweep.json").write_text(json.dumps({"rows": rows}))
    got = rs.merged_rows(str(tmp_path), {"lr_x": 1.0})
    assert [r["name"] for r in got] == ["A/lr_x=1/s0", "A/lr_x=1,warmup=0/s1"]
    assert got[1]["setting"] == {**rs.CENTRE, "lr_x": 1.0, "warmup": 0.0}


def test_univae_curve_lines_are_evaluate_runs_heldout_lines_and_training_lines():
    """benchmarks/univae_curve.py compares held-out lines (the same first n that report.json decodes) with n
    training lines: disjoint sets, n each."""
    import numpy as np  # noqa: PLC0415
    from configs import univae as univae_config  # noqa: PLC0415
    from kexue_jax.experiments import univae  # noqa: PLC0415
    from kexue_jax.streams import stream_seed  # noqa: PLC0415
    sys.path.insert(0, str(REPO / "benchmarks"))
    import univae_curve  # noqa: PLC0415
    c = univae_config.get_config("tiny")
    held, train = univae_curve.heldout_and_train_lines(c, 40)
    tr, va = univae.load_lines(c)
    order = np.random.default_rng(stream_seed(int(c.seed), "evaluation_lines")).permutation(len(va))  # evaluate_run's
    assert held == [va[i] for i in order[:40]] and len(train) == 40 and set(train) <= set(tr)
    assert not set(held) & set(train)


def test_a_second_baseline_from_another_sweep(rs, tmp_path):
    """--other-b: A's savings against another sweep's B (its best seed-0 rate, the same seed), by hand."""
    def curve(flops, losses):
        return [{"step": i, "flops": float(f), "val_loss": float(v)} for i, (f, v) in enumerate(zip(flops, losses))]

    b_good, b_bad = curve([0, 1, 2, 3, 4], [5, 4, 3, 2.5, 2.0]), curve([0, 1, 2, 3, 4], [5, 4.5, 4, 3, 2.6])
    rows = [{"name": f"B/released/lr{lr}/s{seed}", "overrides": {"seed": seed}, "final_loss_scratch": c[-1]["val_loss"],
             "curves": {"scratch (B)": c}} for lr, seed, c in [("0.006", 0, b_good), ("0.012", 0, b_bad),
                                                                ("0.006", 1, b_good), ("0.012", 1, b_bad)]]
    (tmp_path / "other").mkdir()
    json.dump({"rows": rows}, open(tmp_path / "other" / "sweep.json", "w"))
    curves = rs.other_b_curves(str(tmp_path / "other"))
    assert sorted(curves) == [0, 1] and curves[1] == b_good  # the best rate at seed 0 (2.0 < 2.6), every seed
    a_curve = curve([0, 1, 2, 3], [5, 3, 2.5, 2.0])
    a_row = {"name": "A/centre/s1", "widen_flops": 1.0, "curves": {"upscaled (A)": a_curve}}
    results = [{"name": "A/centre/s1", "seed": 1}, {"name": "A/centre/s2", "seed": 2}]
    rs.against_other_b(results, [a_row, {"name": "A/centre/s2"}], curves)
    # B reaches 2.0 at 4 FLOPs; A at 3, of which 1 is the small phase: given small 4 / 2, counted 4 / 3
    assert results[0]["vs_other_b"] == pytest.approx({"compute_saving_given_small": 2.0, "compute_saving": 4 / 3,
                                                      "target_loss": 2.0})
    assert "vs_other_b" not in results[1]  # no B at that seed
    with pytest.raises(SystemExit, match="no finished arm B run at seed 0"):
        json.dump({"rows": []}, open(tmp_path / "other" / "sweep.json", "w"))
        rs.other_b_curves(str(tmp_path / "other"))
