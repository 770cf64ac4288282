r"""GRAWA: pull every worker toward an average weighted by inverse gradient norms."""
from __future__ import annotations

from typing import Any, Dict

import torch

from horovod_leader import grawa_weights
from horovod_leader.optim.averaging import pull_toward_, weighted_sum_
from horovod_leader.optim.base import DistributedWrapper, scalar_loss
from horovod_leader.validation import check_fraction, check_int, check_real


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

    Defaults are the authors' (CIFAR-10, ResNet-20, 4 workers): ``period=32``, ``pull=0.5``.
    """

    name = "grawa"

    def __init__(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module, period: int = 32,
                 pull: float = 0.5, layerwise: bool = False, prox: float = 0.0, norm_decay: float = 0.0, *,
                 broadcast_buffers: bool = True, topology=None):
        self.period = check_int("period", period)
        self.pull = check_fraction("pull", pull)
        if not isinstance(layerwise, bool):
            raise ValueError(f"layerwise must be True or False, got {layerwise!r}")
        self.layerwise = layerwise
        self.prox = check_fraction("prox", prox)
        self.norm_decay = check_real("norm_decay", norm_decay, 0.0, 1.0, high_open=True)
        super().__init__(optimizer, model, topology=topology, broadcast_buffers=broadcast_buffers)
        self._tensors = [t for flat in self.params.values() for t in flat.tensors]  # packing order
        self._smoother = grawa_weights.NormSmoother(self.norm_decay)
        self._centre: Dict[Any, torch.Tensor] = {}
        self._buffer_mean: Dict[Any, torch.Tensor] = {}
        self.last_weights = None  # this worker's weights in the last round (one, or one per tensor)

    def step(self, loss=None) -> None:
        """One step of the wrapped optimizer; an averaging round when ``period`` divides the count."""
        if loss is not None:
            scalar_loss(loss)
        self._check_packed()
        self._steps += 1
        averaging = self._steps % self.period == 0
        norms = grawa_weights.grad_norms(self._tensors, self.layerwise) if averaging else None
        self.optimizer.step()
        if averaging:
            self._average(self._smoother(norms))
        elif self.prox and self._centre:
            for key, flat in self.params.items():
                pull_toward_(flat, self._centre[key], self.prox / self.period)

    def _average(self, norms: torch.Tensor) -> None:
        healthy = self._params_finite()
        mine = grawa_weights.local_terms(norms, healthy)
        summed = mine.clone()
        self.comm.allreduce_(summed, name="norms")
        weights = grawa_weights.weights_from_sums(mine, summed, self.size)
        self.last_weights = weights
        weighted_sum_(self.comm, self.params, self._centre, weights, healthy, "centre")
        if self.float_buffers:
            weighted_sum_(self.comm, self.float_buffers, self._buffer_mean, torch.tensor([1.0 / self.size]), True,
                          "buffers")
            for key, flat in self.float_buffers.items():
                pull_toward_(flat, self._buffer_mean[key], 1.0)
        for key, flat in self.params.items():
            pull_toward_(flat, self._centre[key], self.pull if healthy else 1.0)
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
