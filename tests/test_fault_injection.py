"""benchmarks/fault_injection.py without running a job: its table of jobs names fields each config has, with values
that put several checkpoints in every run; its comparison flags a one-ulp difference in a tensor or a record and
leaves timing fields out. And the loop fix it found: a run stopped by SIGTERM logs the training metrics of the step
it saves (the resumed run starts after that step, so they were missing from metrics.jsonl)."""
import importlib
import json
import os
import signal
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from kexue_jax import config as config_lib
from kexue_jax import metrics as metrics_lib
from kexue_jax import parallel, training

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
fi = importlib.import_module("fault_injection")


def configured(job):
    """The job's config with its overrides set as train.py sets them (ValueError/KeyError/TypeError if not)."""
    path, variant = job.spec.split(":")
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    c = module.get_config(variant)
    for dotted, value in job.overrides.items():
        *sections, name = dotted.split(".")
        node = c
        for s in sections:
            node = node[s]
        if name not in node:
            raise KeyError(f"{job.spec}: no field {dotted}")
        node[name] = value
    return c


@pytest.mark.parametrize("name", sorted(fi.JOBS))
def test_every_job_is_a_tiny_config_whose_overrides_exist_and_checkpoint_inside_each_run(name):
    job = fi.JOBS[name]
    assert job.spec == f"configs/{name}.py:tiny" and (REPO / job.spec.split(":")[0]).is_file()
    c = configured(job)
    assert c.train.log_every == 1  # the kills count logged steps
    every = c.train.eval_every if name == "similarity" else c.train.checkpoint_every  # similarity: keep_evaluated
    assert 0 < every < c.train.steps, (name, every, c.train.steps)
    cmd = fi.command(job, Path("/w"))
    assert cmd[2:4] == [f"--config={job.spec}", "--workdir=/w"] and cmd[-1] == fi.DEVICES
    assert len(cmd) == 5 + len(job.overrides)


def test_the_lm_job_runs_todays_command():
    cmd = fi.command(fi.JOBS["lm"], Path("/w"))
    assert cmd[1:] == ["train.py", "--config=configs/lm.py:tiny", "--workdir=/w", "--config.train.steps=40",
                       "--config.train.checkpoint_every=4", "--config.train.log_every=1",
                       "--config.train.eval_every=10", "--config.train.keep_checkpoints=3",
                       "--config.train.plot=False", "--config.optim.warmup_steps=4", "--jax_num_cpu_devices=2"]
    assert fi.flag_value(("a", "b")) == "('a', 'b')"


def test_progress_lines_are_counted_by_phase_and_step():
    text = "step 1/40 | loss 5.5\n[B scratch] step 3/40 | loss 4 | 1e3 tok/s\nstep 10: val_loss 3.2\n[x] step 3/9 | l"
    assert fi.logged_steps(text) == {("", 1), ("B scratch", 3), ("x", 3)}
    assert fi.SAVED.search("[A widened] SIGTERM: saved step 27; rerun to resume").group(1) == "27"


def test_the_comparison_flags_one_ulp_and_ignores_timing():
    x = np.linspace(-1, 1, 7, dtype=np.float32)
    y = x.copy()
    y[3] = np.nextafter(y[3], np.float32(2))
    cmp = fi.Comparison()
    cmp.arrays({"a": x, "b": x}, {"a": x.copy(), "b": y})
    assert (cmp.tensors, cmp.mismatches) == (2, 1) and cmp.differences[0].startswith("b:")
    cmp = fi.Comparison()
    cmp.arrays({"z": np.zeros(2, np.float32)}, {"z": -np.zeros(2, np.float32)})  # bitwise: -0.0 is not 0.0
    assert cmp.mismatches == 1
    ref = {"loss": 1.5, "curve": [[6, 0.25]], "seconds": 3.0, "wall_s": 1.0, "tokens_per_s": 9.0,
           "nan": float("nan"), "name": "a"}
    cmp = fi.Comparison()
    cmp.records(ref, {**ref, "seconds": 4.0, "wall_s": 2.0, "tokens_per_s": 1.0})
    assert (cmp.values, cmp.mismatches) == (5, 0)
    cmp.records(ref, {**ref, "curve": [[6, float(np.nextafter(0.25, 1.0))]], "extra": 1})
    assert cmp.mismatches == 2
    assert cmp.differences == [".extra: in one only", ".curve[0][1]: 0.25 vs 0.25000000000000006"]


def test_workdirs_compare_records_with_the_workdir_path_replaced(tmp_path):
    for d in ("ref", "other"):
        root = tmp_path / d
        (root / "cells").mkdir(parents=True)
        (root / "cells" / "c.json").write_text(json.dumps({"dir": str(root / "model"), "v": 1.0, "seconds": len(d)}))
        (root / "metrics.jsonl").write_text('{"step": 2, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n{"step": 2, "val": 3')
        (root / "cells" / "tokenizer.json").write_text(json.dumps({"vocab": d}))  # a copied file: not a record
    cmp = fi.Comparison(tmp_path / "ref", tmp_path / "other").workdirs()
    assert (cmp.values, cmp.mismatches) == (4, 0), cmp.differences
    (tmp_path / "other" / "metrics.jsonl").write_text('{"step": 2, "loss": 0.5}\n{"step": 3, "loss": 0.5}\n')
    differences = fi.Comparison(tmp_path / "ref", tmp_path / "other").workdirs().differences
    assert differences == ["metrics.jsonl:.3/train: in one only"]


def test_a_run_stopped_by_sigterm_logs_the_step_it_saves(tmp_path):
    c = config_lib.base_config("toy")
    c.optim.update(lr=0.1, warmup_steps=0)
    c.train.update(steps=8, log_every=1, eval_every=0, checkpoint_every=100, plot=False)
    tx = training.make_optimizer(c.optim, 8)

    def batch(t):
        if t == 4 and not (tmp_path / "sent").exists():  # SIGTERM while step 5 (index 4) is prepared
            (tmp_path / "sent").touch()
            os.kill(os.getpid(), signal.SIGTERM)
        return {"x": np.full((2, 2), t + 1.0, np.float32)}

    def init(key):
        params = {"w": jnp.ones(2)}
        return training.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))

    phase = training.Phase(tx=tx, start=0, end=8, workdir=str(tmp_path / "w"), init=init, batch_fn=batch,
                           loss_fn=lambda p, b, k, t: (jnp.mean((b["x"] @ p["w"]) ** 2), {}), eval_at_start=False)
    with pytest.raises(training.Preempted, match="saved step 5"):
        training.run_loop(phase, c, parallel.make_mesh(1))
    training.run_loop(phase, c, parallel.make_mesh(1))
    logged = [r["step"] for r in metrics_lib.read_metrics(tmp_path / "w") if "loss" in r]
    assert logged == [1, 2, 3, 4, 5, 6, 7, 8]
