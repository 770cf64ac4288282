"""Single-process tests of the pieces that need no communication."""
import math

import pytest
import torch

from horovod_leader.election import ScoreWindow, elect, elect_all
from horovod_leader.packing import key_name, pack
from horovod_leader.topology import blocks_of, groups_from_colors, resolve_group_size
from horovod_leader.validation import check_fraction, check_int, check_multiple


def test_group_size_resolution(monkeypatch):
    monkeypatch.delenv("HOROVOD_LEADER_GROUP_SIZE", raising=False)
    assert resolve_group_size(None, 8) is None
    assert resolve_group_size(2, 8) == 2
    for bad in (3, 0, -4, 2.0, "2", True):
        with pytest.raises(ValueError, match="group_size"):
            resolve_group_size(bad, 8)
    monkeypatch.setenv("HOROVOD_LEADER_GROUP_SIZE", "4")
    assert resolve_group_size(None, 8) == 4
    monkeypatch.setenv("HOROVOD_LEADER_GROUP_SIZE", "3")
    with pytest.raises(ValueError, match="HOROVOD_LEADER_GROUP_SIZE"):
        resolve_group_size(None, 8)
    monkeypatch.setenv("HOROVOD_LEADER_GROUP_SIZE", "two")
    with pytest.raises(ValueError, match="HOROVOD_LEADER_GROUP_SIZE"):
        resolve_group_size(None, 8)


def test_groups():
    assert blocks_of(6, 2) == [[0, 1], [2, 3], [4, 5]]
    # Node colours (lowest rank of each node) -> groups, also for uneven, interleaved nodes.
    assert groups_from_colors([0, 0, 2, 2, 2]) == [[0, 1], [2, 3, 4]]
    assert groups_from_colors([0, 1, 0, 1]) == [[0, 2], [1, 3]]


def test_election_rules():
    assert elect([3.0, 1.0, 2.0, 1.0], range(4)) == 1  # tie 1 vs 3 -> lowest rank
    assert elect([math.nan, -math.inf, math.inf, 5.0], range(4)) == 3  # non-finite never wins
    assert elect([math.nan, math.inf], range(2)) is None
    assert elect([0.0, 9.0, 1.0, 2.0], [2, 3]) == 2  # only candidates count
    leaders, best = elect_all([4.0, 3.0, 2.0, 1.0], [[0, 1], [2, 3]])
    assert leaders == [1, 3] and best == 3


def test_score_window_is_a_running_mean():
    window = ScoreWindow(3)
    assert window.score() == math.inf  # no loss yet: cannot lead
    for loss in (10.0, torch.tensor(1.0), 2.0, 3.0):
        window.record(loss)
    assert window.score() == pytest.approx(2.0)  # mean of the last three
    restored = ScoreWindow(3)
    restored.load_state_dict(window.state_dict())
    assert restored.score() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="loss"):
        window.record(torch.ones(2))
    with pytest.raises(ValueError, match="score_window"):
        ScoreWindow(0)


def test_validation_messages_name_the_argument():
    with pytest.raises(ValueError, match=r"period must be an integer >= 1, got 0"):
        check_int("period", 0)
    with pytest.raises(ValueError, match=r"pull must lie in \[0, 1\], got 1.5"):
        check_fraction("pull", 1.5)
    with pytest.raises(ValueError, match="global_period=6 must be a multiple of period=4"):
        check_multiple("global_period", 6, "period", 4)


def test_pack_shares_memory_and_keeps_values():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2).double())
    before = [p.detach().clone() for p in model.parameters()]
    flats = pack(model.parameters())
    assert {key_name(k) for k in flats} == {"float32.cpu", "float64.cpu"}
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    flat32 = flats[(torch.float32, torch.device("cpu"))]
    flat32.flat.add_(1.0)  # writing the flat buffer writes the model
    assert torch.equal(model[0].weight, before[0] + 1)
    assert flat32.still_packed()
    model[0].weight.data = model[0].weight.data.clone()
    assert not flat32.still_packed()


def test_grawa_weights_arithmetic():
    from horovod_leader.grawa_weights import NormSmoother, healthy_count, local_terms, weights_from_sums

    norms = [torch.tensor([n], dtype=torch.float64) for n in (1.0, 2.0, 4.0, 4.0)]
    terms = [local_terms(n) for n in norms]
    summed = sum(terms)
    weights = [float(weights_from_sums(t, summed)) for t in terms]
    assert weights == pytest.approx([0.5, 0.25, 0.125, 0.125]) and healthy_count(summed) == 4
    # zero norm: finite, dominant; NaN norm and unhealthy worker: weight 0, not counted
    edge = [local_terms(torch.tensor([v], dtype=torch.float64)) for v in (0.0, math.nan, 1.0)]
    edge.append(local_terms(torch.tensor([1.0], dtype=torch.float64), healthy=False))
    summed = sum(edge)
    weights = [float(weights_from_sums(t, summed)) for t in edge]
    assert all(math.isfinite(w) for w in weights)
    assert weights[0] == pytest.approx(1.0) and weights[1] == 0.0 and weights[3] == 0.0
    assert healthy_count(summed) == 2
    # nobody healthy: the count says so (the wrapper then raises AllWorkersDiverged)
    none = [local_terms(torch.tensor([math.inf], dtype=torch.float64)) for _ in range(4)]
    assert healthy_count(sum(none)) == 0
    # per-tensor (LGRAWA) terms: one inverse norm per tensor and one flag
    layer = local_terms(torch.tensor([1.0, 4.0], dtype=torch.float64))
    assert layer.tolist() == [1.0, 0.25, 1.0]
    # bias-corrected smoothing: a constant input comes out unchanged from the first round
    smoother = NormSmoother(0.43)
    assert float(smoother(torch.tensor([3.0], dtype=torch.float64))) == pytest.approx(3.0)
    assert float(smoother(torch.tensor([3.0], dtype=torch.float64))) == pytest.approx(3.0)
    assert float(smoother(torch.tensor([6.0], dtype=torch.float64))) == pytest.approx(
        (0.43 * (0.57 * 3 + 0.43 * 0.57 * 3) + 0.57 * 6) / (1 - 0.43 ** 3))


