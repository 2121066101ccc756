"""One prepared accelerator run: throughput and MFU against a plain flax step, the pod path, growth at GPU scale.

    python benchmarks/device_suite.py --out DIR [--budget-s 540] [--smoke] [--compilation-cache DIR]
        [--stages throughput,pod_path,growth] [--batch-per-device 16] [--growth-workers 3] [--fsdp N]
    python benchmarks/device_suite.py --cpu-compare [--layers 4 --d-model 256 --seq 256 --batch 16 --rounds 20]

Stages run in order, each inside its own share of ``--budget-s`` (wall seconds from the start of the command);
a stage whose share is shorter than its minimum is skipped, and its JSON says why. A stage that raises is
recorded as "error" with the traceback's last lines, and the next stage still runs. ``--out`` receives small
files only: ``summary.json``, one ``<stage>.json`` per stage, and the growth job's ``growth_report.json`` and
``growth_compute.png``. ``--smoke`` runs every stage at toy sizes on a CPU (the test does: about 40 s on 2 shared
cores, nearly all of it compilation).

throughput  The ``configs/upscale.py:pod`` small and big models (GPT, 12 layers, d 384 and 768 = d 384 widened
            x2 by num_heads, seq 1024, bfloat16, attention through cuDNN on a GPU: ``attention_impl="cudnn"``;
            "auto" elsewhere), one training step each: the project's trainer step
            (``kexue_jax.training.make_train_step`` + ``make_optimizer``) and the plain flax step of the same model
            (``benchmarks/flax_reference.py``), fed the same parameters and the same batch, timed in interleaved
            rounds (A B B A ...); then the big model with gradient accumulation, the small model in float32 at
            ``jax.default_matmul_precision("highest")`` (what the lossless check uses; both steps: their
            first-step losses are the float32 parity check), and on a GPU the big model with the config's own
            ``attention_impl="auto"``. Parameters are drawn once per model on the host at the preset's scales and
            shared by its rows. For each row: compile time (rows compile concurrently, ``--compile-workers``),
            step time (median over rounds of ``steps_per_round`` steps, after untimed warm-up steps; the first
            gives ``first_loss``), tokens/s, peak memory (``memory_stats()["peak_bytes_in_use"]`` after the row's
            group: a running peak of the process, null where the backend has none) and XLA's memory analysis of
            the compiled step, and

                MFU = F / (t_step x P x n_devices),   F = kexue_jax.flops.training_flops(cfg, seq, batch)
                                                        = 6 x (matmul multiply-adds of one forward pass)

            with P the chip's dense bf16 peak from ``kexue_jax.parallel.vendor_peak_flops`` (vendor figure of the
            matched ``device_kind``: H100 SXM and H200 989 TFLOP/s, H100 PCIe 756, ...); None where the chip is not
            in the table (CPUs), with F still recorded. F counts the full n^2 attention matmuls (a causal kernel
            skips half of them) and no elementwise work. ``ratio`` = reference step time / project step time
            (> 1: ours is faster). ``--cpu-compare`` times the same pair at one float32 size on this machine.
pod_path    The d 384 model trained a few steps, widened to d 768 inside the device mesh by the job's own
            ``grow_state`` (FSDP over gcd(devices, config fsdp)), then the job's ``logit_gap`` at highest
            precision on 4 validation windows: the gap, the logit scale, and pass/fail at the config's
            ``upscale.lossless_atol`` x max(scale, 1).
growth      ``configs/upscale.py:gpu`` through the main job itself: arm B at lr x (1, 1/2, 2), arm A at the
            defaults against B at the config's lr (``upscale.baseline``: the job's own report, copied), and A's
            ``compute_saving`` recomputed against the best of the three B's. ``--growth-workers`` > 1 runs the
            B's as parallel ``train.py`` processes (a GPU is compile-bound at this size; killed with SIGTERM at the
            stage's deadline), then A; 1 runs B, A, then the other B's in this process, skipping a job whose
            estimate (the first job's time) exceeds what is left. Checkpoints go to ``--scratch``, not ``--out``.

The persistent compilation cache (``--compilation-cache``, default ``<out>/compilation_cache``; give a path
outside ``--out`` when only small files may come back) makes a second call skip compilation. Multi-host (a TPU
pod slice, several GPU hosts): ``--multihost`` calls ``jax.distributed.initialize()``, every host runs the same
command, process 0 writes the files, and the growth stage runs in-process.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent import futures
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # the growth stage's processes share the GPU

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
for _path in (str(ROOT), str(ROOT / "benchmarks")):  # configs/ and flax_reference
    if _path not in sys.path:
        sys.path.insert(0, _path)

import flax_reference as reference  # noqa: E402
from configs import upscale as upscale_configs  # noqa: E402

from kexue_jax import config as config_lib  # noqa: E402
from kexue_jax import data as data_lib  # noqa: E402
from kexue_jax import flops as flops_lib  # noqa: E402
from kexue_jax import parallel, training  # noqa: E402
from kexue_jax.experiments import upscale as upscale_job  # noqa: E402
from kexue_jax.nn import Transformer, TransformerConfig  # noqa: E402

STAGES = ("throughput", "pod_path", "growth")
STAGE_KEYS = ("stage", "status", "reason", "budget_s", "elapsed_s")
ROW_KEYS = ("name", "step", "model", "batch", "seq_len", "grad_accum", "dtype", "precision", "attention",
            "compile_s", "step_time_s", "step_times_s", "tokens_per_s", "flops_per_step", "mfu", "first_loss",
            "peak_memory_bytes", "compiled_memory_bytes")


@dataclasses.dataclass(frozen=True)
class Plan:
    """Sizes of one run of the suite (``FULL`` for a device, ``SMOKE`` for a CPU in under a minute)."""

    batch_per_device: int          # throughput rows: sequences per device per step
    grad_accum: int                # the accumulation row: batch x grad_accum sequences in grad_accum micro-batches
    rounds: int                    # timed rounds per row; the step time is the median over rounds
    steps_per_round: int           # steps per round (one block_until_ready per round)
    warmup_steps: int              # untimed steps after compilation (the first gives the first-step loss)
    pod_model: dict                # overrides of configs/upscale.py:pod's model section (SMOKE shrinks it)
    pod_seq_len: int | None        # None: the config's 1024
    pod_train_steps: int           # steps of the small model before the pod path widens it
    pod_batch_per_device: int
    growth: dict                   # "section.field" overrides of configs/upscale.py:gpu
    growth_workers: int
    share: dict                    # a stage's budget: share x --budget-s (growth: what is left)
    minimum_s: dict                # a stage with less than this is skipped
    lr_factors: tuple = (1.0, 0.5, 2.0)  # arm B's learning rates, x the config's (the first is A's baseline)


FULL = Plan(batch_per_device=16, grad_accum=4, rounds=10, steps_per_round=3, warmup_steps=2, pod_model={},
            pod_seq_len=None, pod_train_steps=20, pod_batch_per_device=8, growth={}, growth_workers=3,
            share={"throughput": 0.35, "pod_path": 0.12}, minimum_s={"throughput": 60, "pod_path": 25, "growth": 120})
SMOKE = Plan(batch_per_device=2, grad_accum=2, rounds=10, steps_per_round=1, warmup_steps=1,
             pod_model=dict(num_layers=2, d_model=32, num_heads=2, head_dim=16, d_ff=128, max_len=32),
             pod_seq_len=32, pod_train_steps=3, pod_batch_per_device=2,
             growth={"model.num_layers": 1, "model.d_model": 16, "model.num_heads": 2, "model.head_dim": 8,
                     "model.d_ff": 64, "model.max_len": 32, "data.seq_len": 32, "data.batch_size": 8,
                     "optim.warmup_steps": 2, "train.steps": 8, "upscale.widen_at": 3, "train.eval_every": 4,
                     "train.eval_batches": 1, "train.log_every": 4, "train.checkpoint_every": 8, "train.plot": False},
             growth_workers=1, share={"throughput": 0.4, "pod_path": 0.2},
             minimum_s={"throughput": 1, "pod_path": 1, "growth": 1}, lr_factors=(1.0,))
#: --smoke compiles with XLA's CPU optimisations off (toy sizes: compilation is the whole cost)
SMOKE_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


# ---------------------------------------------------------------------------------------------------------------
# Pure helpers: the figures.
# ---------------------------------------------------------------------------------------------------------------

def mfu(flops_per_step: float, step_time_s: float, peak_flops: float | None, num_devices: int = 1) -> float | None:
    """Model FLOPs utilisation F / (t x P x n): None when the peak P is unknown (or t is not positive)."""
    if peak_flops is None or not step_time_s > 0:
        return None
    return flops_per_step / (step_time_s * peak_flops * num_devices)


def peak_of(device) -> dict:
    """The dense bf16 peak MFU divides by, and how it was chosen."""
    flops, key = parallel.vendor_peak_flops(device)
    kind = getattr(device, "device_kind", "")
    if flops is None:
        how = (f"unknown: {kind!r} ({device.platform}) is not in kexue_jax.parallel's vendor table of dense bf16 "
               f"peaks, so MFU is null (the FLOPs per step are recorded)")
    else:
        how = f"vendor dense bf16 figure (no sparsity) for table key {key!r}, matched in device_kind {kind!r}"
    return {"flops_per_device": flops, "how": how, "device_kind": kind}


def stage_budget(name: str, plan: Plan, total_s: float, remaining_s: float) -> tuple[float, str | None]:
    """(seconds for stage ``name``, None) or (0, why it is skipped): its share of the total (growth: all that
    is left), capped by what is left, must reach its minimum."""
    budget = remaining_s if name not in plan.share else min(remaining_s, plan.share[name] * total_s)
    if budget < plan.minimum_s[name]:
        return 0.0, (f"{budget:.0f} s of the budget left for this stage (of {remaining_s:.0f} s remaining), "
                     f"less than its minimum {plan.minimum_s[name]} s")
    return budget, None


def flag_value(value) -> str:
    """A value as an ml_collections command-line override reads it (tuples as Python literals)."""
    if isinstance(value, tuple):
        return "(" + "".join(f"{v!r}," for v in value) + ")"
    return str(value)


def apply_overrides(config, overrides: dict) -> None:
    """Set ``"section.field"`` keys of ``overrides`` on an ml_collections config (KeyError on unknown ones)."""
    for key, value in overrides.items():
        section, field = key.split(".")
        if field not in config[section]:
            raise KeyError(f"config.{key}: no such field")
        config[section][field] = value


def device_attention(dtype: str) -> str:
    """cuDNN's flash attention on a GPU in half precision; "auto" elsewhere (einsum on CPU, XLA on GPU fp32)."""
    return "cudnn" if jax.default_backend() == "gpu" and dtype in ("bfloat16", "float16") else "auto"


