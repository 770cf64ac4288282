"""Flatness: Hutchinson's trace and the Lanczos top eigenvalue against Hessians known exactly."""
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from horovod_leader.flatness import hessian_trace, hutchinson_values, top_eigenvalue
from mpi_harness import REPO, expect_passes, run_mpi


def least_squares(n=256, d=64, batch=64, seed=0):
    """Linear least squares, L(w) = mean_i (x_iᵀw − y_i)², over equal-sized batches: the mean of
    the batch means is the overall mean, so H = 2XᵀX/n exactly."""
    gen = torch.Generator().manual_seed(seed)
    # Correlated, unevenly scaled columns: a large off-diagonal part (Hutchinson's variance)
    # and a top eigenvalue that stands apart.
    mixing = torch.eye(d, dtype=torch.float64) + 0.3 * torch.randn(d, d, generator=gen, dtype=torch.float64)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64) @ mixing
    y = torch.randn(n, generator=gen, dtype=torch.float64)
    model = nn.Linear(d, 1, bias=False).double()
    batches = [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]
    return model, batches, 2 * x.T @ x / n


def squared_error(model, batch):
    x, y = batch
    return ((model(x).squeeze(-1) - y) ** 2).mean()


class Quadratic(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, dtype=torch.float64))


def quadratic_loss(model, a):
    """0.5 wᵀAw, whose Hessian is A."""
    return 0.5 * model.w @ a @ model.w


def symmetric_with_spectrum(eigenvalues, seed=0):
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=torch.Generator().manual_seed(seed),
                                       dtype=torch.float64))
    return q @ torch.diag(torch.as_tensor(eigenvalues, dtype=torch.float64)) @ q.T


def hutchinson_sigma(h, samples):
    """σ² = 2(‖H‖_F² − Σ H_ii²)/S: the standard error of Hutchinson's estimate with Rademacher probes."""
    return math.sqrt(2 * (float((h ** 2).sum()) - float((torch.diagonal(h) ** 2).sum())) / samples)


def test_trace_within_four_sigma_on_least_squares():
    model, batches, h = least_squares()
    exact = float(torch.trace(h))
    sigma = hutchinson_sigma(h, 100)
    assert sigma > 0.01 * exact  # the test has teeth: the estimate is not exact by construction
    for seed in (0, 1, 2):
        estimate = hessian_trace(model, squared_error, batches, samples=100, seed=seed)
        assert isinstance(estimate, float)
        assert abs(estimate - exact) <= 4 * sigma, (seed, estimate, exact, sigma)
    # The probe values' spread is the per-probe standard deviation σ·sqrt(S) of the docstring.
    values = torch.tensor(hutchinson_values(model, squared_error, batches, samples=400, seed=3))
    assert float(values.std()) == pytest.approx(hutchinson_sigma(h, 1), rel=0.15)
    # Different seeds draw different probes.
    assert hessian_trace(model, squared_error, batches, samples=10, seed=0) != \
        hessian_trace(model, squared_error, batches, samples=10, seed=1)


def test_top_eigenvalue_within_one_percent_on_least_squares():
    model, batches, h = least_squares(n=512, d=120)
    exact = float(torch.linalg.eigvalsh(h)[-1])
    estimate = top_eigenvalue(model, squared_error, batches, iters=50, seed=0)
    assert isinstance(estimate, float)
    assert estimate == pytest.approx(exact, rel=0.01)
    assert estimate <= exact * (1 + 1e-9)  # a Ritz value never exceeds the top eigenvalue


def test_top_eigenvalue_is_the_largest_algebraic_one():
    d = 100
    # Indefinite, the most negative eigenvalue dominating in magnitude: power iteration on H
    # would converge to -10; the largest algebraic eigenvalue is 3.
    spectrum = torch.cat([torch.tensor([-10.0, -9.0]), torch.linspace(-5.0, 2.0, d - 3), torch.tensor([3.0])])
    a = symmetric_with_spectrum(spectrum)
    model = Quadratic(d)
    estimate = top_eigenvalue(model, quadratic_loss, [a], iters=50, seed=0)
    assert estimate == pytest.approx(3.0, rel=0.01)
    samples = 100
    assert abs(hessian_trace(model, quadratic_loss, [a], samples=samples) - float(spectrum.sum())) <= \
        4 * hutchinson_sigma(a, samples)
    # Negative definite: the largest algebraic eigenvalue is the one smallest in magnitude.
    negative = symmetric_with_spectrum(torch.cat([torch.linspace(-10.0, -1.5, d - 1), torch.tensor([-1.0])]), seed=1)
    assert top_eigenvalue(model, quadratic_loss, [negative], iters=50) == pytest.approx(-1.0, rel=0.01)
    # Fewer parameters than steps: Lanczos stops when the space is exhausted, exactly.
    small = symmetric_with_spectrum(torch.tensor([-4.0, -1.0, 0.5, 2.0]), seed=2)
    assert top_eigenvalue(Quadratic(4), quadratic_loss, [small], iters=50) == pytest.approx(2.0, rel=1e-9)


