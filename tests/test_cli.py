"""What a new user hits on a fresh clone: each mistake ends in one line naming the field (or the flag) and exit
status 2 before anything is written; interrupts save and end in one line; documented commands work."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from configs import init_study as init_study_config
from configs import lm as lm_config
from configs import mixers as mixers_config
from configs import univae as univae_config
from configs import upscale as upscale_config
from kexue_jax import checkpoint as ckpt_lib
from kexue_jax import config as config_lib
from interrupts import signal_after_first_log

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
ENV.pop("XLA_FLAGS", None)


def run(*args, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)


def assert_one_line(proc, status, *words):
    """Exit ``status``, one line on stderr (no traceback) holding every one of ``words``."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == status and len(lines) == 1, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr and all(w in lines[0] for w in words), lines[0]
    return lines[0]


# ------------------------------------------------------------------------------------------------
# A language model that sees the answer.

def test_train_py_refuses_a_bidirectional_lm(tmp_path):
    """FNet with mask=bidirectional on the LM objective reached 0.22 nats/byte by reading the next byte."""
    proc = run("train.py", "--config=configs/lm.py:tiny", f"--workdir={tmp_path / 'w'}",
               "--config.model.token_mixer=fnet", "--config.model.mask=bidirectional", "--config.train.steps=3")
    assert_one_line(proc, 2, "error: config.model.mask must be 'causal'", "data.objective='lm'", "'bidirectional'")
    assert not (tmp_path / "w").exists()


def test_every_job_with_the_lm_objective_refuses_a_non_causal_mask():
    from kexue_jax.experiments import init_study, mixers, upscale

    c = lm_config.get_config("tiny")
    c.model.layer_masks = ("causal", "unilm")
    with pytest.raises(config_lib.ConfigError, match=r"config.model.layer_masks must be 'causal' in every layer"):
        config_lib.validate(c)
    c = upscale_config.get_config("gpt")  # next-byte prediction
    c.model.mask = "bidirectional"
    with pytest.raises(config_lib.ConfigError, match=r"config.model.mask must be 'causal'"):
        upscale.validate(c)
    c = init_study_config.get_config("tiny")
    c.model.mask = "uniae"
    with pytest.raises(config_lib.ConfigError, match=r"config.model.mask must be 'causal'"):
        init_study.validate(c)
    c = mixers_config.get_config("tiny")  # the mixer study makes its LM arms causal itself ...
    assert mixers.validate(c).mask == "bidirectional"
    c.model.layer_masks = ("bidirectional",)  # ... and per-layer masks would override that
    with pytest.raises(config_lib.ConfigError, match=r"config.model.layer_masks must be \(\) in the mixer study"):
        mixers.validate(c)
    c = lm_config.get_config("tiny")
    c.model.token_mixer = "fnet"  # causal by default: the mixer's error says it is for MLM, not "use bidirectional"
    with pytest.raises(config_lib.ConfigError, match=r"which has no causal form: it trains an MLM"):
        config_lib.validate(c)
    c.model.mask, c.data.objective = "bidirectional", "mlm"
    assert config_lib.validate(c).token_mixer == "fnet"  # the MLM objective is fine


# ------------------------------------------------------------------------------------------------
# Misspelled fields and variants, bad values, unknown flags.

@pytest.mark.parametrize("args, words", [
    (["--config=configs/lm.py:tiny", "--config.train.stepz=3"],
     ["--config.train.stepz=3: config.train has no field 'stepz' (did you mean 'steps'?)"]),
    (["--config=configs/lm.py:tiny", "--config.trian.steps=3"],
     ["--config.trian.steps=3: config has no field 'trian' (did you mean 'train'?)"]),
    (["--config=configs/univae.py:tinyy"], ["--config=configs/univae.py:tinyy", "variant must be one of", "'tinyy'"]),
    (["--config=configs/nope.py"], ["--config=configs/nope.py", "No such file"]),
    (["--config=configs/lm.py:tiny", "--config.train.steps=abc"], ["--config.train.steps=abc", "invalid literal"]),
    (["--config=configs/lm.py:tiny", "--workdri=x"], ["Unknown command line flag 'workdri'"]),
])
def test_a_command_line_without_a_usable_config_is_one_line_status_2(tmp_path, args, words):
    proc = run("train.py", *args, f"--workdir={tmp_path / 'w'}")
    assert_one_line(proc, 2, "error: ", *words)
    assert not (tmp_path / "w").exists()


# ------------------------------------------------------------------------------------------------
# Workdirs that are files or cannot be written.

def _unwritable(tmp_path: Path) -> Path:
    """A folder this process cannot write into (root writes through permission bits: /proc then)."""
    if os.geteuid() == 0:
        if not os.path.isdir("/proc/self"):
            pytest.skip("root without /proc: no folder it cannot write")
        return Path("/proc")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    return locked


