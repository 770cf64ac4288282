"""Run a benchmark file on several ranks: the file re-launches itself under mpirun in worker mode."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def relaunch(script: str, args, np: int = 4, timeout: float = 1800) -> None:
    """``mpirun -np NP python SCRIPT --worker ARGS``, with the flags this machine needs."""
    cmd = ["mpirun", "-np", str(np), "--bind-to", "none", "-x", "OMP_NUM_THREADS=1"]
    if np > (os.cpu_count() or 1):
        cmd.append("--oversubscribe")
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    cmd += [sys.executable, "-u", script, "--worker", *args]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run(cmd, check=True, env=env, timeout=timeout)
