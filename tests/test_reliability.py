"""Reliability: faults in real multi-rank jobs, atomic checkpoints, data-only loading, determinism."""
import json
import os
import signal
import subprocess
import sys
import threading
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


READY = "READY-TO-PARSE"


def run_from_ready(extra_args, bad_rank_args=(), timeout=180):
    """The training command on 4 ranks through a small launcher that imports what the command
    needs (torch, Horovod, the package), prints READY, then calls ``main``; ``bad_rank_args``
    are added on rank 2 only. Returns (exit status, output, seconds from the moment the
    last rank printed READY to the end of the job). Timing from there, not from the launch,
    keeps start-up (slow on a loaded machine) out of the bound, which is about how fast a
    refused option ends every rank."""
    script = ("import os, sys\nimport torch, horovod.torch\nfrom horovod_leader.training.command import main\n"
              f"print({READY!r}, flush=True)\n"
              "bad = os.environ.get('OMPI_COMM_WORLD_RANK') == '2'\n"
              f"sys.exit(main(sys.argv[1:] + ({list(bad_rank_args)!r} if bad else [])))")
    cmd = mpirun_command(4, [sys.executable, "-c", script, "--no-progress", *extra_args])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV, cwd=REPO,
                            start_new_session=True)
    lines, ready = [], []

    def read():
        for line in proc.stdout:
            lines.append(line)
            ready.extend([time.time()] * line.count(READY))  # lines of two ranks may share a line

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"no exit within {timeout} s of the launch:\n{''.join(lines)[-3000:]}")
    ended = time.time()
    reader.join(timeout=10)
    output = "".join(lines)
    assert len(ready) == 4, f"not every rank reached main:\n{output[-3000:]}"
    return proc.returncode, output, ended - max(ready)


def test_one_bad_rank_stops_all_fast(tmp_path):
    """Only rank 2 gets a bad option: every rank exits non-zero, quickly, saying why."""
    status, output, seconds = run_from_ready(["--out", str(tmp_path / "x")], bad_rank_args=["--period", "0"])
    assert status != 0 and seconds < 30, seconds
    assert "--period must be an integer >= 1, got 0" in output and "ranks [2]" in output


BAD_OPTIONS = [
    (["--period", "0"], "--period"), (["--period", "2.5"], "--period"), (["--global-period", "6"], "--global-period"),
    (["--local-pull", "1.5"], "--local-pull"), (["--global-pull", "-0.1"], "--global-pull"), (["--pull", "2"], "--pull"),
    (["--lr", "-1"], "--lr"), (["--group-size", "3"], "group_size"), (["--algo", "sgdx"], "--algo"),
    (["--model", "resnet9"], "--model"), (["--dataset", "mnist"], "--dataset"),
    (["--dataset", "cifar10", "--data-dir", "/nonexistent"], "--data-dir"), (["--resume", "/nonexistent"], "--resume"),
    (["--algo", "dp", "--async"], "--async"), (["--epochs", "0"], "--epochs"), (["--beta", "0"], "--beta"),
    (["--algo", "dp", "--compression", "int8"], "--compression"),
    (["--algo", "easgd", "--easgd-variant", "one-sided", "--async", "--compression", "bf16"], "--compression"),
    (["--algo", "easgd", "--easgd-variant", "one-sided"], "--easgd-variant"),
    (["--algo", "lsgd", "--async", "--easgd-variant", "one-sided"], "--easgd-variant"),
    (["--algo", "easgd", "--async", "--easgd-variant", "one-sided", "--device", "cuda"], "--device"),
    (["--algo", "lsgd", "--outer-lr", "0.5"], "--outer-lr"), (["--algo", "diloco", "--outer-lr", "0"], "--outer-lr"),
    (["--algo", "diloco", "--outer-momentum", "1"], "--outer-momentum"),
    (["--inner-optimizer", "adamw", "--momentum", "0.5"], "--momentum"),
    (["--inner-optimizer", "adamw", "--preset", "paper"], "--inner-optimizer"),
    (["--compression", "fp8"], "--compression"), (["--inner-optimizer", "lion"], "--inner-optimizer"),
]


