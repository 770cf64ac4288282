"""Launch multi-rank test programs under mpirun, with a timeout so a hang fails the test.

A program in tests/mpi/ runs named checks on every rank; each check that passes prints
``PASS <name> rank=<r>``. ``expect_passes`` then demands every check on every rank, so a
check that is silently skipped fails too.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterable, Optional

import pytest

REPO = Path(__file__).resolve().parents[1]
MPI_DIR = Path(__file__).resolve().parent / "mpi"


def _horovod_missing() -> Optional[str]:
    from horovod_leader.engine import HOROVOD_MISSING as WHY, horovod_available

    return None if horovod_available() else f"{WHY} here: the toolkit runs on its torch engine, whose checks still run"


#: why the checks that need Horovod cannot run here (``tests/conftest.py`` skips those marked
#: ``horovod``, ``run_mpi`` every launch); None when Horovod is installed
HOROVOD_MISSING = _horovod_missing()


def mpirun_command(np: int, argv: Iterable[str]) -> list:
    if shutil.which("mpirun") is None:
        pytest.fail("mpirun is not on PATH: run launch/setup.sh first")
    cmd = ["mpirun", "-np", str(np), "--oversubscribe", "--bind-to", "none", "-x", "OMP_NUM_THREADS=1"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    return cmd + list(argv)


def _run_bounded(cmd, env: Dict[str, str], what: str, timeout: float, check: bool) -> subprocess.CompletedProcess:
    """Run ``cmd`` in a session of its own; kill the whole session and fail (not hang) after
    ``timeout`` seconds; with ``check``, fail on a non-zero exit, showing the output's end."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=str(REPO), start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{what} hung: no exit within {timeout}s\n{out[-6000:]}")
    result = subprocess.CompletedProcess(cmd, proc.returncode, out, "")
    if check and proc.returncode != 0:
        pytest.fail(f"{what} exited {proc.returncode}\n{out[-8000:]}")
    return result


def run_mpi(script: str, *args: str, np: int = 4, timeout: float = 300, env: Optional[Dict[str, str]] = None,
            check: bool = True) -> subprocess.CompletedProcess:
    """Run tests/mpi/<script> on ``np`` ranks (the Horovod engine, under mpirun); fail (not hang)
    after ``timeout`` seconds; skip, saying why, where Horovod is not installed."""
    if HOROVOD_MISSING:
        pytest.skip(HOROVOD_MISSING)
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = str(REPO) + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    full_env.update(env or {})
    cmd = mpirun_command(np, [sys.executable, "-u", str(MPI_DIR / script), *args])
    return _run_bounded(cmd, full_env, script, timeout, check)


def run_torchrun(script: str, *args: str, np: int = 4, timeout: float = 300, env: Optional[Dict[str, str]] = None,
                 check: bool = True) -> subprocess.CompletedProcess:
    """Run tests/mpi/<script> on ``np`` ranks started by torchrun on this machine (the torch
    engine); fail (not hang) after ``timeout`` seconds."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = str(REPO) + os.pathsep + str(MPI_DIR) + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    full_env.update(env or {})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(np),
           str(MPI_DIR / script), *args]
    return _run_bounded(cmd, full_env, f"{script} under torchrun", timeout, check)


def expect_passes(result: subprocess.CompletedProcess, checks: Iterable[str], np: int = 4) -> None:
    passed = set(re.findall(r"PASS (\S+) rank=(\d+)", result.stdout))
    missing = [(c, r) for c in checks for r in range(np) if (c, str(r)) not in passed]
    assert not missing, f"checks that did not pass on some rank: {missing}\n{result.stdout[-6000:]}"


def values(result: subprocess.CompletedProcess, key: str) -> Dict[int, str]:
    """Lines ``VALUE <key> rank=<r> <text>`` printed by the ranks, by rank."""
    found = re.findall(rf"^VALUE {re.escape(key)} rank=(\d+) (.*)$", result.stdout, flags=re.M)
    return {int(rank): text for rank, text in found}