def _tail(text: str, lines: int = 15) -> list[str]:
    return text.strip().splitlines()[-lines:]


# ---------------------------------------------------------------------------------------------------------------
# Steps: the project's and the reference's, built from one TransformerConfig.
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Row:
    """One timed training step. Rows of one ``group`` are timed in interleaved rounds."""

    name: str
    step: str                      # "project" or "reference"
    cfg: Any                       # the project's TransformerConfig (the reference is built from it)
    batch: int                     # global sequences per step
    seq_len: int
    group: str
    grad_accum: int = 1
    precision: str | None = None   # "highest": jax.default_matmul_precision at lowering
    compiler_options: dict | None = None


def reference_optimizer(optim, total_steps: int):
    """The reference's optax AdamW with the project config's optimizer fields (same update)."""
    return reference.make_optimizer(lr=float(optim.lr), total_steps=total_steps,
                                    warmup_steps=int(optim.warmup_steps), min_lr_ratio=float(optim.min_lr_ratio),
                                    b1=float(optim.b1), b2=float(optim.b2), eps=float(optim.eps),
                                    weight_decay=float(optim.weight_decay),
                                    clip_norm=None if optim.clip_norm is None else float(optim.clip_norm))


def build_step(row: Row, optim, total_steps: int, mesh) -> tuple[Callable, Callable, Any]:
    """(jitted step with the state donated, jitted state_from(project params) -> sharded state, the abstract
    sharded state). Both kinds start from the project's parameters (renamed for the reference)."""
    model = Transformer(row.cfg)
    if row.step == "project":
        tx = training.make_optimizer(optim, total_steps)

        def make_state(params):
            return training.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

        step = training.make_train_step(model, tx, grad_accum=row.grad_accum)
    elif row.step == "reference":
        if row.grad_accum != 1:
            raise ValueError("the reference step has no gradient accumulation")
        rcfg = reference.config_from_project(row.cfg, attention=device_attention(row.cfg.dtype))
        rtx = reference_optimizer(optim, total_steps)

        def make_state(params):
            params = reference.params_from_project(params, rcfg)
            return params, rtx.init(params)

        step = reference.make_train_step(rcfg, rtx)
    else:
        raise ValueError(f"Row.step must be 'project' or 'reference', got {row.step!r}")
    abstract = jax.eval_shape(make_state, param_shapes(row.cfg, row.seq_len))
    shardings = parallel.state_shardings(abstract, mesh)
    sharded = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                     abstract, shardings)
    # copies: the step donates its state, and the other rows start from the same parameters
    state_from = jax.jit(lambda p: make_state(jax.tree_util.tree_map(jnp.copy, p)), out_shardings=shardings)
    return jax.jit(step, donate_argnums=0, out_shardings=(shardings, None)), state_from, sharded


