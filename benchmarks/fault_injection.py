"""Fault injection: SIGKILL a job's run at random moments, rerun it each time, compare with a run never killed;
then SIGTERM one run once and check that it saves, stops and resumes.

    python benchmarks/fault_injection.py [--config configs/lm.py:tiny | JOB | all] [--kills 6] [--steps N]
        [--seed 0] [--workdir DIR] [--results DIR] [--no-sigterm] [--no-compilation-cache]

A job is the ``:tiny`` variant of one config run by ``train.py`` with the overrides of its row of :data:`JOBS`
(a checkpoint every few steps, so that kills land between and during checkpoint writes; for the studies, inside
their cells): ``lm``, ``upscale`` (the main job: arm B, arm A's small phase, widening, its big phase), ``univae``
(the VAE, then its byte LM), ``similarity`` (the tiny study: fine-tunes of two losses, the head ablation,
distillation), ``init_study`` (cells) and ``mixers`` (pre-training and two fine-tunes per arm). The studies keep
each finished run's record (``cells/*.json``, ``runs/*/result.json``); init_study and similarity then delete
its checkpoints. ``--config all`` runs every job, one after the other. Per job, under ``WORKDIR/<job>/``:

1. ``reference``: one uninterrupted run.
2. ``faulty``: the same command, killed with SIGKILL ``--kills`` times. Each run draws a number of logged steps
   still to come; every other kill then waits for a checkpoint write in progress (orbax's
   ``<step>.orbax-checkpoint-tmp-*`` in any ``checkpoints/`` of the workdir) and kills inside it, the others
   kill after a random delay (0-0.3 s). After each kill the command is rerun (it resumes from its newest
   readable checkpoints; finished cells are not redone); after the last kill it runs to the end. A run that
   ends before its kill is started over in an empty workdir.
3. ``sigterm`` (unless ``--no-sigterm``): the same command, sent SIGTERM once after its first logged step (not
   during a checkpoint write). It must exit with status 143 and the line ``SIGTERM: saved step N; rerun to
   resume``, hold a checkpoint at step N, and its rerun must print ``resumed from step N``.
4. Both finished workdirs are compared with the reference (:class:`Comparison`): every tensor of the newest
   checkpoint of every ``checkpoints/`` directory (params, Adam moments, step) and of every saved model
   (``*.safetensors``), bitwise; every value of every JSON record (``*.json``: reports, cell records,
   ``result.json``, stored configs; ``metrics.jsonl``: the last record of each step; not a copied tokenizer),
   exactly, with timing fields (seconds, wall time, tokens/s) left out and the workdir's own path replaced.

Every run gets the same XLA flags (none), 2 CPU devices and, unless ``--no-compilation-cache``, one compilation
cache (``WORKDIR/xla_cache``, filled by the reference run), so every rerun executes the reference's computation
without compiling it again. Prints one JSON line per job: job, kills, kills_during_checkpoint_write, resumes,
tensors_compared, values_compared, mismatches (tensors or values that differ, the first ones named in
``differences``), quarantined (steps moved to ``checkpoints/corrupt/``), sigterm_saved_step, sigterm_resumed,
sigterm_mismatches, seconds. ``--results DIR`` also writes it to ``DIR/<job>.json``. Exit status 1 on a mismatch
or a failed SIGTERM check, 2 when a run fails.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEVICES = "--jax_num_cpu_devices=2"
#: a progress line of ``training.run_loop``: one logged training step (``[phase] step 12/40 | loss ...``)
LOGGED = re.compile(r"^(?:\[(.*)\] )?step (\d+)/\d+ \| ", re.MULTILINE)
SAVED = re.compile(r"SIGTERM: saved step (\d+); rerun to resume$")
#: record fields that measure time, not results: left out of the comparison
TIMING = re.compile(r"(^|_)(seconds|wall|wall_s|tokens_per_s|tokens_per_s_interleaved)$|tok/s")
WORKDIR_TOKEN = "<workdir>"
#: JSON files a run copies, not records it writes (a saved sentence model's tokenizer): not compared
COPIED = ("tokenizer.json",)


@dataclasses.dataclass(frozen=True)
class Job:
    """One job: ``train.py --config=spec`` with ``--config.<field>=<value>`` for each override."""

    spec: str
    overrides: dict


JOBS = {
    "lm": Job("configs/lm.py:tiny", {
        "train.steps": 40, "train.checkpoint_every": 4, "train.log_every": 1, "train.eval_every": 10,
        "train.keep_checkpoints": 3, "train.plot": False, "optim.warmup_steps": 4}),
    # arm B 40 steps, arm A 25 small + up to 2 x B's FLOPs big (stops at B's final loss)
    "upscale": Job("configs/upscale.py:tiny", {
        "train.steps": 40, "train.checkpoint_every": 4, "train.log_every": 1, "train.eval_every": 5,
        "train.plot": False}),
    # the VAE 40 steps, then its byte LM (checkpointed at its end only) 12 steps
    "univae": Job("configs/univae.py:tiny", {
        "train.steps": 40, "train.checkpoint_every": 4, "train.log_every": 1, "train.eval_every": 20,
        "train.eval_batches": 1, "optim.warmup_steps": 5, "eval.lm_steps": 12}),
    # the study: 3 fine-tunes of 12 steps and a distillation of 8, each checkpointed at every evaluation
    "similarity": Job("configs/similarity.py:tiny", {
        "study.enabled": True, "train.steps": 12, "train.eval_every": 4, "train.log_every": 1,
        "data.dev_pairs": 64, "data.test_pairs": 64, "study.distill.steps": 8}),
    # every cell 12 steps, a checkpoint every 4
    "init_study": Job("configs/init_study.py:tiny", {
        "train.steps": 12, "train.checkpoint_every": 4, "train.log_every": 1}),
    # 4 mixers x 2 objectives (7 arms), 8 steps each, the fine-tunes of each MLM arm; no speed rounds (timing only)
    "mixers": Job("configs/mixers.py:tiny", {
        "study.mixers": ("attention", "fnet", "gmlp", "conv"), "train.steps": 8, "train.checkpoint_every": 2,
        "train.log_every": 1, "study.ft_steps": 4, "study.speed_rounds": 0}),
}


class RunFailed(RuntimeError):
    """A run ended with an error status without being killed."""


def flag_value(value) -> str:
    return repr(tuple(value)) if isinstance(value, (tuple, list)) else str(value)


def command(job: Job, workdir: Path, steps: int | None = None) -> list[str]:
    overrides = {**job.overrides, **({} if steps is None else {"train.steps": steps})}
    return [sys.executable, "train.py", f"--config={job.spec}", f"--workdir={workdir}",
            *(f"--config.{k}={flag_value(v)}" for k, v in overrides.items()), DEVICES]


def env(cache: Path | None) -> dict:
    out = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    out.pop("XLA_FLAGS", None)
    if cache is not None:
        out.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return out


def logged_steps(text: str) -> set[tuple[str, int]]:
    """The (phase, step) of every progress line in ``text``."""
    return {(m.group(1) or "", int(m.group(2))) for m in LOGGED.finditer(text)}


def checkpoint_dirs(root: Path) -> list[Path]:
    """Every ``checkpoints/`` directory under ``root`` (not looking inside them)."""
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        if os.path.basename(dirpath) == "checkpoints":
            found.append(Path(dirpath))
            dirnames[:] = []
    return sorted(found)


def committed_steps(directory: Path) -> list[int]:
    return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


def quarantined(root: Path) -> int:
    return sum(len(os.listdir(c / "corrupt")) for c in checkpoint_dirs(root) if (c / "corrupt").is_dir())


class Watch:
    """A run in progress: the steps its output has logged so far, and whether a checkpoint is being written."""

    def __init__(self, workdir: Path, log_path: Path):
        self.workdir, self.log_path, self._dirs, self._listed = workdir, log_path, [], 0.0
        self._offset, self._logged = 0, set()

    def steps(self) -> set[tuple[str, int]]:
        """The (phase, step) of every complete progress line so far (read on from where the last call stopped)."""
        with open(self.log_path, "rb") as f:
            f.seek(self._offset)
            new = f.read()
        end = new.rfind(b"\n") + 1
        self._offset += end
        self._logged |= logged_steps(new[:end].decode(errors="replace"))
        return self._logged

    def writing(self) -> bool:
        if time.time() - self._listed > 0.25:  # phases and cells make their checkpoints/ as they start
            self._dirs, self._listed = checkpoint_dirs(self.workdir), time.time()
        for d in self._dirs:
            try:
                if any(".orbax-checkpoint-tmp" in name for name in os.listdir(d)):
                    return True
            except FileNotFoundError:  # a finished cell's directory, deleted
                pass
        return False


@dataclasses.dataclass
class Runner:
    cache: Path | None
    timeout: float

    def start(self, cmd: list[str], log_path: Path, stderr=subprocess.STDOUT) -> subprocess.Popen:
        log = open(log_path, "w")
        return subprocess.Popen(cmd, cwd=REPO, env=env(self.cache), stdout=log, stderr=stderr)

    def to_end(self, cmd: list[str], log_path: Path) -> str:
        """Run ``cmd`` to its end; its output. RunFailed on an error status."""
        proc = self.start(cmd, log_path)
        try:
            status = proc.wait(self.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            status = proc.wait()
        out = log_path.read_text(errors="replace")
        if status != 0:
            raise RunFailed(f"{' '.join(cmd[1:])} ended with status {status}:\n{out[-3000:]}")
        return out

    def kill_at_random(self, cmd, workdir: Path, log_path: Path, rng: random.Random, *, during_write: bool,
                       seen: set, total: int) -> tuple[int | None, bool, str]:
        """Start ``cmd``; once it has logged a random number (1 .. total - len(seen) - 2) of steps not in ``seen``
        (those its predecessors logged), SIGKILL it inside the next checkpoint write (``during_write``) or after a
        random delay. Returns (its status, None if killed; killed during a write; its output)."""
        proc, watch = self.start(cmd, log_path), Watch(workdir, log_path)
        target, delay = rng.randint(1, max(1, total - len(seen) - 2)), rng.uniform(0.0, 0.3)
        hit_write, deadline = False, time.time() + self.timeout
        while proc.poll() is None and time.time() < deadline:
            if len(watch.steps() - seen) >= target:
                if not during_write:
                    time.sleep(delay)
                    hit_write = watch.writing()
                    break
                if watch.writing():
                    hit_write = True
                    break
            time.sleep(0.002)
        killed = proc.poll() is None
        if killed:
            proc.send_signal(signal.SIGKILL)
        status = proc.wait()
        return None if killed else status, hit_write and killed, log_path.read_text(errors="replace")


# ------------------------------------------------------------------------------------------------
# Comparison.

class Comparison:
    """Counts of tensors and record values compared with a reference, and the differences (first ones named)."""

    def __init__(self, ref_root: Path | None = None, other_root: Path | None = None):
        self.ref_root, self.other_root = ref_root, other_root
        self.tensors = self.values = self.mismatches = 0
        self.differences: list[str] = []

    def differ(self, where: str) -> None:
        self.mismatches += 1
        if len(self.differences) < 10:
            self.differences.append(where)

    def arrays(self, a: dict, b: dict, where: str = "") -> None:
        """Bitwise comparison of two name -> array mappings (dtype, shape and every bit)."""
        import numpy as np  # noqa: PLC0415

        for name in sorted(set(a) ^ set(b)):
            self.differ(f"{where}{name}: in one only")
        for name in sorted(set(a) & set(b)):
            x, y = np.asarray(a[name]), np.asarray(b[name])
            self.tensors += 1
            if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
                gap = (float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64))))
                       if x.shape == y.shape and x.dtype.kind in "fiu" and y.dtype.kind in "fiu" else None)
                self.differ(f"{where}{name}: {x.dtype}{list(x.shape)} vs {y.dtype}{list(y.shape)}, max |diff| {gap}")

    def records(self, a, b, where: str = "") -> None:
        """Exact comparison of two JSON values, fields matching :data:`TIMING` left out (NaN equals NaN)."""
        if isinstance(a, dict) and isinstance(b, dict):
            keys_a = {k for k in a if not TIMING.search(k)}
            keys_b = {k for k in b if not TIMING.search(k)}
            for k in sorted(keys_a ^ keys_b):
                self.differ(f"{where}.{k}: in one only")
            for k in sorted(keys_a & keys_b):
                self.records(a[k], b[k], f"{where}.{k}")
        elif isinstance(a, list) and isinstance(b, list):
            if len(a) != len(b):
                self.differ(f"{where}: {len(a)} vs {len(b)} entries")
            for i, (x, y) in enumerate(zip(a, b)):
                self.records(x, y, f"{where}[{i}]")
        else:
            self.values += 1
            same_nan = isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)
            if not (same_nan or (type(a) is type(b) and a == b)):
                self.differ(f"{where}: {a!r} vs {b!r}")

    def workdirs(self) -> "Comparison":
        """Compare ``other_root`` with ``ref_root``: checkpoints, saved models and records (module docstring)."""
        ref, other = self.ref_root, self.other_root
        dirs = {c.relative_to(ref) for c in checkpoint_dirs(ref)}
        for rel in sorted(dirs ^ {c.relative_to(other) for c in checkpoint_dirs(other)}):
            self.differ(f"{rel}: in one workdir only")
        for rel in sorted(dirs & {c.relative_to(other) for c in checkpoint_dirs(other)}):
            a, b = committed_steps(ref / rel), committed_steps(other / rel)
            if a[-1:] != b[-1:]:
                self.differ(f"{rel}: newest step {a[-1:]} vs {b[-1:]}")
            elif a:
                self.arrays(checkpoint_arrays(ref / rel, a[-1]), checkpoint_arrays(other / rel, a[-1]),
                            f"{rel}/{a[-1]}:")
        for pattern, load, compare in (("*.safetensors", saved_model, self.arrays),
                                       ("*.json", self.load_json, self.records),
                                       ("*.jsonl", self.load_jsonl, self.records)):
            files = {p.relative_to(ref) for p in outside_checkpoints(ref, pattern)}
            for rel in sorted(files ^ {p.relative_to(other) for p in outside_checkpoints(other, pattern)}):
                self.differ(f"{rel}: in one workdir only")
            for rel in sorted(files & {p.relative_to(other) for p in outside_checkpoints(other, pattern)}):
                compare(load(ref / rel, ref), load(other / rel, other), f"{rel}:")
        return self

    @staticmethod
    def load_json(path: Path, root: Path):
        return json.loads(path.read_text().replace(str(root), WORKDIR_TOKEN))

    @staticmethod
    def load_jsonl(path: Path, root: Path) -> dict:
        """The last record of each step, training records (with a ``loss``) apart from evaluations; a line cut by
        a kill (the last one) is skipped."""
        out = {}
        for line in path.read_text().replace(str(root), WORKDIR_TOKEN).splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            out[f"{rec.get('step')}/{'train' if 'loss' in rec else 'eval'}"] = rec
        return out


def outside_checkpoints(root: Path, pattern: str) -> list[Path]:
    return [p for p in root.rglob(pattern) if "checkpoints" not in p.relative_to(root).parts and p.name not in COPIED]


def saved_model(path: Path, root: Path) -> dict:
    from safetensors.numpy import load_file  # noqa: PLC0415

    return load_file(str(path))


def checkpoint_arrays(directory: Path, step: int) -> dict:
    """Every array of checkpoint ``step`` in ``directory`` (read by its own metadata: no model needed), on one
    device, by tree path."""
    import jax  # noqa: PLC0415

    from kexue_jax import checkpoint as ckpt_lib  # noqa: PLC0415

    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ckpt_lib.Checkpointer(directory, max_to_keep=None) as ckpt:
        abstract = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
                                          ckpt._manager.item_metadata(step).tree)
        state, _ = ckpt.restore(abstract, step=step)
    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(state))[0]
    return {jax.tree_util.keystr(path): leaf for path, leaf in leaves}


# ------------------------------------------------------------------------------------------------
# One job.

def sigterm_run(runner: Runner, cmd: list[str], workdir: Path, ref: Path) -> dict:
    """SIGTERM after the first logged step, outside a checkpoint write; then the rerun (module docstring, 3)."""
    log_path, err_path = workdir.parent / "sigterm.log", workdir.parent / "sigterm.stderr"
    with open(err_path, "w") as err:
        proc = runner.start(cmd, log_path, stderr=err)
        watch, deadline = Watch(workdir, log_path), time.time() + runner.timeout
        while proc.poll() is None and time.time() < deadline and not watch.steps():
            time.sleep(0.01)
        while proc.poll() is None and watch.writing():
            time.sleep(0.002)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        status = proc.wait()
    lines = err_path.read_text(errors="replace").strip().splitlines()
    match = SAVED.search(lines[-1]) if status == 143 and lines else None
    saved = int(match.group(1)) if match else None
    stored = saved is not None and any((c / str(saved)).is_dir() for c in checkpoint_dirs(workdir))
    rerun = runner.to_end(cmd, workdir.parent / "sigterm_rerun.log")
    resumed = saved is not None and re.search(rf"resumed from step {saved} \(", rerun) is not None
    cmp = Comparison(ref, workdir).workdirs()
    return {"sigterm_status": status, "sigterm_line": lines[-1] if lines else None, "sigterm_saved_step": saved,
            "sigterm_checkpoint_stored": stored, "sigterm_resumed": resumed, "sigterm_tensors_compared": cmp.tensors,
            "sigterm_values_compared": cmp.values, "sigterm_mismatches": cmp.mismatches,
            **({"sigterm_differences": cmp.differences} if cmp.differences else {})}


def run_job(name: str, args, root: Path, runner: Runner) -> dict:
    t0, job, base = time.time(), JOBS[name], root / name
    ref, faulty, term = base / "reference", base / "faulty", base / "sigterm"
    for d in (ref, faulty, term):
        shutil.rmtree(d, ignore_errors=True)
    base.mkdir(parents=True, exist_ok=True)
    total = len(logged_steps(runner.to_end(command(job, ref, args.steps), base / "reference.log")))
    cmd = command(job, faulty, args.steps)
    rng, seen = random.Random(args.seed), set()
    kills = during = resumes = attempts = 0
    while kills < args.kills and attempts < 4 * args.kills:
        attempts += 1
        status, hit_write, out = runner.kill_at_random(cmd, faulty, base / f"faulty_{attempts}.log", rng,
                                                       during_write=kills % 2 == 0, seen=seen, total=total)
        resumes += "resumed from step" in out
        kills += status is None
        during += hit_write
        seen |= logged_steps(out)
        if status:
            raise RunFailed(f"{' '.join(cmd[1:])} ended with status {status}:\n{out[-3000:]}")
        if status == 0:  # it ended before its kill: start over
            shutil.rmtree(faulty)
            seen = set()
    resumes += "resumed from step" in runner.to_end(cmd, base / "faulty_last.log")
    cmp = Comparison(ref, faulty).workdirs()
    result = {"job": name, "config": job.spec, "kills": kills, "kills_during_checkpoint_write": during,
              "resumes": resumes, "tensors_compared": cmp.tensors, "values_compared": cmp.values,
              "mismatches": cmp.mismatches, **({"differences": cmp.differences} if cmp.differences else {}),
              "quarantined": quarantined(faulty)}
    if args.sigterm:
        result.update(sigterm_run(runner, command(job, term, args.steps), term, ref))
    steps = args.steps or job.overrides.get("train.steps")
    result.update(steps=steps, seed=args.seed, seconds=round(time.time() - t0, 1),
                  command=f"python benchmarks/fault_injection.py --config {job.spec} --kills {args.kills} "
                          f"--seed {args.seed}" + (f" --steps {args.steps}" if args.steps else ""))
    return result


def failed(result: dict) -> bool:
    """A mismatch, or a SIGTERM run that did not stop, save, resume and end equal."""
    if result.get("mismatches") or result.get("sigterm_mismatches"):
        return True
    return "sigterm_status" in result and not (result["sigterm_status"] == 143 and result["sigterm_checkpoint_stored"]
                                               and result["sigterm_resumed"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    names = {job.spec: name for name, job in JOBS.items()}
    parser.add_argument("--config", default="configs/lm.py:tiny",
                        help=f"a job's config ({', '.join(names)}), its name ({', '.join(JOBS)}) or 'all'")
    parser.add_argument("--kills", type=int, default=6)
    parser.add_argument("--steps", type=int, default=None, help="train.steps (default: the job's, lm 40)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="kept when given; default: a temporary directory")
    parser.add_argument("--results", default=None, help="also write each job's line to RESULTS/<job>.json")
    parser.add_argument("--no-sigterm", dest="sigterm", action="store_false", help="skip the SIGTERM run")
    parser.add_argument("--no-compilation-cache", dest="cache", action="store_false")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds one run may take")
    args = parser.parse_args(argv)
    if args.config != "all" and args.config not in names and args.config not in JOBS:
        parser.error(f"--config must be one of {sorted(names)}, {sorted(JOBS)} or 'all', got {args.config!r}")
    if args.kills < 1 or (args.steps is not None and args.steps < 8):
        parser.error("--kills must be >= 1 and --steps >= 8")
    jobs = list(JOBS) if args.config == "all" else [names.get(args.config, args.config)]
    root = Path(args.workdir or tempfile.mkdtemp(prefix="fault_injection_")).resolve()
    runner = Runner(root / "xla_cache" if args.cache else None, args.timeout)
    status = 0
    for name in jobs:
        try:
            result = run_job(name, args, root, runner)
        except RunFailed as e:
            print(e, file=sys.stderr)
            result, status = {"job": name, "error": str(e).splitlines()[0]}, 2
        status = max(status, int(failed(result)))
        print(json.dumps(result), flush=True)
        if args.results:
            os.makedirs(args.results, exist_ok=True)
            Path(args.results, f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    if args.workdir is None:
        shutil.rmtree(root, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