def test_evaluation_mode_and_model_left_as_found():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 1))
    with torch.no_grad():  # statistics unlike any batch's, so train-mode batch norm would differ
        model[1].running_mean.fill_(0.7)
        model[1].running_var.fill_(3.0)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 5, generator=gen), torch.randn(16, generator=gen)) for _ in range(3)]
    before = {k: v.clone() for k, v in model.state_dict().items()}

    model.eval()
    eval_trace = hessian_trace(model, squared_error, batches, samples=8)
    eval_top = top_eigenvalue(model, squared_error, batches, iters=10)
    model.train()
    model[3].eval()  # a mixed state, restored module by module
    assert hessian_trace(model, squared_error, batches, samples=8) == eval_trace
    assert top_eigenvalue(model, squared_error, batches, iters=10) == eval_top
    assert model.training and model[1].training and not model[3].training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # running stats untouched
    assert all(p.grad is None for p in model.parameters())

    # The Hessian is that of the eval-mode function: compare with torch.func's full Hessian.
    model.eval()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def mean_loss(flat):
        pieces = dict(zip(params, torch.split(flat, [p.numel() for p in params.values()])))
        shaped = {k: pieces[k].reshape(p.shape) for k, p in params.items()}
        return sum(squared_error(lambda x: torch.func.functional_call(model, shaped, (x,)), b) for b in batches) / 3

    flat = torch.cat([p.reshape(-1) for p in params.values()])
    full = torch.func.hessian(mean_loss)(flat)
    model.train()
    exhaustive = top_eigenvalue(model, squared_error, batches, iters=len(flat))  # Lanczos over the whole space
    assert exhaustive == pytest.approx(float(torch.linalg.eigvalsh(full)[-1]), rel=1e-4)
    assert hessian_trace(model, squared_error, batches, samples=8) == pytest.approx(
        float(torch.tensor(hutchinson_values(model, squared_error, batches, samples=8), dtype=torch.float64).mean()),
        rel=1e-12)


def test_bad_arguments_name_themselves():
    model, batches, _ = least_squares(n=16, d=4, batch=8)
    for kwargs, name in [({"samples": 0}, "samples"), ({"samples": 2.5}, "samples"), ({"samples": True}, "samples"),
                         ({"seed": -1}, "seed"), ({"seed": "0"}, "seed")]:
        with pytest.raises(ValueError, match=name):
            hessian_trace(model, squared_error, batches, **kwargs)
    for kwargs, name in [({"iters": 0}, "iters"), ({"iters": None}, "iters")]:
        with pytest.raises(ValueError, match=name):
            top_eigenvalue(model, squared_error, batches, **kwargs)
    with pytest.raises(ValueError, match="batches is empty"):
        hessian_trace(model, squared_error, [])
    with pytest.raises(ValueError, match="batches must be"):
        top_eigenvalue(model, squared_error, 3)
    with pytest.raises(ValueError, match="loss_fn must return a scalar"):
        hessian_trace(model, lambda m, b: m(b[0]), batches)
    with pytest.raises(ValueError, match="loss_fn.*raised"):
        hessian_trace(model, lambda m, b: m(b), batches)
    frozen = nn.Linear(4, 1).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters that require gradients"):
        top_eigenvalue(frozen, squared_error, batches)
    assert model.training  # restored after a refusal too


