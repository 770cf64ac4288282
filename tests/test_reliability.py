"""Reliability: faults in real multi-rank jobs, atomic checkpoints, data-only loading, determinism."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mpi_harness import REPO, expect_passes, mpirun_command, run_mpi, values
from test_cli import ENV, final_state, train


def test_mismatched_models_and_nan_recovery():
    result = run_mpi("reliability_checks.py", timeout=500)
    methods = ["lsgd", "grawa", "easgd", "localsgd"]
    expect_passes(result, ["mismatched_models"] + [f"nan_recovery_{m}" for m in methods])
    for m in methods:
        assert float(values(result, f"nan_recovery_accuracy_{m}")[0]) >= 0.90
    assert result.stdout.count("rank 1 diverged") >= len(methods)  # logged with rank and step
    assert "at step 10" in result.stdout


def test_one_bad_rank_stops_all_fast(tmp_path):
    """Only rank 2 gets a bad option: every rank exits non-zero, quickly, saying why."""
    script = ("import os, sys\nfrom horovod_leader.train import main\n"
              "bad = os.environ.get('OMPI_COMM_WORLD_RANK') == '2'\n"
              "sys.exit(main(sys.argv[1:] + (['--period', '0'] if bad else [])))")
    cmd = mpirun_command(4, [sys.executable, "-c", script, "--out", str(tmp_path / "x"), "--no-progress"])
    start = time.time()
    result = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=60, cwd=REPO)
    assert result.returncode != 0 and time.time() - start < 30
    assert "--period must be an integer >= 1, got 0" in result.stderr and "ranks [2]" in result.stderr


BAD_OPTIONS = [
    (["--period", "0"], "--period"), (["--period", "2.5"], "--period"), (["--global-period", "6"], "--global-period"),
    (["--local-pull", "1.5"], "--local-pull"), (["--global-pull", "-0.1"], "--global-pull"), (["--pull", "2"], "--pull"),
    (["--lr", "-1"], "--lr"), (["--group-size", "3"], "group_size"), (["--algo", "sgdx"], "--algo"),
    (["--model", "resnet9"], "--model"), (["--dataset", "mnist"], "--dataset"),
    (["--dataset", "cifar10", "--data-dir", "/nonexistent"], "--data-dir"), (["--resume", "/nonexistent"], "--resume"),
    (["--algo", "dp", "--async"], "--async"), (["--epochs", "0"], "--epochs"), (["--beta", "0"], "--beta"),
]


def test_every_bad_option_is_refused_by_name():
    """Each bad option, checked in-process: the same code every rank runs before any collective."""
    from horovod_leader.train import parse_and_validate

    for args, name in BAD_OPTIONS:
        parsed, error = parse_and_validate(args + ["--out", "unused"])
        assert parsed is None and name in error, (args, error)
    parsed, error = parse_and_validate(["--algo", "lsgd", "--epochs", "1"])
    assert error is None and parsed.period == 4 and parsed.global_period == 16


def test_bad_options_fail_fast_under_mpirun(tmp_path):
    for args, name in [(["--group-size", "3"], "group_size"), (["--resume", str(tmp_path)], "--resume"),
                       (["--model", "resnet9"], "--model")]:
        start = time.time()
        result = train(4, *args, "--out", str(tmp_path / "x"), check=False, timeout=60)
        assert result.returncode != 0 and time.time() - start < 30, args
        assert name in result.stderr, (args, result.stderr[-1500:])


def test_dead_rank_then_resume_is_bitwise(tmp_path):
    common = ["--algo", "lsgd", "--group-size", "2", "--batch-size", "32", "--lr", "0.05", "--eval-every", "1000"]
    run, straight = tmp_path / "killed", tmp_path / "straight"
    cmd = mpirun_command(4, [sys.executable, "-m", "horovod_leader.train", "--no-progress", *common, "--epochs", "300",
                             "--checkpoint-every", "50", "--out", str(run)])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV, cwd=REPO,
                            start_new_session=True)
    try:
        from horovod_leader.checkpoint import latest_step
        deadline = time.time() + 120
        while (latest_step(run) or 0) < 100 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert (latest_step(run) or 0) >= 100, "no checkpoint at step >= 100"
        victim = rank_pid(proc.pid, rank=2)
        os.kill(victim, signal.SIGKILL)
        killed_at = time.time()
        proc.communicate(timeout=60)
        ended_after = time.time() - killed_at
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert ended_after < 30, ended_after
    saved = latest_step(run)
    epochs = (saved // 11) + 2  # resume past the checkpoint, and compare with an uninterrupted run
    train(4, *common, "--epochs", str(epochs), "--checkpoint-every", "0", "--resume", str(run))
    train(4, *common, "--epochs", str(epochs), "--checkpoint-every", "0", "--out", str(straight))
    for rank in range(4):
        a, b = final_state(run, rank), final_state(straight, rank)
        assert a["step"] == b["step"] == epochs * 11
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), rank
    (tmp_path / "dead_rank.json").write_text(json.dumps({"ended_after_s": ended_after, "checkpoint": saved}))
    print(f"dead rank: job ended {ended_after:.1f} s after SIGKILL; resumed from step {saved}")


def rank_pid(mpirun_pid: int, rank: int) -> int:
    """The pid of the process mpirun started as ``rank`` (read from its environment)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"OMPI_COMM_WORLD_RANK={rank}".encode() in environ and "horovod_leader.train" in \
                (entry / "cmdline").read_bytes().decode(errors="replace"):
            return int(entry.name)
    raise AssertionError(f"no process of rank {rank} found")


def test_kill_during_checkpoint_write_keeps_the_last_one(tmp_path):
    from horovod_leader.checkpoint import atomic_save, read

    target = tmp_path / "rank0.pt"
    atomic_save({"step": 1, "w": torch.ones(3)}, target)
    # A child process starts writing step 2 and is SIGKILLed half way through the write.
    code = f"""
import os, signal, torch
from horovod_leader import checkpoint
real_save = torch.save
def half_then_die(obj, f):
    f.write(b"PK" + os.urandom(4096)); f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = half_then_die
checkpoint.atomic_save({{"step": 2, "w": torch.zeros(10**6)}}, checkpoint.Path({str(target)!r}))
"""
    result = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, timeout=60)
    assert result.returncode == -signal.SIGKILL
    state = read(target)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {Path(os.environ['PAYLOAD_MARK'])}",))


def test_checkpoint_with_a_pickled_payload_is_refused(tmp_path, monkeypatch):
    from horovod_leader.checkpoint import read

    mark = tmp_path / "code-ran"
    monkeypatch.setenv("PAYLOAD_MARK", str(mark))
    crafted = tmp_path / "rank0.pt"
    torch.save({"step": 1, "model": Payload()}, crafted)
    with pytest.raises(ValueError, match="refusing to load"):
        read(crafted)
    assert not mark.exists()


def test_seeded_runs_are_bitwise_equal(tmp_path):
    algos = ["lsgd", "mgrawa", "lgrawa", "easgd", "localsgd", "dp"]
    result = run_mpi("determinism_checks.py", str(tmp_path), timeout=400)
    expect_passes(result, [f"deterministic_{a}" for a in algos])
