r"""GRAWA: pull every worker toward an average weighted by inverse gradient norms."""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch

from horovod_leader import grawa_weights
from horovod_leader.compression import Codec, check_compression, name_of
from horovod_leader.optim.averaging import CompressedGather, CopyFromRoot, post_weighted_sum, pull_toward_
from horovod_leader.optim.base import DistributedWrapper, _refuse_overlap_with_async
from horovod_leader.optim.node_average import Part, node_mean
from horovod_leader.validation import check_bool, check_fraction, check_real


class GRAWA(DistributedWrapper):
    r"""Gradient-based weighted averaging (MGRAWA, or LGRAWA with ``layerwise=True``).

    Call ``step(loss)`` after ``loss.backward()``. At every call the wrapped optimizer steps.
    At the k-th call with ``period`` dividing k it is an averaging round, after the optimizer's
    step, with weights from gradient norms:

    .. math::

        w_i = \frac{1/\|g_i\|}{\sum_j 1/\|g_j\|}, \qquad
        x_C = \sum_i w_i\,x_i, \qquad x_i \leftarrow x_i - \lambda\,(x_i - x_C)

    Which gradient :math:`g_i`: by default the ``.grad`` of that step (read before the optimizer
    uses it); with ``fresh_loss`` (the authors' choice), the gradient of ``fresh_loss(model)``
    taken at the moment of averaging, typically on a fresh random batch from the whole training
    set; it is computed with ``torch.autograd.grad`` and leaves ``.grad`` untouched (the forward
    pass runs in the model's current mode, so in training mode it also updates batch-norm
    statistics, as in the authors' code). MGRAWA uses the true L2 norm of the whole gradient
    (the authors' code sums per-tensor norms instead); LGRAWA weights every parameter tensor
    by its own norms. ``norm_decay > 0`` smooths each worker's norms across rounds with a
    bias-corrected exponential average (the authors' 0.9^8, about 0.43). ``prox > 0`` adds,
    after every other step, ``x <- x - (prox/period)(x - x_C)`` toward the last centre.

    Communication per round: one all-reduce of ``x_i / ||g_i||`` (packed parameters, per tensor
    for LGRAWA) and, posted with it, one of ``[1/||g_i|| ...; health flag]`` and one of the
    floating buffers; the centre is their quotient (``horovod_leader.grawa_weights``). So a
    round completes as soon as every worker has joined it. Floating buffers (batch-norm
    statistics) are replaced by their plain mean over the healthy workers.

    Health: a worker whose norm, parameters or floating buffers are not finite enters no
    average (neither the centre, the norms nor the buffers) and is reset to the centre, its
    optimizer state cleared and the recovery logged. A zero norm is clamped (large but finite
    weight). When no worker is healthy, every rank raises ``AllWorkersDiverged``.

    ``asynchronous=True``: workers step at their own pace; a round starts when the steps of all
    workers together cross a multiple of ``size * period`` (``horovod_leader.async_schedule``),
    its collectives run while the worker keeps stepping, and the pull is applied to the
    worker's current parameters when the centre arrives (at most one round behind the count).

    ``compression="bf16"``/``"int8"``: the norms are all-gathered, and each worker's difference
    from the last centre travels compressed in an all-gather (``horovod_leader.compression``).

    ``overlap=d`` (synchronous only): the round posted at step k is applied at step k + d, its
    pull computed from what this worker sent at step k (``_apply``), while the exchange crosses
    the links.

    Defaults are the authors' (CIFAR-10, ResNet-20, 4 workers): ``period=32``, ``pull=0.5``;
    their ``prox`` is 0.01 and their ``norm_decay`` 0.9^8 (both off here by default).
    """

    name = "grawa"
    _uses_node_sets = True
    DEFAULT_PERIOD = 32
    DEFAULT_PULL = 0.5

    def __init__(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module, period: int = DEFAULT_PERIOD,
                 pull: float = DEFAULT_PULL, layerwise: bool = False, prox: float = 0.0, norm_decay: float = 0.0, *,
                 fresh_loss: Optional[Callable[[torch.nn.Module], Any]] = None, asynchronous: bool = False,
                 compression: Optional[str | Codec] = None, broadcast_buffers: bool = True, overlap: int = 0,
                 topology=None):
        self.pull = check_fraction("pull", pull)
        self.layerwise = check_bool("layerwise", layerwise)
        self.prox = check_fraction("prox", prox)
        self.norm_decay = check_real("norm_decay", norm_decay, 0.0, 1.0, high_open=True)
        if fresh_loss is not None and not callable(fresh_loss):
            raise ValueError(f"fresh_loss must be None or a callable fresh_loss(model) -> loss, "
                             f"got {type(fresh_loss).__name__}")
        self.fresh_loss = fresh_loss
        self.compression = check_compression(compression)
        self._asynchronous_given = check_bool("asynchronous", asynchronous)
        _refuse_overlap_with_async(overlap, asynchronous)
        super().__init__(optimizer, model, period=period, topology=topology, broadcast_buffers=broadcast_buffers,
                         overlap=overlap)
        self._tensors = [t for flat in self.params.values() for t in flat.tensors]  # packing order
        self._smoother = grawa_weights.NormSmoother(self.norm_decay)
        self._centre: Dict[Any, torch.Tensor] = {}     # last centre received (prox pulls toward it)
        self._incoming: Dict[Any, torch.Tensor] = {}   # the weighted sum being all-reduced
        self._buffer_sum: Dict[Any, torch.Tensor] = {}
        self._norms: Optional[torch.Tensor] = None
        self._gather = CompressedGather(self.compression) if self.compression else None
        self._others = CopyFromRoot(0)  # buffers that are not floating point: rank 0's
        self.last_weights = None  # this worker's weights in the last round (one, or one per tensor)
        self._setup_rounds(asynchronous, self.period)

    def _settings(self) -> Dict[str, Any]:
        return {**super()._settings(), "period": self.period, "pull": self.pull, "layerwise": self.layerwise,
                "prox": self.prox, "norm_decay": self.norm_decay, "fresh_loss": self.fresh_loss is not None,
                "asynchronous": self._asynchronous_given, "compression": name_of(self.compression)}

    def step(self, loss=None) -> None:
        """One step of the wrapped optimizer; then an averaging round when one is due."""
        self._begin_step(loss)
        due = self._steps % self.period == 0
        if self.fresh_loss is None and (due or self.asynchronous):  # asynchronous rounds start at any step
            self._norms = grawa_weights.grad_norms(self._tensors, self.layerwise)
        self.optimizer.step()
        if self.prox and self._centre and not due:
            for key, flat in self.params.items():
                pull_toward_(flat, self._centre[key], self.prox / self.period)
        if self.asynchronous:
            self._schedule.after_step(self._async_round, self._steps)
            return
        self._advance_in_flight()
        if due:
            self._start_round(self._steps // self.period)

    def _round_norms(self) -> torch.Tensor:
        """The gradient norms that weigh this worker in this round."""
        if self.fresh_loss is None:
            if self._norms is None:  # no step yet (a round served by close())
                self._norms = grawa_weights.grad_norms(self._tensors, self.layerwise)
            return self._norms
        loss = self.fresh_loss(self.model)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
            raise ValueError("fresh_loss(model) must return a scalar loss tensor computed from the model")
        grads = torch.autograd.grad(loss.reshape(()), self._tensors, allow_unused=True)
        return grawa_weights.norms_of(grads, self.layerwise)

    def _round(self, number: int, joined: bool = False):
        """One averaging round; ``joined``: this rank has closed and only takes part."""
        if joined:
            healthy = True
            terms = grawa_weights.local_terms(torch.zeros(len(self._tensors) if self.layerwise else 1,
                                                          dtype=torch.float64), False)
        else:
            healthy = self._healthy()
            terms = grawa_weights.local_terms(self._smoother(self._round_norms()), self._may_contribute())
        contributes = grawa_weights.contributes(terms)
        healthy = healthy and (contributes or joined or self._reset_since_step)  # a non-finite norm is unhealthy too
        if self._in_flight is not None and self.fresh_loss is not None:
            # fresh_loss's forward pass (training mode) moved the batch-norm statistics: what is
            # sent, and what the correction is computed from, is the buffers as they are now
            self._in_flight.snapshot["buffers"] = {key: flat.flat.clone() for key, flat in self.float_buffers.items()}
        if self._nodes is not None:
            summed = yield from self._node_round(terms, contributes)
        else:
            summed = yield from self._flat_round(terms, contributes, joined)
        outcome = {"joined": joined, "healthy": healthy, "others": self._others.incoming if self.other_buffers else {},
                   "diverged": None if grawa_weights.healthy_count(summed) else f"averaging round {number}"}
        if not joined and not outcome["diverged"]:
            outcome.update(weights=grawa_weights.weights_from_sums(terms, summed), centre=self._incoming,
                           buffers=self._buffer_sum)
        yield from self._hold(outcome)
        self._apply(outcome)

    def _flat_round(self, terms: torch.Tensor, contributes: bool, joined: bool):
        """Every rank's weighted parameters in one all-reduce (compressed: an all-gather of every
        rank's difference from the last centre), the centre and mean buffers computed here;
        returns the summed terms ``[1/norm ...; count]``."""
        if self._gather is None:
            summed = terms.clone()
            handles = [self.comm.allreduce_async_(summed, name="norms")]
            handles += post_weighted_sum(self.comm, self.params, self._incoming, grawa_weights.inverse_norms(terms),
                                         contributes, "centre")
        else:  # every worker's terms, and its compressed difference from the last centre
            handles = [self.comm.allgather_async(terms.reshape(1, -1), name="norms")]
            handles += self._gather.post(self.comm, self.params, self._centre, contributes, "centre")
        handles += post_weighted_sum(self.comm, self.float_buffers, self._buffer_sum, None, contributes, "buffers")
        handles += self._others.post(self.comm, self.other_buffers, "others")
        results = yield handles
        if self._gather is not None:
            summed = results[0].sum(0)
        count = grawa_weights.healthy_count(summed)
        if count and not joined:
            if self._gather is None:
                self._normalise(grawa_weights.inverse_norms(summed))
            else:
                inverse = results[0][:, :-1]
                weights = inverse / inverse.sum(0).clamp_min(torch.finfo(torch.float64).tiny)
                self._gather.combine(results[1:], self.params, self._centre,
                                     weights if self.layerwise else weights[:, 0], self._incoming)
            for buf in self._buffer_sum.values():
                buf.div_(count)
        return summed

    def _node_round(self, terms: torch.Tensor, contributes: bool):
        """The node-aware round (``horovod_leader.optim.node_average``): one payload per node
        across the links, compressed on that hop only; returns the summed terms."""
        parts = [Part(self.params, self._incoming, grawa_weights.inverse_norms(terms), self.compression, self._centre),
                 Part(self.float_buffers, self._buffer_sum)]
        extra = self._others.post(self.comm, self.other_buffers, "others")
        (param_totals, _), count = yield from node_mean(self.comm, self._nodes, parts, contributes, "grawa", extra)
        inverse = param_totals if self.layerwise else param_totals[:1]  # MGRAWA: one weight, spread over its tensors
        return torch.cat([inverse, torch.tensor([float(count)], dtype=torch.float64)])

    def _apply(self, outcome) -> None:
        r"""The pull toward the weighted centre, :math:`x \leftarrow x - \lambda (x - x_C)`.
        Overlapped by d steps, the centre is that of what the workers sent at step k and the
        pull is computed from this worker's, :math:`s = x_k`, and applied at step k + d:
        :math:`x \leftarrow x - \lambda (s - x_C)`."""
        if outcome.get("diverged"):
            raise self._all_diverged(outcome["diverged"])
        self._adopt_others(outcome["others"])
        if outcome["joined"]:
            return
        self.last_weights = outcome["weights"]
        self._centre, self._incoming = outcome["centre"], self._centre
        reset = not outcome["healthy"] or (self._in_flight is not None and not self._healthy())
        self._correct_(self.params, self._centre, self.pull, reset=reset)
        self._correct_(self.float_buffers, outcome["buffers"], 1.0, which="buffers", reset=reset)
        if reset:
            self._log_recovery("the GRAWA centre")

    def _normalise(self, total_inverse: torch.Tensor) -> None:
        """Weighted sums into the centre: divide by the summed weights (per tensor for LGRAWA)."""
        offset = 0
        with torch.no_grad():
            for key, flat in self.params.items():
                buf = self._incoming[key]
                if total_inverse.numel() == 1:
                    buf.div_(float(total_inverse))
                else:
                    for view, total in zip(flat.views(buf), total_inverse[offset:offset + len(flat.tensors)].tolist()):
                        view.div_(total)
                offset += len(flat.tensors)

    _required_state = ("smoother", "centre")

    def _state(self) -> Dict[str, Any]:
        # the last weighted centre: the proximal pull's target and the compressed rounds' reference
        return {"smoother": self._smoother.state_dict(), "centre": self._named(self._centre)}

    def _load_state(self, state: Dict[str, Any]) -> None:
        self._smoother.load_state_dict(state["smoother"])
        self._restore_named(state["centre"], self.params, "centre", self._centre)
