"""Metrics: JSON lines + TensorBoard writer, the progress line, curves from the log.

A small writer of our own: a log line and JSON lines in the workdir, TensorBoard through tensorboardX
when installed, no TensorFlow anywhere; process 0 alone writes logs (``is_primary``). The progress line follows big_vision's
(steps, throughput, ETA) with the model-FLOPs utilisation of kexue.fm/archives/8610:

    MFU = (model FLOPs per step x steps per second) / peak FLOP/s of the hardware.

Files in ``workdir``: ``metrics.jsonl`` (one ``{"step": s, name: float, ...}`` object per
:meth:`MetricWriter.write`; NaN/Inf are written as Python's ``json`` does, ``NaN``/``Infinity``),
``config.json``, and TensorBoard ``events.out.tfevents.*``. Nothing happens at import time.
"""
from __future__ import annotations

import json
import logging
import os
import time
import types
from pathlib import Path
from typing import Any, Callable, Mapping

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"


def _as_float(name: str, value: Any) -> float:
    """A scalar metric as a Python float (numbers, numpy / jax 0-d arrays; one device fetch each)."""
    if getattr(value, "ndim", 0) != 0 or isinstance(value, (str, bytes)):
        raise ValueError(f"metric {name!r} must be a real scalar, got {type(value).__name__}: {value!r:.80}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"metric {name!r} must be a real scalar, got {type(value).__name__}: {value!r:.80}"
                         ) from None


def _drop_partial_last_line(path: Path) -> None:
    """Cut a line left unfinished by a killed run (no final newline), so appended records start on a
    line of their own instead of gluing onto it."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


class MetricWriter:
    """Appends scalar metrics to ``workdir/metrics.jsonl`` and TensorBoard event files.

    Only the primary process (``is_primary=True``; pass ``jax.process_index() == 0``) writes anything.
    TensorBoard needs ``tensorboardX``; without it (or with ``tensorboard=False``) only the JSON lines
    are written, with a one-line notice when TensorBoard was asked for.
    """

    def __init__(self, workdir: str | os.PathLike, *, is_primary: bool = True, tensorboard: bool = True):
        self.workdir = Path(workdir)
        self.is_primary = bool(is_primary)
        self._jsonl = None
        self._tb = None
        if not self.is_primary:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        _drop_partial_last_line(self.workdir / METRICS_FILE)
        self._jsonl = open(self.workdir / METRICS_FILE, "a", encoding="utf-8")
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                log.warning("tensorboardX is not installed: TensorBoard logging skipped "
                            "(metrics still go to %s)", self.workdir / METRICS_FILE)
            else:
                self._tb = SummaryWriter(logdir=str(self.workdir))

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Append ``{"step": step, **metrics}`` (values as floats) as one line; flushed at once."""
        if isinstance(step, bool) or not hasattr(step, "__index__"):
            raise ValueError(f"step must be an int, got {step!r}")
        if "step" in metrics:
            raise ValueError("metrics must not contain the key 'step' (it is written from the step argument)")
        record = {"step": int(step), **{str(k): _as_float(str(k), v) for k, v in metrics.items()}}
        if not self.is_primary:
            return
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for name, value in record.items():
                if name != "step":
                    self._tb.add_scalar(name, value, global_step=record["step"])
            self._tb.flush()

    def write_config(self, config: Mapping[str, Any]) -> None:
        """``workdir/config.json``: the config (e.g. ``ConfigDict.to_dict()``), sorted keys; values JSON
        cannot hold are written as ``str(value)``."""
        if not isinstance(config, Mapping):
            raise TypeError(f"config must be a mapping, got {type(config).__name__}")
        if not self.is_primary:
            return
        text = json.dumps(config, indent=2, sort_keys=True, default=str)
        (self.workdir / CONFIG_FILE).write_text(text + "\n", encoding="utf-8")

    def close(self) -> None:
        """Flush and close the files (idempotent)."""
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "MetricWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
    """The records of ``workdir/metrics.jsonl`` in file order. A truncated last line (a run killed
    mid-write) is skipped; any other unparsable line raises ValueError naming the line."""
    path = Path(workdir) / METRICS_FILE
    if not path.is_file():
        raise ValueError(f"workdir: no {METRICS_FILE} in {str(workdir)!r}")
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines):
                log.warning("%s: skipping the truncated last line %d", path, i)
                break
            raise ValueError(f"{path}: line {i} is not JSON ({e.msg})") from None
    return records


# ---------------------------------------------------------------------------------------- progress line

