"""kexue_jax.config: None from the command line, model sections that keep None, dtypes as in flax, the
default workdir per variant, and the comparison that guards resumes."""
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from configs import lm as lm_config
from kexue_jax import config as config_lib
from kexue_jax.nn import TransformerConfig


def parse(*overrides: str, spec: str = "configs/lm.py:tiny"):
    """The config train.py would get for ``--config=spec`` plus ``overrides`` (a private flag registry)."""
    config_lib.accept_none_on_command_line()
    argv = ["train.py", f"--config={spec}", *overrides]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
    fv(argv)
    return fv.config


# every config field whose type allows None, with the value its preset/config file gives it
NULLABLE = [("model.init_std", 0.02), ("model.final_norm", None), ("model.head_norm_eps", None),
            ("optim.clip_norm", 1.0)]


@pytest.mark.parametrize("field, default", NULLABLE)
def test_none_from_the_command_line_is_kept(field, default):
    section, name = field.split(".")
    assert parse()[section][name] == default
    c = parse(f"--config.{field}=None")
    assert c[section][name] is None
    if section == "model":
        assert getattr(config_lib.model_config(c.model), name) is None  # not replaced by the preset's value
    other = {"model.init_std": "0.5", "model.final_norm": "True", "model.head_norm_eps": "0.001",
             "optim.clip_norm": "2.5"}[field]
    assert str(parse(f"--config.{field}={other}")[section][name]) == other  # values still parse


def test_none_is_the_preset_value_only_for_fields_that_cannot_be_none():
    c = parse("--config.model.init_std=None", spec="configs/lm.py:tiny")
    cfg = config_lib.model_config(c.model)
    assert cfg.init_std is None and cfg.norm_eps == 1e-5  # norm_eps left None in the section = GPT's value
    t5 = config_lib.model_section("t5")
    assert t5.init_std is None and config_lib.model_config(t5).init_std is None
    with pytest.raises(config_lib.ConfigError, match="config.data.seq_len must be a positive integer, got None"):
        config_lib.validate(parse("--config.data.seq_len=None"))


def test_dtypes_as_in_flax():
    assert TransformerConfig(dtype=jnp.bfloat16).dtype == "bfloat16"
    assert TransformerConfig(param_dtype=np.float64).param_dtype == "float64"
    assert TransformerConfig(dtype=np.dtype("float16")).compute_dtype == jnp.float16
    assert TransformerConfig(dtype=jnp.bfloat16) == TransformerConfig(dtype="bfloat16")  # the name is stored
    with pytest.raises(ValueError, match=r"TransformerConfig.dtype must be one of .*got 'int32'"):
        TransformerConfig(dtype=jnp.int32)


def test_default_workdir_includes_the_variant():
    assert config_lib.default_workdir("configs/lm.py:tiny") == "runs/lm_tiny"
    assert config_lib.default_workdir("configs/lm.py:default") == "runs/lm_default"
    assert config_lib.default_workdir("configs/upscale.py") == "runs/upscale"
    assert config_lib.default_workdir("configs/lm.py:a/b") == "runs/lm_a-b"


def test_config_changes_ignores_resumable_fields():
    stored = config_lib.to_dict(lm_config.get_config("tiny"))
    c = lm_config.get_config("tiny")
    c.train.steps, c.train.eval_every, c.parallel.fsdp = 500, 7, 2  # may change on resume
    assert config_lib.config_changes(stored, c) == []
    c.model.d_model, c.data.path, c.optim.lr = 128, "my.txt", 0.5
    assert config_lib.config_changes(stored, c) == ["data.path: '' -> 'my.txt'", "model.d_model: 64 -> 128",
                                                    "optim.lr: 0.01 -> 0.5"]
    assert config_lib.config_changes(stored, lm_config.get_config("default"))  # :tiny vs :default differ
    del stored["model"]["token_mixer"], stored["model"]["init_std"]  # a run stored before these fields existed
    c = lm_config.get_config("tiny")
    assert config_lib.config_changes(stored, c) == ["model.init_std: '(absent)' -> 0.02"]  # None would pass


def test_univae_measurements_may_change_on_resume_its_latent_may_not():
    from configs import univae as univae_config

    stored = config_lib.to_dict(univae_config.get_config("tiny"))
    c = univae_config.get_config("tiny")
    c.eval.lm_variant, c.eval.n_heldout = "", 500       # what is measured after training
    assert config_lib.config_changes(stored, c) == []
    c.univae.kappa = 512.0
    assert config_lib.config_changes(stored, c) == ["univae.kappa: 32.0 -> 512.0"]


