"""Flat buffers: a model's tensors packed into one contiguous buffer per (dtype, device).

Every exchange of parameters is then one collective per buffer instead of one per tensor, and
the fused update makes one pass over one buffer. The packing is done once, at construction:
each tensor's storage is moved into its buffer (``tensor.data`` becomes a view into it), so the
model, the optimizer and the buffer share one memory and no copy is made per step. Values do
not change. Move the model to its device *before* wrapping it: ``model.to()`` afterwards would
allocate new storage and silently undo the packing (the wrappers check for it).
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Tuple

import torch

Key = Tuple[torch.dtype, torch.device]


class FlatBuffer:
    """One contiguous buffer holding several tensors of one dtype and device as views."""

    def __init__(self, tensors: List[torch.Tensor]):
        if not tensors:
            raise ValueError("FlatBuffer needs at least one tensor")
        self.tensors = tensors
        self.dtype = tensors[0].dtype
        self.device = tensors[0].device
        self.numels = [t.numel() for t in tensors]
        self.offsets = []
        total = 0
        for n in self.numels:
            self.offsets.append(total)
            total += n
        self.flat = torch.empty(total, dtype=self.dtype, device=self.device)
        for tensor, view in zip(tensors, self.views(self.flat)):
            view.copy_(tensor.detach())
            tensor.data = view  # the tensor now lives inside the flat buffer
        self._ptrs = [t.data_ptr() for t in tensors]

    def views(self, flat: torch.Tensor) -> List[torch.Tensor]:
        """Split a flat buffer of this layout into views shaped like the tensors."""
        return [flat[o:o + n].view_as(t) for o, n, t in zip(self.offsets, self.numels, self.tensors)]

    def like(self, fill: Optional[float] = None) -> torch.Tensor:
        """A new flat buffer of the same size, dtype and device."""
        if fill is None:
            return torch.empty_like(self.flat)
        return torch.full_like(self.flat, fill)

    def gather_grads(self, out: torch.Tensor) -> bool:
        """Copy every tensor's ``.grad`` into ``out`` (flat). Returns False if any grad is None."""
        grads = [t.grad for t in self.tensors]
        if any(g is None for g in grads):
            return False
        torch._foreach_copy_(self.views(out), grads)
        return True

    def still_packed(self) -> bool:
        """True while every tensor still lives in the buffer (nobody re-allocated it)."""
        return all(t.data_ptr() == p for t, p in zip(self.tensors, self._ptrs))

    @property
    def numel(self) -> int:
        return self.flat.numel()

    @property
    def nbytes(self) -> int:
        return self.flat.numel() * self.flat.element_size()


def pack(tensors: Iterable[torch.Tensor]) -> Dict[Key, FlatBuffer]:
    """Pack tensors into one FlatBuffer per (dtype, device), in first-seen order."""
    groups: Dict[Key, List[torch.Tensor]] = {}
    seen = set()
    for tensor in tensors:
        if id(tensor) in seen:  # tied weights appear once
            continue
        seen.add(id(tensor))
        groups.setdefault((tensor.dtype, tensor.device), []).append(tensor)
    return {key: FlatBuffer(ts) for key, ts in groups.items()}


def key_name(key: Key) -> str:
    """A stable, rank-independent name for a buffer, used in collective names."""
    dtype, device = key
    return f"{str(dtype).replace('torch.', '')}.{device.type}"
