r"""The per-step update of an LSGD worker: the optimizer's step plus the leader forces.

.. math::

    x_{k+1} = x_k - \eta\,d_k - a\,(x_k - \tilde x_{group}) - b\,(x_k - \tilde x)

where :math:`\eta d_k` is the wrapped optimizer's step and every force is evaluated at the same
:math:`x_k`. With ``torch.optim.SGD`` the whole update (momentum, Nesterov, weight decay and both
pulls) is one fused pass over each packed buffer (``horovod_leader.fused``); SGD's per-parameter
momentum state then lives as views of one flat buffer, so ``optimizer.state_dict()`` stays
valid. With any other optimizer its own step runs and both pulls follow in one fused pass,
evaluated at the pre-step parameters (kept in an anchor copy), so both paths agree.
"""
from __future__ import annotations

import logging
from itertools import chain
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from horovod_leader import fused
from horovod_leader.packing import FlatBuffer

_SGD_HYPERPARAMS = ("lr", "momentum", "dampening", "weight_decay", "nesterov")
log = logging.getLogger("horovod_leader")


def _slices(flat: FlatBuffer) -> List[slice]:
    """Where each tensor lies in the flat buffer (1-D, contiguous: what the kernels take)."""
    return [slice(o, o + n) for o, n in zip(flat.offsets, flat.numels)]

#: ``leaders(key, a, b)`` -> (local copy or None, global copy or None) for one packed buffer
LeaderCopies = Callable[[Any, float, float], Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]]


