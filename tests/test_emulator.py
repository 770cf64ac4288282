"""The emulated cluster (launch/emulated_cluster.sh): network-namespace nodes joined by
rate-limited links, under its three launchers (mpirun, horovodrun in MPI mode, horovodrun
--gloo). The tests that build namespaces skip, saying why, where that cannot be done."""
import functools
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import List, Optional

import pytest

from mpi_harness import REPO, expect_passes

EMULATOR = REPO / "launch" / "emulated_cluster.sh"
PROGRAM = REPO / "tests" / "mpi" / "emulator_checks.py"
RATE_MBIT = 50  # low, so that a few megabytes measure it and the CPU is never the limit


@functools.lru_cache(maxsize=None)
def _why_unavailable() -> Optional[str]:
    """The same probe the cluster benchmark uses (root, the tools, a namespace made and removed)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from cluster import emulator_unavailable

    return emulator_unavailable()


@pytest.fixture
def namespaces():
    reason = _why_unavailable()
    if reason:
        pytest.skip(reason)


def _emulator(nodes: int, ranks: int, args, launcher: str = "mpirun", rate: str = f"{RATE_MBIT}mbit"):
    env = {**os.environ, "LINK_RATE": rate, "EMULATED_LAUNCHER": launcher, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen(["bash", str(EMULATOR), str(nodes), str(ranks), str(PROGRAM), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=str(REPO),
                            start_new_session=True, preexec_fn=_as_from_a_terminal)


def _as_from_a_terminal() -> None:
    """SIGINT and SIGTERM at their defaults, as a command started from a terminal has them. A
    test suite started in the background inherits SIGINT ignored, and a shell cannot trap a
    signal ignored on entry, so the Ctrl-C check would test that instead."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _stop(proc: subprocess.Popen) -> None:
    """A hang: SIGTERM first, so that the emulator still tears down; SIGKILL if it does not."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def run_emulated(args, launcher: str = "mpirun", timeout: float = 300) -> subprocess.CompletedProcess:
    """2 nodes x 2 ranks of tests/mpi/emulator_checks.py; fails (not hangs) after ``timeout``."""
    proc = _emulator(2, 2, args, launcher)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop(proc)
        out, _ = proc.communicate()
        pytest.fail(f"the emulated run hung: no exit within {timeout}s\n{out[-6000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def run_name(output: str) -> str:
    """The run's name (prefix of its namespaces, links and bridge), from the emulator's banner."""
    found = re.search(r" on (hle[0-9a-f]+), launcher ", output)
    assert found, f"no banner in the emulator's output:\n{output[-3000:]}"
    return found.group(1)


def leftovers(name: str) -> List[str]:
    """Everything of run ``name`` still on the machine: namespaces, links, qdiscs, hosts files."""
    left = [f"namespace {ns}" for ns in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                                       text=True).stdout.split() if ns.startswith(name)]
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    left += [f"link {line.split(':')[1].strip()}" for line in links.splitlines() if name in line]
    qdiscs = subprocess.run(["tc", "qdisc", "show"], capture_output=True, text=True).stdout
    left += [f"qdisc {line}" for line in qdiscs.splitlines() if name in line]
    left += [f"file {path}" for path in Path("/etc/netns").glob(f"{name}*")] if Path("/etc/netns").is_dir() else []
    return left


def measured(output: str, key: str) -> float:
    found = re.search(rf"VALUE {key} rank=0 ([0-9.]+)", output)
    assert found, f"no {key} in the output:\n{output[-3000:]}"
    return float(found.group(1))


def yield_settings(output: str) -> List[str]:
    return re.findall(r"VALUE yield_when_idle rank=\d+ (\w+)", output)


def test_groups_follow_nodes_and_links_run_at_their_rate(namespaces):
    result = run_emulated(["--throughput"])
    assert result.returncode == 0, result.stdout[-8000:]
    expect_passes(result, ["groups_follow_nodes", "throughput"])
    # the emulated nodes share the machine's cores: mpirun's ranks must yield when idle
    assert yield_settings(result.stdout) == ["1"] * 4, yield_settings(result.stdout)
    inter, intra = measured(result.stdout, "inter_mbit"), measured(result.stdout, "intra_mbit")
    assert abs(inter - RATE_MBIT) <= 0.25 * RATE_MBIT, f"between nodes {inter} Mbit/s, links set to {RATE_MBIT}"
    assert intra >= 10 * RATE_MBIT, f"inside a node only {intra} Mbit/s against {inter} between nodes"
    assert not leftovers(run_name(result.stdout))


@pytest.mark.horovod
def test_teardown_after_a_rank_fails_and_after_ctrl_c(namespaces):
    failed = run_emulated(["--fail-rank", "3"])
    assert failed.returncode != 0, failed.stdout[-4000:]
    assert "rank 3 fails on purpose" in failed.stdout
    assert not leftovers(run_name(failed.stdout))

    # Ctrl-C: SIGINT to the whole process group, as a terminal sends it, once every rank runs.
    proc = _emulator(2, 2, ["--hold", "120"])
    watchdog = threading.Timer(240, _stop, [proc])
    watchdog.start()
    lines, ready = [], 0
    try:
        for line in proc.stdout:
            lines.append(line)
            ready += "READY rank=" in line
            if ready == 4:
                os.killpg(proc.pid, signal.SIGINT)
                break
        out = "".join(lines) + proc.communicate(timeout=60)[0]
    finally:
        watchdog.cancel()
        _stop(proc)
    assert ready == 4, out[-4000:]
    assert proc.returncode == 130, f"exit status {proc.returncode} after Ctrl-C\n{out[-4000:]}"
    assert not leftovers(run_name(out))


@pytest.mark.parametrize("launcher", ["horovodrun", "horovodrun-gloo"])
@pytest.mark.horovod
def test_horovodrun_across_emulated_hosts(namespaces, launcher, tmp_path):
    result = run_emulated(["--train", tmp_path / "lsgd"], launcher=launcher)
    assert result.returncode == 0, result.stdout[-8000:]
    expect_passes(result, ["groups_follow_nodes", "train_lsgd"])
    mode = re.findall(r"VALUE mode rank=\d+ (\w+)", result.stdout)
    assert mode == ["gloo" if launcher == "horovodrun-gloo" else "mpi"] * 4, mode
    if launcher == "horovodrun":  # Open MPI under horovodrun yields when idle too; Gloo has no such setting
        assert yield_settings(result.stdout) == ["1"] * 4, yield_settings(result.stdout)
    assert not leftovers(run_name(result.stdout))


def test_asynchronous_lsgd_across_emulated_nodes(namespaces, tmp_path):
    """The global step counter across nodes (a TCP counter server on rank 0's node)."""
    result = run_emulated(["--train-async", tmp_path / "async"])
    assert result.returncode == 0, result.stdout[-8000:]
    expect_passes(result, ["groups_follow_nodes", "train_lsgd_async"])
    assert not leftovers(run_name(result.stdout))


def test_refuses_clearly_without_root_and_on_bad_usage():
    script = EMULATOR.read_text()
    # As an unprivileged user (read from stdin, so that no path needs to be readable to it).
    as_user = {"user": 65534, "group": 65534} if os.geteuid() == 0 else {}
    refused = subprocess.run(["bash", "-s", "--", "2", "2", "program.py"], input=script, capture_output=True,
                             text=True, cwd="/", timeout=60, **as_user)
    assert refused.returncode == 3, refused.stderr
    assert "must run as root" in refused.stderr
    for bad in (["0", "2", "p.py"], ["2", "x", "p.py"], ["2", "2"]):
        usage = subprocess.run(["bash", str(EMULATOR), *bad], capture_output=True, text=True, timeout=60)
        assert usage.returncode == 2 and "usage:" in usage.stderr, (bad, usage.stderr)
    wrong = subprocess.run(["bash", str(EMULATOR), "2", "2", "p.py"], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "EMULATED_LAUNCHER": "srun"})
    assert wrong.returncode == 2 and "EMULATED_LAUNCHER" in wrong.stderr
