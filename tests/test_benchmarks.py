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
