r"""GRAWA: pull every worker toward an average weighted by inverse gradient norms."""
from __future__ import annotations

from typing import Any, Dict

import torch

from horovod_leader import grawa_weights
from horovod_leader.optim.averaging import post_weighted_sum, pull_toward_, replace_all_
from horovod_leader.optim.base import DistributedWrapper
from horovod_leader.validation import check_bool, check_fraction, check_int, check_real


class GRAWA(DistributedWrapper):
    r"""Gradient-based weighted averaging (MGRAWA, or LGRAWA with ``layerwise=True``).

    Call ``step(loss)`` after ``loss.backward()``. At every call the wrapped optimizer steps.
    At the k-th call with ``period`` dividing k it is an averaging round: the norms of the
    gradient of that step (the ``.grad`` just computed, read before the optimizer uses it)
    give the weights

    .. math::

        w_i = \frac{1/\|g_i\|}{\sum_j 1/\|g_j\|}, \qquad
        x_C = \sum_i w_i\,x_i, \qquad x_i \leftarrow x_i - \lambda\,(x_i - x_C)

    computed after the optimizer's step. MGRAWA uses the true L2 norm of the whole gradient
    (the authors' code sums per-tensor norms instead); LGRAWA weights every parameter tensor
    by its own norms. ``norm_decay > 0`` smooths each worker's norms across rounds with a
    bias-corrected exponential average (the authors use about 0.43). ``prox > 0`` adds, after
    every other step, ``x <- x - (prox/period)(x - x_C)`` toward the last centre.

    Communication per round: one all-reduce of the inverse norms (one number, or one per
    tensor, plus a finite flag each) and one all-reduce of the weighted, packed parameters.
    Floating buffers (batch-norm statistics) are averaged with equal weights in the same round.

    A zero norm is clamped (large but finite weight); a non-finite norm gets weight 0; if every
    norm is non-finite the weights are equal. A worker with non-finite parameters contributes
    nothing and is reset to the centre, with its optimizer state cleared.

    ``asynchronous=True``: workers step at their own pace; a round starts when the steps of all
    workers together cross a multiple of ``size * period`` (``horovod_leader.async_schedule``),
    its collectives run while the worker keeps stepping, and the pull is applied to the
    worker's current parameters when the centre arrives (at most one round interval stale).

    Defaults are the authors' (CIFAR-10, ResNet-20, 4 workers): ``period=32``, ``pull=0.5``.
    """

    name = "grawa"

    def __init__(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module, period: int = 32,
                 pull: float = 0.5, layerwise: bool = False, prox: float = 0.0, norm_decay: float = 0.0, *,
                 asynchronous: bool = False, broadcast_buffers: bool = True, topology=None):
        self.period = check_int("period", period)
        self.pull = check_fraction("pull", pull)
        self.layerwise = check_bool("layerwise", layerwise)
        self.prox = check_fraction("prox", prox)
        self.norm_decay = check_real("norm_decay", norm_decay, 0.0, 1.0, high_open=True)
        check_bool("asynchronous", asynchronous)
        super().__init__(optimizer, model, topology=topology, broadcast_buffers=broadcast_buffers)
        self._tensors = [t for flat in self.params.values() for t in flat.tensors]  # packing order
        self._smoother = grawa_weights.NormSmoother(self.norm_decay)
        self._centre: Dict[Any, torch.Tensor] = {}     # last centre received (prox pulls toward it)
        self._incoming: Dict[Any, torch.Tensor] = {}   # the centre being all-reduced
        self._buffer_mean: Dict[Any, torch.Tensor] = {}
        self._norms = None
        self.last_weights = None  # this worker's weights in the last round (one, or one per tensor)
        self._setup_rounds(asynchronous, self.period)

    def step(self, loss=None) -> None:
        """One step of the wrapped optimizer; then an averaging round when one is due."""
        self._begin_step(loss)
        due = self._steps % self.period == 0
        if due or self.asynchronous:  # asynchronous rounds may start at any step
            self._norms = grawa_weights.grad_norms(self._tensors, self.layerwise)
        self.optimizer.step()
        if self.prox and self._centre and not due:
            for key, flat in self.params.items():
                pull_toward_(flat, self._centre[key], self.prox / self.period)
        if self.asynchronous:
            self._schedule.after_step(self._round, self._steps)
        elif due:
            self._run_round(self._steps // self.period)

    def _round(self, number: int):
        norms = self._smoother(self._norms)
        healthy = self._params_finite()
        mine = grawa_weights.local_terms(norms, healthy)
        summed = mine.clone()
        yield [self.comm.allreduce_async_(summed, name="norms")]
        weights = grawa_weights.weights_from_sums(mine, summed, self.size)
        self.last_weights = weights
        handles = post_weighted_sum(self.comm, self.params, self._incoming, weights, healthy, "centre")
        handles += post_weighted_sum(self.comm, self.float_buffers, self._buffer_mean,
                                     torch.tensor([1.0 / self.size]), True, "buffers")
        yield handles
        self._centre, self._incoming = self._incoming, self._centre
        for key, flat in self.params.items():
            pull_toward_(flat, self._centre[key], self.pull if healthy else 1.0)
        replace_all_(self.float_buffers, self._buffer_mean)
        if not healthy:
            self._log_recovery("the GRAWA centre")

    def state_dict(self) -> Dict[str, Any]:
        state = self._base_state()
        state["smoother"] = self._smoother.state_dict()
        state["centre"] = [self._centre[key].clone() for key in self.params if key in self._centre]
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._load_base_state(state)
        self._smoother.load_state_dict(state["smoother"])
        for (key, flat), centre in zip(self.params.items(), state["centre"]):
            self._centre.setdefault(key, flat.like()).copy_(centre)
