"""Fault injection: SIGKILL a training run at random moments, rerun it each time, compare with a run never
killed.

    python benchmarks/fault_injection.py [--kills 6] [--steps 40] [--seed 0] [--workdir DIR]

One uninterrupted run of ``configs/lm.py:tiny`` (``--steps`` steps, a checkpoint every 4 steps) is the
reference. Then the same command runs in a second workdir and is killed with SIGKILL ``--kills`` times:
every other kill waits for a checkpoint write in progress (orbax's ``<step>.orbax-checkpoint-tmp-*``
directory exists) and kills inside it; the others kill after a random step plus a random delay. After each
kill the command is rerun (it resumes from its newest readable checkpoint); after the last kill it runs to
the end. Finally every tensor of both final checkpoints (params, Adam moments, step) is compared bitwise.

Prints one JSON line: kills, kills_during_checkpoint_write, resumes, mismatches (tensors that differ),
tensors_compared, quarantined (steps moved to checkpoints/corrupt/), seconds. Exit status 1 on a mismatch.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def command(workdir: Path, steps: int) -> list[str]:
    return [sys.executable, "train.py", "--config=configs/lm.py:tiny", f"--workdir={workdir}",
            f"--config.train.steps={steps}", "--config.train.checkpoint_every=4", "--config.train.log_every=1",
            "--config.train.eval_every=10", "--config.train.keep_checkpoints=3", "--config.train.plot=False",
            "--config.optim.warmup_steps=4", "--jax_num_cpu_devices=2"]


def env() -> dict:
    out = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    out.pop("XLA_FLAGS", None)
    return out


def logged_step(workdir: Path) -> int:
    """The last step with a training-loss line in metrics.jsonl (0 if none yet)."""
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [0]
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in rec:
            steps.append(rec["step"])
    return max(steps)


def writing_checkpoint(workdir: Path) -> bool:
    ckpt = workdir / "checkpoints"
    return ckpt.exists() and any(".orbax-checkpoint-tmp" in p.name for p in ckpt.iterdir())


def run_and_kill(workdir: Path, steps: int, rng: random.Random, during_write: bool) -> tuple[bool, bool, str]:
    """Start the command, SIGKILL it at the chosen moment. Returns (killed, killed during a write, output)."""
    out_path = workdir.parent / f"{workdir.name}.log"
    with open(out_path, "w") as log:
        proc = subprocess.Popen(command(workdir, steps), cwd=REPO, env=env(), stdout=log, stderr=subprocess.STDOUT)
        start_step = logged_step(workdir)
        target = rng.randint(start_step + 1, max(start_step + 1, steps - 2))
        delay = rng.uniform(0.0, 0.3)
        hit_write = False
        while proc.poll() is None:
            if during_write and writing_checkpoint(workdir):
                hit_write = True
                break
            if not during_write and logged_step(workdir) >= target:
                time.sleep(delay)
                hit_write = writing_checkpoint(workdir)
                break
            time.sleep(0.002)
        killed = proc.poll() is None
        if killed:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
    return killed, hit_write and killed, out_path.read_text()


def final_state(workdir: Path, steps: int):
    """The TrainState of checkpoint ``steps`` in ``workdir``, on one device, on the host."""
    import jax  # noqa: PLC0415

    from configs import lm as lm_config  # noqa: PLC0415
    from kexue_jax import checkpoint, config as config_lib, training  # noqa: PLC0415
    from kexue_jax.nn import Transformer  # noqa: PLC0415

    c = lm_config.get_config("tiny")
    c.train.steps = steps
    model = Transformer(config_lib.model_config(c.model))
    tx = training.make_optimizer(c.optim, steps)
    abstract = jax.eval_shape(lambda k: training.init_state(model, tx, k, c.data.seq_len), jax.random.PRNGKey(0))
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one), abstract)
    state, _ = checkpoint.Checkpointer(workdir / "checkpoints").restore(abstract, step=steps)
    return jax.device_get(state)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=6)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="kept when given; default: a temporary directory")
    args = parser.parse_args(argv)
    if args.kills < 1 or args.steps < 8:
        parser.error("--kills must be >= 1 and --steps >= 8")
    rng = random.Random(args.seed)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="fault_injection_"))
    ref, faulty = root / "reference", root / "faulty"
    for d in (ref, faulty):
        shutil.rmtree(d, ignore_errors=True)
    t0 = time.time()
    done = subprocess.run(command(ref, args.steps), cwd=REPO, env=env(), capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stdout[-2000:], done.stderr[-2000:], file=sys.stderr)
        return 2
    kills = during = resumes = attempts = 0
    while kills < args.kills and attempts < 4 * args.kills:
        attempts += 1
        killed, hit_write, out = run_and_kill(faulty, args.steps, rng, during_write=kills % 2 == 0)
        resumes += "resumed from step" in out
        kills += killed
        during += hit_write
        if not killed and logged_step(faulty) >= args.steps:  # finished before the kill: start over
            shutil.rmtree(faulty)
    last = subprocess.run(command(faulty, args.steps), cwd=REPO, env=env(), capture_output=True, text=True)
    resumes += "resumed from step" in last.stdout
    if last.returncode != 0:
        print(last.stdout[-2000:], last.stderr[-2000:], file=sys.stderr)
        return 2
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    a, b = jax.tree_util.tree_leaves(final_state(ref, args.steps)), jax.tree_util.tree_leaves(final_state(faulty, args.steps))
    mismatches = sum(not np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b)) + abs(len(a) - len(b))
    corrupt = faulty / "checkpoints" / "corrupt"
    print(json.dumps({"kills": kills, "kills_during_checkpoint_write": during, "resumes": resumes,
                      "mismatches": mismatches, "tensors_compared": min(len(a), len(b)),
                      "quarantined": len(list(corrupt.iterdir())) if corrupt.exists() else 0,
                      "steps": args.steps, "seed": args.seed, "seconds": round(time.time() - t0, 1)}))
    if args.workdir is None:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