class TwoForceStep:
    """Applies the gradient force and the two leader forces to the packed parameters."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: Dict[Any, FlatBuffer], allow_fused: bool):
        self.optimizer = optimizer
        self.params = params
        self.fuse_allowed = allow_fused and type(optimizer) is torch.optim.SGD
        if allow_fused and not self.fuse_allowed:
            log.info("horovod_leader: the fused update covers torch.optim.SGD only; with %s its own step runs, "
                     "then the leader pulls", type(optimizer).__name__)
        self._grads: Dict[Any, torch.Tensor] = {}
        self._momentum: Dict[Any, torch.Tensor] = {}
        self._anchor: Dict[Any, torch.Tensor] = {}
        self.fused_steps = 0  # how many steps took the fused path (for tests and logs)
        self._logged: set = set()  # reasons already logged for not fusing

    def __call__(self, a: float, b: float, leaders: LeaderCopies) -> None:
        if self.fuse_allowed:
            reason = self._cannot_fuse()
            if reason is None:
                self._with_step_hooks(lambda: self._fused(a, b, leaders))
                return
            if reason not in self._logged:
                self._logged.add(reason)
                log.info("horovod_leader: the fused update is off for this step: %s; the optimizer's own step "
                         "runs, then the leader pulls", reason)
        self._unfused(a, b, leaders)

    def reset_momentum(self) -> None:
        """After a recovery: the flat momentum buffers start again from zero."""
        for buf in self._momentum.values():
            buf.zero_()

    def _cannot_fuse(self) -> Optional[str]:
        """Why this step cannot take the fused path (None: it can)."""
        if any(g.get("maximize", False) for g in self.optimizer.param_groups):
            return "maximize=True"
        for flat in self.params.values():
            if any(p.grad is not None and p.grad.is_sparse for p in flat.tensors):
                return "a sparse gradient"
        return None

    def _with_step_hooks(self, update: Callable[[], None]) -> None:
        """Run ``update`` as ``optimizer.step()`` would: its step hooks before and after, and
        the mark that LR schedulers read (so they do not warn that the optimizer never stepped)."""
        from torch.optim import optimizer as optim_module

        opt = self.optimizer
        for hook in chain(getattr(optim_module, "_global_optimizer_pre_hooks", {}).values(),
                          getattr(opt, "_optimizer_step_pre_hooks", {}).values()):
            hook(opt, (), {})
        update()
        opt._opt_called = True  # what torch's LR schedulers check for "optimizer.step() was called"
        for hook in chain(getattr(opt, "_optimizer_step_post_hooks", {}).values(),
                          getattr(optim_module, "_global_optimizer_post_hooks", {}).values()):
            hook(opt, (), {})

    def _hyperparameters(self) -> Dict[int, dict]:
        """Each parameter's SGD hyperparameters, from its param group."""
        return {id(p): {name: group[name] for name in _SGD_HYPERPARAMS}
                for group in self.optimizer.param_groups for p in group["params"]}

    def _fused(self, a: float, b: float, leaders: LeaderCopies) -> None:
        """The whole update as one fused pass per buffer; per tensor when the param groups'
        hyperparameters differ (e.g. no weight decay on biases and norms) or some parameters
        have no gradient (frozen, or unused this step: those get the pulls only, as SGD skips them)."""
        hyper = self._hyperparameters()
        with torch.no_grad():
            for key, flat in self.params.items():
                # Parameters outside the optimizer (frozen) or without a gradient do not step.
                per_tensor = [hyper.get(id(p)) for p in flat.tensors]
                stepping = [h is not None and p.grad is not None for p, h in zip(flat.tensors, per_tensor)]
                momentum_needed = [s and float(h["momentum"]) != 0.0 for s, h in zip(stepping, per_tensor)]
                buf, fresh = self._momentum_state(key, flat, momentum_needed)
                uniform = (all(stepping) and all(h == per_tensor[0] for h in per_tensor[1:])
                           and all(f == fresh[0] for f in fresh[1:]))
                grad = self._grads.get(key)
                if grad is None:
                    grad = self._grads[key] = flat.like()
                local, glob = leaders(key, a, b)
                if uniform:
                    flat.gather_grads(grad)
                    self._update(flat.flat, grad, buf if momentum_needed[0] else None, local, glob, per_tensor[0],
                                 a, b, fresh[0])
                else:
                    for i, (p, h, slc) in enumerate(zip(flat.tensors, per_tensor, _slices(flat))):
                        loc = local[slc] if local is not None else None
                        glo = glob[slc] if glob is not None else None
                        if not stepping[i]:
                            if loc is not None or glo is not None:
                                fused.leader_pull_(flat.flat[slc], loc, glo, local_pull=a, global_pull=b)
                            continue
                        grad[slc].copy_(p.grad.reshape(-1))
                        self._update(flat.flat[slc], grad[slc], buf[slc] if momentum_needed[i] else None, loc, glo,
                                     h, a, b, fresh[i])
                # from now on SGD's state is a view of our flat momentum buffer
                for p, view, needed, new in zip(flat.tensors, flat.views(buf), momentum_needed, fresh):
                    if needed and new:
                        self.optimizer.state[p]["momentum_buffer"] = view
        self.fused_steps += 1

    @staticmethod
    def _update(param, grad, buf, local, glob, hyper: dict, a: float, b: float, first_step: bool) -> None:
        fused.two_force_update_(param, grad, buf, local, glob, lr=float(hyper["lr"]),
                                momentum=float(hyper["momentum"]), dampening=float(hyper["dampening"]),
                                weight_decay=float(hyper["weight_decay"]), nesterov=bool(hyper["nesterov"]),
                                local_pull=a, global_pull=b, first_step=first_step)

    def _momentum_state(self, key, flat: FlatBuffer, needed: List[bool]) -> Tuple[torch.Tensor, List[bool]]:
        """(flat momentum buffer, first_step per tensor), keeping SGD's state as its views.

        ``first_step`` (SGD's rule: the buffer starts as the first update direction) is taken
        per tensor: a tensor that steps with momentum for the first time starts from its
        direction; the others keep theirs (copied into the flat buffer if they were elsewhere,
        e.g. after ``load_state_dict`` or unfused steps).
        """
        buf = self._momentum.get(key)
        if buf is None:
            buf = self._momentum[key] = flat.like(0.0)
        fresh = [False] * len(needed)
        for i, (p, view, need) in enumerate(zip(flat.tensors, flat.views(buf), needed)):
            if not need:
                continue
            current = self.optimizer.state[p].get("momentum_buffer") if p in self.optimizer.state else None
            if current is None:
                fresh[i] = True
            elif current.data_ptr() != view.data_ptr():
                view.copy_(current)
                self.optimizer.state[p]["momentum_buffer"] = view
        return buf, fresh

    def _unfused(self, a: float, b: float, leaders: LeaderCopies) -> None:
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
                    local, glob = leaders(key, a, b)
                    if local is not None or glob is not None:
                        fused.leader_pull_(flat.flat, local, glob, local_pull=a, global_pull=b,
                                           anchor=self._anchor[key])
