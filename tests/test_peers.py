"""Smoke tests of the second task (the byte-level language model), the one-launch comparison,
and the peers' benchmark scripts: a few steps each (no timing is asserted)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mpi_harness import REPO, mpirun_command

ENV = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}


def records(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_the_corpus_is_the_standard_library_with_files_held_out(tmp_path):
    from horovod_leader.training import data_pystdlib as corpus

    files = corpus.source_files()
    assert len(files) > 100 and all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in f.parts for f in files)
    train, valid = corpus.pystdlib(tmp_path)
    assert train.tensors[0].shape[1] == corpus.CONTEXT and len(valid) == corpus.VALIDATION_WINDOWS
    # the targets are the inputs shifted by one byte
    x, y = train.tensors
    assert bool((x[:, 1:] == y[:, :-1]).all()) and int(x.max()) < 256
    meta = corpus.metadata(tmp_path)
    assert meta["python"] == sys.version.split()[0] and meta["validation_files"] == len(files[::corpus.VALIDATION_EVERY])
    again, _ = corpus.pystdlib(tmp_path)  # from the cache: the same windows
    assert bool((again.tensors[0] == x).all())


def test_language_model_and_one_launch_comparison(tmp_path):
    """Two methods in one launch on the byte-level GPT: validation bits per byte of the
    centre, the corpus' metadata in config.json, link counters per method."""
    out = tmp_path / "cmp"
    cmd = mpirun_command(4, [sys.executable, "-m", "horovod_leader.compare", "--methods", "dp",
                             "localsgd --period 2 --overlap 1", "--out", str(out), "--dataset", "pystdlib",
                             "--model", "gpt", "--inner-optimizer", "adamw", "--batch-size", "2", "--epochs", "0.0005",
                             "--eval-every", "1", "--eval-subset", "64", "--checkpoint-every", "0", "--no-progress",
                             "--group-size", "2"])
    done = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=900, cwd=REPO)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    for name in ("dp", "localsgd-period-2-overlap-1"):
        rows = records(out / name)
        last = rows[-1]
        assert 0.0 < last["centre_bits_per_byte"] < 9.0, last  # a uniform guess is 8 bits per byte
        assert len(rows) >= 2, rows  # an intermediate evaluation, then the last
        assert last["test_samples"] == 2048 and all(r["test_samples"] == 64 for r in rows[:-1])
        config = json.loads((out / name / "config.json").read_text())
        assert config["metric"] == "bits_per_byte" and config["dataset_metadata"]["python"] == sys.version.split()[0]
        assert (out / name / "links").is_dir()
    assert json.loads((out / "localsgd-period-2-overlap-1" / "config.json").read_text())["overlap"] == 1


def test_comparison_refuses_a_bad_method_on_every_rank(tmp_path):
    cmd = mpirun_command(2, [sys.executable, "-m", "horovod_leader.compare", "--methods", "dp", "lsgd --period 0",
                             "--out", str(tmp_path), "--dataset", "digits"])
    done = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300, cwd=REPO)
    assert done.returncode != 0
    assert "method 'lsgd --period 0'" in done.stderr and "--period" in done.stderr, done.stderr[-2000:]


def _torchft_missing():
    sys.path.insert(0, str(REPO / "benchmarks" / "peers"))
    from run import torchft_missing

    return torchft_missing()


@pytest.mark.parametrize("peers", [pytest.param("torch-localsgd,torch-hierarchical,horovod-dp", marks=pytest.mark.horovod),
                                   "torchft-diloco"])
def test_peer_scripts_run(tmp_path, peers):
    """benchmarks/peers/run.py over shared memory, a 3-second budget on a narrow MLP."""
    if peers.startswith("torchft") and (why := _torchft_missing()):
        pytest.skip(f"torchft is absent: {why}")
    env = {**ENV, "HOROVOD_LEADER_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "peers" / "run.py"), "--rates", "shm", "--seeds",
                           "0", "--budget", "3", "--width", "128", "--samples", "2000", "--methods", peers,
                           "--out", str(tmp_path), "--no-markdown"], capture_output=True, text=True, timeout=900,
                          cwd=REPO, env=env)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    runs = {run["method"]: run for run in json.loads((tmp_path / "peers.json").read_text())["runs"]}
    assert set(runs) == set(peers.split(",")), done.stdout[-3000:]
    for name, run in runs.items():
        assert run["status"] == "ok", (name, run.get("output_tail", "")[-3000:])
        assert run["steps"] > 0 and 0.0 < run["final_accuracy"] <= 1.0, run
