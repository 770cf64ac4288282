"""The benchmark scripts run on a tiny setting and write their outputs (no timing is asserted)."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_fused_update_benchmark_runs(tmp_path):
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "fused_update.py"), "--sizes", "1e4,2e4", "--repeats", "2",
                    "--out", str(tmp_path), "--no-markdown"], check=True, timeout=300, cwd=REPO)
    result = json.loads((tmp_path / "fused_update_cpu.json").read_text())
    assert [row["elements"] for row in result["rows"]] == [10_000, 20_000]
    assert all(row["fused_s"] > 0 and row["unfused_s"] > 0 and row["copy_s"] > 0 for row in result["rows"])
    assert (tmp_path / "fused_update_cpu.png").stat().st_size > 0


def test_straggler_benchmark_runs(tmp_path):
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "straggler.py"), "--budget", "1", "--out", str(tmp_path),
                    "--no-markdown"], check=True, timeout=300, cwd=REPO)
    result = json.loads((tmp_path / "straggler.json").read_text())
    for algo in ("lsgd", "grawa"):
        summary = result["summary"][algo]
        assert summary["fast_steps_per_s_sync"] > 0 and summary["fast_steps_per_s_async"] > 0
        assert 0.0 <= summary["accuracy_async"] <= 1.0
    assert (tmp_path / "straggler.png").stat().st_size > 0


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


def test_time_to_accuracy_benchmark_runs(tmp_path):
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "time_to_accuracy.py"), "--budget", "2", "--seeds", "0",
                    "--methods", "lsgd,dp", "--out", str(tmp_path), "--no-markdown"], check=True, timeout=600, cwd=REPO)
    result = json.loads((tmp_path / "time_to_accuracy.json").read_text())
    assert set(result["results"]) == {"lsgd", "dp"}
    assert all(0.0 < run["final_accuracy"] <= 1.0 for runs in result["results"].values() for run in runs)
    assert (tmp_path / "time_to_accuracy.png").stat().st_size > 0