def param_shapes(cfg, seq_len: int):
    """The project model's parameter tree as ShapeDtypeStructs (no compilation)."""
    model = Transformer(cfg.replace(dtype="float32", attention_impl="auto"))
    return jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, seq_len), jnp.int32))["params"],
                          jax.random.PRNGKey(0))


def host_params(shapes, std: float = 0.02, seed: int = 0):
    """Parameters drawn on the host at the preset's scales, without compiling an initialiser: norm scales 1,
    biases 0, every other tensor N(0, std^2) (the "gpt" preset's truncated normal has std 0.02)."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "scale":
            return np.ones(leaf.shape, leaf.dtype)
        if name == "bias":
            return np.zeros(leaf.shape, leaf.dtype)
        return (std * rng.standard_normal(leaf.shape)).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def random_batch(vocab_size: int, batch: int, seq_len: int, mesh, seed: int = 0) -> dict:
    """Uniform random tokens as a global batch over ``mesh`` (this process's rows of one seeded batch)."""
    ids = np.random.default_rng(seed).integers(0, vocab_size, (batch, seq_len + 1), dtype=np.int32)
    rows = data_lib.process_rows(batch, jax.process_index(), jax.process_count())
    local = {"inputs": ids[rows, :-1], "targets": ids[rows, 1:]}
    return data_lib.to_global(local, parallel.batch_sharding(mesh))


@contextlib.contextmanager
def _precision(precision: str | None):
    if precision is None:
        yield
    else:
        with jax.default_matmul_precision(precision):
            yield


def compile_step(jitted, abstract_state, abstract_batch, precision=None, options=None):
    """(compiled, seconds, note): lower under the matmul precision and compile; compiler options the backend
    refuses are dropped (the note says so) rather than losing the row."""
    t0 = time.perf_counter()
    with _precision(precision):
        lowered = jitted.lower(abstract_state, abstract_batch)
    note = None
    try:
        compiled = lowered.compile(options) if options else lowered.compile()
    except Exception as e:  # noqa: BLE001 (an unknown option name is backend-specific)
        if not options:
            raise
        note = f"compiler options {options} refused ({type(e).__name__}: {str(e)[:200]}); compiled without them"
        compiled = lowered.compile()
    return compiled, time.perf_counter() - t0, note


def _loss(out) -> float:
    return float(out["loss"] if isinstance(out, dict) else out)


def _memory_of(compiled) -> int | None:
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 (not every backend has one)
        return None
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - getattr(m, "alias_size_in_bytes", 0))


def _peak_memory() -> int | None:
    stats = jax.local_devices()[0].memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")


def time_group(runs: dict[str, list], rounds: int, steps_per_round: int) -> dict[str, list[float]]:
    """Per-step seconds of each run, one sample per round, the runs interleaved A B B A ... so that load and
    clocks hit them alike. ``runs[name] = [compiled, state, batch]``; the state is advanced in place. A round
    blocks once, on its last outputs (an executable's outputs complete together)."""
    names = list(runs)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            compiled, state, batch = runs[n]
            t0 = time.perf_counter()
            for _ in range(steps_per_round):
                state, out = compiled(state, batch)
            jax.block_until_ready(out)
            times[n].append((time.perf_counter() - t0) / steps_per_round)
            runs[n][1] = state
    for n in names:
        jax.block_until_ready(runs[n][1])
    return times


def model_summary(cfg) -> dict:
    return {k: getattr(cfg, k) for k in ("num_layers", "d_model", "num_heads", "head_dim", "d_ff", "vocab_size",
                                         "max_len", "dtype", "attention_impl")}


