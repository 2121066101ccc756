"""Interrupting a ``train.py`` process in the tests: one helper for SIGTERM and Ctrl-C (SIGINT)."""
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def signal_after_first_log(args, workdir: Path, env: dict, sig=signal.SIGTERM, timeout: float = 240):
    """Run ``train.py *args --workdir=workdir`` (cwd: the repo, environment ``env``), send ``sig`` once its
    metrics log holds a training loss, and return (status, stderr lines). Stdout goes to ``<workdir>.stdout``."""
    workdir = Path(workdir)
    with open(workdir.parent / f"{workdir.name}.stdout", "w") as out:
        proc = subprocess.Popen([sys.executable, "train.py", *args, f"--workdir={workdir}"], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.PIPE, text=True)
        try:
            metrics, deadline = workdir / "metrics.jsonl", time.time() + timeout
            while (time.time() < deadline and proc.poll() is None
                   and not (metrics.exists() and '"loss"' in metrics.read_text())):
                time.sleep(0.1)
            proc.send_signal(sig)
            _, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    return proc.returncode, err.strip().splitlines()
