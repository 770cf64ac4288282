"""The training command's parts that need no communication: presets, clock, batch-norm re-estimation."""
import pytest
import torch

from horovod_leader.training import clock as clock_module
from horovod_leader.training.clock import TrainingClock
from horovod_leader.training.evaluation import reestimate_batch_norm
from horovod_leader.training.command import parse, parse_and_validate


def test_paper_preset_per_method():
    lsgd, error = parse_and_validate(["--preset", "paper", "--algo", "lsgd", "--model", "resnet20"])
    assert error is None
    assert (lsgd.period, lsgd.global_period, lsgd.local_pull, lsgd.global_pull, lsgd.prox, lsgd.score_window) == (
        4, 16, 0.1, 0.1, 0.1, 10)
    assert (lsgd.lr, lsgd.momentum, lsgd.nesterov, lsgd.weight_decay, lsgd.batch_size) == (0.1, 0.9, True, 1e-4, 128)
    assert lsgd.lr_time_milestones == [500.0] and lsgd.bn_batches == "full" and lsgd.sampling == "reshuffle"
    assert lsgd.time_budget is None  # the preset sets no budget
    grawa = parse(["--preset", "paper", "--algo", "mgrawa", "--model", "cnn7"])
    assert (grawa.period, grawa.pull, grawa.prox, grawa.fresh_batch) == (32, 0.5, 0.01, 128)
    assert grawa.norm_decay == pytest.approx(0.9 ** 8) and grawa.lr_time_milestones == []  # CNN7 keeps its LR
    easgd = parse(["--preset", "paper", "--algo", "easgd", "--model", "vgg16"])
    assert (easgd.period, easgd.beta, easgd.lr_time_milestones) == (16, 0.43, [500.0])
    plain = parse(["--algo", "lsgd"])
    assert plain.prox == 0.0 and plain.score_window is None and plain.bn_batches == 20
    used, _ = parse_and_validate(["--algo", "lsgd", "--period", "8"])
    assert used.score_window == 8 and used.global_period == 32  # config.json shows what LSGD uses


def test_explicit_options_override_the_preset():
    args, error = parse_and_validate(["--preset", "paper", "--algo", "lsgd", "--prox", "0.05", "--batch-size", "32",
                                      "--lr-time-milestones", "--bn-batches", "5", "--no-nesterov"])
    assert error is None
    assert args.prox == 0.05 and args.batch_size == 32 and args.lr_time_milestones == [] and args.bn_batches == 5
    assert args.nesterov is False and args.score_window == 10  # the rest still comes from the preset
    # explicitly giving the default value also counts as explicit
    assert parse(["--preset", "paper", "--algo", "lsgd", "--prox", "0"]).prox == 0.0
    _, error = parse_and_validate(["--bn-batches", "0"])
    assert "--bn-batches" in error


def test_clock_excludes_evaluation(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(clock_module.time, "perf_counter", lambda: now[0])
    clock = TrainingClock()
    clock.start()
    now[0] += 5.0
    with clock.excluded():
        now[0] += 3.0
        assert clock.train_seconds() == 5.0  # not counted while it runs either
        with clock.excluded():
            now[0] += 1.0
    now[0] += 2.0
    assert clock.train_seconds() == 7.0 and clock.wall_seconds() == 11.0
    resumed = TrainingClock()
    resumed.load_state_dict(clock.state_dict())
    now[0] += 1.0
    assert resumed.train_seconds() == 8.0 and resumed.wall_seconds() == 12.0


def test_batch_norm_reestimation_is_the_average_over_batches():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Dropout(0.5),
                                torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 2))
    batches = [torch.randn(16, 3, 8, 8) + k for k in range(5)]
    rng = torch.get_rng_state()
    assert reestimate_batch_norm(model, iter(batches)) == 5
    assert torch.equal(torch.get_rng_state(), rng)  # dropout stayed off: no random numbers drawn
    with torch.no_grad():
        features = [model[0](x) for x in batches]
    means = torch.stack([f.mean(dim=(0, 2, 3)) for f in features]).mean(0)
    variances = torch.stack([f.var(dim=(0, 2, 3), unbiased=True) for f in features]).mean(0)
    assert torch.allclose(model[1].running_mean, means, atol=1e-5)
    assert torch.allclose(model[1].running_var, variances, atol=1e-5)
    assert int(model[1].num_batches_tracked) == 5 and not model.training


def test_group_centres_and_full_pass_batch_norm_against_direct_computations():
    from mpi_harness import expect_passes, run_mpi

    result = run_mpi("evaluation_checks.py", timeout=180)
    expect_passes(result, ["group_centres", "full_pass_bn", "limited_bn"])


