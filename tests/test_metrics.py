"""Tests for kexue_jax.metrics: JSON lines, primary-only writing, TensorBoard files, progress line, plots."""
import json
import logging
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from kexue_jax import metrics
from kexue_jax.metrics import MetricWriter, ProgressLine, format_progress, plot_curves, read_metrics


def test_jsonl_content_and_config(tmp_path):
    with MetricWriter(tmp_path, tensorboard=False) as w:
        w.write(1, {"loss": jnp.float32(2.5), "lr": np.float64(1e-3)})
        w.write(2, {"loss": 2.25, "grad_norm": jnp.array(0.5)})
        w.write_config({"model": {"d_model": 256, "dims": (4, 8)}, "name": "gpt", "path": tmp_path})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": 1, "loss": 2.5, "lr": 1e-3}, {"step": 2, "loss": 2.25, "grad_norm": 0.5}]
    assert read_metrics(tmp_path) == [json.loads(line) for line in lines]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config == {"model": {"d_model": 256, "dims": [4, 8]}, "name": "gpt", "path": str(tmp_path)}
    # a resumed run appends
    with MetricWriter(tmp_path, tensorboard=False) as w:
        w.write(3, {"loss": float("nan")})
    recs = read_metrics(tmp_path)
    assert [r["step"] for r in recs] == [1, 2, 3] and np.isnan(recs[-1]["loss"])


def test_bad_metrics_raise(tmp_path):
    with MetricWriter(tmp_path, tensorboard=False) as w:
        with pytest.raises(ValueError, match="metric 'acts' must be a real scalar"):
            w.write(1, {"acts": np.ones(3)})
        with pytest.raises(ValueError, match="metric 'name' must be a real scalar"):
            w.write(1, {"name": "gpt"})
        with pytest.raises(ValueError, match="key 'step'"):
            w.write(1, {"step": 1.0})


def test_non_primary_writes_nothing(tmp_path):
    workdir = tmp_path / "run"
    with MetricWriter(workdir, is_primary=False) as w:
        w.write(1, {"loss": 1.0})
        w.write_config({"a": 1})
    assert not workdir.exists()


def test_read_metrics_skips_truncated_last_line_only(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "lo')
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 3.0}]
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "lo\n{"step": 2, "loss": 3.0}\n')
    with pytest.raises(ValueError, match="line 1 is not JSON"):
        read_metrics(tmp_path)
    with pytest.raises(ValueError, match="no metrics.jsonl"):
        read_metrics(tmp_path / "missing")


def test_a_resumed_writer_drops_the_line_a_killed_run_left_unfinished(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "lo')  # SIGKILL mid-write
    with MetricWriter(tmp_path, tensorboard=False) as w:
        w.write(2, {"loss": 2.5})
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}]


def test_tensorboard_event_file_appears(tmp_path):
    pytest.importorskip("tensorboardX")
    with MetricWriter(tmp_path) as w:
        w.write(10, {"loss": 1.5})
        w.write(20, {"loss": 1.25})
    events = list(tmp_path.glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0


def test_tensorboard_event_values(tmp_path):
    """The scalars read back from the event file (tensorboardX's own protobuf reader)."""
    pytest.importorskip("tensorboardX")
    import struct

    from tensorboardX.proto import event_pb2
    with MetricWriter(tmp_path) as w:
        w.write(10, {"loss": 1.5})
        w.write(20, {"loss": 1.25})
    raw = next(tmp_path.glob("events.out.tfevents.*")).read_bytes()
    scalars, pos = [], 0
    while pos < len(raw):  # TFRecord framing: length u64, crc u32, data, crc u32
        (n,) = struct.unpack("<Q", raw[pos:pos + 8])
        event = event_pb2.Event.FromString(raw[pos + 12:pos + 12 + n])
        pos += 12 + n + 4
        scalars += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
    assert scalars == [(10, "loss", 1.5), (20, "loss", 1.25)]


def test_missing_tensorboardx_gives_one_notice(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import now raises ImportError
    with caplog.at_level(logging.WARNING, logger="kexue_jax.metrics"):
        with MetricWriter(tmp_path) as w:
            w.write(1, {"loss": 1.0})
            w.write(2, {"loss": 0.5})
    assert caplog.text.count("tensorboardX is not installed") == 1
    assert not list(tmp_path.glob("events.out.tfevents.*"))
    assert len(read_metrics(tmp_path)) == 2


def test_format_progress_exact_strings():
    line = format_progress(120, 2000, {"loss": 2.3141, "bpb": 3.33849}, 1.2e5, 0.231, 252)
    assert line == "step 120/2000 | loss 2.314 | bpb 3.338 | 1.2e+05 tok/s | MFU 23.1% | ETA 04:12"
    assert format_progress(1, 10, {}, None, None, None) == "step 1/10"
    assert format_progress(5, 10, {"lr": 3e-4}, 987.0, None, 3723.4) == \
        "step 5/10 | lr 0.0003 | 9.9e+02 tok/s | ETA 1:02:03"


def test_progress_line_rates_from_clock():
    times = iter([100.0, 102.0, 103.0])
    progress = ProgressLine(1000, tokens_per_step=4096, flops_per_step=2e12, peak_flops=1e14,
                            clock=lambda: next(times))
    assert progress(0, {"loss": 5.0}) == "step 0/1000 | loss 5"
    # 10 steps in 2 s: 5 steps/s -> 20480 tok/s, MFU 2e12*5/1e14 = 10%, ETA 990/5 = 198 s
    assert progress(10, {"loss": 4.0}) == "step 10/1000 | loss 4 | 2.0e+04 tok/s | MFU 10.0% | ETA 03:18"
    # 20 steps in 1 s: 81920 tok/s, MFU 40%, ETA 970/20 = 48.5 s -> 00:48 (round half to even)
    assert progress(30, {}) == "step 30/1000 | 8.2e+04 tok/s | MFU 40.0% | ETA 00:48"


def test_plot_curves_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    with MetricWriter(tmp_path, tensorboard=False) as w:
        for s in range(1, 21):
            w.write(s, {"loss": 5.0 / s})
            if s % 5 == 0:
                w.write(s, {"val_loss": 5.5 / s})
    out = tmp_path / "plots" / "curves.png"
    assert plot_curves(tmp_path, out) is True
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    with pytest.raises(ValueError, match="none of .* logged keys: \\['loss', 'step', 'val_loss'\\]"):
        plot_curves(tmp_path, out, series={"acc": "accuracy"})


def test_plot_curves_without_matplotlib(tmp_path, monkeypatch, capsys):
    with MetricWriter(tmp_path, tensorboard=False) as w:
        w.write(1, {"loss": 1.0})
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert plot_curves(tmp_path, tmp_path / "x.png") is False
    assert capsys.readouterr().out.strip() == "matplotlib is not installed: no plot written"
    assert not (tmp_path / "x.png").exists()


def test_format_duration():
    assert [metrics.format_duration(s) for s in (0, 59.4, 61, 3599, 3600, 90061)] == \
        ["00:00", "00:59", "01:01", "59:59", "1:00:00", "25:01:01"]
