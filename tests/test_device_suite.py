"""The prepared accelerator run (benchmarks/device_suite.py) at toy sizes on CPU, its flax reference step, and the
configs/upscale.py:gpu variant it trains."""
import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from configs import upscale as upscale_config
from kexue_jax import config as config_lib
from kexue_jax import flops, parallel
from kexue_jax.experiments import upscale as upscale_job
from kexue_jax.nn import TransformerConfig

REPO = Path(__file__).resolve().parents[1]


def _suite():
    """benchmarks/device_suite.py as a module (registered: its dataclasses resolve their annotations there)."""
    if "device_suite" not in sys.modules:
        spec = importlib.util.spec_from_file_location("device_suite", REPO / "benchmarks" / "device_suite.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["device_suite"] = mod
        spec.loader.exec_module(mod)
    return sys.modules["device_suite"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One ``--smoke`` run of the whole suite in a fresh process (single CPU device); its output folder."""
    root = tmp_path_factory.mktemp("device_suite")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "benchmarks/device_suite.py", "--smoke", "--out", str(root / "out"),
                           "--compilation-cache", str(root / "cache")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root / "out"


def _load(out: Path, name: str) -> dict:
    return json.loads((out / name).read_text())


def test_smoke_writes_every_stage_with_its_keys(smoke):
    ds = _suite()
    assert {p.name for p in smoke.iterdir()} == {"summary.json", "throughput.json", "pod_path.json", "growth.json",
                                                 "growth_report.json"}
    summary = _load(smoke, "summary.json")
    assert {"suite", "smoke", "budget_s", "elapsed_s", "device", "peak", "stages", "headline"} <= set(summary)
    assert summary["smoke"] is True and set(summary["stages"]) == set(ds.STAGES)
    for name in ds.STAGES:
        stage = _load(smoke, f"{name}.json")
        assert set(ds.STAGE_KEYS) <= set(stage), name
        assert stage["stage"] == name and stage["status"] == "ok", stage.get("reason")
        assert summary["stages"][name]["status"] == "ok"

    tp = _load(smoke, "throughput.json")
    names = [r["name"] for r in tp["rows"]]
    assert names == ["project d32", "reference d32", "project d64", "reference d64", "project d64 grad_accum 2",
                     "project d32 float32 highest", "reference d32 float32 highest"]
    for row in tp["rows"]:
        assert set(ds.ROW_KEYS) <= set(row), row["name"]
        assert len(row["step_times_s"]) >= 10 and row["tokens_per_s"] > 0 and row["compile_s"] > 0
    assert [p["group"] for p in tp["pairs"]] == ["small", "big", "fp32"]
    assert all(p["ratio"] > 0 for p in tp["pairs"])
    assert {"flops_per_device", "how", "device_kind"} <= set(tp["peak"])

    pod = _load(smoke, "pod_path.json")
    assert {"passed", "max_abs_logit_diff", "logit_scale", "tolerance", "mesh", "precision"} <= set(pod)
    assert pod["passed"] is True and pod["precision"] == "highest"
    assert pod["big_model"]["d_model"] == 2 * pod["small_model"]["d_model"]
    assert pod["max_abs_logit_diff"] <= pod["tolerance"] == pod["lossless_atol"] * max(pod["logit_scale"], 1.0)

    growth = _load(smoke, "growth.json")
    assert {"variant", "lrs", "runs", "best_b", "report", "against_best_b"} <= set(growth)
    assert [r["status"] for r in growth["runs"]] == ["ok", "ok"]  # B at the config's rate, then A (--smoke)
    report = _load(smoke, "growth_report.json")
    assert {"compute_saving", "compute_saving_given_small", "saving_curve", "curves",
            "max_abs_logit_diff"} <= set(report)
    assert growth["report"]["compute_saving"] == report["compute_saving"]


def test_mfu_uses_kexue_flops_training_flops(smoke):
    ds = _suite()
    tp = _load(smoke, "throughput.json")
    for row in tp["rows"]:
        cfg = TransformerConfig.preset("gpt", **row["model"])
        assert row["flops_per_step"] == flops.training_flops(cfg, row["seq_len"], row["batch"]), row["name"]
    # CPUs have no vendor peak: MFU is null, the FLOPs are still recorded
    assert tp["peak"]["flops_per_device"] is None and all(r["mfu"] is None for r in tp["rows"])
    # MFU = F / (t x P x n)
    assert ds.mfu(6e12, 0.5, 1e15, 2) == pytest.approx(6e12 / (0.5 * 1e15 * 2))
    assert ds.mfu(6e12, 0.5, None) is None
    h100 = types.SimpleNamespace(device_kind="NVIDIA H100 80GB HBM3", platform="gpu")
    assert parallel.vendor_peak_flops(h100) == (989e12, "h100")
    assert parallel.vendor_peak_flops(types.SimpleNamespace(device_kind="NVIDIA H100 PCIe"))[0] == 756e12
    assert ds.peak_of(h100)["flops_per_device"] == 989e12


def test_reference_step_has_the_project_steps_loss(smoke):
    parity = _load(smoke, "throughput.json")["parity_fp32"]
    assert parity["dtype"] == "float32" and parity["precision"] == "highest"
    assert parity["loss_abs_diff"] <= 1e-5 * max(1.0, abs(parity["project_loss"]))
    # bfloat16 pairs start from the same parameters and batch too: equal up to bfloat16 rounding
    assert all(p["first_loss_abs_diff"] < 1e-2 for p in _load(smoke, "throughput.json")["pairs"])


def test_reference_refuses_another_model():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import flax_reference
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    with pytest.raises(ValueError, match="residual"):
        flax_reference.config_from_project(TransformerConfig.preset("bert"))
    cfg = flax_reference.config_from_project(TransformerConfig.preset("gpt", num_layers=3), attention="einsum")
    assert (cfg.num_layers, cfg.attention) == (3, "einsum")


def test_gpu_variant_validates():
    c = upscale_config.get_config("gpu")
    small, _ = upscale_job.validate(c)
    big = upscale_job.grown_config(small, c.upscale)
    assert config_lib.validate(c, num_devices=1) == small
    assert (small.num_layers, small.d_model, big.d_model, big.num_heads, big.head_dim) == (8, 256, 512, 8, 64)
    assert (c.data.seq_len, c.data.batch_size, small.dtype) == (256, 64, "bfloat16")
    assert c.upscale.widen_at * 6 == c.train.steps
    with pytest.raises(ValueError, match="'gpu'"):
        upscale_config.get_config("gpux")


def test_suite_flags(capsys):
    ds = _suite()
    for argv, flag in ((["--smoke"], "--out"), (["--out", "x", "--budget-s", "0"], "--budget-s"),
                       (["--out", "x", "--stages", "throughput,speed"], "--stages"),
                       (["--cpu-compare", "--d-model", "100"], "--d-model")):
        with pytest.raises(SystemExit) as exit_info:
            ds.parse_args(argv)
        assert exit_info.value.code == 2 and flag in capsys.readouterr().err
    assert ds.parse_args(["--out", "x"]).budget_s == 540.0
    assert ds.parse_args(["--out", "x", "--smoke"]).budget_s == 300.0
    assert ds.flag_value(("scratch",)) == "('scratch',)"
    cmd = ds.growth_command(ds.FULL, {"optim.lr": 0.002, "upscale.arms": ("scratch",)}, Path("w"))
    assert cmd[1:] == [str(REPO / "train.py"), f"--config={REPO / 'configs' / 'upscale.py'}:gpu", "--workdir=w",
                       "--config.optim.lr=0.002", "--config.upscale.arms=('scratch',)"]
    budget, why = ds.stage_budget("growth", ds.FULL, 540.0, 100.0)
    assert budget == 0.0 and "minimum 120 s" in why
    assert ds.stage_budget("throughput", ds.FULL, 540.0, 540.0) == (pytest.approx(0.35 * 540.0), None)