def run_rows(rows: list[Row], *, optim, total_steps: int, mesh, plan_rounds: int, steps_per_round: int,
             warmup_steps: int, deadline: float, peak: float | None, compile_workers: int) -> list[dict]:
    """Compile every row (``compile_workers`` at a time, in threads: XLA compiles without the GIL), then run
    and time the rows group by group, skipping the groups that would start after ``deadline``."""
    n_dev = mesh.size
    built = {r.name: build_step(r, optim, total_steps, mesh) for r in rows}
    batches: dict[tuple, dict] = {}
    params: dict = {}

    def params_for(r: Row):  # one draw per parameter shape, shared by its rows
        key = (r.cfg.replace(dtype="float32", attention_impl="auto"), r.seq_len)
        if key not in params:
            params[key] = host_params(param_shapes(r.cfg, r.seq_len))
        return params[key]

    def batch_for(r: Row):
        key = (r.cfg.vocab_size, r.batch, r.seq_len)
        if key not in batches:
            batches[key] = random_batch(*key, mesh)
        return batches[key]

    abstract_batch = {r.name: jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), batch_for(r)) for r in rows}
    pool = futures.ThreadPoolExecutor(max_workers=max(1, compile_workers))
    pending = {r.name: pool.submit(compile_step, built[r.name][0], built[r.name][2], abstract_batch[r.name],
                                   r.precision, r.compiler_options) for r in rows}
    results = []
    try:
        for group in dict.fromkeys(r.group for r in rows):
            members = [r for r in rows if r.group == group]
            if time.monotonic() > deadline:
                for r in members:
                    pending[r.name].cancel()
                    results.append({"name": r.name, "step": r.step, "skipped": "the stage's budget was spent"})
                continue
            runs, info = {}, {}
            for r in members:
                try:
                    compiled, compile_s, note = pending[r.name].result()
                    state = built[r.name][1](params_for(r))
                    batch = batch_for(r)
                    first = None
                    for i in range(warmup_steps):
                        state, out = compiled(state, batch)
                        if i == 0:
                            first = _loss(out)
                    runs[r.name] = [compiled, state, batch]
                    info[r.name] = dict(compile_s=compile_s, note=note, first_loss=first,
                                        compiled_memory_bytes=_memory_of(compiled))
                except Exception as e:  # noqa: BLE001 (one failing row must not lose the others)
                    results.append({"name": r.name, "step": r.step, "error": f"{type(e).__name__}: {e}"[:2000]})
            times = time_group(runs, plan_rounds, steps_per_round) if runs else {}
            peak_mem = _peak_memory()
            for r in members:
                if r.name not in runs:
                    continue
                t = statistics.median(times[r.name])
                f = flops_lib.training_flops(r.cfg, r.seq_len, r.batch)
                results.append({
                    "name": r.name, "step": r.step, "group": r.group, "model": model_summary(r.cfg),
                    "batch": r.batch, "seq_len": r.seq_len, "grad_accum": r.grad_accum, "dtype": r.cfg.dtype,
                    "precision": r.precision or "default", "attention": (r.cfg.attention_impl if r.step == "project"
                                                                         else device_attention(r.cfg.dtype)),
                    "compiler_options": r.compiler_options, **info[r.name],
                    "step_time_s": t, "step_times_s": times[r.name], "steps_timed": plan_rounds * steps_per_round,
                    "tokens_per_s": r.batch * r.seq_len / t, "flops_per_step": f, "mfu": mfu(f, t, peak, n_dev),
                    "peak_memory_bytes": peak_mem,
                })
            runs.clear()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return results


def pair_figures(rows: list[dict]) -> list[dict]:
    """For each group holding a project and a reference row: ratio = reference / project step time (> 1: the
    project's step is faster), the median of the per-round ratios, and the first-step loss difference."""
    out = []
    for group in dict.fromkeys(r.get("group") for r in rows if "step_time_s" in r):
        ours = [r for r in rows if r.get("group") == group and r["step"] == "project" and "step_time_s" in r]
        ref = [r for r in rows if r.get("group") == group and r["step"] == "reference" and "step_time_s" in r]
        if not ours or not ref:
            continue
        a, b = ours[0], ref[0]
        out.append({"group": group, "project": a["name"], "reference": b["name"],
                    "ratio": b["step_time_s"] / a["step_time_s"],
                    "ratio_median_of_rounds": statistics.median(
                        y / x for x, y in zip(a["step_times_s"], b["step_times_s"])),
                    "first_loss_abs_diff": (None if a["first_loss"] is None or b["first_loss"] is None
                                            else abs(a["first_loss"] - b["first_loss"]))})
    return out


def parity_of(rows: list[dict], group: str) -> dict:
    """The float32 pair's first-step losses (same parameters, same batch, highest matmul precision)."""
    pair = {r["step"]: r for r in rows if r.get("group") == group and r.get("first_loss") is not None}
    if set(pair) != {"project", "reference"}:
        return {"skipped": f"the {group} pair did not run"}
    a, b = pair["project"]["first_loss"], pair["reference"]["first_loss"]
    return {"dtype": pair["project"]["dtype"], "precision": pair["project"]["precision"],
            "batch": pair["project"]["batch"], "seq_len": pair["project"]["seq_len"],
            "project_loss": a, "reference_loss": b, "loss_abs_diff": abs(a - b)}


# ---------------------------------------------------------------------------------------------------------------
# Stages.
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Context:
    plan: Plan
    out: Path
    scratch: Path
    cache_dir: str
    fsdp: int | None
    compile_workers: int
    smoke: bool


def pod_config(plan: Plan):
    """configs/upscale.py:pod with the plan's model overrides; returns (config, small cfg, big cfg, seq_len)."""
    c = upscale_configs.get_config("pod")
    c.model.update(plan.pod_model)
    if plan.pod_seq_len is not None:
        c.data.seq_len = plan.pod_seq_len
    small = config_lib.model_config(c.model)
    return c, small, upscale_job.grown_config(small, c.upscale), c.data.seq_len