def test_a_workdir_that_is_a_file_or_cannot_be_written_is_one_line_status_2(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for workdir, words in ((afile, ["is not a directory", "is a file"]),
                           (afile / "sub", ["is not a directory", "is a file"]),
                           (_unwritable(tmp_path) / "run", ["cannot be written"])):
        proc = run("train.py", "--config=configs/lm.py:tiny", f"--workdir={workdir}")
        assert_one_line(proc, 2, f"error: --workdir={workdir}", *words)
    assert sorted(p.name for p in tmp_path.iterdir()) in (["afile"], ["afile", "locked"])
    config_lib.check_workdir(str(tmp_path / "new" / "run"))  # creatable: passes, and writes nothing
    assert not (tmp_path / "new").exists()


# ------------------------------------------------------------------------------------------------
# Interrupts.

def test_ctrl_c_saves_the_current_step_and_ends_in_one_line(tmp_path):
    """SIGINT between checkpoints: status 130, one line, the current step saved (SIGTERM: 143, the slow test
    ``test_training.py::test_sigterm_saves_and_the_rerun_resumes``)."""
    status, err = signal_after_first_log(["--config=configs/lm.py:tiny", "--config.train.steps=5000",
                                          "--config.train.checkpoint_every=5000", "--config.train.log_every=5",
                                          "--config.train.eval_every=5000", "--config.train.plot=False"],
                                         tmp_path / "run", ENV, signal.SIGINT)
    proc = subprocess.CompletedProcess([], status, "", "\n".join(err))
    line = assert_one_line(proc, 130, "SIGINT: saved step", "rerun to resume")
    steps = ckpt_lib.Checkpointer(tmp_path / "run" / "checkpoints").all_steps()
    assert steps == [int(line.split("saved step ")[1].split(";")[0])] and 0 < steps[0] < 5000


# ------------------------------------------------------------------------------------------------
# UniVAE: data errors and the sub-commands.

def test_univae_missing_data_path_is_one_line_status_2(tmp_path):
    proc = run("train.py", "--config=configs/univae.py:tiny", "--config.data.path=/nonexistent",
               f"--workdir={tmp_path / 'w'}")
    assert_one_line(proc, 2, "error: config.data.path: '/nonexistent' does not exist")
    assert not (tmp_path / "w").exists()


def test_univae_single_text_file_is_split_by_lines_like_lm(tmp_path):
    from kexue_jax import data as data_lib
    from kexue_jax.experiments import univae as job

    lines = [f"Line number {i} of my own text." for i in range(400)]
    one = tmp_path / "mine.txt"
    one.write_text("\n".join(lines) + "\n")
    c = univae_config.get_config("tiny")
    c.data.path, c.univae.src_len = str(one), 40
    train, held = job.load_lines(c)
    assert train == lines[:len(train)] and held == lines[len(train):]  # the file's last ~10% of lines held out
    assert len(held) == pytest.approx(40, abs=2)
    assert data_lib.split_corpus(data_lib.load_plays(str(one)), 0.1)[1].size > 0  # lm.py's split of the same file
    (tmp_path / "short.txt").write_text("a\nb\n")
    c.data.path = str(tmp_path / "short.txt")
    with pytest.raises(config_lib.ConfigError, match=r"config.data.path: '.*short.txt' has too few distinct lines"):
        job.load_lines(c)


def test_univae_cli_errors_are_one_line_status_2(tmp_path, monkeypatch, capsys):
    from kexue_jax.experiments import univae as job

    proc = run("-m", "kexue_jax.experiments.univae", "sample", "--workdir", str(tmp_path / "none"))
    assert_one_line(proc, 2, f"error: --workdir '{tmp_path / 'none'}' does not exist", "python train.py")
    c = univae_config.get_config("tiny")
    cfg = job.univae_config(c)
    monkeypatch.setattr(job, "load", lambda workdir: (c, cfg, job.BYTES, None))  # a trained run, n_latent 2
    for argv, words in ((["resample", "--text", "hi", "--layers", "2"], "--layers must be distinct"),
                        (["resample", "--text", "hi", "--layers", "a"], "in [0, 2) (0 = the lowest latent layer)"),
                        (["interpolate", "--text", "a", "--text2", "b", "--steps", "1"],
                         "--steps must be an integer >= 2"),
                        (["interpolate", "--text", "a", "--text2", "b", "--steps", "x"], "argument --steps"),
                        (["sample", "--n", "0"], "--n must be a positive integer")):
        with pytest.raises(SystemExit) as exit_info:
            job.main([*argv, "--workdir", "w"])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and words in err[0]
    assert job.parse_layers("1,0", 2) == [1, 0]
    tokens = job.source_tokens(["x" * 20, "short"], cfg, job.BYTES)  # src_len 16: 14 bytes fit
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"warning: --text is 20 tokens, more than univae.src_len - 2 = 14: cut to {'x' * 14!r}"]
    assert job.to_text(tokens[0]) == "x" * 14 and job.to_text(tokens[1]) == "short"


# ------------------------------------------------------------------------------------------------
# Documented commands.

def test_old_analytic_command_forwards_and_hf_help_is_whole():
    proc = run("-m", "kexue_jax.analytic", "--help", timeout=120)
    assert proc.returncode == 0 and "python -m kexue_jax.experiments.analytic" in proc.stdout
    assert "--experiment {tabular,shakespeare}" in " ".join(proc.stdout.split())
    workspace = (REPO / "WORKSPACE.md").read_text()
    assert "python -m kexue_jax.analytic --experiment" not in workspace
    assert "Replace the" not in workspace
    proc = run("-m", "kexue_jax.hf", "--help", timeout=120)
    assert proc.returncode == 0
    assert "widening a real pretrained model losslessly (kexue.fm/archives/8444)." in " ".join(proc.stdout.split())