def test_sources_stand_on_their_own():
    """No docstring or comment points at a file outside the repository or at an issue number."""
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    pattern = re.compile(r"/work/|DESIGN\.md|HELPER_BRIEF|\b[Ii]ssue[ -]?#?\d")
    files = [*repo.glob("kexue_jax/**/*.py"), *repo.glob("configs/*.py"), *repo.glob("benchmarks/*.py"),
             repo / "train.py"]
    assert len(files) > 20
    hits = [f"{f.relative_to(repo)}:{i}" for f in files for i, line in enumerate(f.read_text().splitlines(), 1)
            if pattern.search(line)]
    assert hits == []


# ------------------------------------------------------------------------------------------------
# The token mixers' options moved into config.model.mixer_options (kexue.fm/archives/8431).

def _old_layout(stored: dict) -> dict:
    """``stored`` as the code before mixer_options wrote it: the options were fields of config.model itself."""
    import copy
    old = copy.deepcopy(stored)
    old["model"].update(old["model"].pop("mixer_options"))
    return old


def test_moved_fields_name_every_option():
    from kexue_jax.nn.mixers import OPTION_NAMES
    assert config_lib.MOVED_FIELDS == {f"model.{n}": f"model.mixer_options.{n}" for n in OPTION_NAMES}
    assert len(config_lib.MOVED_FIELDS) == 8 and "model.conv_kernel_size" in config_lib.MOVED_FIELDS


@pytest.mark.parametrize("spec", ["configs/mixers.py:tiny", "configs/lm.py:tiny"])
def test_a_stored_config_with_the_old_flat_keys_resumes(tmp_path, spec):
    import json

    from kexue_jax import training
    c = parse(spec=spec)
    new = json.loads(json.dumps(config_lib.to_dict(c), default=str))
    old = _old_layout(new)
    assert "mixer_options" not in old["model"] and "conv_kernel_size" in old["model"]
    assert config_lib.migrate_stored(old) == new and "mixer_options" not in old["model"]  # a copy
    assert config_lib.migrate_stored(new) == new
    assert config_lib.config_changes(old, c) == []
    (tmp_path / "config.json").write_text(json.dumps(old, indent=2, sort_keys=True))
    training.check_resume(c, str(tmp_path))  # resumes
    # a stored section is read at the new keys (UniVAE's load builds the model from a stored config.json)
    assert config_lib.model_config(ml_collections.ConfigDict(old["model"])) == config_lib.model_config(c.model)
    c.model.mixer_options.conv_kernel_size = 5
    stored = old["model"]["conv_kernel_size"]
    with pytest.raises(config_lib.ConfigError, match=rf"model.mixer_options.conv_kernel_size: {stored!r} -> 5"):
        training.check_resume(c, str(tmp_path))


def test_an_old_key_on_the_command_line_names_the_new_key(tmp_path):
    argv = ("--config.model.conv_kernel_size=5",)
    with pytest.raises(Exception) as e:
        parse(*argv)
    want = ("--config.model.conv_kernel_size=5: config.model.conv_kernel_size moved: use "
            "config.model.mixer_options.conv_kernel_size (--config.model.mixer_options.conv_kernel_size=5)")
    assert config_lib.command_line_error(e.value, ["train.py", "--config=configs/lm.py:tiny", *argv]) == want
    c = parse("--config.model.mixer_options.conv_kernel_size=5", "--config.model.mixer_options.mixer_norm_eps=None")
    cfg = config_lib.model_config(c.model)
    assert cfg.mixer_options.conv_kernel_size == 5 and cfg.mixer_options.mixer_norm_eps is None
    import os
    import subprocess
    import sys
    from pathlib import Path
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "train.py", "--config=configs/lm.py:tiny", f"--workdir={tmp_path / 'w'}",
                           "--config.model.tiny_attention_dim=8"], cwd=repo, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(repo)})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0] == ("error: --config.model.tiny_attention_dim=8: config.model.tiny_attention_dim moved: use "
                        "config.model.mixer_options.tiny_attention_dim "
                        "(--config.model.mixer_options.tiny_attention_dim=8)")
    assert not (tmp_path / "w").exists()