def stage_throughput(ctx: Context, deadline: float) -> dict:
    plan = ctx.plan
    c, small, big, seq = pod_config(plan)
    mesh = parallel.make_mesh(-1, 1)
    n = mesh.size
    b = plan.batch_per_device * n
    att = device_attention(small.dtype)
    # the plain flax reference is the standard GPT: time the same model (muP only adds one scalar multiply of the
    # logits; the pod path and growth stages run the config's own parameterization)
    standard = dict(attention_impl=att, parameterization="standard", mup_base_d_model=None,
                    attn_scale=TransformerConfig.preset("gpt").attn_scale)
    small, big = small.replace(**standard), big.replace(**standard)
    fp32 = small.replace(dtype="float32", attention_impl="auto")
    gpu = jax.default_backend() == "gpu"
    rows = [Row(f"project d{small.d_model}", "project", small, b, seq, "small"),
            Row(f"reference d{small.d_model}", "reference", small, b, seq, "small"),
            Row(f"project d{big.d_model}", "project", big, b, seq, "big"),
            Row(f"reference d{big.d_model}", "reference", big, b, seq, "big"),
            Row(f"project d{big.d_model} grad_accum {plan.grad_accum}", "project", big, b * plan.grad_accum, seq,
                "accum", grad_accum=plan.grad_accum),
            # XLA's Triton GEMM autotuning of fp32 fusions at highest precision took minutes per module on a GPU;
            # cuBLAS does these GEMMs without it. The pair's first-step losses are the float32 parity check.
            *(Row(f"{kind} d{small.d_model} float32 highest", kind, fp32, b, seq, "fp32", precision="highest",
                  compiler_options={"xla_gpu_enable_triton_gemm": False} if gpu else None)
              for kind in ("project", "reference"))]
    if gpu:  # the job runs with the config's "auto" (XLA attention on a GPU)
        rows.append(Row(f"project d{big.d_model} attention auto (the config's)", "project",
                        big.replace(attention_impl="auto"), b, seq, "auto_attention"))
    peak = peak_of(jax.devices()[0])
    t0 = time.perf_counter()
    results = run_rows(rows, optim=c.optim, total_steps=c.train.steps, mesh=mesh, plan_rounds=plan.rounds,
                       steps_per_round=plan.steps_per_round, warmup_steps=plan.warmup_steps, deadline=deadline,
                       peak=peak["flops_per_device"], compile_workers=ctx.compile_workers)
    rows_s = time.perf_counter() - t0
    failed = [r for r in results if "error" in r or "skipped" in r]
    return {"status": "partial" if failed else "ok", "reason": None if not failed else
            f"{len(failed)} of {len(rows)} rows did not run (see their 'error' / 'skipped')",
            "peak": peak, "devices": n, "mesh": dict(mesh.shape), "rows": results, "pairs": pair_figures(results),
            "parity_fp32": parity_of(results, "fp32"), "rows_wall_s": rows_s, "compile_workers": ctx.compile_workers,
            "steps": {"warmup": plan.warmup_steps, "rounds": plan.rounds, "steps_per_round": plan.steps_per_round},
            "optimizer": {k: c.optim[k] for k in c.optim}}


def stage_pod_path(ctx: Context, deadline: float) -> dict:
    del deadline  # one widening: nothing to cut short
    plan = ctx.plan
    c, small, _, seq = pod_config(plan)
    n = jax.device_count()
    fsdp = ctx.fsdp or math.gcd(n, int(c.parallel.fsdp))
    mesh = parallel.make_mesh(-1, fsdp)
    u = c.upscale
    steps = c.train.steps
    pre = c.optim.copy_and_resolve_references()
    pre.warmup_steps = 0  # a few steps at the full rate, so the widened model is not at its initialisation
    tx = training.make_optimizer(pre, steps)
    model = Transformer(small)
    t0 = time.perf_counter()
    params = host_params(param_shapes(small, seq))  # the preset's scales, no initialiser to compile

    def make_state(p):
        return training.TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p))

    shardings = parallel.state_shardings(jax.eval_shape(make_state, params), mesh)
    state = jax.jit(make_state, out_shardings=shardings)(params)  # born sharded, as the job's init_sharded
    step = jax.jit(training.make_train_step(model, tx), donate_argnums=0, out_shardings=(shardings, None))
    corpus = training.load_corpus(c.data)
    data_cfg = c.data.copy_and_resolve_references()
    data_cfg.batch_size = plan.pod_batch_per_device * n
    losses = []
    for t in range(plan.pod_train_steps):
        batch = data_lib.to_global(training.host_batch(corpus, data_cfg, t, 0), parallel.batch_sharding(mesh))
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    train_s = time.perf_counter() - t0
    # the job's own optimizer after widening (used by grow_state only when it does not map Adam's state)
    tx_big = upscale_job.big_phase_optimizer(c, state.params, small, upscale_job.big_phase_schedule(c))
    t1 = time.perf_counter()
    big_state, big_cfg = upscale_job.grow_state(state, small, u, tx_big, mesh, jax.random.PRNGKey(1))
    jax.block_until_ready(big_state)
    grow_s = time.perf_counter() - t1
    val = np.asarray(corpus.val[:4 * seq], np.int32).reshape(4, seq)
    t2 = time.perf_counter()
    gap, scale = upscale_job.logit_gap(state.params, small, big_state.params, big_cfg, val)
    check_s = time.perf_counter() - t2
    tol = float(u.lossless_atol) * max(scale, 1.0)
    leaves = jax.tree_util.tree_leaves(big_state.params)
    split = sum(1 for x in leaves if any(a is not None for a in x.sharding.spec))
    n_small = sum(int(x.size) for x in jax.tree_util.tree_leaves(state.params))
    return {"status": "ok", "reason": None, "passed": bool(gap <= tol), "max_abs_logit_diff": gap,
            "logit_scale": scale, "tolerance": tol, "lossless_atol": float(u.lossless_atol), "precision": "highest",
            "mesh": dict(mesh.shape), "devices": n, "fsdp": fsdp, "small_model": model_summary(small),
            "big_model": model_summary(big_cfg), "params_small": n_small,
            "params_big": sum(int(x.size) for x in leaves), "big_leaves_split_over_fsdp": split,
            "big_leaves": len(leaves), "train_steps_before_widening": plan.pod_train_steps,
            "train_batch": data_cfg.batch_size, "losses_before_widening": losses,
            "widen": {k: (tuple(u[k]) if isinstance(u[k], (list, tuple)) else u[k])
                      for k in ("factor", "grow", "noise_db", "symmetry", "map_optimizer", "depth_factor")},
            "init_and_train_s": train_s, "grow_s": grow_s, "logit_check_s": check_s}


