"""The training system: end to end, sharding vs single device vs pmap, resume, fallback, errors."""
import json
import os
import shutil
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
    """Host params without the attention key biases, for comparisons ACROSS device layouts: q.b_k is
    constant along a softmax row, so their true gradient is 0 and Adam normalizes float rounding noise,
    which differs between layouts. Comparisons on the same layout use :func:`whole_state`."""
    params = jax.device_get(result.state.params)
    for name, layer in params.items():
        if name.startswith("layer_"):
            layer["attn"]["key"].pop("bias", None)
    return params


def whole_state(result):
    """Every tensor of the final state (params, optimizer state, step) on the host."""
    return jax.device_get(result.state)


def unigram_entropy(tokens) -> float:
    """Entropy (nats) of the byte frequencies of ``tokens``: the loss of the best context-free model."""
    p = np.bincount(np.asarray(tokens), minlength=256) / len(tokens)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


@pytest.fixture(scope="module")
def short_runs(tmp_path_factory):
    """``short(train.steps=n)`` trained once per module for n = 3 and 6 (8 devices, sharded): the reference run
    of several tests. ``short_runs(n)`` -> (PhaseResult, its workdir); tests that go on training in a workdir
    copy it (``_copy_run``), so the shared one is never written again."""
    done = {}

    def get(steps):
        if steps not in done:
            work = tmp_path_factory.mktemp(f"short_{steps}") / "run"
            done[steps] = (training.train(short(**{"train.steps": steps}), str(work)), work)
        return done[steps]

    return get


def _copy_run(run, dest):
    """A private copy of a shared run's workdir (config, metrics log, checkpoints)."""
    shutil.copytree(run[1], dest)
    return dest


def test_tiny_end_to_end_loss_falls(tmp_path):
    result = training.train(tiny(), str(tmp_path))
    vals = [h["val_loss"] for h in result.history]
    assert vals[0] - vals[-1] > 1.5, vals  # 5.6 nats/byte at init (uniform over 260) -> below 4.1
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in x and x["step"] == 60 for x in lines)
    assert json.loads((tmp_path / "config.json").read_text())["model"]["preset"] == "gpt"
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [30, 60]


def test_one_device_equals_eight_device_mesh_and_fsdp(tmp_path, short_runs):
    one = training.train(short(**{"parallel.data": 1, "train.steps": 3}), str(tmp_path / "one"))
    eight, _ = short_runs(3)
    fsdp = training.train(short(**{"train.steps": 3, "parallel.fsdp": 4}), str(tmp_path / "fsdp"))
    assert eight.state.params["layer_0"]["ffn"]["wi"]["kernel"].sharding.mesh.size == 8
    chex.assert_trees_all_close(final_params(one), final_params(eight), atol=2e-6, rtol=2e-5)
    chex.assert_trees_all_close(final_params(fsdp), final_params(eight), atol=2e-6, rtol=2e-5)


def test_pmap_mode_equals_sharded_mode(tmp_path, short_runs):
    sharded, _ = short_runs(3)
    pmapped = training.train(short(**{"train.steps": 3, "parallel.mode": "pmap"}), str(tmp_path / "p"))
    chex.assert_trees_all_close(final_params(pmapped), final_params(sharded), atol=2e-6, rtol=2e-5)


def test_gradient_accumulation_equals_one_big_batch(tmp_path, short_runs):
    whole, _ = short_runs(3)
    accum = training.train(short(**{"train.steps": 3, "train.grad_accum": 2}), str(tmp_path / "a"))
    chex.assert_trees_all_close(final_params(accum), final_params(whole), atol=2e-6, rtol=2e-5)


