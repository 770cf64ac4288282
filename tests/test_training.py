"""The training command's parts that need no communication: presets, clock, batch-norm re-estimation."""
import pytest
import torch

from horovod_leader.training import clock as clock_module
from horovod_leader.training.clock import TrainingClock
from horovod_leader.training.evaluation import reestimate_batch_norm
from horovod_leader.train import parse, parse_and_validate


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