def growth_config(plan: Plan, overrides: dict):
    c = upscale_configs.get_config("gpu")
    apply_overrides(c, {**plan.growth, **overrides})
    return c


def growth_command(plan: Plan, overrides: dict, workdir: Path) -> list[str]:
    """The ``train.py`` command of one growth job (the same job the in-process path runs)."""
    merged = {**plan.growth, **overrides}
    return [sys.executable, str(ROOT / "train.py"), f"--config={ROOT / 'configs' / 'upscale.py'}:gpu",
            f"--workdir={workdir}", *(f"--config.{k}={flag_value(v)}" for k, v in merged.items())]


def _job_env(cache_dir: str) -> dict:
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               XLA_PYTHON_CLIENT_PREALLOCATE="false", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def run_growth_jobs(ctx: Context, jobs: list[dict], deadline: float, workers: int) -> None:
    """Run ``jobs`` (dicts with name, overrides, workdir), filling in status, elapsed_s and report. workers == 1:
    in this process, one after another, skipping a job when the time left is under its estimate (the first
    job's duration); workers > 1: ``train.py`` processes, ``workers`` at a time, killed at ``deadline``."""
    if workers == 1:
        first = None
        for job in jobs:
            left = deadline - time.monotonic()
            need = job.get("estimate", 1.0) * (first or 0.0)
            if left <= 0 or left < need:
                job.update(status="skipped", reason=f"{left:.0f} s left in the stage, estimated need {need:.0f} s")
                continue
            t0 = time.perf_counter()
            try:
                config = growth_config(ctx.plan, job["overrides"])
                training.check_resume(config, str(job["workdir"]))
                job["report"] = upscale_job.run(config, str(job["workdir"]))
                job["status"] = "ok"
            except Exception as e:  # noqa: BLE001 (one failing job must not lose the others)
                job.update(status="error", reason=f"{type(e).__name__}: {e}"[:2000],
                           traceback=_tail(traceback.format_exc()))
            job["elapsed_s"] = time.perf_counter() - t0
            first = job["elapsed_s"] if first is None else first
        return
    env = _job_env(ctx.cache_dir)
    queue, running = list(jobs), {}
    while queue or running:
        while queue and len(running) < workers:
            job = queue.pop(0)
            job["workdir"].mkdir(parents=True, exist_ok=True)
            log = open(job["workdir"] / "log.txt", "w")  # noqa: SIM115 (closed when the process ends)
            proc = subprocess.Popen(growth_command(ctx.plan, job["overrides"], job["workdir"]), cwd=ROOT, env=env,
                                    stdout=log, stderr=subprocess.STDOUT)
            running[proc] = (job, log, time.perf_counter())
        time.sleep(0.5)
        for proc in list(running):
            job, log, t0 = running[proc]
            late = time.monotonic() > deadline
            if proc.poll() is None and not late:
                continue
            if proc.poll() is None:
                proc.terminate()  # train.py saves the current step on SIGTERM and exits
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            log.close()
            del running[proc]
            job["elapsed_s"] = time.perf_counter() - t0
            job["returncode"] = proc.returncode
            report = job["workdir"] / "report.json"
            if proc.returncode == 0 and report.exists():
                job.update(status="ok", report=json.loads(report.read_text()))
            else:
                job.update(status="error" if not late else "stopped",
                           reason="the stage's budget ran out" if late else f"train.py exited {proc.returncode}",
                           log_tail=_tail((job["workdir"] / "log.txt").read_text()))