def test_equal_settings_share_the_optimizer_loss_and_init_so_a_rerun_reuses_the_compiled_step():
    c = short()
    tx = training.make_optimizer(c.optim, 6)
    assert training.make_optimizer(short().optim, 6) is tx  # another ConfigDict with the same settings
    assert training.make_optimizer(short(**{"optim.lr": 1e-3}).optim, 6) is not tx
    assert training.make_optimizer(c.optim, 7) is not tx
    assert training.make_optimizer(c.optim, 6, schedule=training.make_schedule(c.optim, 6)) is not tx  # not cached
    assert training.optim_key(c.optim) == tuple(sorted(c.optim.items()))
    assert training.optim_key({"lr": 1e-3, "betas": [0.9, 0.95]}) is None  # a list is not hashable: not cached
    # the cached optimizer is the one built from the settings: the same updates, bitwise
    params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
    grads = jax.tree_util.tree_map(lambda p: jnp.sin(p) + 0.5, params)
    fresh = training._build_optimizer(c.optim, 6)
    s1, s2 = tx.init(params), fresh.init(params)
    update1, update2 = jax.jit(tx.update), jax.jit(fresh.update)
    for _ in range(3):
        u1, s1 = update1(grads, s1, params)
        u2, s2 = update2(grads, s2, params)
        chex.assert_trees_all_equal(u1, u2)
    model = Transformer(config_lib.model_config(c.model))
    same = Transformer(config_lib.model_config(short().model))
    assert training.lm_loss(same, alpha_warmup_steps=3) is training.lm_loss(model, alpha_warmup_steps=3)
    assert training.lm_loss(model, alpha_warmup_steps=4) is not training.lm_loss(model, alpha_warmup_steps=3)
    assert training.make_eval_step(same) is training.make_eval_step(model)
    init = training.state_initializer(model, tx, 8)
    assert training.state_initializer(same, training.make_optimizer(short().optim, 6), 8) is init
    chex.assert_trees_all_equal(jax.jit(init)(jax.random.PRNGKey(1)),
                                jax.jit(training.init_state, static_argnums=(0, 1, 3))(model, tx,
                                                                                     jax.random.PRNGKey(1), 8))


def test_killed_run_resumes_bitwise(tmp_path, capsys, short_runs):
    full, _ = short_runs(6)  # short() runs 6 steps
    # killed after 4 steps: the last checkpoint is step 3, step 4 is lost
    training.train(short(), str(tmp_path / "killed"), stop_after=4)
    assert ckpt_lib.Checkpointer(tmp_path / "killed" / "checkpoints").all_steps() == [3]
    capsys.readouterr()
    resumed = training.train(short(), str(tmp_path / "killed"))
    assert "resumed from step 3" in capsys.readouterr().out
    # same device layout: every tensor (attention key biases and Adam moments included) is bitwise equal
    chex.assert_trees_all_equal(whole_state(resumed), whole_state(full))


def test_corrupt_latest_checkpoint_falls_back(tmp_path, capsys, caplog, short_runs):
    work = _copy_run(short_runs(6), tmp_path / "run")  # = training.train(short(train.steps=6), work)
    latest = work / "checkpoints" / "6"
    for f in latest.rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "array_metadatas" not in str(f):
            f.write_bytes(b"garbage")
    capsys.readouterr()
    result = training.train(short(**{"train.steps": 6}), str(work))
    out = capsys.readouterr().out
    assert "resumed from step 3" in out
    assert int(jax.device_get(result.state.step)) == 6
    # the unreadable final step was moved aside and written again: readable now, equal to the result
    assert (work / "checkpoints" / "corrupt" / "6").is_dir()
    assert ckpt_lib.Checkpointer(work / "checkpoints").all_steps() == [3, 6]
    chex.assert_trees_all_equal(_restore_state(work, short(), 6), whole_state(result))
    capsys.readouterr()
    training.train(short(**{"train.steps": 6}), str(work))  # a third run has nothing left to do
    assert "resumed from step 6" in capsys.readouterr().out


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, short_runs):
    work = _copy_run(short_runs(3), tmp_path / "nan")  # = training.train(short(train.steps=3), work)
    good = ckpt_lib.Checkpointer(work / "checkpoints").all_steps()
    (work / "config.json").unlink()  # the poisoned optimizer is a deliberate change: skip the resume check
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
    ("optim.schedule", "step", "config.optim.schedule must be one of ('cosine', 'linear', 'constant', 'wsd')"),
    ("optim.warmup_steps", 100, "config.optim.warmup_steps must be in [0, train.steps=60]"),
    ("parallel.mode", "dp", "config.parallel.mode must be one of ('sharded', 'pmap')"),
    ("parallel.fsdp", 3, "parallel.fsdp must be a positive divisor of the device count 8"),
    ("model.residual", "sandwich", "TransformerConfig.residual must be one of ('post', 'pre', 'alpha', 'alpha_post', 'rezero', 'deepnorm')"),
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
    c = short(**{"data.path": str(tmp_path / "doc*.txt"), "train.steps": 30, "train.eval_every": 30,
                  "train.checkpoint_every": 30})
    result = training.train(c, str(tmp_path / "w"))
    floor = unigram_entropy(training.load_corpus(c.data).val)  # ~2.8 nats: a context-free model's best
    assert result.history[-1]["val_loss"] < floor - 0.5, (result.history[-1], floor)