def format_duration(seconds: float) -> str:
    """``MM:SS`` below an hour, ``H:MM:SS`` above (seconds rounded; negatives clamp to 0)."""
    s = max(0, int(round(seconds)))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def format_progress(step: int, total: int, metrics: Mapping[str, Any], tokens_per_s: float | None,
                    mfu: float | None, eta_s: float | None) -> str:
    """``step 120/2000 | loss 2.314 | bpb 3.338 | 1.2e+05 tok/s | MFU 23.1% | ETA 04:12``.

    Metrics in the given order with 4 significant digits; ``mfu`` is a fraction (0.231 -> 23.1%);
    ``None`` rate/MFU/ETA parts are left out.
    """
    parts = [f"step {step}/{total}"]
    parts += [f"{name} {_as_float(name, v):.4g}" for name, v in metrics.items()]
    if tokens_per_s is not None:
        parts.append(f"{tokens_per_s:.1e} tok/s")
    if mfu is not None:
        parts.append(f"MFU {100 * mfu:.1f}%")
    if eta_s is not None:
        parts.append(f"ETA {format_duration(eta_s)}")
    return " | ".join(parts)


class ProgressLine:
    """Progress text with throughput, MFU and ETA measured between consecutive calls.

    ``line = progress(step, metrics)``: rates use the wall time and steps since the previous call (the
    first call, which usually includes compilation, only starts the clock).
    ``MFU = flops_per_step * steps/s / peak_flops`` when both are given (kexue.fm/archives/8610);
    ``ETA = (total_steps - step) / steps/s``; ``tokens_per_step=None`` (a job without a token count) leaves
    tokens/s out.
    """

    def __init__(self, total_steps: int, *, tokens_per_step: int | None, flops_per_step: float | None = None,
                 peak_flops: float | None = None, clock: Callable[[], float] = time.perf_counter):
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if tokens_per_step is not None and tokens_per_step < 1:
            raise ValueError(f"tokens_per_step must be >= 1, got {tokens_per_step}")
        if peak_flops is not None and peak_flops <= 0:
            raise ValueError(f"peak_flops must be > 0, got {peak_flops}")
        self.total_steps = total_steps
        self.tokens_per_step = tokens_per_step
        self.flops_per_step = flops_per_step
        self.peak_flops = peak_flops
        self._clock = clock
        self._last: tuple[int, float] | None = None

    def __call__(self, step: int, metrics: Mapping[str, Any]) -> str:
        now = self._clock()
        tokens_per_s = mfu = eta = None
        if self._last is not None and step > self._last[0] and now > self._last[1]:
            steps_per_s = (step - self._last[0]) / (now - self._last[1])
            tokens_per_s = None if self.tokens_per_step is None else steps_per_s * self.tokens_per_step
            eta = (self.total_steps - step) / steps_per_s
            if self.flops_per_step is not None and self.peak_flops is not None:
                mfu = self.flops_per_step * steps_per_s / self.peak_flops
        self._last = (step, now)
        return format_progress(step, self.total_steps, metrics, tokens_per_s, mfu, eta)


# ---------------------------------------------------------------------------------------- curves

DEFAULT_SERIES = types.MappingProxyType({"train": "loss", "val": "val_loss"})


def plot_curves(workdir: str | os.PathLike, out_png: str | os.PathLike, *, x: str = "step",
                series: Mapping[str, str] = DEFAULT_SERIES) -> bool:
    """Line plot of ``series`` (legend label -> metric name) against ``x`` from ``metrics.jsonl``,
    saved as a PNG. Where a run resumed and logged an ``x`` twice, the later value is drawn. Series
    absent from the log are left out (ValueError when all are). Returns False, with a one-line notice,
    when matplotlib is not installed."""
    records = read_metrics(workdir)
    curves = {}
    for label, key in series.items():
        points = {r[x]: r[key] for r in records if x in r and key in r}
        if points:
            xs = sorted(points)
            curves[label] = (xs, [points[v] for v in xs])
    if not curves:
        keys = sorted({k for r in records for k in r})
        raise ValueError(f"series: none of {dict(series)} against x={x!r} is in the log; "
                         f"logged keys: {keys}")
    from kexue_jax import reporting  # noqa: PLC0415

    fig = reporting.figure(figsize=(6, 4), dpi=100)
    if fig is None:
        return False
    ax = fig.add_subplot()
    for label, (xs, ys) in curves.items():
        ax.plot(xs, ys, label=label, marker="." if len(xs) < 50 else None)
    ax.set_xlabel(x)
    ax.set_ylabel(", ".join(dict.fromkeys(series[label] for label in curves)))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, format="png")
    return True
