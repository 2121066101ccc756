"""The experiments train.py dispatches to, end to end on shrunken configs."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from configs import upscale as upscale_config
from kexue_jax import experiments
from kexue_jax.experiments import upscale as upscale_experiment

REPO = Path(__file__).resolve().parents[1]


def test_upscale_tiny_main_job(tmp_path, capsys):
    c = upscale_config.get_config("tiny")
    c.train.update(steps=16, eval_every=4, log_every=4, checkpoint_every=8)
    c.upscale.widen_at = 8
    report = experiments.run(c, str(tmp_path))
    out = capsys.readouterr().out
    assert "lossless upscaling: results" in out and "compute saving" in out
    saved = json.loads((tmp_path / "report.json").read_text())
    for key in ("max_abs_logit_diff", "loss_before_widen", "loss_after_widen", "final_loss_upscaled",
                "final_loss_scratch", "flops_to_target_upscaled", "flops_to_target_scratch", "compute_saving"):
        assert key in saved
    assert report["max_abs_logit_diff"] <= 1e-5 * max(report["logit_scale"], 1.0)
    # widening is lossless: the validation loss right after widening equals the one before
    assert report["loss_after_widen"] == pytest.approx(report["loss_before_widen"], abs=1e-5)
    assert report["big_model"]["d_model"] == 2 * report["small_model"]["d_model"]
    flops = [h["flops"] for h in report["curves"]["upscaled (A)"]]
    assert flops == sorted(flops) and flops[-1] < report["flops_scratch_total"]
    assert (tmp_path / "compute.png").read_bytes()[:4] == b"\x89PNG"
    # rerunning resumes every phase instead of training again
    again = experiments.run(c, str(tmp_path))
    assert "resumed from step" in capsys.readouterr().out
    assert again["final_loss_scratch"] == pytest.approx(report["final_loss_scratch"])


def test_compute_saving_interpolates():
    scratch = [{"flops": 0.0, "val_loss": 5.0}, {"flops": 10.0, "val_loss": 3.0}, {"flops": 20.0, "val_loss": 2.0}]
    upscaled = [{"flops": 0.0, "val_loss": 5.0}, {"flops": 4.0, "val_loss": 2.5}, {"flops": 8.0, "val_loss": 1.5}]
    got = upscale_experiment.compute_saving(upscaled, scratch)
    assert got["target_loss"] == 2.0 and got["flops_to_target_scratch"] == 20.0
    assert got["flops_to_target_upscaled"] == pytest.approx(6.0)
    assert got["compute_saving"] == pytest.approx(20.0 / 6.0)
    never = [{"flops": 0.0, "val_loss": 5.0}, {"flops": 4.0, "val_loss": 4.0}]
    assert upscale_experiment.compute_saving(never, scratch)["compute_saving"] is None


@pytest.mark.parametrize("field,value,message", [
    ("widen_at", 0, "config.upscale.widen_at must be an integer in"),
    ("factor", 1, "factor must be an integer >= 2"),
    ("grow", "depth", "grow must be one of"),
    ("noise", -1.0, "config.upscale.noise must be >= 0"),
    ("schedule", "cyclic", r"config.upscale.schedule must be one of \('continue', 'restart'\)"),
    ("big_steps", 0, "config.upscale.big_steps must be None"),
])
def test_upscale_config_errors(tmp_path, field, value, message):
    c = upscale_config.get_config("tiny")
    c.upscale[field] = value
    with pytest.raises(ValueError, match=message):
        experiments.run(c, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()


def test_unknown_experiment_and_variant():
    c = upscale_config.get_config("tiny")
    c.experiment = "gan"
    with pytest.raises(ValueError, match=r"config.experiment must be one of \('lm', 'upscale'\)"):
        experiments.run(c, "/tmp/unused")
    with pytest.raises(ValueError, match="variant must be one of"):
        upscale_config.get_config("huge")


def test_train_py_rejects_bad_override_before_compiling(tmp_path):
    proc = subprocess.run([sys.executable, "train.py", "--config=configs/lm.py:tiny", f"--workdir={tmp_path / 'w'}",
                           "--config.model.norm=batchnorm"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "TransformerConfig.norm must be one of ('layernorm', 'rmsnorm'), got 'batchnorm'" in proc.stderr
    assert not (tmp_path / "w").exists()