def test_mlm_objective_and_alpha_residual(tmp_path):
    """MLM on runs of 200 equal bytes: a masked byte is the byte of its window, so a model that reads its
    context goes well below the unigram entropy (ln 8, the loss of predicting byte frequencies, where a
    broken mask or loss weighting stays), not merely finite. (Byte MLM on prose plateaus at the unigram
    entropy for hundreds of steps at this size: measured, see the WORKSPACE.)"""
    (tmp_path / "text.txt").write_text("".join(ch * 200 for ch in "abcdefgh") * 30)
    c = short(**{"data.objective": "mlm", "train.alpha_warmup_steps": 4, "data.path": str(tmp_path / "text.txt"),
                 "train.steps": 40, "train.eval_every": 20, "train.checkpoint_every": 40, "optim.warmup_steps": 4})
    c.model = config_lib.model_section("bert", num_layers=2, d_model=32, num_heads=2, head_dim=16, d_ff=64,
                                       max_len=64, residual="alpha_post")
    result = training.train(c, str(tmp_path / "w"))
    floor = unigram_entropy(training.load_corpus(c.data).val)
    assert floor == pytest.approx(np.log(8), abs=0.01)
    assert result.history[-1]["val_loss"] < floor - 0.25, (result.history[-1], floor)


def test_resume_refuses_another_config_and_allows_more_steps(tmp_path, capsys, short_runs):
    work = _copy_run(short_runs(3), tmp_path / "run")  # = training.train(short(train.steps=3), work)
    stored = (work / "config.json").read_text()
    metrics = (work / "metrics.jsonl").read_text()
    wider = short(**{"train.steps": 3, "optim.b2": 0.95})
    wider.model.d_model = 128
    with pytest.raises(config_lib.ConfigError, match=r"holds a run of another config.*2 field\(s\) differ: "
                                                      r"model.d_model: 64 -> 128; optim.b2: 0.99 -> 0.95"):
        training.train(wider, str(work))
    # nothing written, nothing moved: the stored config, the log and the checkpoint are as they were
    assert (work / "config.json").read_text() == stored and (work / "metrics.jsonl").read_text() == metrics
    assert ckpt_lib.Checkpointer(work / "checkpoints").all_steps() == [3]
    # without a stored config the checkpoint itself does not fit: refused, and never called corrupt
    (work / "config.json").unlink()
    with pytest.raises(ckpt_lib.CheckpointMismatch, match="step 3 .* does not fit the configured model"):
        training.train(wider, str(work))
    assert ckpt_lib.Checkpointer(work / "checkpoints").all_steps() == [3]
    assert not (work / "checkpoints" / "corrupt").exists()
    # train.steps may change on resume (RESUMABLE_FIELDS): the run continues from step 3 to 6
    capsys.readouterr()
    more = training.train(short(**{"train.steps": 6}), str(work))
    assert "resumed from step 3" in capsys.readouterr().out and int(jax.device_get(more.state.step)) == 6


def test_validation_split_smaller_than_a_batch_is_caught_before_anything_is_written(tmp_path):
    (tmp_path / "one.txt").write_text("a line of text\n" * 600)  # 9,000 bytes: 900 for validation
    c = tiny(**{"data.path": str(tmp_path / "one.txt"), "data.batch_size": 16, "data.seq_len": 64})
    with pytest.raises(config_lib.ConfigError, match=r"config.data: the validation split \(900 bytes, "
                       r"data.val_fraction=0.1\) holds 14 windows of data.seq_len=64, fewer than one batch "
                       r"\(data.batch_size=16\)"):
        training.train(c, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()


def test_one_file_two_files_a_folder_and_a_glob_all_split(tmp_path):
    text = "".join(f"line {i}: to be or not to be\n" for i in range(400))
    (tmp_path / "docs").mkdir()
    for name in ("a.txt", "b.txt"):
        (tmp_path / "docs" / name).write_text(text)
    one = tmp_path / "docs" / "a.txt"
    corpus = training.load_corpus(tiny(**{"data.path": str(one)}).data)
    data = text.encode()
    # one document: the last ~10% of its bytes, from a line start on, is the validation split
    assert len(corpus.train) + len(corpus.val) == len(data)
    assert abs(len(corpus.val) - 0.1 * len(data)) <= 40 and data[len(corpus.train) - 1:len(corpus.train)] == b"\n"
    assert bytes(corpus.val.astype(np.uint8)) == data[len(corpus.train):]
    for path in (tmp_path / "docs", str(tmp_path / "docs" / "*.txt")):  # two files: one document each side
        corpus = training.load_corpus(tiny(**{"data.path": str(path)}).data)
        assert len(corpus.val) == len(data) and len(corpus.train) == len(data)


@pytest.mark.parametrize("overrides, stored_change, message", [
    (["--config.model.norm=batchnorm"], None,
     "error: config.model: TransformerConfig.norm must be one of ('layernorm', 'rmsnorm'), got 'batchnorm'"),
    ([], ("model", "d_model", 32), "error: config: {w} holds a run of another config, not resumed (1 field(s) "
                                   "differ: model.d_model: 32 -> 64)"),
])
def test_train_py_config_errors_are_one_line_and_status_2(tmp_path, overrides, stored_change, message):
    work = tmp_path / "w"
    if stored_change is not None:  # a workdir whose run used another config
        stored = config_lib.to_dict(tiny())
        section, name, value = stored_change
        stored[section][name] = value
        work.mkdir()
        (work / "config.json").write_text(json.dumps(stored))
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "train.py", "--config=configs/lm.py:tiny", f"--workdir={work}", *overrides],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().startswith(message.format(w=work)), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert (sorted(p.name for p in work.iterdir()) == ["config.json"]) if stored_change else not work.exists()


