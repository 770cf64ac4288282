"""Data-parallel SGD: Horovod's gradient all-reduce behind the same interface as the others."""
from __future__ import annotations

import contextlib
from typing import Any, Dict

import torch

from horovod_leader.optim.base import DistributedWrapper
from horovod_leader.validation import check_int


class DataParallel(DistributedWrapper):
    """Gradients are averaged over all workers at every step, as ``hvd.DistributedOptimizer`` does.

    The same loop as the other wrappers (``optimizer.zero_grad(); loss.backward();
    opt.step(loss)``), the same ``comm_bytes`` accounting (the gradients' payload, which equals
    the parameter payload P, per step), and Horovod's habits:

    * Horovod's hooks all-reduce each gradient as backward produces it; ``synchronize()`` waits
      for them, so that ``.grad`` holds the average, and ``skip_synchronize()`` makes the next
      ``step`` use it as is. Clipping the *averaged* gradient keeps every replica identical::

          loss.backward()
          opt.synchronize()
          torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
          with opt.skip_synchronize():
              opt.step(loss)

    * ``backward_passes_per_step=N`` accumulates N backward passes locally before the
      all-reduce (gradient accumulation), as in Horovod.
    * The *user's* optimizer steps and holds the state (momentum, Adam's moments), so
      ``optimizer.state_dict()``, its step hooks and LR schedulers pointed at it behave as
      without Horovod.
    * Uneven step counts: a rank that stops early calls ``close()``, which is ``hvd.join()``: it
      takes part in the others' all-reduces with zero gradients, so until every rank has closed
      the average is over *all* ranks, the stopped ones counting as zeros (Horovod's rule).

    Extra keyword arguments go to ``hvd.DistributedOptimizer`` (``compression=``, ``op=``, ...).
    Start every rank from the same weights (``hvd.broadcast_parameters``), as usual with data
    parallelism. A non-finite averaged gradient would enter every replica alike, so every rank
    raises ``AllWorkersDiverged`` instead of stepping into NaN.
    """

    name = "dp"

    def __init__(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module, *, backward_passes_per_step: int = 1,
                 topology=None, **distributed_kwargs):
        passes = check_int("backward_passes_per_step", backward_passes_per_step)
        self.backward_passes_per_step = passes
        self._distributed_kwargs = distributed_kwargs
        from horovod_leader import engine

        if engine.choose() == "torch" and distributed_kwargs:  # alike on every rank, before any collective
            raise ValueError(f"DataParallel: {sorted(distributed_kwargs)} are hvd.DistributedOptimizer's options, "
                             "and this run is on the torch engine: run it on the Horovod engine (--backend horovod) "
                             "or leave them out")
        super().__init__(optimizer, model, period=1, topology=topology, broadcast_buffers=False)
        if engine.name() == "torch":
            self._horovod = GradientAverage(engine.active(), optimizer)
        else:
            import horovod.torch as hvd

            # Horovod's optimizer is a second optimizer object over the same param groups: only its
            # gradient hooks and synchronize() are used; the user's optimizer steps.
            self._horovod = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                                     backward_passes_per_step=passes, **distributed_kwargs)
        self._synchronized = False
        self._skip = False
        self._grad_bytes = sum(p.numel() * p.element_size() for g in optimizer.param_groups for p in g["params"]
                               if p.requires_grad)
        # Horovod hooked the parameters that require gradients now; a change would go unaveraged.
        self._model_param_list = list(model.parameters())
        self._requires_grad = self._requires_grad_now()

    def _settings(self) -> Dict[str, Any]:
        def describe(value):  # classes (Compression.fp16) by name: their repr holds no address
            return f"{value.__module__}.{value.__qualname__}" if isinstance(value, type) else repr(value)

        return {**super()._settings(), "backward_passes_per_step": self.backward_passes_per_step,
                **{name: describe(value) for name, value in sorted(self._distributed_kwargs.items())}}

    def _requires_grad_now(self):
        return tuple(p.requires_grad for p in self._model_param_list)

    def _check_unchanged(self) -> None:
        super()._check_unchanged()
        if self._requires_grad_now() != self._requires_grad:
            names = [name for (name, p), was in zip(self.model.named_parameters(), self._requires_grad)
                     if p.requires_grad != was]
            raise RuntimeError(f"DataParallel: requires_grad changed after the wrapper was built for {names}; "
                               "Horovod all-reduces the gradients of the parameters that required them at "
                               "construction, so the replicas would drift apart. Set requires_grad before wrapping, "
                               "or build a new DataParallel after changing it")

    def synchronize(self) -> None:
        """Wait for the gradient all-reduces: every ``.grad`` then holds the average over ranks."""
        self._horovod.synchronize()
        if not self._synchronized:
            self.comm.bytes += self._grad_bytes
        self._synchronized = True

    @contextlib.contextmanager
    def skip_synchronize(self):
        """The ``step`` inside uses the gradients as they are (after ``synchronize()``)."""
        self._skip = True
        try:
            yield
        finally:
            self._skip = False

    def step(self, loss=None) -> None:
        self._begin_step(loss)
        if not self._skip:
            self.synchronize()
        elif not self._synchronized:
            raise RuntimeError("DataParallel.step inside skip_synchronize() needs synchronize() first: the "
                               "gradients have not been averaged")
        # The average is the same on every rank, so every rank decides alike: a non-finite
        # average would put NaN into every replica, with nothing sound left to recover from.
        if not all(bool(torch.isfinite(p.grad._values() if p.grad.is_sparse else p.grad).all())
                   for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None):
            raise self._all_diverged("the averaged gradient is not finite")
        self.optimizer.step()
        self._synchronized = False
        self._horovod._synchronized = False  # Horovod's own step is not used: reset its flag alike

    def _round(self, number: int, joined: bool = False):
        """Never called: data-parallel SGD has no rounds. Horovod's gradient hooks all-reduce
        every gradient at every step."""
        raise NotImplementedError("DataParallel has no rounds: Horovod's hooks all-reduce every gradient")

    def _join_rounds(self) -> None:
        """No rounds: ``hvd.join()`` (in ``close``) lets a rank that stopped early take part in
        the others' gradient all-reduces with zeros; on the torch engine ``GradientAverage.join``
        does the same."""
        if isinstance(self._horovod, GradientAverage):
            self._horovod.join()

    def zero_grad(self, set_to_none: bool = True) -> None:
        if set_to_none and not isinstance(self._horovod, GradientAverage):
            # Horovod's zero_grad() takes no arguments (it checks for pending all-reduces)
            self._horovod.zero_grad()
        else:
            self.optimizer.zero_grad(set_to_none=False)



