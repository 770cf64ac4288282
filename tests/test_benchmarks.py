"""The benchmark scripts run on a tiny setting and write their outputs (no timing is asserted)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def summary_module():
    """``benchmarks/cluster_summary.py``, imported from the benchmarks folder."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import cluster_summary
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return cluster_summary


def test_fused_update_benchmark_runs(tmp_path):
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "fused_update.py"), "--sizes", "1e4,2e4", "--repeats", "2",
                    "--out", str(tmp_path), "--no-markdown"], check=True, timeout=300, cwd=REPO)
    result = json.loads((tmp_path / "fused_update_cpu.json").read_text())
    assert [row["elements"] for row in result["rows"]] == [10_000, 20_000]
    assert all(row["fused_s"] > 0 and row["unfused_s"] > 0 and row["copy_s"] > 0 for row in result["rows"])
    assert (tmp_path / "fused_update_cpu.png").stat().st_size > 0


@pytest.mark.horovod
def test_straggler_benchmark_runs(tmp_path):
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "straggler.py"), "--budget", "1", "--out", str(tmp_path),
                    "--no-markdown"], check=True, timeout=300, cwd=REPO)
    result = json.loads((tmp_path / "straggler.json").read_text())
    for algo in ("lsgd", "grawa"):
        summary = result["summary"][algo]
        assert summary["fast_steps_per_s_sync"] > 0 and summary["fast_steps_per_s_async"] > 0
        assert 0.0 <= summary["accuracy_async"] <= 1.0
    assert (tmp_path / "straggler.png").stat().st_size > 0


@pytest.mark.horovod
def test_communication_benchmark_runs(tmp_path):
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "communication.py"), "--steps", "64", "--models", "cnn",
                    "--out", str(tmp_path), "--no-markdown"], check=True, timeout=600, cwd=REPO)
    result = json.loads((tmp_path / "communication.json").read_text())
    rows = {row["name"]: row for row in result["runs"]["cnn"]}
    # the accounting agrees with the algorithms' definitions (64 steps: whole periods everywhere)
    for name, row in rows.items():
        assert abs(row["bytes_per_step"] - row["theory"]) <= 1e-6 * row["theory"], name
    assert rows["LSGD tau=tau_G=16"]["bytes_per_step"] <= rows["DataParallel"]["bytes_per_step"] / 10
    assert (tmp_path / "communication.png").stat().st_size > 0


@pytest.mark.horovod
def test_time_to_accuracy_benchmark_runs(tmp_path):
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "time_to_accuracy.py"), "--budget", "2", "--seeds", "0",
                    "--methods", "lsgd,dp", "--out", str(tmp_path), "--no-markdown"], check=True, timeout=600, cwd=REPO)
    result = json.loads((tmp_path / "time_to_accuracy.json").read_text())
    assert set(result["results"]) == {"lsgd", "dp"}
    assert all(0.0 < run["final_accuracy"] <= 1.0 for runs in result["results"].values() for run in runs)
    assert (tmp_path / "time_to_accuracy.png").stat().st_size > 0


def _cluster_benchmark(out: Path, rates: str, methods: str, budget: str, cache: Path) -> str:
    """benchmarks/cluster.py in a tiny setting (a narrow MLP, 2,000 MNIST-1D signals, 1 seed)."""
    env = {**os.environ, "HOROVOD_LEADER_CACHE": str(cache)}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "cluster.py"), "--rates", rates, "--methods",
                           methods, "--seeds", "0", "--budget", budget, "--width", "256", "--samples", "2000",
                           "--out", str(out), "--no-markdown"], check=True, timeout=900, cwd=REPO, env=env,
                          capture_output=True, text=True)
    return done.stdout


def _cluster_runs(out: Path):
    return {run["name"]: run for run in json.loads((out / "cluster.json").read_text())["runs"]}


