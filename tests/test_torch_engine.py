"""The second engine: every wrapper on torch.distributed, launched by torchrun."""
import os
import re
import subprocess
import sys

import pytest
import torch

from mpi_harness import MPI_DIR, REPO, expect_passes, run_mpi, run_torchrun

WRAPPERS = ("localsgd", "easgd", "grawa", "diloco", "lsgd")
EVERY = WRAPPERS + ("dp",)


def test_every_wrapper_on_the_torch_engine():
    """tests/mpi/engine_checks.py under torchrun --nproc-per-node 4 (Gloo): for every wrapper, the
    exact rounds (d = 0 and 2), uneven step counts, a NaN worker, a resumed checkpoint; the
    asynchronous variants over the TCP step counter; compression; data-parallel habits."""
    result = run_torchrun("engine_checks.py", timeout=600)
    checks = (["engine_is_torch", "exact_dp", "dp_habits", "one_sided_refused"]
              + [f"exact_d{d}_{name}" for d in (0, 2) for name in WRAPPERS]
              + [f"{kind}_{name}" for kind in ("uneven", "resume") for name in EVERY]
              + [f"nan_{name}" for name in WRAPPERS]
              + [f"async_{name}" for name in ("lsgd", "grawa", "easgd")]
              + ["compressed_lsgd_int8", "compressed_grawa_bf16"])
    expect_passes(result, checks)


def _final(tmp_path, launcher, algo):
    out, saved = tmp_path / f"{launcher}-{algo}", tmp_path / f"{launcher}-{algo}.pt"
    options = ["--algo", algo, "--save", str(saved), "--epochs", "1", "--batch-size", "32", "--seed", "3",
               "--checkpoint-every", "0", "--out", str(out)]
    env = {"HOROVOD_LEADER_GROUP_SIZE": "2"}
    if launcher == "torch":
        run_torchrun("engine_probe.py", *options, env=env, timeout=300)
    else:
        run_mpi("engine_probe.py", *options, env=env, timeout=300)
    return torch.load(saved, weights_only=True)


#: the largest difference allowed between the engines after a synchronous run: the reductions
#: sum in different orders (Horovod over MPI, torch.distributed over Gloo); measured below 1e-5
ENGINE_TOLERANCE = 1e-4


@pytest.mark.parametrize("algo", ["lsgd", "mgrawa"])
def test_the_two_engines_give_the_same_parameters(tmp_path, algo):
    """The same seed, one epoch of digits on 4 ranks in groups of 2, on both engines."""
    horovod, torch_engine = _final(tmp_path, "horovod", algo), _final(tmp_path, "torch", algo)
    difference = max(float((horovod[k].double() - torch_engine[k].double()).abs().max()) for k in horovod
                     if horovod[k].is_floating_point())
    print(f"{algo}: largest difference between the engines {difference:.2e}")
    assert difference <= ENGINE_TOLERANCE, difference


def test_emulated_cluster_with_torchrun_groups_follow_the_nodes(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    from cluster import emulator_unavailable

    reason = emulator_unavailable()
    if reason:
        pytest.skip(f"the emulated cluster cannot run here: {reason}")
    env = {**os.environ, "EMULATED_LAUNCHER": "torchrun", "LINK_RATE": "1gbit",
           "PYTHONPATH": str(REPO) + os.pathsep + str(MPI_DIR)}
    done = subprocess.run(["bash", str(REPO / "launch" / "emulated_cluster.sh"), "2", "2",
                           str(MPI_DIR / "engine_probe.py")], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = re.findall(r"ENGINE (\S+) rank=(\d) host=(\S+) groups=(\[\[.*?\]\])", done.stdout)
    assert len(lines) == 4, done.stdout
    for engine, rank, host, groups in lines:
        assert engine == "torch" and groups == "[[0, 1], [2, 3]]" and host == f"node{int(rank) // 2}", lines
