"""A 4-rank toy problem whose every round can be computed by hand (no side effects on import).

Each rank r starts at ``start(r)`` and its gradient at x is ``grad(r, x)``, which depends on x,
so the step at which a correction lands changes the result. ``simulate(method, d)`` gives every
rank's parameters after ``STEPS`` steps of plain SGD, in float64, with the published updates and
each round posted at its step and applied d steps later (d = 0: at once, the published method).
Losses are 10 - rank, so with groups [0, 1] and [2, 3] rank 1 leads the first group, rank 3 the
second and all. ``run(make, d)`` runs a wrapper (``WRAPPERS``) on the same problem.
"""
import torch
from torch import nn

import horovod_leader as hl

LR, STEPS, PERIOD = 0.1, 10, 4
DIRECTION = torch.tensor([1.0, -1.0, 0.5, 2.0], dtype=torch.float64)
LOCAL_LEADER = {0: 1, 1: 1, 2: 3, 3: 3}

WRAPPERS = {
    "localsgd": lambda o, m, d: hl.LocalSGD(o, m, period=PERIOD, overlap=d),
    "easgd": lambda o, m, d: hl.EASGD(o, m, period=PERIOD, beta=0.9, overlap=d),
    "grawa": lambda o, m, d: hl.GRAWA(o, m, period=PERIOD, pull=0.5, overlap=d),
    "diloco": lambda o, m, d: hl.DiLoCo(o, m, period=PERIOD, outer_lr=0.7, outer_momentum=0.9, overlap=d),
    "lsgd": lambda o, m, d: hl.LSGD(o, m, period=PERIOD, global_period=2 * PERIOD, local_pull=0.1, global_pull=0.2,
                                    overlap=d),
}


def start(r):
    return 0.1 * (r + 1) + 0.01 * torch.arange(4, dtype=torch.float64)


def grad(r, x):
    """Rank r's gradient at x (float64)."""
    return 0.1 * (r + 1) * DIRECTION + 0.5 * (x - start(r))


def weights(model) -> torch.Tensor:
    return model.weight.detach().double().reshape(-1)


def run(make, rank: int, d: int = 0, steps: int = STEPS, model=None, opt=None, first: int = 1):
    """Steps ``first``..``steps`` with this rank's gradient at its weights, loss 10 - rank."""
    if model is None:
        model = nn.Linear(4, 1, bias=False)
        with torch.no_grad():
            model.weight.copy_(start(rank).float().view(1, 4))
        opt = make(torch.optim.SGD(model.parameters(), lr=LR), model, d)
    for _ in range(first, steps + 1):
        model.weight.grad = grad(rank, weights(model)).float().view(1, 4)
        opt.step(10.0 - rank)
    return model, opt


def simulate(method: str, d: int, size: int = 4, steps: int = STEPS):
    """Every rank's parameters after ``steps``. Each step's gradient is taken where the step
    starts (as the caller sets ``.grad`` before ``step``). The averaging methods step, then
    apply a round due, then post one (the snapshot is after the step, what d = 0 averages);
    LSGD applies a refresh due, posts one (the snapshot is the parameters that produced the
    step's loss, what its leaders send at d = 0), then steps. d = 0 applies at once."""
    x = [start(r) for r in range(size)]
    centre = sum(x) / size  # EASGD's x~
    theta, momentum = x[0].clone(), None  # DiLoCo's outer parameters (rank 0's) and momentum
    if method == "diloco":
        x = [theta.clone() for _ in range(size)]
    pending, inverse = None, None

    def apply(x, pending):
        nonlocal centre, theta, momentum
        s, extra = pending[1], pending[2]
        if method == "lsgd":
            out = []
            for r in range(size):
                pull = torch.zeros(4, dtype=torch.float64)
                if r != LOCAL_LEADER[r]:
                    pull += 0.1 * (s[r] - s[LOCAL_LEADER[r]])
                if extra and r != 3:  # a global refresh; rank 3 leads all
                    pull += 0.2 * (s[r] - s[3])
                out.append(x[r] - pull)
            return out
        mean = sum(s) / size
        if method == "localsgd":
            return [mean + (x[r] - s[r]) for r in range(size)]
        if method == "easgd":
            alpha = 0.9 / size
            out = [x[r] - alpha * (s[r] - centre) for r in range(size)]
            centre = 0.1 * centre + 0.9 * mean
            return out
        if method == "grawa":
            c = sum(w * s[r] for r, w in enumerate(extra)) / sum(extra)
            return [x[r] - 0.5 * (s[r] - c) for r in range(size)]
        if method == "diloco":
            delta = theta - mean
            momentum = delta.clone() if momentum is None else 0.9 * momentum + delta
            theta = theta - 0.7 * (delta + 0.9 * momentum)  # Nesterov
            return [theta + (x[r] - s[r]) for r in range(size)]
        raise ValueError(method)

    for t in range(1, steps + 1):
        due = t % PERIOD == 0
        g = [grad(r, x[r]) for r in range(size)]
        if method == "lsgd":
            if pending is not None and t == pending[0]:
                x, pending = apply(x, pending), None
            if due:
                pending = (t + d, [v.clone() for v in x], t % (2 * PERIOD) == 0)
                if d == 0:
                    x, pending = apply(x, pending), None
            x = [x[r] - LR * g[r] for r in range(size)]
            continue
        if due and method == "grawa":  # the weights: inverse gradient norms at the round's step
            inverse = [1.0 / float(g[r].norm()) for r in range(size)]
        x = [x[r] - LR * g[r] for r in range(size)]
        if pending is not None and t == pending[0]:
            x, pending = apply(x, pending), None
        if due:
            pending = (t + d, [v.clone() for v in x], inverse)
            if d == 0:
                x, pending = apply(x, pending), None
    return x