@pytest.mark.parametrize("kind", ["bf16", "int8"])
def test_compression_round_trip_and_non_finite_blocks(kind):
    from horovod_leader.compression import Compression, check_compression

    codec = check_compression(kind)
    assert codec is getattr(Compression, kind) and codec.name == kind
    torch.manual_seed(0)
    values = torch.randn(1000) * torch.logspace(-3, 1, 1000)
    values[256:512] = 0.0  # an all-zero block
    payload = codec.encode(values)
    assert sum(t.numel() * t.element_size() for t in payload) == codec.payload_bytes(values.numel())
    decoded = codec.decode(payload, values.numel())
    assert decoded.shape == values.shape and torch.isfinite(decoded).all()
    assert torch.equal(decoded[256:512], values[256:512])
    assert (decoded - values).abs().max().item() <= codec.max_error(values) + 1e-12
    # A NaN or inf anywhere in a block must reach the receiver as non-finite values, never as
    # finite garbage: the receiver's health check is what discards a diverged leader's copy.
    for bad in (math.nan, math.inf):
        broken = values.clone()
        broken[700] = bad
        decoded = codec.decode(codec.encode(broken), broken.numel())
        assert not torch.isfinite(decoded[700])
        assert torch.isfinite(decoded[:512]).all()  # other blocks are untouched


def test_non_finite_at_start_is_not_divergence_but_a_change_is():
    from horovod_leader.health import NonFiniteAtStart

    mask = torch.tensor([0.0, -math.inf, 0.0, math.inf, math.nan])
    known = NonFiniteAtStart([("mask", mask.clone()), ("stats", torch.zeros(3))])
    assert list(known.positions) == ["mask"]  # all-finite tensors cost nothing
    assert known.finite("mask", mask.clone())
    for position, bad in ((0, math.nan), (1, math.nan), (1, math.inf), (2, -math.inf)):
        changed = mask.clone()
        changed[position] = bad
        assert not known.finite("mask", changed), (position, bad)
    assert not known.finite("stats", torch.tensor([0.0, math.nan, 0.0]))
    # a -inf pulled toward a leader's -inf stays -inf; a finite position is pulled as usual
    x, leader = torch.tensor([1.0, -math.inf, 0.0, math.inf, math.nan]), mask.clone()
    known.pull_keeping_constants_("mask", x, None, leader, 0.0, 0.5)
    assert x[1] == -math.inf and x[3] == math.inf and math.isnan(x[4]) and x[0] == 0.5


def test_grawa_norm_of_a_sparse_gradient_is_the_dense_one():
    from horovod_leader.grawa_weights import norms_of

    emb = torch.nn.Embedding(10, 4, sparse=True)
    emb(torch.tensor([1, 1, 2, 1])).pow(2).sum().backward()  # repeated indices: an uncoalesced gradient
    dense = emb.weight.grad.to_dense()
    assert torch.allclose(norms_of([emb.weight.grad], layerwise=True), dense.double().norm().reshape(1))
    assert torch.allclose(norms_of([emb.weight.grad, None], layerwise=False), dense.double().norm().reshape(1))


def test_each_default_has_one_home():
    """The training command's defaults are the wrapper classes' own, except where a class names
    the command's value and says why (LSGD's global period, DiLoCo's period)."""
    import inspect

    from horovod_leader.optim import DiLoCo, LSGD
    from horovod_leader.registry import METHODS
    from horovod_leader.training.command import build_parser

    parser = build_parser()
    cli = {action.dest: action.default for action in parser._actions}
    differ_on_purpose = {("lsgd", "global_period"), ("diloco", "period")}
    for name, spec in METHODS.items():
        signature = inspect.signature(spec.wrapper.__init__).parameters
        for dest in spec.options:
            library = signature[dest].default
            command = spec.period if dest == "period" else cli[dest]
            if (name, dest) in differ_on_purpose or dest in spec.cli_defaults:
                continue
            assert command == library, (name, dest, command, library)
    assert METHODS["diloco"].period == DiLoCo.CLI_PERIOD != DiLoCo.DEFAULT_PERIOD
    assert "CLI_PERIOD" in inspect.getsource(DiLoCo) and "CLI_GLOBAL_PERIOD_FACTOR" in inspect.getsource(LSGD)