def test_itstime():
    assert [t for t in range(1, 13) if training.itstime(t, 4, last=10)] == [4, 8, 10, 12]
    assert [t for t in range(1, 6) if training.itstime(t, 0, last=5)] == [5]  # every=0: only the last step


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


def _restore_state(workdir: Path, config, step: int, device=None):
    """The TrainState saved at ``step`` in ``workdir``, restored onto one device, on the host."""
    model = Transformer(config_lib.model_config(config.model))
    tx = training.make_optimizer(config.optim, config.train.steps)
    abstract = jax.eval_shape(lambda k: training.init_state(model, tx, k, config.data.seq_len),
                              jax.random.PRNGKey(0))
    one = jax.sharding.SingleDeviceSharding(device or jax.devices()[0])
    abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one), abstract)
    state, got = ckpt_lib.Checkpointer(workdir / "checkpoints").restore(abstract, step=step)
    assert got == step
    return jax.device_get(state)


def _restore_params(workdir: Path, config, step: int):
    """Params saved at ``step`` without the attention key biases (to compare across device layouts)."""
    return final_params(training.PhaseResult(_restore_state(workdir, config, step), [], 0.0, None))


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
                            stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and '"loss"' in metrics.read_text()):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    steps = ckpt_lib.Checkpointer(tmp_path / "checkpoints").all_steps()
    assert len(steps) == 1 and 0 < steps[0] < 400
    # one line, status 128 + SIGTERM = 143 (stopped by the signal, not finished; no traceback)
    assert proc.returncode == 143 and err.strip().splitlines() == [f"SIGTERM: saved step {steps[0]}; rerun to resume"], err
    again = subprocess.run([sys.executable, "train.py", *flags[:1], "--config.train.steps=" + str(steps[0] + 20),
                            *flags[2:]], cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resumed from step {steps[0]}" in again.stdout


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path):
    """SIGTERM reaches process 1 only (not the one that logs): both processes agree on one step, save it
    together and stop; the checkpoint directory holds exactly that step."""
    import re
    import signal
    import time

    flags = ["--config=configs/lm.py:tiny", "--config.train.steps=2000", "--config.train.checkpoint_every=5000",
             "--config.train.eval_every=5000", "--config.train.log_every=5", "--config.train.plot=False",
             f"--workdir={tmp_path}"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    env.pop("XLA_FLAGS", None)
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "train.py", *flags, "--multihost",
                               f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}",
                               "--jax_num_cpu_devices=2"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        metrics = tmp_path / "metrics.jsonl"
        deadline = time.time() + 240
        while time.time() < deadline and not (metrics.exists() and '"loss"' in metrics.read_text()):
            time.sleep(0.5)
        procs[1].send_signal(signal.SIGTERM)
        outs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    saved = [re.findall(r"SIGTERM: saved step (\d+)", out) for out in outs]
    assert saved[0] and saved[1] and saved[0] == saved[1], [out[-2000:] for out in outs]
    step = int(saved[0][0])
    assert ckpt_lib.Checkpointer(tmp_path / "checkpoints").all_steps() == [step] and 0 < step < 2000
