"""Local SGD (periodic model averaging): every ``period`` steps, replace every worker by the mean."""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from horovod_leader.compression import check_compression
from horovod_leader.optim.averaging import MeanRound, replace_all_
from horovod_leader.optim.base import DistributedWrapper
from horovod_leader.validation import check_int


class LocalSGD(DistributedWrapper):
    r"""Every worker steps on its own; at the k-th ``step`` with ``period`` dividing k, after
    the optimizer's step, every worker is replaced by the plain average
    :math:`\bar x = \frac1p \sum_i x_i` (and floating buffers by theirs).

    One all-reduce of the packed parameters per round (with a one-number count of the healthy
    workers, those whose parameters and floating buffers are finite: a diverged worker
    contributes nothing and is reset). When no worker is healthy, every rank raises
    ``AllWorkersDiverged``. ``compression="bf16"``/``"int8"``: each worker sends its difference
    from the last average, compressed, in an all-gather (``horovod_leader.compression``).
    """

    name = "localsgd"

    def __init__(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module, period: int = 4, *,
                 compression: Optional[str] = None, broadcast_buffers: bool = True, topology=None):
        self.period = check_int("period", period)
        self.compression = check_compression(compression)
        super().__init__(optimizer, model, topology=topology, broadcast_buffers=broadcast_buffers)
        self._mean = MeanRound(self.compression)
        self._last_average: Dict = {}  # the reference of compressed rounds: the same on every rank
        self._setup_rounds(False, self.period)

    def _settings(self) -> Dict[str, Any]:
        return {**super()._settings(), "period": self.period, "compression": self.compression}

    def step(self, loss=None) -> None:
        """One step of the wrapped optimizer; every ``period`` steps, the averaging round."""
        self._step_then_round(loss)

    def _round(self, number: int, joined: bool = False):
        """One averaging round; ``joined``: this rank has closed and only takes part."""
        healthy = self._healthy()
        results = yield self._mean.post(self.comm, self.params, self.float_buffers,
                                        self._may_contribute() and not joined, refs=self._last_average,
                                        others=self.other_buffers)
        if not self._mean.finish(results):
            raise self._all_diverged(f"averaging round {number}")
        self._mean.others.finish(self.other_buffers)
        if self.compression:
            self._last_average = {key: mean.clone() for key, mean in self._mean.params.items()}
        if joined:
            return
        replace_all_(self.params, self._mean.params)
        replace_all_(self.float_buffers, self._mean.buffers)
        if not healthy:
            self._log_recovery("the average of the healthy workers")

    def state_dict(self) -> Dict[str, Any]:
        state = self._base_state()
        # the reference of compressed rounds: without it a resumed run would send whole weights
        state["last_average"] = [self._last_average[key].clone() for key in self.params if key in self._last_average]
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._load_base_state(state)
        self._last_average = {}
        for (key, flat), mean in zip(self.params.items(), state.get("last_average") or []):
            # on the parameters' device, whatever map_location the checkpoint was loaded with
            self._last_average[key] = flat.accumulator().copy_(mean)
