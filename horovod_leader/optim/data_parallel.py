"""Data-parallel SGD: Horovod's DistributedOptimizer behind the same interface as the others."""
from __future__ import annotations

from typing import Any, Dict

import torch

from horovod_leader.optim.base import DistributedWrapper


class DataParallel(DistributedWrapper):
    """Gradients are averaged over all workers at every step (``hvd.DistributedOptimizer``).

    A thin adapter, so that the same loop (``optimizer.zero_grad(); loss.backward();
    opt.step(loss)``) and the same ``comm_bytes`` accounting apply. Horovod all-reduces each
    gradient as backward produces it; ``comm_bytes`` grows by the gradients' payload, which
    equals the parameter payload P, per step. Extra keyword arguments go to
    ``hvd.DistributedOptimizer`` (``compression=``, ``op=``, ...). Start every rank from the same
    weights (``hvd.broadcast_parameters``), as usual with data parallelism.
    """

    name = "dp"

    def __init__(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module, *, topology=None,
                 **distributed_kwargs):
        super().__init__(optimizer, model, topology=topology, broadcast_buffers=False)
        import horovod.torch as hvd

        self._user_optimizer = optimizer
        # Horovod's wrapper is a new optimizer over the same param groups; it holds the state.
        self.optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                                  **distributed_kwargs)
        self._grad_bytes = sum(p.numel() * p.element_size() for g in optimizer.param_groups for p in g["params"]
                               if p.requires_grad)

    def step(self, loss=None) -> None:
        self._begin_step(loss)
        self.optimizer.step()  # waits for the gradient all-reduces, then steps
        self.comm.bytes += self._grad_bytes

    def zero_grad(self, set_to_none: bool = True) -> None:
        if set_to_none:  # Horovod's zero_grad() takes no arguments (it checks for pending all-reduces)
            self.optimizer.zero_grad()
        else:
            self._user_optimizer.zero_grad(set_to_none=False)

    def state_dict(self) -> Dict[str, Any]:
        return self._base_state()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._load_base_state(state)
