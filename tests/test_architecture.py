"""docs/architecture.md's example method (one class, one registry entry) runs as written."""
import json

from mpi_harness import expect_passes, run_mpi


def test_the_documented_example_method_runs(tmp_path):
    out = tmp_path / "plainavg"
    result = run_mpi("architecture_example_checks.py", str(out), timeout=300)
    expect_passes(result, ["example_round_is_the_average", "example_in_the_training_command_ran"])
    config = json.loads((out / "config.json").read_text())
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert config["algo"] == "plainavg" and config["period"] == 8
    assert last["centre_accuracy"] > 0.8 and len(set(last["steps"])) == 1, last