def test_every_bad_option_is_refused_by_name():
    """Each bad option, checked in-process: the same code every rank runs before any collective."""
    from horovod_leader.training.command import parse_and_validate

    for args, name in BAD_OPTIONS:
        parsed, error = parse_and_validate(args + ["--out", "unused"])
        assert parsed is None and name in error, (args, error)
    parsed, error = parse_and_validate(["--algo", "lsgd", "--epochs", "1"])
    assert error is None and parsed.period == 4 and parsed.global_period == 16
    parsed, error = parse_and_validate(["--algo", "diloco", "--inner-optimizer", "adamw", "--epochs", "1"])
    assert error is None and (parsed.period, parsed.lr, parsed.outer_lr, parsed.outer_momentum) == (32, 1e-3, 0.7, 0.9)


def test_bad_options_fail_fast_under_mpirun(tmp_path):
    for args, name in [(["--group-size", "3"], "group_size"), (["--resume", str(tmp_path)], "--resume"),
                       (["--model", "resnet9"], "--model"),
                       (["--algo", "dp", "--compression", "int8"], "--compression")]:
        status, output, seconds = run_from_ready([*args, "--out", str(tmp_path / "x")])
        print(f"{args}: every rank ended {seconds:.1f} s after the last one was ready")
        assert status != 0 and seconds < 30, (args, seconds)
        assert name in output, (args, output[-1500:])


@pytest.mark.horovod
def test_dead_rank_then_resume_is_bitwise(tmp_path):
    """A rank is killed mid-run; ``--resume OUT`` alone then finishes the run with its saved
    configuration (30 epochs, groups of 2, ...), bitwise as an uninterrupted run."""
    common = ["--algo", "lsgd", "--group-size", "2", "--batch-size", "32", "--lr", "0.05", "--eval-every", "1000"]
    run, straight = tmp_path / "killed", tmp_path / "straight"
    epochs = 30  # 330 steps: the kill, after the checkpoint at step 100, comes well before the end
    cmd = mpirun_command(4, [sys.executable, "-m", "horovod_leader.train", "--no-progress", *common, "--epochs",
                             str(epochs), "--checkpoint-every", "50", "--out", str(run)])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV, cwd=REPO,
                            start_new_session=True)
    try:
        from horovod_leader.training.checkpoint import latest_step
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
    assert saved < epochs * 11, "the run ended before the kill"
    train(4, "--resume", str(run))
    train(4, *common, "--epochs", str(epochs), "--checkpoint-every", "0", "--out", str(straight))
    for rank in range(4):
        a, b = final_state(run, rank), final_state(straight, rank)
        assert a["step"] == b["step"] == epochs * 11
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), rank
    (tmp_path / "dead_rank.json").write_text(json.dumps({"ended_after_s": ended_after, "checkpoint": saved}))
    print(f"dead rank: job ended {ended_after:.1f} s after SIGKILL; resumed from step {saved}")


def parent_pid(pid: int) -> int:
    """The parent of ``pid`` (from /proc/PID/stat: the field after the parenthesised name), 0 if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat.rsplit(")", 1)[1].split()[1])


def descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        pid = parent_pid(pid)
        if pid == ancestor:
            return True
    return False


def rank_pid(mpirun_pid: int, rank: int) -> int:
    """The pid of the process that this ``mpirun`` started as ``rank``: among the descendants of
    ``mpirun_pid`` only (another job running at the same time has ranks of the same number),
    the one whose environment names that rank."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or not descends_from(int(entry.name), mpirun_pid):
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if f"OMPI_COMM_WORLD_RANK={rank}".encode() in environ and "horovod_leader.train" in cmdline:
            return int(entry.name)
    raise AssertionError(f"no process of rank {rank} under mpirun {mpirun_pid} found")


def test_kill_during_checkpoint_write_keeps_the_last_one(tmp_path):
    from horovod_leader.training.checkpoint import atomic_save, read

    target = tmp_path / "rank0.pt"
    atomic_save({"step": 1, "w": torch.ones(3)}, target)
    # A child process starts writing step 2 and is SIGKILLed half way through the write.
    code = f"""
import os, signal, torch
from horovod_leader.training import checkpoint
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
    from horovod_leader.training.checkpoint import read

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
