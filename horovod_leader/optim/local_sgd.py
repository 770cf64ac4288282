"""Local SGD (periodic model averaging): every ``period`` steps, replace every worker by the mean."""
from __future__ import annotations

from typing import Any, Dict

import torch

from horovod_leader.optim.averaging import divide_, post_healthy_count, post_weighted_sum, replace_all_
from horovod_leader.optim.base import DistributedWrapper, scalar_loss
from horovod_leader.validation import check_int


class LocalSGD(DistributedWrapper):
    r"""Every worker steps on its own; at the k-th ``step`` with ``period`` dividing k, after
    the optimizer's step, every worker is replaced by the plain average
    :math:`\bar x = \frac1p \sum_i x_i` (and floating buffers by theirs).

    One all-reduce of the packed parameters per round (with a one-number count of the workers
    whose parameters are finite: a diverged worker contributes nothing and is reset).
    """

    name = "localsgd"

    def __init__(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module, period: int = 4, *,
                 broadcast_buffers: bool = True, topology=None):
        self.period = check_int("period", period)
        super().__init__(optimizer, model, topology=topology, broadcast_buffers=broadcast_buffers)
        self._sum: Dict[Any, torch.Tensor] = {}
        self._buffer_sum: Dict[Any, torch.Tensor] = {}
        self._count = torch.zeros(1, dtype=torch.float64)
        self._setup_rounds(False, self.period)

    def step(self, loss=None) -> None:
        if loss is not None:
            scalar_loss(loss)
        self._check_packed()
        self._steps += 1
        self.optimizer.step()
        if self._steps % self.period == 0:
            self._run_round(self._steps // self.period)

    def _round(self, number: int):
        healthy = self._params_finite()
        handles = post_healthy_count(self.comm, healthy, self._count)
        handles += post_weighted_sum(self.comm, self.params, self._sum, None, healthy, "sum")
        handles += post_weighted_sum(self.comm, self.float_buffers, self._buffer_sum, None, healthy, "buffers")
        yield handles
        count = float(self._count)
        replace_all_(self.params, divide_(self._sum, count))
        replace_all_(self.float_buffers, divide_(self._buffer_sum, count))
        if not healthy:
            self._log_recovery("the average of the healthy workers")

    def state_dict(self) -> Dict[str, Any]:
        return self._base_state()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._load_base_state(state)