def test_help_shows_each_default_once():
    """Every option's default appears once, in words or as ``(default: X)``; none is printed as
    None; the methods are named as on the command line (mgrawa, lgrawa)."""
    import re

    from horovod_leader.training.command import build_parser

    text = build_parser().format_help()
    assert "(default: None)" not in text and "GRAWA's" not in text and "for grawa" not in text
    blocks = {}
    for block in re.split(r"\n  (?=-)", text):
        flat = " ".join(block.split())
        blocks[flat.split()[0].rstrip(",")] = flat
    for option, default in (("--algo", "lsgd"), ("--inner-optimizer", "sgd"), ("--compression", "none"),
                            ("--easgd-variant", "rounds"), ("--batch-size", "128"), ("--momentum", "0.9"),
                            ("--outer-lr", "0.7"), ("--outer-momentum", "0.9"), ("--model", "cnn"),
                            ("--nesterov", "True")):
        assert f"(default: {default})" in blocks[option], blocks[option]
    assert "default 0.1" in blocks["--lr"] and "mgrawa" in blocks["--period"] and "mgrawa" in blocks["--pull"]
    for option, block in blocks.items():
        if option.startswith("--"):
            assert block.count("default") <= 1, block


def test_progress_prints_lines_on_piped_output():
    """Under mpirun rank 0's output is not a terminal with a width: a line every interval, each
    ending in a newline (no carriage-return redraws), with the figures of the bar."""
    import io

    from horovod_leader.training.progress import Progress

    now = [0.0]
    out = io.StringIO()
    progress = Progress(100, 10, "lsgd", file=out, interval=5.0, clock=lambda: now[0])
    for step in range(30):
        now[0] += 1.0
        progress.update(1)
        if step == 3:
            progress.set_postfix(loss="0.500", acc="-")
    progress.close()
    lines = out.getvalue().split("\n")
    assert lines[-1] == "" and "\r" not in out.getvalue()
    assert len(lines[:-1]) == 6  # at 5, 10, ..., 30 s
    assert lines[0].startswith("lsgd:") and "15/100" in lines[0] and "loss=0.500" in lines[0]
    assert "40/100" in lines[-2]


def test_resume_restores_the_saved_configuration(tmp_path, monkeypatch):
    """--resume OUT takes every option from OUT/config.json (as the run wrote it); an option
    given again must repeat it unless it may change; --preset is not applied twice."""
    import json
    from pathlib import Path
    from types import SimpleNamespace

    from horovod_leader.training.command import Trainer
    from horovod_leader.training import resume

    # The world size as horovodrun --gloo tells a 4-rank job, read without communicating.
    monkeypatch.setenv("HOROVOD_CONTROLLER", "gloo")
    monkeypatch.setenv("HOROVOD_SIZE", "4")
    out = tmp_path / "run"
    original, error = parse_and_validate(["--preset", "paper", "--algo", "lsgd", "--group-size", "2", "--batch-size",
                                          "32", "--lr", "0.05", "--epochs", "2", "--out", str(out)])
    assert error is None
    Trainer.write_config(SimpleNamespace(rank=0, out=Path(out), args=original, size=4,
                                         topo=SimpleNamespace(groups=[[0, 1], [2, 3]])))
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "latest.json").write_text(json.dumps({"step": 22, "world_size": 4}))

    resumed, error = parse_and_validate(["--resume", str(out)])
    assert error is None
    for key, value in vars(original).items():
        if key != "resume":
            assert getattr(resumed, key) == value, key
    assert resumed.batch_size == 32 and resumed.prox == 0.1  # explicit over the preset, and the preset's own

    longer, error = parse_and_validate(["--resume", str(out), "--epochs", "4", "--time-budget", "60", "--eval-every",
                                        "5", "--checkpoint-every", "0", "--no-progress", "--lr", "0.05"])
    assert error is None and (longer.epochs, longer.time_budget, longer.eval_every, longer.checkpoint_every,
                              longer.no_progress, longer.lr) == (4.0, 60.0, 5.0, 0, True, 0.05)

    for argv, name in ((["--lr", "0.1"], "--lr 0.1"), (["--group-size", "4"], "--group-size 4"),
                       (["--async"], "--async True"), (["--algo", "diloco"], "--algo diloco"),
                       (["--batch-size", "128"], "--batch-size 128"), (["--out", str(tmp_path / "other")], "--out")):
        parsed, error = parse_and_validate(["--resume", str(out), *argv])
        assert parsed is None and name in error, (argv, error)
    _, error = parse_and_validate(["--resume", str(tmp_path)])
    assert "--resume" in error and "config.json" in error
    with pytest.raises(ValueError, match="--group-size"):
        resume.check_groups([[0, 1], [2, 3]], [[0, 1, 2, 3]])
    resume.check_groups([[0, 1], [2, 3]], [[0, 1], [2, 3]])
