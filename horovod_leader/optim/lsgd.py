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
from horovod_leader.async_schedule import Together
from horovod_leader.compression import Codec, check_compression, name_of
from horovod_leader.election import ScoreWindow, elect_all
from horovod_leader.packing import key_name
from horovod_leader.optim.base import DistributedWrapper, _refuse_overlap_with_async
from horovod_leader.optim.two_force import TwoForceStep
from horovod_leader.validation import check_bool, check_fraction, check_int, check_multiple


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
    * :math:`b` = ``global_pull`` at a global refresh, plus ``prox / global_period``;
    * both are exactly 0 on the worker whose copy it is: the leader of a level is never pulled
      at that level, neither by the refresh nor by the proximal pull toward its own copy, so a
      worker that always leads follows its optimizer exactly.

    With a single group (one node, or ``group_size`` = world size) the group leader is the
    global leader and only the global force acts (plain LSGD).

    When the wrapped optimizer is ``torch.optim.SGD`` the whole update (momentum, Nesterov,
    weight decay and both pulls) is one fused pass over each packed parameter buffer
    (``horovod_leader.fused``); for any other optimizer, its own step runs and the two pulls
    are fused after it, evaluated at the pre-step parameters.

    A worker whose score, parameters or floating buffers are not finite never leads; at the
    next refresh its parameters are reset to the leader's, its optimizer state cleared, and the
    recovery logged. When no worker is healthy in a refresh, every rank raises
    ``AllWorkersDiverged`` naming the step.

    ``asynchronous=True`` (the paper's Algorithm 1): workers step at their own pace; refresh
    round n starts when the steps of all workers together reach ``n * size * period`` (with
    one group, ``size * global_period``), counted with one-sided MPI atomics, so a fast worker
    takes more steps between refreshes than a slow one. A round is one set of non-blocking
    collectives posted together: the gathering of the scores, and the broadcasts of the leaders
    elected from the scores gathered in the *previous* round (so the first round only gathers).
    Pipelining the election this way makes a round complete as soon as every worker has joined
    it, with no second exchange that would wait for the slowest worker's next step. The worker
    keeps stepping while the round is in flight; the pull
    ``x <- x - a (x - x_group) - b (x - x_global)`` is applied to its current parameters when the
    copies arrive (a leader's own pull is 0). A received copy that is not finite (its sender
    diverged after it was elected) is discarded. Rounds keep pace with the global count and
    start at most one round behind it (``horovod_leader.async_schedule``). Ranks may stop at
    different step counts: ``close()`` keeps serving due refreshes until every rank has closed.

    Args:
        optimizer: any ``torch.optim.Optimizer`` over ``model``'s parameters.
        model: the model; its parameters and buffers are packed into flat buffers (values
            unchanged). Move it to its device before wrapping.
        period: local refresh period :math:`\tau` (default ``DEFAULT_PERIOD`` = 4).
        global_period: global refresh period :math:`\tau_G`, a multiple of ``period``
            (default: ``period``, so that one group refreshes every ``period`` steps). The
            authors use :math:`\tau_G \in \{4, 16, 64\}`, :math:`\tau = \tau_G/4`, which is the
            training command's default (``CLI_GLOBAL_PERIOD_FACTOR`` x ``--period``): it follows
            the authors' protocol, where the library keeps the single-level default.
        local_pull: :math:`\lambda`, in [0, 1] (authors' default 0.1).
        global_pull: :math:`\lambda_G`, in [0, 1] (authors' default 0.1).
        prox: per-step proximal pull p, in [0, 1] (authors use 0.1; default 0, off).
        score_window: number of recent losses averaged into the score (default: ``period``).
        broadcast_buffers: send the leader's buffers (batch-norm statistics) with its
            parameters; floating buffers are pulled like parameters, others are copied.
        asynchronous: run the asynchronous variant described above.
        compression: ``None``, ``"bf16"`` or ``"int8"``: the leaders' parameters travel as the
            compressed difference from the copy every receiver already holds
            (``horovod_leader.compression``): 1/2 or about 1/4 of the bytes. Buffers travel
            uncompressed, as in the averaging methods.
        fused: ``None`` (auto: fuse when the optimizer is plain SGD), ``False`` never.
        overlap: d, an integer in [0, ``period``): a synchronous refresh posted at step k is
            applied at step k + d, its pulls computed from this worker's parameters at step k
            (``_apply``), while the broadcasts cross the links; 0: at once (the method as
            published). Not with ``asynchronous``, whose refreshes overlap already.
        topology: a ``Topology`` from ``horovod_leader.init``; default: the current one.
    """

    name = "lsgd"
    _uses_node_sets = True
    _state_world_keys = ("size", "groups")  # the leaders, and where each copy came from, are ranks
    _announces_rounds = False  # the score rows announce a refresh to ranks that closed early

    def _settings(self) -> Dict[str, Any]:
        return {**super()._settings(), "period": self.period, "global_period": self.global_period,
                "local_pull": self.local_pull, "global_pull": self.global_pull, "prox": self.prox,
                "score_window": self.scores.window, "asynchronous": self._asynchronous_given,
                "compression": name_of(self.compression), "fused": self._fused_given}

    DEFAULT_PERIOD = 4
    DEFAULT_PULL = 0.1  # lambda and lambda_G, the authors' (LSGD code train.sh: c1 = c2 = 0.1)
    CLI_GLOBAL_PERIOD_FACTOR = 4  # the training command's tau_G = 4 tau (see ``global_period``)

    def __init__(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module, period: int = DEFAULT_PERIOD,
                 global_period: Optional[int] = None, local_pull: float = DEFAULT_PULL,
                 global_pull: float = DEFAULT_PULL, prox: float = 0.0, score_window: Optional[int] = None, *,
                 asynchronous: bool = False, compression: Optional[str | Codec] = None, broadcast_buffers: bool = True,
                 fused: Optional[bool] = None, overlap: int = 0, topology=None):
        # Validate everything before the base class communicates.
        period = check_int("period", period)
        self.global_period = period if global_period is None else check_int("global_period", global_period)
        check_multiple("global_period", self.global_period, "period", period)
        self.local_pull = check_fraction("local_pull", local_pull)
        self.global_pull = check_fraction("global_pull", global_pull)
        self.prox = check_fraction("prox", prox)
        self.scores = ScoreWindow(period if score_window is None else check_int("score_window", score_window))
        if fused not in (None, True, False):
            raise ValueError(f"fused must be None, True or False, got {fused!r}")
        self._asynchronous_given = check_bool("asynchronous", asynchronous)
        self._fused_given = fused
        self.compression = check_compression(compression)
        _refuse_overlap_with_async(overlap, asynchronous)
        super().__init__(optimizer, model, period=period, topology=topology, broadcast_buffers=broadcast_buffers,
                         overlap=overlap)
        self._update = TwoForceStep(optimizer, self.params, allow_fused=fused is not False)
        if fused is True and not self._update.fuse_allowed:
            raise ValueError("fused=True needs a torch.optim.SGD optimizer (the fused kernel is SGD's update)")
        self._multi = self.topology.num_groups > 1
        self._local_leader: Optional[int] = None
        self._global_leader: Optional[int] = None
        self.last_scores: Optional[List[float]] = None
        # Last received leader copies, one flat tensor per packed buffer ("local"/"global"),
        # the rank each came from, and the buffers a broadcast in flight writes into (swapped
        # in when it completes).
        self._copies: Dict[str, Dict[str, torch.Tensor]] = {"local": {}, "global": {}}
        self._copy_source: Dict[str, Optional[int]] = {"local": None, "global": None}
        self._incoming: Dict[str, Dict[str, torch.Tensor]] = {"local": {}, "global": {}}
        self._payloads: Dict[str, list] = {"local": [], "global": []}  # compressed broadcasts in flight
        self._unit = self.period if self._multi else self.global_period  # steps per round
        self._setup_rounds(asynchronous, self._unit)

    # ------------------------------------------------------------------ public state
    @property
    def global_leader(self) -> Optional[int]:
        """Global rank of the current global leader (None before the first global election)."""
        return self._global_leader

    @property
    def local_leader(self) -> Optional[int]:
        """Global rank of this rank's current group leader (the global leader with one group)."""
        return self._local_leader if self._multi else self._global_leader

    @property
    def fused_steps(self) -> int:
        """How many steps took the fused path."""
        return self._update.fused_steps

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
        if self.overlap:
            self._overlapped_step(k)
            return
        got_local = got_global = False
        if k % self._unit == 0:
            self._driver.start(self._round(k // self._unit), block=True)
            got_local, got_global, healthy = self._driver.result
            if not healthy and (got_local or got_global):
                self._recover("global" if got_global else "local")
                return
        a = self._coefficient("local", self.local_pull if got_local else 0.0, self.period) if self._multi else 0.0
        b = self._coefficient("global", self.global_pull if got_global else 0.0, self.global_period)
        self._update(a, b, self._leaders_for)
        self._pull_buffers(a, b, got_local, got_global)

    def _overlapped_step(self, k: int) -> None:
        """``overlap`` = d > 0: a refresh posted d steps ago is applied (``_apply``: its pulls,
        from its snapshot); a refresh due now is posted with a snapshot of this worker,
        :math:`s = x_k` (what a leader sends, as at d = 0), to go on while it steps; then the
        gradient step with the per-step proximal pulls toward the copies already held. A
        worker reset to a leader's copy takes no step this time, as at d = 0."""
        self._advance_in_flight()
        if k % self._unit == 0:
            self._start_round(k // self._unit)
        if self._reset_since_step:
            return
        a = self._coefficient("local", 0.0, self.period) if self._multi else 0.0
        b = self._coefficient("global", 0.0, self.global_period)
        self._update(a, b, self._leaders_for)
        self._pull_buffers(a, b, False, False)

    def _async_step(self) -> None:
        """Gradient step with the per-step proximal pulls, then count it and serve refreshes."""
        a = self._coefficient("local", 0.0, self.period) if self._multi else 0.0
        b = self._coefficient("global", 0.0, self.global_period)
        self._update(a, b, self._leaders_for)
        self._pull_buffers(a, b, False, False)
        self._schedule.after_step(self._async_round, self._steps)

    def _coefficient(self, level: str, refresh_pull: float, period: int) -> float:
        """This step's pull toward the ``level`` copy: 0 when this rank sent that copy."""
        source = self._copy_source[level]
        if source is None or source == self.rank:
            return 0.0
        return refresh_pull + self.prox / period

    # ------------------------------------------------------------------ synchronous refresh
    def _gather_scores(self, local: bool = False, global_: bool = False, joined: bool = False):
        """Post the all-gather of this rank's row ``[score, stepping, local, global]``; returns
        (handle, healthy). The score is +inf when this rank may not lead (unhealthy, just reset,
        or closed); the other columns announce the round to ranks that closed early."""
        score = self.scores.score()
        healthy = math.isfinite(score) and self._healthy()
        may_lead = healthy and self._may_contribute() and not joined
        stepping = 0.0 if joined else 1.0
        mine = torch.tensor([[score if may_lead else math.inf, stepping, stepping * local, stepping * global_]],
                            dtype=torch.float64)
        return self.comm.allgather_async(mine, name="scores"), healthy

    def _elect(self, scores: List[float], detail: str = ""):
        """Leaders of every group and the global leader; every rank raises when none is healthy."""
        self.last_scores = scores
        group_leaders, global_leader = elect_all(scores, self.topology.groups)
        if global_leader is None:
            raise self._all_diverged(detail)
        return group_leaders[self.topology.group], global_leader

    def _elect_and_receive(self, local: bool, global_: bool, joined: bool = False):
        """Synchronous refresh: gather everyone's score, elect the leaders, receive their
        parameters (a generator of posted collectives, see ``async_schedule``); returns
        (got_local, got_global, healthy). ``joined``: this rank has closed; it learns from the
        gathered rows which refresh the stepping ranks run (None when none is stepping)."""
        handle, healthy = self._gather_scores(local, global_, joined)
        (table,) = yield Together([handle])  # a few bytes: an overlapped refresh waits for them at once
        if joined:
            if float(table[:, 1].sum()) == 0.0:
                return None
            local, global_ = bool(table[:, 2].sum() > 0), bool(table[:, 3].sum() > 0)
        group_leader, global_leader = self._elect(table[:, 0].tolist())
        levels = []
        if local and group_leader is not None:  # None: every worker of this group diverged
            levels.append(("local", group_leader))
        if global_:
            levels.append(("global", global_leader))
        yield from self._receive(levels, self._sources())
        for level, _ in levels:
            self._decode(level)
        outcome = {"levels": levels, "healthy": healthy, "incoming": {level: self._incoming[level] for level, _ in levels}}
        yield from self._hold(outcome)
        return self._apply(outcome)

    def _apply(self, outcome):
        r"""The copies received become the current ones, and their senders the leaders; returns
        (got_local, got_global, healthy). Overlapped by d steps, the refresh's pulls are then
        computed from the snapshot :math:`s = x_k` this worker had when the refresh was posted,
        and applied at step k + d: :math:`x \leftarrow x - a (s - \tilde x_{group}) - b (s - \tilde x)`
        (the leader's snapshot is the copy it sent: it is not pulled)."""
        for level, leader in outcome["levels"]:
            self._incoming[level] = outcome["incoming"][level]  # the same dict, or one from a checkpoint
            self._accept(level, leader)
            if level == "local":
                self._local_leader = leader
            else:
                self._global_leader = leader
        received = {level for level, _ in outcome["levels"]}
        got_local, got_global, healthy = "local" in received, "global" in received, outcome["healthy"]
        if self._in_flight is not None and (got_local or got_global):
            if not (healthy and self._healthy()):
                self._recover("global" if got_global else "local")
            else:
                self._pull_from_snapshot(got_local, got_global)
        return got_local, got_global, healthy

    def _sources(self):
        """What a leader sends: its snapshot while an overlapped refresh is in flight (it keeps
        stepping meanwhile), else its packed buffers as they are (None)."""
        if self._in_flight is None:
            return None
        snap = self._in_flight.snapshot
        out = {"param." + key_name(k): t for k, t in snap["params"].items()}
        out.update({"fbuf." + key_name(k): t for k, t in snap["buffers"].items()})
        out.update({"obuf." + key_name(k): t for k, t in snap["others"].items()})
        return out

    def _pull_from_snapshot(self, got_local: bool, got_global: bool) -> None:
        """The refresh's pulls, computed from the snapshot and added to the current parameters."""
        a = self.local_pull if got_local and self._copy_source["local"] != self.rank else 0.0
        b = self.global_pull if got_global and self._copy_source["global"] != self.rank else 0.0
        snap = self._in_flight.snapshot
        with torch.no_grad():
            for key, flat in self.params.items():
                local_copy, global_copy = self._leaders_for(key, a, b)
                if local_copy is not None or global_copy is not None:
                    fused.leader_pull_(flat.flat, local_copy, global_copy, local_pull=a, global_pull=b,
                                       anchor=snap["params"][key])
            for key, flat in self.float_buffers.items():
                local_copy, global_copy = self._leaders_for(key, a, b, kind="fbuf")
                if local_copy is not None or global_copy is not None:
                    self._constants.pull_keeping_constants_("fbuf." + key_name(key), flat.flat, local_copy,
                                                            global_copy, a, b, anchor=snap["buffers"][key])
        self._pull_buffers(0.0, 0.0, got_local, got_global)  # the integer buffers: the leader's

    def _join_rounds(self) -> None:
        """Synchronous close: take part in the others' refreshes (never leading, never pulled)
        until every rank has closed."""
        while True:
            self._driver.start(self._round(self._steps // self._unit, joined=True), block=True)
            if self._driver.result is None:
                return

    def _round(self, number: int, joined: bool = False):
        """Refresh ``number``, at step ``number * unit`` (``unit``: ``period`` with several
        groups, ``global_period`` with one): synchronous (``_elect_and_receive``: local with
        several groups, global when ``global_period`` divides the step; a ``joined`` rank
        learns which from the gathered rows) or asynchronous (``_async_refresh``)."""
        if self.asynchronous:
            return (yield from self._async_refresh(number))
        global_ = (number * self._unit) % self.global_period == 0
        return (yield from self._elect_and_receive(self._multi, global_, joined))

    # ------------------------------------------------------------------ asynchronous round
    def _async_refresh(self, number: int):
        """Asynchronous round ``number``: gather the scores and, at the same time, receive the
        copies of the leaders elected in the previous round; then pull toward them."""
        global_ = (number * self._schedule.unit) % (self.size * self.global_period) == 0
        handle, healthy = self._gather_scores()
        levels = []
        if self._multi and self._local_leader is not None:
            levels.append(("local", self._local_leader))
        if global_ and self._global_leader is not None:
            levels.append(("global", self._global_leader))
        results = yield from self._receive(levels, first=[handle])
        detail = f"asynchronous round {number}, global step total {self._schedule.last_total}"
        self._local_leader, self._global_leader = self._elect(results[0][:, 0].tolist(), detail)
        got = {level: self._accept(level, leader, check_finite=True) for level, leader in levels}
        got_local, got_global = got.get("local", False), got.get("global", False)
        if not healthy and (got_local or got_global):
            self._recover("global" if got_global else "local")
            return
        # The round's pulls; the sender of a copy is not pulled toward it.
        a = self.local_pull if got_local and self._copy_source["local"] != self.rank else 0.0
        b = self.global_pull if got_global and self._copy_source["global"] != self.rank else 0.0
        with torch.no_grad():
            for key, flat in self.params.items():
                local_copy, global_copy = self._leaders_for(key, a, b)
                if local_copy is not None or global_copy is not None:
                    fused.leader_pull_(flat.flat, local_copy, global_copy, local_pull=a, global_pull=b)
        self._pull_buffers(a, b, got_local, got_global)

    # ------------------------------------------------------------------ exchanging copies
    def _prepare(self, level: str, leader: int, sources=None) -> list:
        """The tensors a ``level`` copy travels in, as (tensor, collective name): every exchanged
        buffer, in its incoming buffer; the leader fills them (``sources``: what it sends by
        buffer name, default its packed buffers).

        With ``compression``, a parameter buffer of the global copy travels as the compressed
        difference from the last global copy, which every rank already holds (zeros before the
        first), and is decoded on arrival (``_decode``). The copies inside a node (the local
        level) travel uncompressed: they cross no link."""
        incoming = self._incoming[level]
        items, self._payloads[level] = [], []
        # Asynchronous rounds broadcast the copy of a leader elected one round earlier. If that
        # leader has since been reset, its parameters are only some other worker's copy: it
        # sends NaN, which every receiver discards. Otherwise resets could feed on one another
        # and keep finite copies circulating while in truth every worker keeps diverging.
        withdrawn = self.asynchronous and self.rank == leader and not self._may_contribute()
        for name, flat in self._exchanged().items():
            buf = incoming.get(name)
            if buf is None:
                buf = incoming[name] = flat.like()
            source = flat.flat if sources is None else sources[name]
            if withdrawn and source.is_floating_point():
                source = torch.full_like(source, math.nan)
            if self.compression and level == "global" and name.startswith("param."):  # buffers travel as they are
                ref = self._copies[level].get(name)
                if self.rank == leader:
                    payload = self.compression.encode_diff(source, ref)  # one pass: difference and encoding
                else:
                    payload = self.compression.payload_like(flat.numel, flat.flat.device)
                self._payloads[level].append((name, ref, payload))
                items += [(part, f"{level}.{name}.{j}") for j, part in enumerate(payload)]
                continue
            if self.rank == leader:
                buf.copy_(source)
            items.append((buf, f"{level}.{name}"))
        return items

    def _bcast(self, items: list, root: int, process_set, tag: str = "", counted: bool = True) -> list:
        return [self.comm.broadcast_async_(tensor, root, name=name + tag, process_set=process_set, counted=counted)
                for tensor, name in items]

    def _receive(self, levels, sources=None, first=()):
        """Receive the copies of ``levels`` [(level, leader)] (a generator for ``yield from``;
        ``first``: handles posted with the first phase, whose results it returns).

        The local copy goes inside the node (over shared memory on the CPU, outside Horovod's
        queue: ``Topology.node_sets``). The global copy, when the topology is node-aware, goes
        in three phases, each posted once the one before has arrived, so that each link carries
        it once: inside the leader's node, then across the links among the nodes' first ranks,
        then inside every other node; otherwise in one broadcast to everyone."""
        topo, nodes = self.topology, self._nodes
        in_node = nodes.in_node if nodes is not None else topo.process_set
        phase1, relayed = list(first), None
        for level, leader in levels:
            items = self._prepare(level, leader, sources)
            if level == "local":
                phase1 += self._bcast(items, leader, in_node)
            elif nodes is None:
                phase1 += self._bcast(items, leader, self.comm.global_process_set)
            else:
                source = topo.group_of(leader)
                if topo.group == source and nodes.group_size > 1:
                    phase1 += self._bcast(items, leader, in_node, ".node")
                relayed = (items, source)
        # an overlapped refresh waits at once for what stays inside the node, so that the hop
        # across the links starts now (``Together``); anything else it polls
        in_node_only = not first and (nodes is not None or not any(level == "global" for level, _ in levels))
        results = yield (Together(phase1) if in_node_only else phase1)
        if relayed is not None:  # each rank counts the copy once in comm_bytes, where it first arrives
            items, source = relayed
            first_hop = topo.group == source and nodes.group_size > 1  # this rank took part in the ".node" hop
            yield (self._bcast(items, nodes.node_leaders[source], nodes.leaders, ".cross", counted=not first_hop)
                   if nodes.is_relay else [])
            spread = topo.group != source and nodes.group_size > 1
            yield (self._bcast(items, nodes.relay, in_node, ".spread", counted=not nodes.is_relay) if spread else [])
        return results[:len(first)]

    def _decode(self, level: str) -> None:
        """Compressed copies that arrived, decoded into the incoming buffers: ref + difference."""
        incoming = self._incoming[level]
        for name, ref, payload in self._payloads[level]:
            self.compression.decode_into(payload, incoming[name], ref)  # one pass: decoding and adding back
        self._payloads[level] = []

    def _accept(self, level: str, leader: int, check_finite: bool = False) -> bool:
        """The copy in flight becomes the current one (unless it is not finite)."""
        self._decode(level)
        incoming = self._incoming[level]
        if check_finite and not all(self._constants.finite(name, t) for name, t in incoming.items()
                                    if t.is_floating_point()):
            return False
        self._copies[level], self._incoming[level] = incoming, self._copies[level]
        self._copy_source[level] = leader
        return True

    # ------------------------------------------------------------------ applying the forces
    def _leaders_for(self, key, a: float, b: float, kind: str = "param"):
        name = f"{kind}.{key_name(key)}"
        local = self._copies["local"].get(name) if a else None
        glob = self._copies["global"].get(name) if b else None
        return local, glob

    def _pull_buffers(self, a: float, b: float, got_local: bool, got_global: bool) -> None:
        with torch.no_grad():
            for key, flat in self.float_buffers.items():
                local, glob = self._leaders_for(key, a, b, kind="fbuf")
                if local is not None or glob is not None:  # a -inf mask pulled toward -inf stays -inf
                    self._constants.pull_keeping_constants_("fbuf." + key_name(key), flat.flat, local, glob, a, b)
            # Integer buffers (e.g. batch-norm's num_batches_tracked) cannot be averaged: take
            # the leader's, unless this rank is that leader.
            level = "global" if got_global else ("local" if got_local else None)
            if level is not None and self._copy_source[level] != self.rank:
                self._adopt_others({key: self._copies[level]["obuf." + key_name(key)] for key in self.other_buffers})

    def _recover(self, level: str) -> None:
        """This worker diverged: take the leader's parameters and buffers, restart the optimizer state."""
        with torch.no_grad():
            for name, flat in self._exchanged().items():
                flat.flat.copy_(self._copies[level][name])
        self._log_recovery(f"the {level} leader's (rank {self._copy_source[level]}) parameters")
        self._update.reset_momentum()
        self.scores = ScoreWindow(self.scores.window)

    # ------------------------------------------------------------------ checkpointing
    _required_state = ("scores", "local_leader", "global_leader", "copies")

    def _state(self) -> Dict[str, Any]:
        return {"scores": self.scores.state_dict(), "local_leader": self._local_leader,
                "global_leader": self._global_leader, "copy_source": dict(self._copy_source),
                "copies": {level: {name: t.clone() for name, t in copies.items()}
                           for level, copies in self._copies.items()}}

    def _load_state(self, state: Dict[str, Any]) -> None:
        self.scores.load_state_dict(state["scores"])
        self._local_leader = state["local_leader"]
        self._global_leader = state["global_leader"]
        exchanged = self._exchanged()
        for level, copies in state["copies"].items():
            for name, tensor in copies.items():
                if name not in exchanged:
                    raise ValueError(f"state_dict holds a leader copy {name!r} that this model does not have")
                self._copies[level].setdefault(name, exchanged[name].like()).copy_(tensor)
        # Older checkpoints name no source: the copy came from that level's leader.
        default = {"local": self.local_leader if self._copies["local"] else None,
                   "global": self._global_leader if self._copies["global"] else None}
        self._copy_source = {level: state.get("copy_source", default).get(level) for level in ("local", "global")}