class GradientAverage:
    """What ``hvd.DistributedOptimizer`` does for ``DataParallel``, on the torch engine: at
    ``synchronize()`` every gradient (zeros where a parameter has none, as Horovod sends) is
    averaged over all ranks in one all-reduce per dtype, after backward rather than during it.
    A one-number header rides with it, the count of ranks still stepping, so that a rank that
    closed early joins the others' all-reduces with zero gradients (``join``), which is
    ``hvd.join()``'s rule: until every rank has closed, the stopped ones count as zeros.

    Args:
        engine: the torch engine (``horovod_leader.engine.TorchEngine``), initialised.
        optimizer: the user's optimizer; its parameters that require gradients are averaged.
    """

    def __init__(self, engine, optimizer: torch.optim.Optimizer):
        self.engine = engine
        self.params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        self._synchronized = False  # read and reset by DataParallel, as Horovod's flag

    def _buckets(self, stepping: bool):
        by_dtype: Dict[Any, list] = {}
        for p in self.params:
            by_dtype.setdefault((p.dtype, p.device), []).append(p)
        for (dtype, device), params in by_dtype.items():
            if stepping:
                flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
            else:
                flat = torch.zeros(sum(p.numel() for p in params), dtype=dtype, device=device)
            yield params, flat

    def _reduce(self, stepping: bool):
        header = torch.tensor([1.0 if stepping else 0.0], dtype=torch.float64)
        handles = [self.engine.allreduce_async_(header, op=self.engine.Sum)]
        buckets = list(self._buckets(stepping))
        handles += [self.engine.allreduce_async_(flat, op=self.engine.Average) for _, flat in buckets]
        for handle in handles:
            self.engine.synchronize(handle)
        return float(header), buckets

    def synchronize(self) -> None:
        _, buckets = self._reduce(True)
        with torch.no_grad():
            for params, flat in buckets:
                offset = 0
                for p in params:
                    view = flat[offset:offset + p.numel()].view_as(p)
                    if p.grad is None:
                        p.grad = view.clone()
                    else:
                        p.grad.copy_(view)
                    offset += p.numel()
        self._synchronized = True

    def join(self) -> None:
        """Take part, with zero gradients, in the others' all-reduces until every rank has closed."""
        while True:
            stepping, _ = self._reduce(False)
            if stepping == 0.0:
                return
