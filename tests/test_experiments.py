"""The experiments train.py dispatches to, end to end on shrunken configs."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from configs import upscale as upscale_config
from kexue_jax import experiments, reporting
from kexue_jax.experiments import upscale as upscale_experiment

REPO = Path(__file__).resolve().parents[1]


REPORT_KEYS = ("max_abs_logit_diff", "loss_before_widen", "loss_after_widen", "final_loss_upscaled",
               "final_loss_scratch", "flops_to_target_upscaled", "flops_to_target_scratch", "compute_saving",
               "compute_saving_given_small", "saving_curve", "loss_gap_at_equal_flops", "seeds", "cap_hit",
               "copy_cosine", "unigram_entropy")


def _tiny(steps=16, widen_at=8):
    c = upscale_config.get_config("tiny")
    c.train.update(steps=steps, eval_every=4, log_every=4, checkpoint_every=8)
    c.upscale.update(widen_at=widen_at, noise_db=-10.0)
    return c


def test_upscale_tiny_main_job(tmp_path, capsys):
    c = _tiny()
    report = experiments.run(c, str(tmp_path))
    out = capsys.readouterr().out
    assert "lossless upscaling: results" in out and "compute saving given the small model" in out
    assert "unigram entropy of the validation split 3.30" in out
    saved = json.loads((tmp_path / "report.json").read_text())
    for key in REPORT_KEYS:
        assert key in saved, key
    assert report["max_abs_logit_diff"] <= 1e-5 * max(report["logit_scale"], 1.0)
    # widening (with -10 dB of exact noise) is lossless: the validation loss right after equals the one before
    assert report["loss_after_widen"] == pytest.approx(report["loss_before_widen"], abs=1e-5)
    assert report["big_model"]["d_model"] == 2 * report["small_model"]["d_model"]
    # the noise made the copies differ (cosine 1/sqrt(1 + 10^(-10/10)) right after widening), and they stay apart
    cos = [c["cosine"] for c in report["copy_cosine"]]
    assert cos[0] == pytest.approx(1 / math.sqrt(1.1), abs=0.03) and max(cos) < 1.0 - 1e-3
    # run to target: A stops only once it has spent B's FLOPs and reached B's final loss, or at the cap
    fb = report["flops_scratch_total"]
    a_curve = report["curves"]["upscaled (A)"]
    assert [h["flops"] for h in a_curve] == sorted(h["flops"] for h in a_curve)
    if report["cap_hit"]:
        f_big = (a_curve[-1]["flops"] - a_curve[-2]["flops"]) / (a_curve[-1]["step"] - a_curve[-2]["step"])
        assert a_curve[-1]["flops"] >= c.upscale.cap * fb - f_big and report["compute_saving"] is None
        assert report["final_loss_upscaled"] > report["final_loss_scratch"]
    else:
        assert a_curve[-1]["flops"] >= fb and report["final_loss_upscaled"] <= report["final_loss_scratch"]
        assert report["compute_saving"] == pytest.approx(report["flops_to_target_scratch"]
                                                         / report["flops_to_target_upscaled"])
    assert report["loss_gap_at_equal_flops"] == pytest.approx(
        upscale_experiment.loss_at_flops(a_curve, fb) - report["final_loss_scratch"])
    assert len(report["saving_curve"]) == 6
    assert (tmp_path / "compute.png").read_bytes()[:4] == b"\x89PNG"
    # rerunning resumes every phase instead of training again
    again = experiments.run(c, str(tmp_path))
    assert "resumed from step" in capsys.readouterr().out
    assert again["final_loss_scratch"] == pytest.approx(report["final_loss_scratch"])
    assert again["final_loss_upscaled"] == pytest.approx(report["final_loss_upscaled"])


def test_upscale_job_grows_inside_the_mesh_like_on_one_device(tmp_path):
    """The pod path: with FSDP over 4 of 8 devices the job widens inside the mesh (``grow_state``: one jit
    with the big state's shardings as outputs, no host gather) and gives the single-device numbers (fp32
    rounding). Arm A alone (B is the same scratch run as in test_training's mesh tests), to the cap of B's
    analytic FLOPs: 11 big steps after widening at step 4 on both layouts."""
    one = _tiny(steps=12, widen_at=4)
    one.upscale.update(arms=("upscaled",), cap=1.0)
    one.parallel.update(data=1, fsdp=1)
    r1 = experiments.run(one, str(tmp_path / "one"))
    sharded = _tiny(steps=12, widen_at=4)
    sharded.upscale.update(arms=("upscaled",), cap=1.0)
    sharded.parallel.update(data=2, fsdp=4)
    r8 = experiments.run(sharded, str(tmp_path / "fsdp"))
    assert r1["big_steps_run"] == r8["big_steps_run"] == 11
    assert r8["final_loss_upscaled"] == pytest.approx(r1["final_loss_upscaled"], abs=2e-4)
    assert r8["loss_after_widen"] == pytest.approx(r1["loss_after_widen"], abs=2e-5)


@pytest.mark.slow
def test_upscale_seeds_and_a_reused_baseline(tmp_path):
    """``upscale.seeds`` runs every seed in its own directory and reports mean +/- std; ``upscale.baseline``
    reads arm B from a finished job instead of training it."""
    one = _tiny(steps=12, widen_at=4)
    r1 = experiments.run(one, str(tmp_path / "one"))
    reuse = _tiny(steps=12, widen_at=4)
    reuse.upscale.update(arms=("upscaled",), baseline=str(tmp_path / "multi_b"), seeds=(0, 1))
    b_only = _tiny(steps=12, widen_at=4)
    b_only.upscale.update(arms=("scratch",), seeds=(0, 1))
    experiments.run(b_only, str(tmp_path / "multi_b"))
    agg = experiments.run(reuse, str(tmp_path / "multi_a"))
    assert agg["seeds"] == [0, 1] and len(agg["per_seed"]) == 2
    assert not (tmp_path / "multi_a" / "seed_0" / "b_scratch").exists()  # B was read, not trained
    finals = [r["final_loss_scratch"] for r in agg["per_seed"]]
    assert agg["final_loss_scratch"]["mean"] == pytest.approx(np.mean(finals))
    assert agg["final_loss_scratch"]["std"] == pytest.approx(np.std(finals, ddof=1))
    assert finals[0] == pytest.approx(r1["final_loss_scratch"], abs=1e-4)  # seed 0 = the same B


def test_aggregate_gives_mean_and_sample_std_over_seeds():
    per_seed = [{"seed": 0, "compute_saving": 0.7, "final_loss_scratch": 1.9},
                {"seed": 1, "compute_saving": None, "final_loss_scratch": 1.8},
                {"seed": 2, "compute_saving": 0.9, "final_loss_scratch": 2.0}]
    agg = upscale_experiment.aggregate(per_seed)
    assert agg["seeds"] == [0, 1, 2] and agg["per_seed"] is per_seed
    assert agg["compute_saving"] == {"mean": pytest.approx(0.8), "std": pytest.approx(np.std([0.7, 0.9], ddof=1)),
                                     "n": 2, "values": [0.7, None, 0.9]}
    assert agg["final_loss_scratch"]["std"] == pytest.approx(0.1)
    assert "compute_saving_given_small" not in agg and "family_saving" not in agg  # no seed has them
    per_seed[0]["family_saving"] = None                                                # a released run that missed
    assert upscale_experiment.aggregate(per_seed)["family_saving"] is None
    table = upscale_experiment.format_table(agg)
    assert "0.8 ± 0.14 (n=2, 1 not reached)" in table and "family saving" not in table


def test_compute_saving_figures_from_curves():
    scratch = [{"flops": 0.0, "val_loss": 5.0}, {"flops": 10.0, "val_loss": 3.0}, {"flops": 20.0, "val_loss": 2.0}]
    upscaled = [{"flops": 0.0, "val_loss": 5.0}, {"flops": 4.0, "val_loss": 2.5}, {"flops": 8.0, "val_loss": 1.5},
                {"flops": 20.0, "val_loss": 1.0}]
    got = upscale_experiment.compute_saving(upscaled, scratch, small_flops=2.0, warmup_flops=10.0)
    assert got["target_loss"] == 2.0 and got["flops_to_target_scratch"] == 20.0
    assert got["flops_to_target_upscaled"] == pytest.approx(6.0)
    assert got["compute_saving"] == pytest.approx(20.0 / 6.0)
    assert got["compute_saving_given_small"] == pytest.approx(20.0 / 4.0)
    assert got["loss_gap_at_equal_flops"] == pytest.approx(1.0 - 2.0)
    # 6 targets from B's loss at the end of warmup (3.0) to its final loss (2.0)
    curve = got["saving_curve"]
    assert [c["target"] for c in curve] == pytest.approx([3.0, 2.8, 2.6, 2.4, 2.2, 2.0])
    assert curve[0]["flops_scratch"] == pytest.approx(10.0) and curve[0]["flops_upscaled"] == pytest.approx(3.2)
    assert curve[0]["saving"] == pytest.approx(10.0 / 3.2) and curve[0]["saving_given_small"] == pytest.approx(10 / 1.2)
    assert curve[0]["reached_in_small_phase"] is False
    never = [{"flops": 0.0, "val_loss": 5.0}, {"flops": 4.0, "val_loss": 4.0}]
    none = upscale_experiment.compute_saving(never, scratch)
    assert none["compute_saving"] is None and none["compute_saving_given_small"] is None
    assert none["loss_gap_at_equal_flops"] is None  # A's curve does not reach B's FLOPs
    assert reporting.unigram_loss(np.array([0, 0, 1, 1])) == pytest.approx(math.log(2))


@pytest.mark.parametrize("field,value,message", [
    ("widen_at", 0, "config.upscale.widen_at must be an integer in"),
    ("factor", 1, "factor must be an integer >= 2"),
    ("grow", "depth", "grow must be one of"),
    ("noise_db", -60.0, None),  # fine in float32
    ("symmetry", "dropout", r"config.upscale.symmetry must be one of \('zero_sum', 'fan_out'\)"),
    ("schedule", "cyclic", r"config.upscale.schedule must be one of \('continue', 'restart', 'rewind'\)"),
    ("big_steps", 0, "config.upscale.big_steps must be None"),
    ("lr_multiplier", 0.0, "config.upscale.lr_multiplier must be None"),
    ("lr_tensors", "bias", r"config.upscale.lr_tensors must be one of \('all', 'matrices', 'hidden'\)"),
    ("cap", 0.5, "config.upscale.cap must be a number >= 1"),
    ("depth_factor", 2, "config.upscale.depth_factor=2 needs model.residual 'pre' or 'alpha'"),
    ("seeds", (1, 1), "config.upscale.seeds must be"),
    ("baseline", "/nonexistent/run", "config.upscale.baseline must be None or the workdir of a finished job"),
])
def test_upscale_config_errors(tmp_path, field, value, message):
    c = upscale_config.get_config("tiny")
    c.upscale[field] = value
    if message is None:
        upscale_experiment.validate(c)
        return
    with pytest.raises(ValueError, match=message):
        experiments.run(c, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()


def test_noise_below_bfloat16_resolution_is_refused_before_anything_runs(tmp_path):
    c = upscale_config.get_config("tiny")
    c.model.dtype = "bfloat16"
    c.upscale.noise_db = -60.0
    with pytest.raises(ValueError, match=r"config.upscale.noise_db=-60.0 is below the resolution of the compute "
                                         r"dtype bfloat16"):
        experiments.run(c, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_two_process_upscale_job(tmp_path):
    """The pod path end to end: 2 processes x 2 CPU devices over 127.0.0.1, FSDP over all 4 devices, so
    no process holds the whole small state; the job widens inside the mesh and finishes both arms."""
    import os
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    flags = ["--config=configs/upscale.py:tiny", "--config.train.steps=8", "--config.upscale.widen_at=4",
             "--config.train.eval_every=4", "--config.train.checkpoint_every=4", "--config.train.log_every=4",
             "--config.train.plot=False", "--config.parallel.data=1", "--config.parallel.fsdp=4",
             "--config.upscale.noise_db=-10", f"--workdir={tmp_path / 'pod'}"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    env.pop("XLA_FLAGS", None)
    procs = [subprocess.Popen([sys.executable, "train.py", *flags, "--multihost",
                               f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                               f"--process_id={i}", "--jax_num_cpu_devices=2"],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    report = json.loads((tmp_path / "pod" / "report.json").read_text())
    assert report["max_abs_logit_diff"] <= 1e-5 * max(report["logit_scale"], 1.0)
    assert report["loss_after_widen"] == pytest.approx(report["loss_before_widen"], abs=1e-5)


def test_unknown_experiment_and_variant():
    c = upscale_config.get_config("tiny")
    c.experiment = "gan"
    with pytest.raises(ValueError, match=r"config.experiment must be one of \('lm', 'upscale', .*\), got 'gan'"):
        experiments.run(c, "/tmp/unused")
    with pytest.raises(ValueError, match="variant must be one of"):
        upscale_config.get_config("huge")


def test_train_py_rejects_bad_override_before_compiling(tmp_path):
    proc = subprocess.run([sys.executable, "train.py", "--config=configs/lm.py:tiny", f"--workdir={tmp_path / 'w'}",
                           "--config.model.norm=batchnorm"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "TransformerConfig.norm must be one of ('layernorm', 'rmsnorm'), got 'batchnorm'" in proc.stderr
    assert not (tmp_path / "w").exists()


def _sweep_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("upscale_sweep", REPO / "benchmarks" / "upscale_sweep.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sweep_plan_covers_the_issue_grid_and_analysis_uses_the_tuned_baseline(tmp_path):
    sw = _sweep_module()
    runs = sw.plan(str(tmp_path), "default")
    names = [r["name"] for r in runs]
    assert len(names) == len(set(names))
    ov = {r["name"]: r["overrides"] for r in runs}
    centre = ov["A/centre"]
    # every factor of the grid differs from the centre in exactly the field(s) it names
    noise = {(o.get("upscale.noise_db"), o["upscale.symmetry"]) for n, o in ov.items() if n.startswith("A/noise")}
    assert {(None, "zero_sum"), (-40.0, "zero_sum"), (-20.0, "zero_sum"), (0.0, "zero_sum"),
            (-20.0, "fan_out"), (-10.0, "fan_out"), (0.0, "fan_out")} <= noise
    assert centre["upscale.noise_db"] == -10.0 and centre["upscale.widen_frac"] == pytest.approx(1 / 6)
    assert {ov["A/widen_at=1/3"]["upscale.widen_frac"], ov["A/widen_at=2/3"]["upscale.widen_frac"]} == {1 / 3, 2 / 3}
    assert {ov[f"A/schedule={s}"]["upscale.schedule"] for s in ("restart", "rewind")} == {"restart", "rewind"}
    assert {ov[f"A/lr_multiplier={m}"]["upscale.lr_multiplier"] for m in ("1", "4")} == {1.0, 4.0}
    assert ov["A/lr_multiplier=hidden x2"]["upscale.lr_tensors"] == "hidden"
    assert ov["A/optimizer=fresh"]["upscale.map_optimizer"] is False
    assert ov["A/k4/centre"]["upscale.factor"] == 4 and ov["A/depth2_gpt/centre"]["upscale.depth_factor"] == 2
    assert all(f"B/{m}/lr{lr:g}/s0" in names for m in ("main", "k4", "depth2_gpt", "mlm") for lr in sw.LRS)
    # analysis: B's best rate is the lowest final loss; A's figures are the job's own compute_saving
    b_curve = lambda final: [{"step": 0, "flops": 0.0, "val_loss": 5.0}, {"step": 10, "flops": 10.0, "val_loss": 3.0},  # noqa: E731
                             {"step": 20, "flops": 20.0, "val_loss": final}]
    rows = [{"name": f"B/main/lr{lr:g}/s0", "model": "main", "variant": "default", "overrides": {"optim.lr": lr},
             "final_loss_scratch": final, "curves": {"scratch (B)": b_curve(final)}}
            for lr, final in zip(sw.LRS, (2.3, 2.0, 2.6))]
    a_curve = [{"step": 0, "flops": 0.0, "val_loss": 5.0}, {"step": 5, "flops": 4.0, "val_loss": 2.5},
               {"step": 9, "flops": 8.0, "val_loss": 1.5}, {"step": 20, "flops": 20.0, "val_loss": 1.0}]
    rows.append({"name": "A/centre", "model": "main", "variant": "default", "overrides": {},
                 "curves": {"upscaled (A)": a_curve}, "widen_flops": 2.0, "final_loss_upscaled": 1.0})
    an = sw.analyze(rows)
    assert an["best_lr"] == {"main": sw.LRS[1]}
    (res,) = an["results"]
    want = upscale_experiment.compute_saving(a_curve, b_curve(2.0), small_flops=2.0, warmup_flops=5.0)
    assert res["compute_saving"] == pytest.approx(want["compute_saving"]) == pytest.approx(20.0 / 6.0)
    assert "| A/centre | 3.33 | 5.00 |" in sw.tables(an)


def test_sweep_size_study_rows_use_each_sizes_tuned_baseline_and_the_main_report(tmp_path):
    sw = _sweep_module()
    runs = {r["name"]: r for r in sw.plan(str(tmp_path), "default")}
    # the size study runs the job's defaults (no centre overrides) at three seeds, and d 64 gets its own lr grid
    for s in (0, 1, 2):
        ov = runs[f"A/size 32->64/default/s{s}"]["overrides"]
        assert ov["seed"] == s and "upscale.schedule" not in ov and ov["model.d_model"] == 32
    assert [f"B/size 32->64/lr{lr:g}/s0" in runs for lr in (3e-3, 6e-3, 1.2e-2)] == [True] * 3
    late = runs["A/size 32->64/widen_at=2/3 restart 1/3"]["overrides"]
    c = sw._config(runs["A/size 32->64/widen_at=2/3 restart 1/3"])
    assert (c.upscale.widen_at, c.upscale.big_steps, c.upscale.schedule) == (1000, 500, "restart")
    assert late["upscale.big_frac"] == pytest.approx(1 / 3)
    # factor 4 from d 32 lands exactly on the main job's big model (so the main job's arm B is its baseline)
    k4 = sw._config(runs["A/main/factor=4 from d 32"])
    main = sw._config({"overrides": {}, "variant": "default"})
    d, u = k4.model, k4.upscale
    assert (d.d_model * u.factor, d.head_dim * u.factor, d.d_ff * u.factor, d.num_heads) == (
        main.model.d_model * main.upscale.factor, main.model.head_dim * main.upscale.factor,
        main.model.d_ff * main.upscale.factor, main.model.num_heads)
    # an A row measured against an arm B outside the sweep keeps the job's own figures
    ext = {"name": "A/main/factor=4 from d 32", "model": "main", "overrides": {"optim.lr": 3e-3},
           "final_loss_upscaled": 1.7, "target_loss": 1.63, "compute_saving": 0.5,
           "compute_saving_given_small": 0.6, "loss_gap_at_equal_flops": 0.07}
    res = sw.analyze([ext])["results"]
    assert res[0]["compute_saving"] == 0.5 and res[0]["b_lr"] == 3e-3

    b_curve = lambda final: [{"step": 0, "flops": 0.0, "val_loss": 5.0}, {"step": 10, "flops": 10.0, "val_loss": 3.0},  # noqa: E731
                             {"step": 20, "flops": 20.0, "val_loss": final}]
    a_curve = lambda at: [{"step": 0, "flops": 0.0, "val_loss": 5.0}, {"step": 5, "flops": at, "val_loss": 2.0},  # noqa: E731
                          {"step": 20, "flops": 20.0, "val_loss": 1.9}]
    rows = [{"name": f"B/size 32->64/lr{lr:g}/s{s}", "model": "size 32->64", "variant": "default",
             "overrides": {"optim.lr": lr, "seed": s}, "final_loss_scratch": final + s * 0.01,
             "curves": {"scratch (B)": b_curve(final + s * 0.01)}}
            for lr, final in ((3e-3, 2.1), (6e-3, 2.0), (1.2e-2, 2.4)) for s in ((0, 1) if lr == 6e-3 else (0,))]
    rows += [{"name": f"A/size 32->64/default/s{s}", "model": "size 32->64", "variant": "default",
              "overrides": {"seed": s}, "curves": {"upscaled (A)": a_curve(at)}, "widen_flops": 1.0,
              "final_loss_upscaled": 1.9} for s, at in ((0, 4.0), (1, 5.0))]
    an = sw.analyze(rows)
    assert an["best_lr"] == {"size 32->64": 6e-3}
    main = {"seeds": [0, 1, 2], "settings": {"lr": 3e-3},
            "compute_saving": {"mean": 0.9, "std": 0.05, "n": 3, "missing": 0},
            "compute_saving_given_small": {"mean": 0.95, "std": 0.04, "n": 3, "missing": 0},
            "loss_gap_at_equal_flops": {"mean": 0.01, "std": 0.002, "n": 3, "missing": 0},
            "final_loss_scratch": {"mean": 1.63, "std": 0.007, "n": 3, "missing": 0}}
    small, mid = sw.size_study(an, main)
    # each A seed against B(best lr, same seed): targets 2.0 and 2.01 are reached at 4 and 5 FLOPs
    want = [upscale_experiment.compute_saving(a_curve(at), b_curve(t), small_flops=1.0)["compute_saving"]
            for at, t in ((4.0, 2.0), (5.0, 2.01))]
    assert small["compute_saving"]["mean"] == pytest.approx(np.mean(want))
    assert small["compute_saving"]["std"] == pytest.approx(np.std(want, ddof=1))
    assert small["b_lr"] == 6e-3 and (small["d_small"], small["d_big"]) == (32, 64)
    assert mid["model"] == "main" and mid["compute_saving"]["mean"] == 0.9 and mid["target_loss"]["mean"] == 1.63
    table = sw.size_table([small, mid])
    assert f"| d 32 → 64 | 0.006 | 2.0050 ± 0.0071 (2/2) | {np.mean(want):.2f} ± {np.std(want, ddof=1):.2f} (2/2)" in table
    assert "| d 64 → 128 | 0.003 | 1.6300 ± 0.0070 (3/3) | 0.90 ± 0.05 (3/3) | 0.95 ± 0.04 (3/3)" in table
    assert sw.plot_size_study([small, mid], str(tmp_path / "size.png")) and (tmp_path / "size.png").stat().st_size > 0
