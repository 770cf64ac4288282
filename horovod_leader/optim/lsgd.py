r"""Leader SGD (LSGD): a gradient step plus a pull toward the best worker, locally and globally.

Each worker i minimises :math:`f(x_i) + \frac{\lambda}{2}\|x_i-\tilde x_{group}\|^2 +
\frac{\lambda_G}{2}\|x_i-\tilde x\|^2`, where :math:`\tilde x_{group}` is the best worker of its
group (node) and :math:`\tilde x` the best of all. The leader's own pull vanishes, so the
leader does plain SGD and the stationary points are those of f.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import torch

from horovod_leader import fused
from horovod_leader.election import ScoreWindow, elect_all
from horovod_leader.flat import FlatBuffer, key_name
from horovod_leader.optim.base import DistributedWrapper
from horovod_leader.validation import check_bool, check_fraction, check_int, check_multiple


_SGD_HYPERPARAMS = ("lr", "momentum", "dampening", "weight_decay", "nesterov")


class LSGD(DistributedWrapper):
    r"""Leader SGD over Horovod, in the single-leader or the multi-leader setting.

    Call ``step(loss)`` after ``loss.backward()``. The k-th call (k = 1, 2, ...) is a local
    refresh when ``period`` divides k and a global refresh when ``global_period`` divides k.
    At a refresh every rank's score (mean of its last ``score_window`` losses) is gathered,
    the leaders are elected (lowest finite score; ties to the lowest rank) and each leader
    broadcasts its parameters :math:`x_k` (those that produced its loss) to its group (local)
    or to everyone (global): only leaders' parameters travel. Then every worker applies the
    two-force update, all forces computed from the same :math:`x_k`:

    .. math::

        x_{k+1} = x_k - \eta\,d_k - a\,(x_k - \tilde x_{group}) - b\,(x_k - \tilde x)

    where :math:`\eta d_k` is the wrapped optimizer's step (the gradient force), and

    * :math:`a` = ``local_pull`` at a local refresh, plus ``prox / period`` at every step once a
      local copy was received (the authors' per-step proximal pull); 0 otherwise;
    * :math:`b` = ``global_pull`` at a global refresh, plus ``prox / global_period``.

    With a single group (one node, or ``group_size`` = world size) the group leader is the
    global leader and only the global force acts (plain LSGD).

    When the wrapped optimizer is ``torch.optim.SGD`` the whole update (momentum, Nesterov,
    weight decay and both pulls) is one fused pass over each packed parameter buffer
    (``horovod_leader.fused``); for any other optimizer, its own step runs and the two pulls
    are fused after it, evaluated at the pre-step parameters.

    A worker whose score or parameters are not finite never leads; at the next refresh its
    parameters are reset to the leader's, its optimizer state cleared, and the recovery logged.

    ``asynchronous=True`` (the paper's Algorithm 1): workers step at their own pace; refresh
    round n starts when the steps of all workers together reach ``n * size * period`` (with
    one group, ``size * global_period``), counted with one-sided MPI atomics, so a fast worker
    takes more steps between refreshes than a slow one. The round's score gathering and leader
    broadcasts are non-blocking: the worker keeps stepping, and the pull
    ``x <- x - a (x - x_group) - b (x - x_global)`` is applied to its current parameters when the
    copies arrive. A worker starts round n+1 only after round n completed, so the copies are
    at most one round interval old. Ranks may stop at different step counts: ``close()``
    keeps serving due refreshes until every rank has closed.

    Args:
        optimizer: any ``torch.optim.Optimizer`` over ``model``'s parameters.
        model: the model; its parameters and buffers are packed into flat buffers (values
            unchanged). Move it to its device before wrapping.
        period: local refresh period :math:`\tau` (default 4).
        global_period: global refresh period :math:`\tau_G`, a multiple of ``period``
            (default: ``period``). The authors use :math:`\tau_G \in \{4, 16, 64\}`, :math:`\tau = \tau_G/4`.
        local_pull: :math:`\lambda`, in [0, 1] (authors' default 0.1).
        global_pull: :math:`\lambda_G`, in [0, 1] (authors' default 0.1).
        prox: per-step proximal pull p, in [0, 1] (authors use 0.1; default 0, off).
        score_window: number of recent losses averaged into the score (default: ``period``).
        broadcast_buffers: send the leader's buffers (batch-norm statistics) with its
            parameters; floating buffers are pulled like parameters, others are copied.
        asynchronous: run the asynchronous variant described above.
        fused: ``None`` (auto: fuse when the optimizer is plain SGD), ``False`` never.
        topology: a ``Topology`` from ``horovod_leader.init``; default: the current one.
    """

    name = "lsgd"

    def __init__(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module, period: int = 4,
                 global_period: Optional[int] = None, local_pull: float = 0.1, global_pull: float = 0.1,
                 prox: float = 0.0, score_window: Optional[int] = None, *, asynchronous: bool = False,
                 broadcast_buffers: bool = True, fused: Optional[bool] = None, topology=None):
        # Validate everything before the base class communicates.
        self.period = check_int("period", period)
        self.global_period = self.period if global_period is None else check_int("global_period", global_period)
        check_multiple("global_period", self.global_period, "period", self.period)
        self.local_pull = check_fraction("local_pull", local_pull)
        self.global_pull = check_fraction("global_pull", global_pull)
        self.prox = check_fraction("prox", prox)
        self.scores = ScoreWindow(self.period if score_window is None else check_int("score_window", score_window))
        if fused not in (None, True, False):
            raise ValueError(f"fused must be None, True or False, got {fused!r}")
        check_bool("asynchronous", asynchronous)
        super().__init__(optimizer, model, topology=topology, broadcast_buffers=broadcast_buffers)
        self._fuse_allowed = fused is not False and self._sgd_over_whole_model()
        if fused is True and not self._fuse_allowed:
            raise ValueError("fused=True needs a torch.optim.SGD optimizer over all of the model's parameters")
        self._multi = self.topology.num_groups > 1
        self._local_leader: Optional[int] = None
        self._global_leader: Optional[int] = None
        self.last_scores: Optional[List[float]] = None
        # Last received leader copies, one flat tensor per packed buffer ("local"/"global"),
        # and the buffers a broadcast in flight writes into (swapped in when it completes).
        self._copies: Dict[str, Dict[str, torch.Tensor]] = {"local": {}, "global": {}}
        self._incoming: Dict[str, Dict[str, torch.Tensor]] = {"local": {}, "global": {}}
        self._grads: Dict[Any, torch.Tensor] = {}
        self._momentum: Dict[Any, torch.Tensor] = {}
        self._anchor: Dict[Any, torch.Tensor] = {}
        self.fused_steps = 0  # how many steps took the fused path (for tests and logs)
        self._setup_rounds(asynchronous, self.period if self._multi else self.global_period)

    # ------------------------------------------------------------------ public state
    @property
    def global_leader(self) -> Optional[int]:
        """Global rank of the current global leader (None before the first global refresh)."""
        return self._global_leader

    @property
    def local_leader(self) -> Optional[int]:
        """Global rank of this rank's current group leader (the global leader with one group)."""
        return self._local_leader if self._multi else self._global_leader

    # ------------------------------------------------------------------ the step
    def step(self, loss) -> None:
        """One LSGD step: record ``loss``, refresh the leaders if due, apply the update."""
        if loss is None:
            raise ValueError("LSGD.step needs this rank's loss: the leader is elected by it")
        loss = self._begin_step(loss)
        k = self._steps
        self.scores.record(loss)
        if self.asynchronous:
            self._async_step()
            return
        local_refresh = self._multi and k % self.period == 0
        global_refresh = k % self.global_period == 0
        got_local = got_global = False
        if local_refresh or global_refresh:
            got_local, got_global, healthy = self._refresh(local_refresh, global_refresh)
            if not healthy and (got_local or got_global):
                self._recover("global" if got_global else "local")
                return
        a = self._coefficient("local", self.local_pull if got_local else 0.0, self.period) if self._multi else 0.0
        b = self._coefficient("global", self.global_pull if got_global else 0.0, self.global_period)
        if not (self._fuse_allowed and self._fused_step(a, b)):
            self._unfused_step(a, b)
        self._pull_buffers(a, b, got_local, got_global)

    def _async_step(self) -> None:
        """Gradient step with the per-step proximal pulls, then count it and serve refreshes."""
        a = self._coefficient("local", 0.0, self.period) if self._multi else 0.0
        b = self._coefficient("global", 0.0, self.global_period)
        if not (self._fuse_allowed and self._fused_step(a, b)):
            self._unfused_step(a, b)
        self._pull_buffers(a, b, False, False)
        self._schedule.after_step(self._round, self._steps)

    def _round(self, number: int):
        """Asynchronous refresh round ``number``: gather scores, elect, receive, then pull."""
        global_ = (number * self._schedule.unit) % (self.size * self.global_period) == 0
        got_local, got_global, healthy = yield from self._elect_and_receive(self._multi, global_)
        if not healthy and (got_local or got_global):
            self._recover("global" if got_global else "local")
            return
        a = self.local_pull if got_local else 0.0
        b = self.global_pull if got_global else 0.0
        with torch.no_grad():
            for key, flat in self.params.items():
                local_copy, global_copy = self._leaders_for("param", key, a, b)
                if local_copy is not None or global_copy is not None:
                    fused.leader_pull_(flat.flat, local_copy, global_copy, local_pull=a, global_pull=b)
        self._pull_buffers(a, b, got_local, got_global)

    def _coefficient(self, level: str, refresh_pull: float, period: int) -> float:
        prox = self.prox / period if self._copies[level] else 0.0
        return refresh_pull + prox

    # ------------------------------------------------------------------ refresh: elect + exchange
    def _refresh(self, local: bool, global_: bool):
        """Synchronous refresh: elect and receive before this step's update.

        Returns (received_local, received_global, this_rank_healthy).
        """
        self._driver.start(self._elect_and_receive(local, global_), block=True)
        return self._driver.result

    def _elect_and_receive(self, local: bool, global_: bool):
        """Gather everyone's score, elect the leaders, receive their parameters (a generator of
        posted collectives, see ``async_schedule``); returns (got_local, got_global, healthy)."""
        topo = self.topology
        score = self.scores.score()
        healthy = math.isfinite(score) and self._params_finite()
        mine = torch.tensor([score if healthy else math.inf], dtype=torch.float64)
        (gathered,) = yield [self.comm.allgather_async(mine, name="scores")]
        scores = gathered.tolist()
        self.last_scores = scores
        group_leaders, global_leader = elect_all(scores, topo.groups)
        handles, levels = [], []
        if local and group_leaders[topo.group] is not None:
            self._local_leader = group_leaders[topo.group]
            handles += self._post_receive("local", self._local_leader, topo.process_set)
            levels.append("local")
        if global_ and global_leader is not None:
            self._global_leader = global_leader
            handles += self._post_receive("global", global_leader, self.comm.global_process_set)
            levels.append("global")
        yield handles
        for level in levels:  # the copies in flight become the current ones
            self._copies[level], self._incoming[level] = self._incoming[level], self._copies[level]
        return "local" in levels, "global" in levels, healthy

    def _exchanged(self) -> Dict[str, FlatBuffer]:
        """Every packed buffer that travels with the leader, by a rank-independent name."""
        out = {"param." + key_name(k): f for k, f in self.params.items()}
        out.update({"fbuf." + key_name(k): f for k, f in self.float_buffers.items()})
        out.update({"obuf." + key_name(k): f for k, f in self.other_buffers.items()})
        return out

    def _post_receive(self, level: str, leader: int, process_set) -> list:
        """Post the leader's broadcast of every exchanged buffer into the incoming buffers."""
        incoming = self._incoming[level]
        handles = []
        for name, flat in self._exchanged().items():
            buf = incoming.get(name)
            if buf is None:
                buf = incoming[name] = flat.like()
            if self.rank == leader:
                buf.copy_(flat.flat)
            handles.append(self.comm.broadcast_async_(buf, leader, name=f"{level}.{name}", process_set=process_set))
        return handles

    # ------------------------------------------------------------------ applying the forces
    def _leaders_for(self, kind: str, key, a: float, b: float):
        name = f"{kind}.{key_name(key)}"
        local = self._copies["local"].get(name) if a else None
        glob = self._copies["global"].get(name) if b else None
        return local, glob

    def _sgd_over_whole_model(self) -> bool:
        if type(self.optimizer) is not torch.optim.SGD:
            return False
        in_optimizer = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        in_model = {id(p) for flat in self.params.values() for p in flat.tensors}
        return in_optimizer == in_model

    def _fused_step(self, a: float, b: float) -> bool:
        """The whole update as one fused pass per buffer; False when this step cannot fuse."""
        groups = self.optimizer.param_groups
        hyper = {name: groups[0][name] for name in _SGD_HYPERPARAMS}
        if any(g.get("maximize", False) for g in groups) or any(
                any(g[name] != hyper[name] for name in _SGD_HYPERPARAMS) for g in groups[1:]):
            return False
        for flat in self.params.values():
            if any(p.grad is None or p.grad.is_sparse for p in flat.tensors):
                return False
        momentum = float(hyper["momentum"])
        plans = []
        for key, flat in self.params.items():
            first_step, buf = False, None
            if momentum != 0.0:
                state = self._momentum_state(key, flat)
                if state is None:
                    return False
                first_step, buf = state
            plans.append((key, flat, first_step, buf))
        with torch.no_grad():
            for key, flat, first_step, buf in plans:
                grad = self._grads.get(key)
                if grad is None:
                    grad = self._grads[key] = flat.like()
                flat.gather_grads(grad)
                local, glob = self._leaders_for("param", key, a, b)
                fused.two_force_update_(flat.flat, grad, buf, local, glob, lr=float(hyper["lr"]), momentum=momentum,
                                        dampening=float(hyper["dampening"]), weight_decay=float(hyper["weight_decay"]),
                                        nesterov=bool(hyper["nesterov"]), local_pull=a, global_pull=b,
                                        first_step=first_step)
                if first_step:  # from now on SGD's state is a view of our flat momentum buffer
                    for p, view in zip(flat.tensors, flat.views(buf)):
                        self.optimizer.state[p]["momentum_buffer"] = view
        self.fused_steps += 1
        return True

    def _momentum_state(self, key, flat: FlatBuffer):
        """(first_step, flat momentum buffer) keeping SGD's per-parameter state as its views,
        or None when some parameters have a buffer and others not (cannot fuse)."""
        buf = self._momentum.get(key)
        if buf is None:
            buf = self._momentum[key] = flat.like(0.0)
        existing = [self.optimizer.state[p].get("momentum_buffer") if p in self.optimizer.state else None
                    for p in flat.tensors]
        if all(e is None for e in existing):
            return True, buf
        if any(e is None for e in existing):
            return None
        for p, view, current in zip(flat.tensors, flat.views(buf), existing):
            if current.data_ptr() != view.data_ptr():  # e.g. after load_state_dict or unfused steps
                view.copy_(current)
                self.optimizer.state[p]["momentum_buffer"] = view
        return False, buf

    def _unfused_step(self, a: float, b: float) -> None:
        """The wrapped optimizer's own step, then both pulls fused, evaluated at the pre-step x."""
        pulling = a != 0.0 or b != 0.0
        if pulling:
            for key, flat in self.params.items():
                anchor = self._anchor.get(key)
                if anchor is None:
                    anchor = self._anchor[key] = flat.like()
                anchor.copy_(flat.flat)
        self.optimizer.step()
        if pulling:
            with torch.no_grad():
                for key, flat in self.params.items():
                    local, glob = self._leaders_for("param", key, a, b)
                    fused.leader_pull_(flat.flat, local, glob, local_pull=a, global_pull=b, anchor=self._anchor[key])

    def _pull_buffers(self, a: float, b: float, got_local: bool, got_global: bool) -> None:
        with torch.no_grad():
            for key, flat in self.float_buffers.items():
                local, glob = self._leaders_for("fbuf", key, a, b)
                if local is not None or glob is not None:
                    fused.leader_pull_(flat.flat, local, glob, local_pull=a, global_pull=b)
            # Integer buffers (e.g. batch-norm's num_batches_tracked) cannot be averaged: take the leader's.
            level = "global" if got_global else ("local" if got_local else None)
            if level is not None:
                for key, flat in self.other_buffers.items():
                    flat.flat.copy_(self._copies[level]["obuf." + key_name(key)])

    def _recover(self, level: str) -> None:
        """This worker diverged: take the leader's parameters and buffers, restart the optimizer state."""
        leader = self._global_leader if level == "global" else self._local_leader
        with torch.no_grad():
            for name, flat in self._exchanged().items():
                flat.flat.copy_(self._copies[level][name])
        self._log_recovery(f"the {level} leader's (rank {leader}) parameters")
        for buf in self._momentum.values():
            buf.zero_()
        self.scores = ScoreWindow(self.scores.window)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> Dict[str, Any]:
        state = self._base_state()
        state.update({
            "scores": self.scores.state_dict(),
            "local_leader": self._local_leader,
            "global_leader": self._global_leader,
            "copies": {level: {name: t.clone() for name, t in copies.items()} for level, copies in self._copies.items()},
        })
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._load_base_state(state)
        self.scores.load_state_dict(state["scores"])
        self._local_leader = state["local_leader"]
        self._global_leader = state["global_leader"]
        exchanged = self._exchanged()
        for level, copies in state["copies"].items():
            for name, tensor in copies.items():
                if name not in exchanged:
                    raise ValueError(f"state_dict holds a leader copy {name!r} that this model does not have")
                self._copies[level].setdefault(name, exchanged[name].like()).copy_(tensor)