def test_plain_process_without_horovod_or_mpi():
    code = ("import sys, torch\n"
            "from torch import nn\n"
            "from horovod_leader.flatness import hessian_trace, top_eigenvalue\n"
            "m = nn.Linear(3, 1)\n"
            "b = [(torch.randn(8, 3), torch.randn(8))]\n"
            "f = lambda m, b: ((m(b[0]).squeeze(-1) - b[1]) ** 2).mean()\n"
            "print(hessian_trace(m, f, b, samples=4), top_eigenvalue(m, f, b, iters=4))\n"
            "assert 'horovod.torch' not in sys.modules and 'mpi4py.MPI' not in sys.modules, sorted(sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]


def test_distributed_equals_single_process():
    result = run_mpi("flatness_checks.py", timeout=300)
    expect_passes(result, ["trace_equals_single_process", "top_eigenvalue_equals_single_process",
                           "cnn_equals_single_process", "group_process_set", "bad_arguments_on_every_rank"])


@pytest.mark.horovod
def test_training_command_measures_flatness_and_report_shows_it(tmp_path):
    """``--flatness`` on a 4-rank LSGD run: the final record holds the centre's and the leader's
    figures, they are what one process computes from the final checkpoint, and the report's
    table shows both columns."""
    import json
    import os

    from horovod_leader.training import checkpoint, data
    from horovod_leader.flatness import cross_entropy_loss, fixed_training_batches
    from horovod_leader.training.models import DigitsCNN
    from mpi_harness import mpirun_command

    out = tmp_path / "lsgd"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    cmd = mpirun_command(4, [sys.executable, "-m", "horovod_leader.train", "--no-progress", "--algo", "lsgd",
                             "--group-size", "2", "--epochs", "2", "--batch-size", "32", "--lr", "0.05",
                             "--checkpoint-every", "0", "--flatness", "--flatness-batches", "2", "--out", str(out)])
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    keys = ("hessian_trace", "hessian_top_eigenvalue", "leader_hessian_trace", "leader_hessian_top_eigenvalue")
    assert all(isinstance(last[k], float) and math.isfinite(last[k]) for k in keys), last

    # The same figures from the final checkpoint in this one process (the CNN has no batch
    # norm, so the centre is the plain average of the workers).
    train, _ = data.digits(seed=0)
    batches = fixed_training_batches(*train.tensors, batch_size=32, count=2)
    states = [checkpoint.read(checkpoint.step_folder(out, checkpoint.latest_step(out)) / f"rank{r}.pt")["model"]
              for r in range(4)]
    centre, leader = DigitsCNN(), DigitsCNN()
    centre.load_state_dict({k: sum(s[k] for s in states) / 4 for k in states[0]})
    leader.load_state_dict(states[last["global_leader"]])
    for model, prefix in ((centre, ""), (leader, "leader_")):
        assert hessian_trace(model, cross_entropy_loss, batches) == pytest.approx(last[prefix + "hessian_trace"],
                                                                                   rel=1e-4)
        assert top_eigenvalue(model, cross_entropy_loss, batches) == pytest.approx(
            last[prefix + "hessian_top_eigenvalue"], rel=1e-3)
    assert last["hessian_top_eigenvalue"] > 0

    report = subprocess.run([sys.executable, "-m", "horovod_leader.report", str(out), "--out", str(tmp_path / "report")],
                            capture_output=True, text=True, env=env, timeout=120)
    assert report.returncode == 0, report.stderr
    header, _, row = report.stdout.splitlines()[:3]
    assert header.rstrip().endswith("| Hessian trace | top eigenvalue |")
    cells = [c.strip() for c in row.strip().strip("|").split("|")]
    assert cells[-2] == f"{last['hessian_trace']:.4g} (leader {last['leader_hessian_trace']:.4g})"
    assert cells[-1] == f"{last['hessian_top_eigenvalue']:.4g} (leader {last['leader_hessian_top_eigenvalue']:.4g})"


@pytest.mark.horovod
def test_benchmark_orderings_and_a_tiny_run(tmp_path):
    """The benchmark's verdict logic on given figures, then the script end to end on one short run."""
    import json

    sys.path.insert(0, str(REPO / "benchmarks"))
    from flatness import check_orderings

    def runs(trace, top):
        return [{"trace": trace + d, "top_eigenvalue": top + d / 10} for d in (-1.0, 0.0, 1.0)]

    # The paper's trace order, with one pair (EASGD, LSGD) closer than the seeds' spread.
    verdict = check_orderings({"mgrawa": runs(10, 5), "lgrawa": runs(20, 6), "easgd": runs(30, 1), "lsgd": runs(30.5, 2),
                               "dp": runs(50, 9), "localsgd": runs(1, 1)})
    assert verdict["trace"]["same_order"] and verdict["trace"]["grawa_flattest"]
    assert verdict["trace"]["pairs_in_paper_order"] == "10/10"
    assert verdict["trace"]["pairs_resolved_beyond_spread"] == "9/10"
    assert verdict["top_eigenvalue"]["measured_order"] == ["easgd", "lsgd", "mgrawa", "lgrawa", "dp"]
    assert verdict["top_eigenvalue"]["same_order"] and not verdict["top_eigenvalue"]["grawa_flattest"]

    subprocess.run([sys.executable, str(REPO / "benchmarks" / "flatness.py"), "--methods", "mgrawa", "--seeds", "0",
                    "--epochs", "1", "--flatness-batches", "1", "--out", str(tmp_path), "--no-markdown"],
                   check=True, timeout=300, cwd=REPO)
    result = json.loads((tmp_path / "flatness.json").read_text())
    (run,) = result["results"]["mgrawa"]
    assert run["steps"] > 0 and math.isfinite(run["trace"]) and math.isfinite(run["top_eigenvalue"])