def stage_growth(ctx: Context, deadline: float) -> dict:
    plan = ctx.plan
    base = growth_config(plan, {})
    lr0 = float(base.optim.lr)
    root = ctx.scratch / "growth"
    b_jobs = [{"name": f"B lr {lr0 * f:g}", "arm": "scratch", "lr": lr0 * f, "workdir": root / f"b_lr{lr0 * f:g}",
               "overrides": {"optim.lr": lr0 * f, "upscale.arms": ("scratch",), "train.plot": False}}
              for f in plan.lr_factors]
    a_job = {"name": "A (defaults)", "arm": "upscaled", "lr": lr0, "workdir": root / "a",
             "overrides": {"upscale.arms": ("upscaled",), "upscale.baseline": str(b_jobs[0]["workdir"])},
             "estimate": 1.5}
    workers = 1 if jax.process_count() > 1 else ctx.plan.growth_workers
    if workers == 1:  # the main comparison first, then the other learning rates
        for job in b_jobs[1:]:
            job["estimate"] = 1.0
        run_growth_jobs(ctx, [b_jobs[0], a_job, *b_jobs[1:]], deadline, 1)
    else:
        run_growth_jobs(ctx, b_jobs, deadline, workers)
        if b_jobs[0]["status"] == "ok":
            run_growth_jobs(ctx, [a_job], deadline, workers)
        else:
            a_job.update(status="skipped", reason="arm B at the config's learning rate did not finish")
    runs = []
    for job in (*b_jobs, a_job):
        rep = job.get("report") or {}
        runs.append({k: job.get(k) for k in ("name", "arm", "lr", "status", "reason", "elapsed_s", "returncode",
                                            "log_tail", "traceback") if job.get(k) is not None}
                    | {"final_val_loss": rep.get("final_loss_scratch" if job["arm"] == "scratch"
                                                 else "final_loss_upscaled")})
    finished_b = [j for j in b_jobs if j.get("status") == "ok"]
    best = min(finished_b, key=lambda j: j["report"]["final_loss_scratch"]) if finished_b else None
    out = {"variant": "configs/upscale.py:gpu", "overrides": {k: flag_value(v) for k, v in plan.growth.items()},
           "lrs": [j["lr"] for j in b_jobs], "workers": workers, "runs": runs,
           "best_b": None if best is None else {"lr": best["lr"], "final_loss": best["report"]["final_loss_scratch"]}}
    rep = a_job.get("report")
    if rep:
        out["report"] = {k: rep.get(k) for k in upscale_job.SCALAR_KEYS + ("cap_hit", "big_steps_run")}
        out["report_file"] = "growth_report.json"
        (ctx.out / "growth_report.json").write_text(json.dumps(rep, indent=2))
        if (a_job["workdir"] / "compute.png").exists():
            shutil.copy(a_job["workdir"] / "compute.png", ctx.out / "growth_compute.png")
            out["plot"] = "growth_compute.png"
        if best is not None:
            b_hist = best["report"]["curves"]["scratch (B)"]
            warm = base.optim.warmup_steps * b_hist[-1]["flops"] / max(b_hist[-1]["step"], 1)
            vs = upscale_job.compute_saving(rep["curves"]["upscaled (A)"], b_hist,
                                            small_flops=rep["widen_flops"], warmup_flops=warm)
            out["against_best_b"] = {"lr": best["lr"], **{k: vs[k] for k in (
                "target_loss", "compute_saving", "compute_saving_given_small", "loss_gap_at_equal_flops")}}
    done = sum(1 for r in runs if r["status"] == "ok")
    out["status"] = "ok" if done == len(runs) else ("partial" if done else "error")
    out["reason"] = None if done == len(runs) else f"{len(runs) - done} of {len(runs)} jobs did not finish"
    return out


STAGE_FUNCTIONS = {"throughput": stage_throughput, "pod_path": stage_pod_path, "growth": stage_growth}


def headline(results: dict) -> dict:
    """The few figures a reader wants first, from the stage results."""
    h: dict = {}
    tp = results.get("throughput", {})
    for r in tp.get("rows", []):
        if "step_time_s" in r:
            h[f"{r['name']}: tokens/s"] = round(r["tokens_per_s"], 1)
            if r["mfu"] is not None:
                h[f"{r['name']}: MFU"] = round(r["mfu"], 4)
    for p in tp.get("pairs", []):
        h[f"ratio reference/project step time, {p['group']}"] = round(p["ratio"], 3)
    pod = results.get("pod_path", {})
    if "passed" in pod:
        h["pod path lossless"] = pod["passed"]
        h["pod path max |logit diff|"] = pod["max_abs_logit_diff"]
    gr = results.get("growth", {}).get("report")
    if gr:
        h["growth compute_saving"] = gr.get("compute_saving")
        h["growth compute_saving_given_small"] = gr.get("compute_saving_given_small")
    return h


