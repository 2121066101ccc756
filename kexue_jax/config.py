"""Experiment configs (ml_collections) and their validation.

A config has the sections ``model`` (a ``TransformerConfig`` preset plus overrides of any field),
``data``, ``optim``, ``train`` and ``parallel``. Every field of ``TransformerConfig`` is present in
``config.model``, so ``--config.model.<field>=...`` works for all of them. A field whose type does not
allow None holds None for "the preset's value"; a field whose type allows None (``init_std``,
``final_norm``, ``head_norm_eps``) holds the preset's value, so an explicit None is kept. (Changing
``preset`` on the command line does not refill those three: set them too.)
``validate`` checks everything and raises :class:`ConfigError` (a ValueError) naming the field and the
allowed values before any data is read or anything is compiled.

The token mixers' options are the nested section ``config.model.mixer_options`` (``TransformerConfig.mixer_options``,
kexue.fm/archives/8431). They were fields of ``config.model`` itself (:data:`MOVED_FIELDS`): the old keys on the
command line end in one line naming the new key (status 2), and a stored config that has them resumes
(:func:`migrate_stored`).

Resuming: a run stores its resolved config (``config.json``); :func:`config_changes` lists the fields
that differ from a stored one, except :data:`RESUMABLE_FIELDS` (schedule length, logging, evaluation,
checkpoint cadence, device layout), which may change when a run is resumed.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import tempfile
import types
import typing
from typing import Any, Sequence

import ml_collections
from absl import flags
from ml_collections import config_dict, config_flags

from kexue_jax.nn.mixers import OPTION_NAMES, MixerOptions
from kexue_jax.nn.transformer import TransformerConfig

OBJECTIVES = ("lm", "mlm")
SCHEDULES = ("cosine", "linear", "constant", "wsd")
DECAY_SHAPES = ("linear", "1-sqrt")
MODES = ("sharded", "pmap")

#: Fields that may differ between a run and its resume: the number of steps (the learning-rate schedule
#: is rebuilt for the new total), the logging / evaluation / checkpoint cadence and the device layout
#: (checkpoints are resharded on restore), and a job's post-training measurements (``eval.*``: the UniVAE
#: job's sizes of its held-out measurements and its judge LM). ``section.*`` matches a whole section.
RESUMABLE_FIELDS = ("train.steps", "train.log_every", "train.eval_every", "train.eval_batches",
                    "train.checkpoint_every", "train.keep_checkpoints", "train.plot", "parallel.*", "eval.*")

#: Fields added to the code with a value other than None that does what the code did before them: a stored
#: config that lacks one resumes while the field holds that value (as it resumes while an added field is None).
ADDED_FIELDS = {"upscale.scenario": "grow_during", "upscale.protocol": "to_target"}

#: Fields that moved: old dotted key -> new dotted key. A stored config with the old keys is read at the new ones
#: (:func:`migrate_stored`); the old keys on the command line or in ``model_section`` are errors naming the new.
MOVED_FIELDS = {f"model.{name}": f"model.mixer_options.{name}" for name in OPTION_NAMES}


class ConfigError(ValueError):
    """A configuration the run cannot use (a field, the data it names, or a resume of another config).
    ``train.py`` prints its message as one line and exits with status 2."""


def _allows_none(field: dataclasses.Field, cls: type = TransformerConfig) -> bool:
    hint = typing.get_type_hints(cls)[field.name]
    return isinstance(hint, types.UnionType) and type(None) in hint.__args__


def _moved_error(old: str) -> str:
    """``config.<old> moved: use config.<new>`` for a key of MOVED_FIELDS (without the ``config.`` prefix)."""
    return f"config.{old} moved: use config.{MOVED_FIELDS[old]}"


def _placeholder(field: dataclasses.Field):
    hint = str(field.type)
    if "tuple" in hint:
        return config_dict.placeholder(tuple)
    for name, typ in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if hint.startswith(name) or hint.startswith(f"{name} |"):
            return config_dict.placeholder(typ)
    return config_dict.placeholder(object)


def model_section(preset: str = "gpt", **overrides) -> ml_collections.ConfigDict:
    """``preset`` plus one entry per TransformerConfig field: None (= the preset's value) for fields that
    cannot be None, the preset's value for fields that can (so that None given later is kept). The token
    mixers' options are the nested section ``mixer_options`` with the same rule; override some of them with
    ``mixer_options=dict(conv_kernel_size=3, ...)`` (kexue.fm/archives/8431)."""
    section = ml_collections.ConfigDict({"preset": preset})
    resolved = TransformerConfig.preset(preset)
    for field in dataclasses.fields(TransformerConfig):
        if field.name == "mixer_options":
            section[field.name] = _options_section(resolved.mixer_options)
            continue
        section[field.name] = _placeholder(field)
        if _allows_none(field):
            section[field.name] = getattr(resolved, field.name)
    for name, value in overrides.items():
        if f"model.{name}" in MOVED_FIELDS:
            raise ConfigError(f"{_moved_error(f'model.{name}')} (model_section(..., mixer_options=dict({name}=...)))")
        if name not in section:
            raise ConfigError(f"config.model: unknown field {name!r}")
        if name == "mixer_options":
            options = dataclasses.asdict(value) if isinstance(value, MixerOptions) else dict(value)
            unknown = sorted(set(options) - set(OPTION_NAMES))
            if unknown:
                raise ConfigError(f"config.model.mixer_options: unknown field(s) {unknown}; fields are {OPTION_NAMES}")
            for key, option in options.items():
                section.mixer_options[key] = option
            continue
        section[name] = value
    return section


def _options_section(options: MixerOptions) -> ml_collections.ConfigDict:
    """``config.model.mixer_options``: None (= the default) for options that cannot be None, else the value."""
    section = ml_collections.ConfigDict()
    for field in dataclasses.fields(MixerOptions):
        section[field.name] = _placeholder(field)
        if _allows_none(field, MixerOptions):
            section[field.name] = getattr(options, field.name)
    return section


def base_config(experiment: str = "lm") -> ml_collections.ConfigDict:
    """Defaults shared by all experiments (each config file edits them)."""
    c = ml_collections.ConfigDict()
    c.experiment = experiment
    c.seed = 0
    c.model = model_section("gpt")
    c.data = ml_collections.ConfigDict(dict(
        path="",            # "" = the embedded Shakespeare corpus; else a file, folder or glob of UTF-8 text
        val_fraction=0.1, split_seed=0, seq_len=128, batch_size=32, objective="lm", mask_rate=0.15))
    c.optim = ml_collections.ConfigDict(dict(
        lr=3e-3, warmup_steps=100, schedule="cosine", min_lr_ratio=0.1, weight_decay=0.1,
        b1=0.9, b2=0.99, eps=1e-8, clip_norm=1.0,
        # schedule "wsd" only: the share of the steps spent decaying (None = 0.2) and the decay's shape
        # ("linear" or "1-sqrt"; None = "linear"): training.cooldown_schedule
        decay_fraction=config_dict.placeholder(float), decay_shape=config_dict.placeholder(str)))
    c.train = ml_collections.ConfigDict(dict(
        steps=1000, grad_accum=1, log_every=50, eval_every=200, eval_batches=8, checkpoint_every=500,
        keep_checkpoints=3, alpha_warmup_steps=0, plot=True))
    c.parallel = ml_collections.ConfigDict(dict(mode="sharded", data=-1, fsdp=1))
    return c


def model_config(section) -> TransformerConfig:
    """The TransformerConfig of a ``config.model`` section (raises its validation errors). A section stored
    before a field moved (a run's config.json: :data:`MOVED_FIELDS`) is read at the new keys."""
    values = migrate_stored({"model": to_dict(section)})["model"]
    leftover = [k for k in values if f"model.{k}" in MOVED_FIELDS]
    if leftover:  # a section of today's layout with an old key added (e.g. by a config file)
        raise ConfigError(_moved_error(f"model.{leftover[0]}"))
    preset = values.pop("preset")
    options = values.pop("mixer_options", None) or {}
    nullable = {f.name for f in dataclasses.fields(TransformerConfig) if _allows_none(f)}
    overrides = {k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items()
                 if v is not None or k in nullable}
    nullable_options = {f.name for f in dataclasses.fields(MixerOptions) if _allows_none(f, MixerOptions)}
    overrides["mixer_options"] = {k: v for k, v in options.items() if v is not None or k in nullable_options}
    try:
        return TransformerConfig.preset(preset, **overrides)
    except ValueError as e:
        raise ConfigError(f"config.model: {e}") from None


def migrate_stored(stored: dict) -> dict:
    """A stored config (the dict of a run's ``config.json``, or any config as a dict) in today's layout: the keys of
    :data:`MOVED_FIELDS` that it has are read at their new keys (a copy; ``stored`` is not changed). A config that
    has the new section already (``model.mixer_options``) is of today's layout and comes back as it is."""
    out = copy.deepcopy(stored)
    sections: dict[str, list[tuple[str, str]]] = {}  # new section -> its (old, new) keys
    for old, new in MOVED_FIELDS.items():
        sections.setdefault(new.rsplit(".", 1)[0], []).append((old, new))
    for section, moves in sections.items():
        holder_path, name = section.rsplit(".", 1)
        holder = _node(out, holder_path)
        if holder is None or name in holder:
            continue
        moved = {}
        for old, new in moves:
            parent_path, key = old.rsplit(".", 1)
            parent = _node(out, parent_path)
            if parent is not None and key in parent:
                moved[new.rsplit(".", 1)[1]] = parent.pop(key)
        if moved:
            holder[name] = moved
    return out


def _node(tree: dict, dotted: str):
    """The dict at ``dotted`` in a nested dict, or None."""
    for key in dotted.split("."):
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree if isinstance(tree, dict) else None


def _fail(field: str, allowed: str, got: Any):
    raise ConfigError(f"config.{field} must be {allowed}, got {got!r}")


def _positive_int(c, field: str):
    section, name = field.split(".")
    v = c[section][name]
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        _fail(field, "a positive integer", v)


def validate(c, num_devices: int | None = None) -> TransformerConfig:
    """Check a whole config; returns the model's TransformerConfig. ``num_devices`` (default: all)
    checks that the batch splits over the devices."""
    model_cfg = model_config(c.model)
    for field in ("data.seq_len", "data.batch_size", "train.steps", "train.grad_accum", "train.log_every",
                  "train.eval_every", "train.eval_batches", "train.checkpoint_every", "train.keep_checkpoints"):
        _positive_int(c, field)
    if c.data.objective not in OBJECTIVES:
        _fail("data.objective", f"one of {OBJECTIVES}", c.data.objective)
    if c.data.objective == "mlm" and model_cfg.mask == "causal":
        _fail("model.mask", "not 'causal' with data.objective='mlm' (use preset 'bert' or mask='bidirectional')",
              model_cfg.mask)
    if c.data.objective == "lm" and any(m != "causal" for m in model_cfg.masks_per_layer):
        # next-byte prediction with a non-causal mask reads the byte it predicts: a loss near 0 that means nothing
        field, got = ("model.layer_masks", model_cfg.layer_masks) if model_cfg.layer_masks else ("model.mask",
                                                                                                  model_cfg.mask)
        _fail(field, "'causal' in every layer with data.objective='lm' (any other mask lets a position see the "
                     "byte it predicts; use data.objective='mlm' for a bidirectional model)", got)
    if not 0.0 < c.data.val_fraction < 1.0:
        _fail("data.val_fraction", "a number in (0, 1)", c.data.val_fraction)
    if not 0.0 < c.data.mask_rate < 1.0:
        _fail("data.mask_rate", "a number in (0, 1)", c.data.mask_rate)
    if model_cfg.position == "learned" and c.data.seq_len > model_cfg.max_len:
        _fail("data.seq_len", f"<= model.max_len={model_cfg.max_len} with learned positions", c.data.seq_len)
    if c.data.batch_size % c.train.grad_accum:
        _fail("train.grad_accum", f"a divisor of data.batch_size={c.data.batch_size}", c.train.grad_accum)
    if c.optim.schedule not in SCHEDULES:
        _fail("optim.schedule", f"one of {SCHEDULES}", c.optim.schedule)
    if not c.optim.lr > 0:
        _fail("optim.lr", "a number > 0", c.optim.lr)
    if c.optim.warmup_steps < 0 or c.optim.warmup_steps > c.train.steps:
        _fail("optim.warmup_steps", f"in [0, train.steps={c.train.steps}]", c.optim.warmup_steps)
    if not 0.0 <= c.optim.min_lr_ratio <= 1.0:
        _fail("optim.min_lr_ratio", "a number in [0, 1]", c.optim.min_lr_ratio)
    decay_fraction, decay_shape = c.optim.get("decay_fraction"), c.optim.get("decay_shape")
    if decay_fraction is not None and (isinstance(decay_fraction, bool) or not 0.0 < decay_fraction <= 1.0):
        _fail("optim.decay_fraction", "None (0.2) or a number in (0, 1]", decay_fraction)
    if decay_shape is not None and decay_shape not in DECAY_SHAPES:
        _fail("optim.decay_shape", f"None (linear) or one of {DECAY_SHAPES}", decay_shape)
    if c.optim.weight_decay < 0:
        _fail("optim.weight_decay", "a number >= 0", c.optim.weight_decay)
    if c.optim.clip_norm is not None and c.optim.clip_norm <= 0:
        _fail("optim.clip_norm", "None or a number > 0", c.optim.clip_norm)
    if c.train.alpha_warmup_steps < 0:
        _fail("train.alpha_warmup_steps", "an integer >= 0", c.train.alpha_warmup_steps)
    if c.parallel.mode not in MODES:
        _fail("parallel.mode", f"one of {MODES}", c.parallel.mode)
    if num_devices is not None:
        micro = c.data.batch_size // c.train.grad_accum
        if micro % num_devices:
            _fail("data.batch_size", f"such that batch_size / grad_accum is divisible by the {num_devices} devices",
                  c.data.batch_size)
    return model_cfg


def to_dict(c) -> dict:
    """A JSON-serialisable dict of the config (for config.json)."""
    def plain(v):
        if isinstance(v, (ml_collections.ConfigDict, dict)):
            return {k: plain(x) for k, x in dict(v).items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v
    return plain(c.to_dict() if hasattr(c, "to_dict") else c)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _resumable(field: str) -> bool:
    return any(field == r or (r.endswith(".*") and field.startswith(r[:-1])) for r in RESUMABLE_FIELDS)


def config_changes(stored: dict, current) -> list[str]:
    """``field: stored -> current`` for every field that differs between a stored config (the dict of a
    run's ``config.json``) and ``current``, except :data:`RESUMABLE_FIELDS` and fields the stored config
    lacks that are None now (a field added to the code since, left at "the preset's value") or hold their
    :data:`ADDED_FIELDS` value; [] when resuming is safe."""
    old = _flatten(migrate_stored(stored))  # a config stored before a field moved: at the new keys
    new = _flatten(json.loads(json.dumps(to_dict(current), default=str)))  # the JSON form: tuples as lists
    absent = "(absent)"
    return [f"{k}: {old.get(k, absent)!r} -> {new.get(k, absent)!r}" for k in sorted(set(old) | set(new))
            if old.get(k, absent) != new.get(k, absent) and not _resumable(k)
            and not (k not in old and new[k] == ADDED_FIELDS.get(k))]


def identity(c) -> dict:
    """The fields of config ``c`` that a resume may not change (all but :data:`RESUMABLE_FIELDS`), flattened
    (``"section.field": value``) in their JSON form, without those that are None or hold their
    :data:`ADDED_FIELDS` value (so a field added to the code later keeps the identity of a config): a run
    resumes under a config of the same identity (:func:`config_changes`)."""
    flat = _flatten(json.loads(json.dumps(to_dict(c), default=str)))
    return {k: v for k, v in sorted(flat.items()) if v != ADDED_FIELDS.get(k) and not _resumable(k)}


def default_workdir(config_spec: str) -> str:
    """``runs/<file stem>`` or ``runs/<file stem>_<variant>`` for ``--config=path/stem.py[:variant]``, so
    the variants of one config file never share (and resume) one run."""
    path, _, variant = str(config_spec).partition(":")
    stem = os.path.splitext(os.path.basename(path))[0]
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in variant)
    return os.path.join("runs", f"{stem}_{safe}" if safe else stem)


def check_workdir(workdir: str) -> None:
    """Raise ConfigError unless ``workdir`` is a directory this process can write, or one it can create:
    its nearest existing ancestor must be a directory where a file can be made (a temporary file, removed
    at once, probes it; ``os.access`` alone passes root everywhere, /proc included)."""
    probe = os.path.abspath(workdir)
    while not os.path.lexists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    where = "" if probe == os.path.abspath(workdir) else f" (the nearest existing path on it is {probe!r})"
    if not os.path.isdir(probe):
        raise ConfigError(f"--workdir={workdir} is not a directory{where}: {probe!r} is a file; give a directory")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise ConfigError(f"--workdir={workdir} cannot be written{where}: {e.strerror or e}; "
                          f"give a directory you can write") from None


_DID_YOU_MEAN = re.compile(r'Did you mean "([^"]+)" instead of "([^"]+)"\?')
_EXCEPTION_PREFIX = re.compile(r"^[A-Za-z_.]*(Error|Exception): ")


def command_line_error(error: BaseException, argv: Sequence[str]) -> str:
    """One line for a command line that gives no usable config (``train.py`` prints it, status 2): a
    misspelled field, with ml_collections' "did you mean" hint and the argument that named it; a config
    file or variant that does not load (the error at the end of its traceback); a bad value or flag."""
    for arg in argv:  # a field that moved (MOVED_FIELDS): the new key, whatever ml_collections says
        key, has_value, value = arg.partition("=")
        if key.startswith("--config.") and key[len("--config."):] in MOVED_FIELDS:
            old = key[len("--config."):]
            return f"{arg}: {_moved_error(old)} (--config.{MOVED_FIELDS[old]}{has_value}{value})"
    chain = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    for text in (str(a) for e in chain for a in e.args):
        hint = _DID_YOU_MEAN.search(text)
        if hint is None:
            continue
        suggestion, key = hint.groups()
        for arg in argv:
            path = arg.split("=", 1)[0][2:].split(".")
            if arg.startswith("--config.") and key in path[1:]:
                parent = ".".join(path[:path.index(key, 1)])
                return f"{arg}: {parent} has no field {key!r} (did you mean {suggestion!r}?)"
        return f"config has no field {key!r} (did you mean {suggestion!r}?)"
    first = chain[0]
    text = str(first.args[0]) if isinstance(first, KeyError) and first.args else str(first)
    lines = [line.strip() for line in text.splitlines() if line.strip()] or [type(first).__name__]
    if len(lines) == 1:
        return lines[0]
    head = lines[0].rstrip(":") if lines[0].startswith("flag --") else next(
        (a for a in argv if a.startswith("--config=")), lines[0].rstrip(":"))
    return f"{head}: {_EXCEPTION_PREFIX.sub('', lines[-1])}"


class _NoneOr(flags.ArgumentParser):
    """An absl flag parser that reads the literal ``None`` as None and anything else with ``parser``."""

    def __init__(self, parser: flags.ArgumentParser):
        self._parser = parser

    def parse(self, argument):
        if isinstance(argument, str) and argument.strip() == "None":
            return None
        return self._parser.parse(argument)

    def flag_type(self):
        return self._parser.flag_type()


def accept_none_on_command_line() -> None:
    """Let ``--config.<field>=None`` set None for int, float and bool fields (ml_collections' parsers
    reject it). Fields that cannot be None then fail validation with a message naming the field.
    Changes ml_collections' parser table for this process: call it in an entry point, not at import."""
    for typ, parser in ((float, flags.FloatParser()), (int, flags.IntegerParser()), (bool, flags.BooleanParser())):
        config_flags.register_flag_parser_for_type(typ, _NoneOr(parser))


__all__ = ["base_config", "model_section", "model_config", "validate", "to_dict", "ConfigError", "RESUMABLE_FIELDS",
           "ADDED_FIELDS", "MOVED_FIELDS", "migrate_stored", "identity", "config_changes",
           "accept_none_on_command_line", "default_workdir", "check_workdir", "command_line_error"]