@pytest.mark.horovod
def test_cluster_benchmark_runs_over_shared_memory(tmp_path):
    first = _cluster_benchmark(tmp_path, "shm", "lsgd,dp", "2", tmp_path / "cache")
    runs = _cluster_runs(tmp_path)
    assert set(runs) == {"shm-2x2-lsgd-seed0", "shm-2x2-dp-seed0"}, first
    payload = runs["shm-2x2-dp-seed0"]["parameter_bytes"]
    assert payload == 4 * (256 * 256 + (40 + 12) * 256 + 10)  # the MLP's float32 parameters
    for run in runs.values():
        assert run["status"] == "ok" and run["steps"] > 0 and 0.0 < run["final_accuracy"] <= 1.0, run
        assert run["link_counters"] is None  # one node: no link
    # data-parallel SGD all-reduces every gradient every step; multi-leader LSGD (tau=4, tau_G=16)
    # sends 1/4 + 1/16 of a payload per step in whole periods
    assert runs["shm-2x2-dp-seed0"]["comm_bytes_per_step"] == payload
    assert runs["shm-2x2-lsgd-seed0"]["comm_bytes_per_step"] < payload / 3
    assert (tmp_path / "cluster.png").stat().st_size > 0
    # resumable: a second call finds both results and runs nothing
    again = _cluster_benchmark(tmp_path, "shm", "lsgd,dp", "2", tmp_path / "cache")
    assert "2 runs, 2 already done, 0 to run" in again, again


def test_cluster_benchmark_counts_link_bytes_on_the_emulated_cluster(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    from cluster import emulator_unavailable

    reason = emulator_unavailable()
    if reason:
        pytest.skip(f"the emulated cluster cannot run here: {reason}")
    out = _cluster_benchmark(tmp_path, "100mbit", "lsgd", "3", tmp_path / "cache")
    run = _cluster_runs(tmp_path)["100mbit-2x2-lsgd-seed0"]
    assert run["status"] == "ok", out
    nodes = run["link_counters"]
    assert set(nodes) == {"node0", "node1"}, nodes
    # every global refresh (each 16 steps) carries the leader's parameters into the other node
    refreshes = int(run["steps"]) // 16
    received = sum(node["train"]["rx"] for node in nodes.values())
    assert received >= 0.9 * refreshes * run["parameter_bytes"], (received, refreshes, run["parameter_bytes"])
    for node in nodes.values():
        assert node["whole"]["tx"] >= node["train"]["tx"] and node["whole"]["rx"] >= node["train"]["rx"]
    assert (tmp_path / "cluster.png").stat().st_size > 0


def test_cluster_summary_compares_compression_at_equal_steps():
    """A run twice as fast, with the same accuracy per step, shows no change at equal steps."""
    cluster_summary = summary_module()
    # accuracy = steps / 1000: the plain run takes 1 step/s, the compressed one 2 steps/s
    plain = {"curve": [(t, t / 1000) for t in (10.0, 20.0, 30.0, 40.0)], "steps_per_s": 1.0, "steps": 40}
    packed = {"curve": [(t, 2 * t / 1000) for t in (10.0, 20.0, 30.0, 40.0)], "steps_per_s": 2.0, "steps": 80}
    change, steps = cluster_summary.equal_steps_change([plain], [packed])
    assert steps == 40
    assert change == pytest.approx(0.0, abs=1e-9)
    # a compressed run that learns less per step shows it: 0.02 - 0.03 accuracy at 30 steps
    worse = {"curve": [(t, t / 1500) for t in (10.0, 20.0, 30.0)], "steps_per_s": 1.0, "steps": 30}
    change, steps = cluster_summary.equal_steps_change([plain], [worse])
    assert steps == 30 and change == pytest.approx(-1.0)


def test_cluster_summary_reads_a_loss_curve_against_its_own_value_at_the_budget():
    """Data-parallel SGD reaches its own loss at the budget at the budget, even when its last
    evaluation falls past it (the target is read between the last two points); a loss is
    shown in bits per byte, not as a percentage."""
    cluster_summary = summary_module()
    # the language model's data-parallel run: evaluations at 54.1 s and 60.5 s, budget 60 s
    curve = [(6.3, 4.9), (30.2, 4.3), (54.1, 4.1), (60.5, 4.0298)]
    target = cluster_summary.accuracy_at(curve, 60.0)
    assert 4.0298 < target < 4.1
    assert cluster_summary.time_to(curve, target, 60.0, higher=False) == pytest.approx(60.0)
    assert cluster_summary.time_to(curve, target - 0.01, 60.0, higher=False) is None
    assert cluster_summary.score_text([target], 1) == f"{target:.3f} bits/byte"
    assert cluster_summary.score_text([0.5, 0.7], 100) == "60.00 ± 14.14%"
