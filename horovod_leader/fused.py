r"""The fused two-force update: gradient force plus the two leader forces, in one pass.

For flat buffers x (parameters), g (gradient), m (momentum), L (local leader), G (global
leader), every force is computed from the same x:

.. math::

    d &= g + \mathrm{wd}\,x \\
    m &= \mu\,m + (1-\text{dampening})\,d \quad(\text{on the first step: } m = d) \\
    d &= d + \mu\,m \ \text{(Nesterov)} \quad\text{or}\quad d = m \\
    x &\leftarrow x - \eta\,d - \lambda\,(x - L) - \lambda_G\,(x - G)

which is ``torch.optim.SGD``'s step and both leader pulls of LSGD. Unfused it is four or five
element-wise passes over memory; fused it reads x, g, m, L, G once and writes x and m once.

Three implementations with one meaning, compared by the tests:

* the compiled extension ``horovod_leader._fused`` (C++ with ``at::parallel_for``; CUDA when it
  was built with a CUDA toolkit);
* ``fallback_two_force_update_``: pure PyTorch, used when the extension is not built;
* ``reference_two_force_update``: the formula written out plainly, in float64, for tests.

float16 and bfloat16 buffers are computed in float32 and rounded once when stored.
This module imports and works without Horovod.
"""
from __future__ import annotations

from typing import Optional

import torch

try:  # the compiled kernel is optional: everything works without it
    from horovod_leader import _fused as _ext  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - depends on the build
    _ext = None

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def backend() -> str:
    """Which implementation ``two_force_update_`` uses: ``"extension"`` or ``"fallback"``."""
    return "extension" if _ext is not None else "fallback"


def extension_has_cuda() -> bool:
    """True when the compiled extension includes the CUDA kernel."""
    return _ext is not None and bool(_ext.has_cuda())


def _check(param, grad, momentum_buf, local_leader, global_leader, anchor, momentum, local_pull, global_pull):
    if param.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"param: dtype {param.dtype} is not supported; use one of {SUPPORTED_DTYPES}")
    if not param.is_contiguous() or param.dim() != 1:
        raise ValueError("param must be a flat (1-d) contiguous tensor")
    named = {"grad": grad, "momentum_buf": momentum_buf, "local_leader": local_leader,
             "global_leader": global_leader, "anchor": anchor}
    for name, tensor in named.items():
        if tensor is None:
            continue
        if tensor.shape != param.shape or tensor.dtype != param.dtype or tensor.device != param.device:
            raise ValueError(f"{name} must match param: shape {tuple(param.shape)}, dtype {param.dtype}, device {param.device}; "
                             f"got {tuple(tensor.shape)}, {tensor.dtype}, {tensor.device}")
        if not tensor.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if momentum != 0.0 and momentum_buf is None:
        raise ValueError("momentum_buf is required when momentum != 0")
    if local_pull != 0.0 and local_leader is None:
        raise ValueError("local_leader is required when local_pull != 0")
    if global_pull != 0.0 and global_leader is None:
        raise ValueError("global_leader is required when global_pull != 0")


def two_force_update_(param: torch.Tensor, grad: torch.Tensor, momentum_buf: Optional[torch.Tensor],
                      local_leader: Optional[torch.Tensor], global_leader: Optional[torch.Tensor], *,
                      lr: float, momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0,
                      nesterov: bool = False, local_pull: float = 0.0, global_pull: float = 0.0,
                      first_step: bool = False) -> torch.Tensor:
    """Apply the two-force update in place to ``param`` (and ``momentum_buf``); returns ``param``.

    Every tensor is a flat contiguous buffer of one dtype on one device. ``momentum_buf`` may
    be None when ``momentum == 0``; a leader may be None when its pull is 0. On ``first_step``
    the momentum buffer is set to d, as ``torch.optim.SGD`` does on its first step.
    """
    if grad is None:
        raise ValueError("grad is required; use leader_pull_ for a pull without a gradient step")
    _check(param, grad, momentum_buf, local_leader, global_leader, None, momentum, local_pull, global_pull)
    return _dispatch(param, grad, momentum_buf, local_leader, global_leader, None, float(lr), float(momentum),
                     float(dampening), float(weight_decay), bool(nesterov), float(local_pull), float(global_pull),
                     bool(first_step))


