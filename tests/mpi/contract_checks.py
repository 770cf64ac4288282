"""The wrapper contract, for every wrapper and the registry (4 ranks).

* round_trip_*: every wrapper's ``state_dict`` survives ``torch.save`` / ``torch.load(weights_only=True)``
  and loads into a fresh wrapper of the same kind, whose ``state_dict`` and ``centre()`` then
  equal the saved ones; tensors are keyed by buffer name.
* foreign_*: a wrapper refuses another wrapper's ``state_dict`` (naming both), an optimizer's, and
  a centre that names a buffer its model does not have.
* registry_builds_*: ``MethodSpec.make`` builds each method's wrapper from parsed options.
"""
import io
import math

import horovod.torch as hvd
import pytest
import torch
from torch import nn

import horovod_leader as hl
from horovod_leader.optim.base import DistributedWrapper
from _common import check

topo = hl.init(group_size=2)
rank = topo.rank

WRAPPERS = {
    "lsgd": lambda o, m: hl.LSGD(o, m, period=2, global_period=4),
    "lsgd_async": lambda o, m: hl.LSGD(o, m, period=2, global_period=4, asynchronous=True),
    "lsgd_int8": lambda o, m: hl.LSGD(o, m, period=2, global_period=4, compression="int8"),
    "grawa": lambda o, m: hl.GRAWA(o, m, period=2, prox=0.01),
    "grawa_bf16": lambda o, m: hl.GRAWA(o, m, period=2, compression=hl.Compression.bf16),
    "easgd": lambda o, m: hl.EASGD(o, m, period=2),
    "easgd_async": lambda o, m: hl.EASGD(o, m, period=2, asynchronous=True),
    "easgd_onesided": lambda o, m: hl.OneSidedEASGD(o, m, period=2),
    "localsgd_int8": lambda o, m: hl.LocalSGD(o, m, period=2, compression="int8"),
    "diloco": lambda o, m: hl.DiLoCo(o, m, period=2),
    "dp": lambda o, m: hl.DataParallel(o, m),
}


def model_and_optimizer(seed: int):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def flatten(value, prefix=""):
    """Every tensor and scalar of a nested state, by path."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in flatten(item, f"{prefix}/{key}").items()}
    if isinstance(value, (list, tuple)):
        return {k: v for i, item in enumerate(value) for k, v in flatten(item, f"{prefix}/{i}").items()}
    return {prefix: value}


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and bool(
            torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
                                  and torch.equal(a.nan_to_num(), b.nan_to_num())))
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def train(opt, model, steps=6):
    data = torch.Generator().manual_seed(rank)
    for _ in range(steps):
        loss = model(torch.randn(8, 3, generator=data)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step(loss)


with check("contract_signatures"):
    import inspect

    for cls in (hl.LSGD, hl.GRAWA, hl.EASGD, hl.OneSidedEASGD, hl.LocalSGD, hl.DiLoCo, hl.DataParallel):
        assert issubclass(cls, DistributedWrapper) and not inspect.isabstract(cls), cls
        assert list(inspect.signature(cls._round).parameters) == ["self", "number", "joined"], cls
    with pytest.raises(TypeError, match="abstract"):
        DistributedWrapper(*model_and_optimizer(0)[::-1], period=1)

saved = {}
for name, make in WRAPPERS.items():
    with check(f"round_trip_{name}"):
        model, sgd = model_and_optimizer(0)
        opt = make(sgd, model)
        train(opt, model)
        opt.close()
        state = opt.state_dict()
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        state = torch.load(buffer, weights_only=True)  # data only: tensors and plain containers
        assert state["algorithm"] == type(opt).__name__ and state["world"] == {"size": 4, "groups": [[0, 1], [2, 3]]}
        for part in ("centre", "outer", "last_average", "centre_shard"):
            if part in state:  # keyed by buffer name, never by position
                assert isinstance(state[part], dict) and all(isinstance(k, str) for k in state[part]), state[part]
        saved[name] = state
        centre = opt.centre()
        fresh_model, fresh_sgd = model_and_optimizer(1)
        fresh = make(fresh_sgd, fresh_model)
        fresh.load_state_dict(state)
        mine, theirs = flatten(state), flatten(fresh.state_dict())
        assert mine.keys() == theirs.keys(), set(mine) ^ set(theirs)
        differ = [path for path in mine if not same(mine[path], theirs[path])]
        assert not differ, differ
        if centre is not None and name != "easgd_onesided":  # the one-sided centre after close() is a collective
            assert all(torch.equal(centre[key], fresh.centre()[key]) for key in centre)
        fresh.close()

with check("foreign_state_dicts"):
    model, sgd = model_and_optimizer(0)
    opt = hl.LocalSGD(sgd, model, period=2)
    for other in ("lsgd", "grawa", "easgd", "diloco", "dp"):
        with pytest.raises(ValueError, match=f"state_dict is from {saved[other]['algorithm']}, not LocalSGD"):
            opt.load_state_dict(saved[other])
    with pytest.raises(ValueError, match="optimizer's state_dict"):
        opt.load_state_dict(sgd.state_dict())
    opt.close()
    model, sgd = model_and_optimizer(0)
    opt = hl.EASGD(sgd, model, period=2)
    renamed = {**saved["easgd"], "centre": {"float16.cpu": next(iter(saved["easgd"]["centre"].values()))}}
    with pytest.raises(ValueError, match=r"centre holds buffers \['float16.cpu'\] that this model does not have"):
        opt.load_state_dict(renamed)
    opt.close()
    hvd.allreduce(torch.zeros(1), name="test.contract.alive")  # nobody was left in a collective

with check("registry_builds_every_method"):
    from horovod_leader.registry import METHODS
    from horovod_leader.training.command import build_parser, make_wrapper, validate

    for algo, spec in METHODS.items():
        args = build_parser().parse_args(["--algo", algo, "--out", "unused"])
        validate(args)
        model, sgd = model_and_optimizer(0)
        opt = make_wrapper(args, sgd, model)
        assert type(opt) is spec.wrapper and opt.period == args.period, (algo, type(opt), opt.period)
        if spec.period is not None:
            assert args.period == spec.period
        opt.close()