def run_suite(ctx: Context, stages: tuple[str, ...], budget_s: float, start: float) -> dict:
    """Every stage in order inside the budget; writes ``<stage>.json`` and ``summary.json``; returns the summary."""
    results: dict = {}
    primary = jax.process_index() == 0
    for name in STAGES:
        if name not in stages:
            continue
        remaining = budget_s - (time.monotonic() - start)
        budget, why = stage_budget(name, ctx.plan, budget_s, remaining)
        t0 = time.monotonic()
        if why is not None:
            res = {"status": "skipped", "reason": why}
        else:
            print(f"[device_suite] {name}: {budget:.0f} s", flush=True)
            try:
                res = STAGE_FUNCTIONS[name](ctx, t0 + budget)
            except Exception as e:  # noqa: BLE001 (the next stage still runs)
                res = {"status": "error", "reason": f"{type(e).__name__}: {e}"[:2000],
                       "traceback": _tail(traceback.format_exc(), 25)}
        res = {"stage": name, **res, "budget_s": budget, "elapsed_s": time.monotonic() - t0}
        results[name] = res
        if primary:
            (ctx.out / f"{name}.json").write_text(json.dumps(res, indent=2, default=str))
        print(f"[device_suite] {name}: {res['status']} in {res['elapsed_s']:.1f} s"
              + (f" ({res['reason']})" if res.get("reason") else ""), flush=True)
    summary = {"suite": "device_suite", "smoke": ctx.smoke, "budget_s": budget_s,
               "elapsed_s": time.monotonic() - start, "device": parallel.describe(),
               "peak": peak_of(jax.devices()[0]), "compilation_cache": ctx.cache_dir,
               "xla_flags": os.environ.get("XLA_FLAGS", ""),
               "stages": {n: {k: r.get(k) for k in ("status", "reason", "budget_s", "elapsed_s")}
                          | {"file": f"{n}.json"} for n, r in results.items()},
               "headline": headline(results)}
    if primary:
        (ctx.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


# ---------------------------------------------------------------------------------------------------------------
# The CPU comparison: the project's step against the reference's, side by side.
# ---------------------------------------------------------------------------------------------------------------

def cpu_compare(args) -> dict:
    """The throughput stage's pair at one small float32 size, ``--rounds`` interleaved rounds (JSON)."""
    c = upscale_configs.get_config("gpt")
    cfg = config_lib.model_config(c.model).replace(
        num_layers=args.layers, d_model=args.d_model, num_heads=args.d_model // 64, head_dim=64,
        d_ff=4 * args.d_model, max_len=args.seq, dtype="float32", attention_impl="auto")
    mesh = parallel.make_mesh(1, 1)
    rows = [Row("project", "project", cfg, args.batch, args.seq, "cpu"),
            Row("reference", "reference", cfg, args.batch, args.seq, "cpu")]
    results = run_rows(rows, optim=c.optim, total_steps=c.train.steps, mesh=mesh, plan_rounds=args.rounds,
                       steps_per_round=1, warmup_steps=2, deadline=math.inf, peak=None, compile_workers=1)
    pair = pair_figures(results)
    out = {"benchmark": "device_suite --cpu-compare", "model": model_summary(cfg), "batch": args.batch,
           "seq_len": args.seq, "rounds": args.rounds,
           "project_step_s": results[0].get("step_time_s"), "reference_step_s": results[1].get("step_time_s"),
           "ratio": pair[0]["ratio"] if pair else None,
           "ratio_median_of_rounds": pair[0]["ratio_median_of_rounds"] if pair else None,
           "ratio_best": (min(results[1]["step_times_s"]) / min(results[0]["step_times_s"])) if pair else None,
           "first_loss_abs_diff": pair[0]["first_loss_abs_diff"] if pair else None,
           "flops_per_step": results[0].get("flops_per_step"), "device": parallel.describe()}
    return out


# ---------------------------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------------------------

def _positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a positive {kind.__name__}, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be a positive {kind.__name__}, got {text!r}")
        return value
    return parse


def _stages(text: str) -> tuple[str, ...]:
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in names if s not in STAGES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"must be a comma-separated subset of {','.join(STAGES)}, got {text!r}")
    return names


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python benchmarks/device_suite.py", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="folder for the JSON files and plots (created; small files only)")
    ap.add_argument("--budget-s", type=_positive(float), default=None,
                    help="wall seconds for all stages (default 540, --smoke 300)")
    ap.add_argument("--smoke", action="store_true", help="toy sizes on a CPU, under a minute (what the test runs)")
    ap.add_argument("--compilation-cache", default=None,
                    help="JAX persistent compilation cache folder (default <out>/compilation_cache)")
    ap.add_argument("--stages", type=_stages, default=STAGES, help=f"subset of {','.join(STAGES)} (default all)")
    ap.add_argument("--batch-per-device", type=_positive(int), default=None,
                    help="throughput rows: sequences per device per step (default 16; --smoke 2)")
    ap.add_argument("--growth-workers", type=_positive(int), default=None,
                    help="parallel train.py processes for arm B (default 3; --smoke 1 = in this process)")
    ap.add_argument("--compile-workers", type=_positive(int), default=4, help="throughput rows compiled at once")
    ap.add_argument("--fsdp", type=_positive(int), default=None,
                    help="pod path: FSDP size of the mesh (default gcd(devices, the :pod config's 4))")
    ap.add_argument("--scratch", type=Path, default=None,
                    help="folder for the growth jobs' checkpoints and logs (default: a temporary one, removed)")
    ap.add_argument("--multihost", action="store_true", help="call jax.distributed.initialize() first")
    cmp_ = ap.add_argument_group("--cpu-compare: the project/reference step-time ratio at one small float32 size")
    cmp_.add_argument("--cpu-compare", action="store_true")
    cmp_.add_argument("--layers", type=_positive(int), default=4)
    cmp_.add_argument("--d-model", type=_positive(int), default=256)
    cmp_.add_argument("--seq", type=_positive(int), default=256)
    cmp_.add_argument("--batch", type=_positive(int), default=16)
    cmp_.add_argument("--rounds", type=_positive(int), default=20)
    args = ap.parse_args(argv)
    if args.cpu_compare:
        if args.d_model % 64:
            ap.error(f"--d-model must be a multiple of 64 (heads of 64), got {args.d_model}")
        return args
    if args.out is None:
        ap.error("--out DIR is required (unless --cpu-compare)")
    if args.out.exists() and not args.out.is_dir():
        ap.error(f"--out {args.out} exists and is not a folder")
    if args.budget_s is None:
        args.budget_s = 300.0 if args.smoke else 540.0
    return args


def main(argv=None) -> int:
    start = time.monotonic()
    args = parse_args(argv)
    if args.multihost:
        jax.distributed.initialize()
    if args.cpu_compare:
        print(json.dumps(cpu_compare(args)))
        return 0
    plan = SMOKE if args.smoke else FULL
    if args.smoke:  # before the backend starts (nothing has touched a device yet)
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {SMOKE_XLA_FLAGS}".strip()
    plan = dataclasses.replace(plan, **{k: v for k, v in (("batch_per_device", args.batch_per_device),
                                                           ("growth_workers", args.growth_workers))
                                        if v is not None})
    args.out.mkdir(parents=True, exist_ok=True)
    cache = str(args.compilation_cache or args.out / "compilation_cache")
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    own_scratch = args.scratch is None
    scratch = Path(tempfile.mkdtemp(prefix="device_suite_")) if own_scratch else args.scratch
    ctx = Context(plan=plan, out=args.out, scratch=scratch, cache_dir=cache, fsdp=args.fsdp,
                  compile_workers=args.compile_workers, smoke=args.smoke)
    try:
        summary = run_suite(ctx, args.stages, args.budget_s, start)
    finally:
        if own_scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(summary["headline"], default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
