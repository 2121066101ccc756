"""The training system: end to end, sharding vs single device vs pmap, resume, fallback, errors."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import lm as lm_config
from kexue_jax import checkpoint as ckpt_lib
from kexue_jax import config as config_lib
from kexue_jax import training
from kexue_jax.nn import Transformer

REPO = Path(__file__).resolve().parents[1]


def tiny(**overrides):
    """configs/lm.py:tiny with dotted overrides, e.g. tiny(**{"train.steps": 6})."""
    c = lm_config.get_config("tiny")
    for dotted, value in overrides.items():
        section, name = dotted.split(".")
        c[section][name] = value
    return c


def short(**overrides):
    base = {"train.steps": 6, "optim.warmup_steps": 2, "train.log_every": 2, "train.eval_every": 3,
            "train.checkpoint_every": 3, "train.eval_batches": 1, "train.plot": False}
    return tiny(**{**base, **overrides})


def final_params(result):
    """Host params without the attention key biases: q.b_k is constant along a softmax row, so their
    true gradient is 0 and Adam normalizes float rounding noise; they differ across device layouts."""
    params = jax.device_get(result.state.params)
    for name, layer in params.items():
        if name.startswith("layer_"):
            layer["attn"]["key"].pop("bias", None)
    return params


def test_tiny_end_to_end_loss_falls(tmp_path):
    result = training.train(tiny(), str(tmp_path))
    vals = [h["val_loss"] for h in result.history]
    assert vals[0] - vals[-1] > 1.5, vals  # 5.6 nats/byte at init (uniform over 260) -> below 4.1
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in x and x["step"] == 60 for x in lines)
    assert json.loads((tmp_path / "config.json").read_text())["model"]["preset"] == "gpt"
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [30, 60]


def test_one_device_equals_eight_device_mesh_and_fsdp(tmp_path):
    one = training.train(short(**{"parallel.data": 1, "train.steps": 3}), str(tmp_path / "one"))
    eight = training.train(short(**{"train.steps": 3}), str(tmp_path / "eight"))
    fsdp = training.train(short(**{"train.steps": 3, "parallel.fsdp": 4}), str(tmp_path / "fsdp"))
    assert eight.state.params["layer_0"]["ffn"]["wi"]["kernel"].sharding.mesh.size == 8
    chex.assert_trees_all_close(final_params(one), final_params(eight), atol=2e-6, rtol=2e-5)
    chex.assert_trees_all_close(final_params(fsdp), final_params(eight), atol=2e-6, rtol=2e-5)


def test_pmap_mode_equals_sharded_mode(tmp_path):
    sharded = training.train(short(**{"train.steps": 3}), str(tmp_path / "s"))
    pmapped = training.train(short(**{"train.steps": 3, "parallel.mode": "pmap"}), str(tmp_path / "p"))
    chex.assert_trees_all_close(final_params(pmapped), final_params(sharded), atol=2e-6, rtol=2e-5)


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    whole = training.train(short(**{"train.steps": 3}), str(tmp_path / "w"))
    accum = training.train(short(**{"train.steps": 3, "train.grad_accum": 2}), str(tmp_path / "a"))
    chex.assert_trees_all_close(final_params(accum), final_params(whole), atol=2e-6, rtol=2e-5)


def test_killed_run_resumes_bitwise(tmp_path, capsys):
    full = training.train(short(), str(tmp_path / "full"))
    # killed after 4 steps: the last checkpoint is step 3, step 4 is lost
    training.train(short(), str(tmp_path / "killed"), stop_after=4)
    assert ckpt_lib.Checkpointer(tmp_path / "killed" / "checkpoints").all_steps() == [3]
    capsys.readouterr()
    resumed = training.train(short(), str(tmp_path / "killed"))
    assert "resumed from step 3" in capsys.readouterr().out
    chex.assert_trees_all_equal(final_params(resumed), final_params(full))


def test_corrupt_latest_checkpoint_falls_back(tmp_path, capsys, caplog):
    work = tmp_path / "run"
    training.train(short(**{"train.steps": 6}), str(work))
    latest = work / "checkpoints" / "6"
    for f in latest.rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "array_metadatas" not in str(f):
            f.write_bytes(b"garbage")
    capsys.readouterr()
    result = training.train(short(**{"train.steps": 6}), str(work))
    out = capsys.readouterr().out
    assert "resumed from step 3" in out
    assert int(jax.device_get(result.state.step)) == 6


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    work = tmp_path / "nan"
    training.train(short(**{"train.steps": 3}), str(work))
    good = ckpt_lib.Checkpointer(work / "checkpoints").all_steps()
    with pytest.raises(training.NonFiniteLoss, match="non-finite"):
        training.train(short(**{"train.steps": 9, "optim.lr": 1e30, "optim.clip_norm": None,
                                "optim.warmup_steps": 0}), str(work))
    assert ckpt_lib.Checkpointer(work / "checkpoints").all_steps() == good == [3]


@pytest.mark.parametrize("field,value,message", [
    ("data.objective", "clm", "config.data.objective must be one of ('lm', 'mlm')"),
    ("data.seq_len", 0, "config.data.seq_len must be a positive integer"),
    ("data.seq_len", 128, "config.data.seq_len must be <= model.max_len=64"),
    ("data.batch_size", 12, "divisible by the 8 devices"),
    ("train.grad_accum", 3, "config.train.grad_accum must be a divisor of data.batch_size=16"),
    ("optim.schedule", "step", "config.optim.schedule must be one of ('cosine', 'linear', 'constant')"),
    ("optim.warmup_steps", 100, "config.optim.warmup_steps must be in [0, train.steps=60]"),
    ("parallel.mode", "dp", "config.parallel.mode must be one of ('sharded', 'pmap')"),
    ("parallel.fsdp", 3, "parallel.fsdp must be a positive divisor of the device count 8"),
    ("model.residual", "sandwich", "TransformerConfig.residual must be one of ('post', 'pre', 'alpha', 'alpha_post')"),
    ("model.d_model", -4, "TransformerConfig.d_model must be a positive integer"),
])
def test_bad_config_raises_before_anything_runs(tmp_path, field, value, message):
    section, name = field.split(".")
    c = tiny()
    c[section][name] = value
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        training.train(c, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()  # nothing written


def test_bad_data_files_raise_clear_errors(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"hello \xff\xfe world")
    with pytest.raises(ValueError, match="bad.txt"):
        training.train(tiny(**{"data.path": str(bad)}), str(tmp_path / "w1"))
    empty_dir = tmp_path / "texts"
    empty_dir.mkdir()
    (empty_dir / "a.txt").write_text("")
    with pytest.raises(ValueError, match="a.txt"):
        training.train(tiny(**{"data.path": str(empty_dir)}), str(tmp_path / "w2"))
    with pytest.raises(ValueError, match="matched no files"):
        training.train(tiny(**{"data.path": str(tmp_path / "missing*.txt")}), str(tmp_path / "w3"))
    assert not any((tmp_path / w).exists() for w in ("w1", "w2", "w3"))


def test_user_text_files_train(tmp_path):
    for i in range(3):
        (tmp_path / f"doc{i}.txt").write_text(("Lorem ipsum dolor sit amet, ü. " * 200) + str(i))
    result = training.train(short(**{"data.path": str(tmp_path / "doc*.txt")}), str(tmp_path / "w"))
    assert np.isfinite(result.history[-1]["val_loss"])


def test_mlm_objective_and_alpha_residual(tmp_path):
    c = short(**{"data.objective": "mlm", "train.alpha_warmup_steps": 4})
    c.model = config_lib.model_section("bert", num_layers=2, d_model=32, num_heads=2, head_dim=16, d_ff=64,
                                       max_len=64, residual="alpha_post")
    result = training.train(c, str(tmp_path))
    assert np.isfinite(result.history[-1]["val_loss"])


def test_lr_schedule_and_restart():
    c = tiny()
    sched = training.make_schedule(c.optim, 60)
    assert float(sched(0)) == 0.0 and float(sched(10)) == pytest.approx(1e-2)
    assert float(sched(60)) == pytest.approx(1e-3, rel=1e-4)  # min_lr_ratio 0.1
    restarted = training.make_schedule(c.optim, 30, start=30)  # re-warmup after widening at step 30
    assert float(restarted(30)) == 0.0 and float(restarted(35)) == pytest.approx(5e-3)
    assert float(restarted(40)) == pytest.approx(1e-2) and float(restarted(60)) == pytest.approx(1e-3, rel=1e-4)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _restore_params(workdir: Path, config, step: int):
    model_cfg = config_lib.model_config(config.model)
    model = Transformer(model_cfg)
    tx = training.make_optimizer(config.optim, config.train.steps)
    abstract = jax.eval_shape(lambda k: training.init_state(model, tx, k, config.data.seq_len),
                              jax.random.PRNGKey(0))
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one), abstract)
    state, got = ckpt_lib.Checkpointer(workdir / "checkpoints").restore(abstract, step=step)
    assert got == step
    return final_params(training.PhaseResult(state, [], 0.0, None))


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path):
    """2 processes x 2 CPU devices over 127.0.0.1 (jax.distributed) == 1 process x 4 devices."""
    flags = ["--config=configs/lm.py:tiny", "--config.train.steps=4", "--config.optim.warmup_steps=2",
             "--config.train.eval_every=2", "--config.train.checkpoint_every=2", "--config.train.log_every=2",
             "--config.train.plot=False"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    env.pop("XLA_FLAGS", None)
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "train.py", *flags, f"--workdir={tmp_path / 'multi'}",
                               "--multihost", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                               f"--process_id={i}", "--jax_num_cpu_devices=2"],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    single = subprocess.run([sys.executable, "train.py", *flags, f"--workdir={tmp_path / 'single'}",
                             "--jax_num_cpu_devices=4"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert single.returncode == 0, single.stderr[-3000:]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    assert "step 4/4" in outs[0] and "step 4/4" not in outs[1]  # only process 0 logs
    c = lm_config.get_config("tiny")
    c.train.steps = 4
    chex.assert_trees_all_close(_restore_params(tmp_path / "multi", c, 4),
                                _restore_params(tmp_path / "single", c, 4), atol=2e-6, rtol=2e-5)


@pytest.mark.slow
def test_sigterm_saves_and_the_rerun_resumes(tmp_path):
    """A real process: SIGTERM between checkpoints saves the current step; rerunning resumes from it."""
    import signal
    import time

    flags = ["--config=configs/lm.py:tiny", "--config.train.steps=400", "--config.train.checkpoint_every=1000",
             "--config.train.log_every=5", "--config.train.eval_every=1000", "--config.train.plot=False",
             f"--workdir={tmp_path}"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.Popen([sys.executable, "train.py", *flags], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and '"loss"' in metrics.read_text()):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert "SIGTERM: saved step" in out, out[-2000:]
    steps = ckpt_lib.Checkpointer(tmp_path / "checkpoints").all_steps()
    assert len(steps) == 1 and 0 < steps[0] < 400
    again = subprocess.run([sys.executable, "train.py", *flags[:1], "--config.train.steps=" + str(steps[0] + 20),
                            *flags[2:]], cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resumed from step {steps[0]}" in again.stdout
