"""The training command, the report, checkpoints and resume, the launch scripts."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cifar_fixture import allow_fixture, write_cifar10
from mpi_harness import REPO, mpirun_command

ENV = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}


def train(np, *args, timeout=300, check=True):
    cmd = mpirun_command(np, [sys.executable, "-m", "horovod_leader.train", "--no-progress", *args])
    result = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout, cwd=REPO)
    if check:
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def final_state(out, rank):
    from horovod_leader.training import checkpoint

    return checkpoint.read(checkpoint.step_folder(out, checkpoint.latest_step(out)) / f"rank{rank}.pt")


def records(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_cifar10_loads_through_torchvision(tmp_path):
    from horovod_leader.training.data import cifar10

    write_cifar10(tmp_path)
    with allow_fixture():
        train_set, test_set = cifar10(str(tmp_path))
    assert train_set.tensors[0].shape == (200, 3, 32, 32) and test_set.tensors[0].shape == (40, 3, 32, 32)
    assert train_set.tensors[1].dtype == torch.int64 and int(train_set.tensors[1].max()) <= 9
    with pytest.raises(ValueError, match="cifar-10-batches-py"):
        cifar10(str(tmp_path / "missing"))


def test_cifar10_training_path(tmp_path):
    """Two ranks train ResNet-20 on the fixture through the real CLI and torchvision loader."""
    write_cifar10(tmp_path / "data")
    out = tmp_path / "run"
    train_on_fixture(tmp_path, "--model", "resnet20", "--algo", "lsgd", "--epochs", "2", "--batch-size", "16",
                     "--out", str(out), np=2)
    last = records(out)[-1]
    assert last["step"] == 2 * (100 // 16) and 0.0 <= last["centre_accuracy"] <= 1.0


def test_four_rank_run_and_report(tmp_path):
    """Frequent evaluation: its time is excluded from the training clock, which keeps to the
    budget, while the wall clock runs past it."""
    out = tmp_path / "lsgd"
    budget = 20.0
    train(4, "--algo", "lsgd", "--group-size", "2", "--time-budget", str(budget), "--eval-every", "0.5",
          "--batch-size", "32", "--lr", "0.05", "--out", str(out), "--checkpoint-every", "0")
    config = json.loads((out / "config.json").read_text())
    assert config["algo"] == "lsgd" and config["world_size"] == 4 and config["groups"] == [[0, 1], [2, 3]]
    rows = records(out)
    assert len(rows) >= 20  # evaluations at intervals, plus the final one
    last = rows[-1]
    assert last["leader_accuracy"] >= 0.9, last
    assert last["global_leader"] in range(4) and len(last["losses"]) == 4 and len(last["local_leaders"]) == 4
    assert all(b > 0 for b in last["comm_bytes"]) and last["centre_accuracy"] > 0.5
    assert len(last["group_centre_accuracies"]) == 2 and min(last["group_centre_accuracies"]) > 0.5
    assert budget <= last["train_seconds"] <= budget + 1.0, last["train_seconds"]
    assert last["wall_seconds"] > budget + 1.0, (last["train_seconds"], last["wall_seconds"])
    assert all(r["train_seconds"] <= r["wall_seconds"] for r in rows)
    report = subprocess.run([sys.executable, "-m", "horovod_leader.report", str(out), "--target", "0.9", "--out",
                             str(tmp_path / "report")], capture_output=True, text=True, env=ENV, timeout=120)
    assert report.returncode == 0, report.stderr
    assert "| lsgd | lsgd |" in report.stdout and "time to 0.90" in report.stdout
    for name in ("test_accuracy_vs_time.png", "test_error_vs_time.png", "leader_over_time.png", "communication.png",
                 "report.md"):
        assert (tmp_path / "report" / name).stat().st_size > 0


def write_run(folder, config, rows):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_report_headlines_the_centre_and_flags_an_overrun_budget(tmp_path):
    """Every run's curve is its centre, as the authors report it: LSGD's leader only has a
    column of its own; an asynchronous run's intermediate records carry the centre too. A run
    that trained more than 5% past its budget is flagged. The error axis is logarithmic, so a
    failed run (90% error) leaves the others readable."""
    from horovod_leader.training import report

    base = {"wall_seconds": 0.0, "comm_bytes": [0] * 4}
    write_run(tmp_path / "sync", {"algo": "lsgd", "world_size": 4, "time_budget": 3}, [
        {**base, "train_seconds": t, "step": 10 * t, "leader_accuracy": a + 0.02, "centre_accuracy": a}
        for t, a in ((1, 0.5), (2, 0.93), (3, 0.97))])
    write_run(tmp_path / "async", {"algo": "lsgd", "asynchronous": True, "compression": "int8"}, [
        {**base, "train_seconds": 1, "step": 10, "worker0_accuracy": 0.95, "centre_accuracy": 0.6, "comm_bytes": 5},
        {**base, "train_seconds": 2, "step": 20, "worker0_accuracy": 0.96, "centre_accuracy": 0.92, "comm_bytes": 9},
        {**base, "train_seconds": 3, "step": 30, "worker_accuracies": [0.94, 0.96, 0.9, 0.9],
         "leader_accuracy": 0.96, "centre_accuracy": 0.95}])
    write_run(tmp_path / "outer", {"algo": "diloco", "time_budget": 20}, [
        {**base, "train_seconds": 33.5, "step": 30, "worker_accuracies": [0.9] * 4, "centre_accuracy": 0.1,
         "time_budget": 20}])
    runs = [report.load_run(tmp_path / name) for name in ("sync", "async", "outer")]
    rows = {s["run"]: s for s in (report.summarise(run, 0.9) for run in runs)}
    assert (rows["sync"]["curve_of"], rows["sync"]["time_to_target_s"], rows["sync"]["final_accuracy"]) == (
        "centre (workers' average)", 2, 0.97)
    assert rows["sync"]["final_leader_accuracy"] == 0.99 and rows["sync"]["trained"] == "3.0"
    assert (rows["async"]["curve_of"], rows["async"]["time_to_target_s"], rows["async"]["final_accuracy"]) == (
        "centre (workers' average)", 2, 0.95)
    assert rows["async"]["method"] == "lsgd async int8" and rows["async"]["best_accuracy"] == 0.95
    assert rows["outer"]["curve_of"] == "outer parameters" and rows["outer"]["time_to_target_s"] is None
    assert rows["outer"]["trained"] == "33.5 (OVER budget 20 s by 68%)"
    table = report.table(list(rows.values()), 0.9)
    assert "| async | lsgd async int8 | centre (workers' average) | 0.9500 |" in table and "final leader" in table
    assert "OVER budget" in table
    fig = report.error_figure(runs)
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    assert [line.get_label() for line in ax.get_lines()] == [
        "sync (lsgd: centre (workers' average))", "async (lsgd async int8: centre (workers' average))",
        "outer (diloco: outer parameters)"]
    assert list(ax.get_lines()[2].get_ydata()) == [90.0]


def train_on_fixture(tmp_path, *args, np=4):
    """The training command on the CIFAR-10 fixture, through torchvision's real loader."""
    code = ("import sys; sys.path.insert(0, %r); from cifar_fixture import allow_fixture\n"
            "from horovod_leader.training.command import main\n"
            "with allow_fixture():\n    sys.exit(main(sys.argv[1:]))" % str(Path(__file__).parent))
    cmd = mpirun_command(np, [sys.executable, "-c", code, "--dataset", "cifar10", "--data-dir", str(tmp_path / "data"),
                              "--no-progress", *args])
    result = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.parametrize("algo, model, expected", [
    ("lsgd", "resnet20", {"period": 4, "global_period": 16, "local_pull": 0.1, "global_pull": 0.1, "prox": 0.1,
                          "score_window": 10, "lr_time_milestones": [500.0], "augment": "paper"}),
    ("mgrawa", "cnn7", {"period": 32, "pull": 0.5, "prox": 0.01, "norm_decay": 0.9 ** 8, "fresh_batch": 128,
                        "lr_time_milestones": [], "augment": "paper"}),
])
def test_paper_preset_on_cifar_fixture(tmp_path, algo, model, expected):
    """4 ranks, --preset paper, the authors' augmentation; options given explicitly win over
    the preset: --batch-size, and for GRAWA a short period (so that it averages in a short
    run) and a smaller LR (CNN7, which has no batch norm, diverges at 0.1 on this tiny set)."""
    write_cifar10(tmp_path / "data", per_batch=100)  # 500 training images: 125 per rank
    out = tmp_path / "run"
    explicit = {"period": 4, "lr": 0.01} if algo == "mgrawa" else {}
    options = [text for key, value in explicit.items() for text in ("--" + key, str(value))]
    train_on_fixture(tmp_path, "--preset", "paper", "--algo", algo, "--model", model, "--group-size", "2",
                     "--batch-size", "16", *options, "--epochs", "2", "--eval-every", "1000", "--out", str(out))
    config = json.loads((out / "config.json").read_text())
    for key, value in {"preset": "paper", "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4,
                       "sampling": "reshuffle", "bn_batches": "full", "time_budget": None, **expected, **explicit,
                       "batch_size": 16}.items():
        assert config[key] == pytest.approx(value) if isinstance(value, float) else config[key] == value, key
    last = records(out)[-1]
    assert last["step"] == 2 * (125 // 16) and last["epoch"] == 2.0
    assert 0.0 < last["train_seconds"] < last["wall_seconds"]
    assert 0.0 <= last["centre_accuracy"] <= 1.0 and len(last["worker_accuracies"]) == 4
    if algo == "lsgd":
        assert len(last["group_centre_accuracies"]) == 2


def test_resume_continues_bitwise(tmp_path):
    """The second segment names only what may change (--epochs): the method, groups, batch size
    and LR come from the saved configuration, and the result is bitwise the uninterrupted run's.
    Then --resume alone, on a run that has reached its budget, takes no further step."""
    common = ["--algo", "lsgd", "--group-size", "2", "--batch-size", "32", "--lr", "0.05", "--checkpoint-every", "0",
              "--eval-every", "1000"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(4, *common, "--epochs", "4", "--out", str(straight))
    train(4, *common, "--epochs", "2", "--out", str(split))
    steps_half = json.loads((split / "checkpoints" / "latest.json").read_text())["step"]
    train(4, "--epochs", "4", "--resume", str(split))
    assert records(split)[-1]["step"] == records(straight)[-1]["step"] == 2 * steps_half
    config = json.loads((split / "config.json").read_text())
    assert (config["epochs"], config["groups"], config["batch_size"], config["lr"]) == (4.0, [[0, 1], [2, 3]], 32, 0.05)
    for rank in range(4):
        a = final_state(straight, rank)
        b = final_state(split, rank)
        assert a["step"] == b["step"]
        for key in a["model"]:
            assert torch.equal(a["model"][key], b["model"][key]), (rank, key)
    train(4, "--resume", str(split))
    assert records(split)[-1]["step"] == 2 * steps_half
    for rank in range(4):
        assert final_state(split, rank)["step"] == 2 * steps_half
        assert all(torch.equal(final_state(straight, rank)["model"][k], v)
                   for k, v in final_state(split, rank)["model"].items())


def test_diloco_run(tmp_path):
    """--algo diloco on 4 ranks: metrics written; the centre evaluated is the outer parameters,
    identical on every rank, with the outer momentum in the checkpoint."""
    out = tmp_path / "diloco"
    train(4, "--algo", "diloco", "--period", "8", "--epochs", "6", "--batch-size", "32", "--lr", "0.05",
          "--eval-every", "1000", "--checkpoint-every", "0", "--out", str(out))
    config = json.loads((out / "config.json").read_text())
    assert (config["algo"], config["outer_lr"], config["outer_momentum"], config["inner_optimizer"]) == (
        "diloco", 0.7, 0.9, "sgd")
    last = records(out)[-1]
    assert last["steps"] == [66] * 4 and last["centre_accuracy"] >= 0.9, last
    states = [final_state(out, rank)["wrapper"] for rank in range(4)]
    for state in states[1:]:
        assert states[0]["outer"].keys() == state["outer"].keys()  # keyed by buffer name
        assert all(torch.equal(states[0]["outer"][name], state["outer"][name]) for name in state["outer"])
    assert states[0]["outer_optimizer"]["state"], "no outer momentum saved"


@pytest.mark.parametrize("options", [
    ["--algo", "lsgd", "--group-size", "2", "--compression", "int8"],
    pytest.param(["--algo", "easgd", "--easgd-variant", "one-sided"], marks=pytest.mark.horovod),
], ids=["lsgd-int8", "easgd-one-sided"])
def test_asynchronous_run_checkpoints_at_the_end_and_resumes(tmp_path, options):
    """An asynchronous run writes its checkpoint after close() (every rank's state final, the
    one-sided EASGD's centre shards included) and a second segment continues from it."""
    out = tmp_path / "run"
    train(4, *options, "--async", "--batch-size", "32", "--lr", "0.05", "--epochs", "2", "--eval-every", "0.01",
          "--out", str(out))
    first = records(out)[-1]
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["step"] == 22
    assert [final_state(out, rank)["step"] for rank in range(4)] == [22] * 4
    train(4, "--resume", str(out), "--epochs", "4")
    last = records(out)[-1]
    assert last["steps"] == [44] * 4 and [final_state(out, rank)["step"] for rank in range(4)] == [44] * 4
    assert last["centre_accuracy"] > 0.5 and last["centre_accuracy"] > first["centre_accuracy"] - 0.05, (first, last)
    assert any("worker0_accuracy" in r for r in records(out))  # intermediate records: rank 0's worker,
    assert any(r.get("centre_accuracy") is not None for r in records(out) if "worker0_accuracy" in r)  # and the centre
    if "one-sided" in options:
        assert last["comm_bytes"] == [0] * 4  # no collective during training
        assert min(last["one_sided_bytes"]) > max(first["one_sided_bytes"]) > 0  # counts carried on
    else:
        assert min(last["comm_bytes"]) > max(first["comm_bytes"]) > 0
        assert json.loads((out / "config.json").read_text())["compression"] == "int8"


def test_launch_scripts():
    scripts = sorted((REPO / "launch").glob("*.sh")) + [REPO / "launch" / "slurm.sbatch"] + sorted(
        (REPO / "examples").glob("*.sh"))
    for script in scripts:
        subprocess.run(["bash", "-n", str(script)], check=True)
    env = {**os.environ, "DRY_RUN": "1", "SLURM_NNODES": "3", "SLURM_GPUS_PER_NODE": "gpu:8", "SLURM_JOB_ID": "42"}
    srun = subprocess.run(["bash", str(REPO / "launch" / "slurm.sbatch"), "--algo", "lsgd"], env=env,
                          capture_output=True, text=True, check=True).stdout.split()
    assert srun[:5] == ["srun", "--mpi=pmix", "--ntasks=24", "--ntasks-per-node=8", "--gpus-per-task=1"]
    assert srun[-6:] == ["-m", "horovod_leader.train", "--out", "runs/slurm-42", "--algo", "lsgd"]
    mpirun = subprocess.run(["bash", str(REPO / "launch" / "slurm.sbatch")], env={**env, "LAUNCHER": "mpirun"},
                            capture_output=True, text=True, check=True).stdout.split()
    assert mpirun[:5] == ["mpirun", "-np", "24", "--map-by", "ppr:8:node"]
    local = subprocess.run(["bash", str(REPO / "launch" / "mpirun.sh"), "64", "train.py"], capture_output=True,
                           text=True, check=True, env={**os.environ, "DRY_RUN": "1"}).stdout.split()
    assert local[:3] == ["mpirun", "-np", "64"] and "--oversubscribe" in local
    assert local[local.index("--bind-to") + 1] == "none"  # no binding when oversubscribed
    cluster = subprocess.run(["bash", str(REPO / "launch" / "mpirun.sh"), "8", "train.py"], capture_output=True,
                             text=True, check=True, env={**os.environ, "DRY_RUN": "1", "HOSTS": "a:4,b:4"}).stdout.split()
    assert "--oversubscribe" not in cluster and cluster[cluster.index("--bind-to") + 1] == "socket"
    assert cluster[cluster.index("-H") + 1] == "a:4,b:4"
    assert ("--allow-run-as-root" in local) == (os.geteuid() == 0)
    hosts = subprocess.run(["bash", str(REPO / "launch" / "horovodrun.sh"), "8", "train.py"], capture_output=True,
                           text=True, check=True, env={**os.environ, "DRY_RUN": "1", "HOSTS": "a:4,b:4"}).stdout
    assert "-np 8 -H a:4" in hosts
