"""Horovod's Gloo mode on one host (`horovodrun --gloo -np 4`): the ranks are not started by
MPI, so the topology comes from Horovod, the training command agrees on its options over
Horovod, and the asynchronous variants refuse clearly on every rank."""
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mpi_harness import MPI_DIR, REPO, expect_passes

pytestmark = pytest.mark.horovod  # Horovod's own launcher and Gloo mode

HOROVODRUN = Path(sys.executable).parent / "horovodrun"


def horovodrun_gloo(argv, timeout: float = 300, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """``horovodrun --gloo -np 4 python ARGV``; fails (not hangs) after ``timeout`` seconds."""
    if not HOROVODRUN.exists():
        pytest.fail(f"{HOROVODRUN} is missing: run launch/setup.sh first")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [str(HOROVODRUN), "--gloo", "-np", "4", sys.executable, "-u", *map(str, argv)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=str(cwd), start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"horovodrun --gloo hung: no exit within {timeout}s\n{out[-6000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def test_topology_refusals_and_wrappers_without_mpi():
    result = horovodrun_gloo([MPI_DIR / "gloo_checks.py"], cwd=MPI_DIR)
    assert result.returncode == 0, result.stdout[-8000:]
    expect_passes(result, ["host_group", "blocks_and_group_broadcast", "bad_arguments", "async_refused",
                           "synchronous_wrappers"])


@pytest.mark.parametrize("algo", ["lsgd", "dp"])
def test_training_command_in_gloo_mode(algo, tmp_path):
    out = tmp_path / algo
    result = horovodrun_gloo(["-m", "horovod_leader.train", "--no-progress", "--algo", algo, "--group-size", "2",
                              "--period", "2", "--global-period", "4", "--time-budget", "4", "--eval-every", "2",
                              "--out", out])
    assert result.returncode == 0, result.stdout[-8000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    assert last["step"] > 0 and len(last["steps"]) == 4 and len(last["worker_accuracies"]) == 4
    assert all(n > 0 for n in last["comm_bytes"])
    if algo == "lsgd":
        # Two groups of two: each has its own local leader, inside the group.
        assert last["local_leaders"][0] in (0, 1) and last["local_leaders"][2] in (2, 3), last["local_leaders"]
        assert last["local_leaders"][0] == last["local_leaders"][1]
    assert json.loads((out / "config.json").read_text())["algo"] == algo


def test_async_stops_every_rank_with_the_fix(tmp_path):
    result = horovodrun_gloo(["-m", "horovod_leader.train", "--no-progress", "--algo", "lsgd", "--async",
                              "--time-budget", "5", "--out", tmp_path / "async"], timeout=60)
    assert result.returncode != 0
    message = re.findall(r"error \(ranks \[0, 1, 2, 3\]\): --async needs MPI.*", result.stdout)
    assert len(message) == 1, result.stdout[-4000:]
    assert "launch with horovodrun in MPI mode or mpirun" in message[0]
    # The ranks stopped with that message and status 2, and none with a traceback (horovodrun's
    # own report of the failed job follows the ranks' output).
    assert re.search(r"Process \d exit with status code 2", result.stdout), result.stdout[-4000:]
    assert not re.search(r"\[\d\]<stderr>:Traceback", result.stdout), result.stdout[-4000:]


def test_mode_detection_and_host_views(monkeypatch):
    from horovod_leader import launcher, topology

    monkeypatch.setenv("HOROVOD_CONTROLLER", "gloo")
    assert not launcher.launched_by_mpi()
    with pytest.raises(launcher.MPIRequired, match="launch with horovodrun in MPI mode or mpirun"):
        launcher.require_mpi("asynchronous mode")
    monkeypatch.setenv("HOROVOD_CONTROLLER", "mpi")
    assert launcher.launched_by_mpi()
    launcher.require_mpi("asynchronous mode")  # no error under MPI
    # Two hosts of two ranks, then hosts of 3 and 1 ranks; a host whose ranks are not one block is refused.
    assert topology.groups_from_host_views([(0, 2), (0, 2), (2, 2), (2, 2)]) == [[0, 1], [2, 3]]
    assert topology.groups_from_host_views([(0, 3), (0, 3), (0, 3), (3, 1)]) == [[0, 1, 2], [3]]
    with pytest.raises(RuntimeError, match="contiguous"):
        topology.groups_from_host_views([(0, 2), (1, 2), (0, 2), (1, 2)])