def leader_pull_(param: torch.Tensor, local_leader: Optional[torch.Tensor], global_leader: Optional[torch.Tensor], *,
                 local_pull: float = 0.0, global_pull: float = 0.0,
                 anchor: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The two leader forces alone, fused: ``x -= a·(y - L) + b·(y - G)`` with y = ``anchor``.

    ``anchor`` defaults to ``param`` itself. Passing the parameters as they were before the
    wrapped optimizer's step keeps every force computed from the same x (LSGD's formula) when
    the gradient force comes from an optimizer that is not fused (Adam, ...).
    """
    _check(param, None, None, local_leader, global_leader, anchor, 0.0, local_pull, global_pull)
    return _dispatch(param, None, None, local_leader, global_leader, anchor, 0.0, 0.0, 0.0, 0.0, False,
                     float(local_pull), float(global_pull), False)


def _dispatch(param, grad, buf, local, glob, anchor, lr, momentum, dampening, wd, nesterov, a, b, first_step):
    if param.numel() == 0:
        return param
    # A zero pull reads nothing: drop its tensor so no kernel touches it.
    local = local if a != 0.0 else None
    glob = glob if b != 0.0 else None
    buf = buf if momentum != 0.0 else None
    if _ext is not None and (param.device.type == "cpu" or extension_has_cuda()):
        _ext.two_force_update_(param, grad, buf, local, glob, anchor, lr, momentum, dampening, wd, nesterov,
                               a, b, first_step)
        return param
    return fallback_two_force_update_(param, grad, buf, local, glob, anchor, lr, momentum, dampening, wd,
                                      nesterov, a, b, first_step)


def fallback_two_force_update_(param, grad, buf, local, glob, anchor, lr, momentum, dampening, wd, nesterov,
                               a, b, first_step) -> torch.Tensor:
    """Pure-PyTorch implementation of the same update (few passes, in-place where it can)."""
    low = param.dtype in _LOW_PRECISION
    up = (lambda t: t.float()) if low else (lambda t: t)
    x = up(param)
    step = None  # the total displacement, subtracted from x at the end
    if grad is not None:
        d = up(grad)
        if wd != 0.0:
            d = d.add(x, alpha=wd)
        if buf is not None:
            m = up(buf)
            if first_step:
                m.copy_(d)
            else:
                m.mul_(momentum).add_(d, alpha=1.0 - dampening)
            if low:
                buf.copy_(m)
            d = d.add(m, alpha=momentum) if nesterov else m
        step = d * lr
    y = x if anchor is None else up(anchor)
    for leader, pull in ((local, a), (glob, b)):
        if leader is None:
            continue
        force = torch.sub(y, up(leader)).mul_(pull)
        step = force if step is None else step.add_(force)
    if step is not None:
        if low:
            param.copy_(x.sub_(step))
        else:
            param.sub_(step)
    return param


def reference_two_force_update(param, grad, momentum_buf, local_leader, global_leader, *, lr, momentum=0.0,
                               dampening=0.0, weight_decay=0.0, nesterov=False, local_pull=0.0, global_pull=0.0,
                               first_step=False, anchor=None):
    """The formula, written plainly in float64. Returns (new_param, new_momentum_buf); no in-place."""
    f64 = lambda t: None if t is None else t.detach().to(torch.float64)
    x, g, m, L, G = f64(param), f64(grad), f64(momentum_buf), f64(local_leader), f64(global_leader)
    y = x if anchor is None else f64(anchor)
    new_x = x.clone()
    new_m = m
    if g is not None:
        d = g + weight_decay * x
        if momentum != 0.0:
            new_m = d.clone() if first_step else momentum * m + (1.0 - dampening) * d
            d = d + momentum * new_m if nesterov else new_m
        new_x = new_x - lr * d
    if local_pull != 0.0:
        new_x = new_x - local_pull * (y - L)
    if global_pull != 0.0:
        new_x = new_x - global_pull * (y - G)
    return new_x, new_m
