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

#: dtypes whose sums and averages are accumulated in float32 (and cast back once at the end)
LOW_PRECISION = (torch.float16, torch.bfloat16)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype in which averages, weighted sums and centres of ``dtype`` values are kept:
    float32 for float16 and bfloat16 (whose sums overflow or lose most of their bits), the
    dtype itself otherwise."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


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

    def like(self, fill: Optional[float] = None, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """A new flat buffer of the same size and device, of this dtype (or ``dtype``)."""
        if fill is None:
            return torch.empty_like(self.flat, dtype=dtype)
        return torch.full_like(self.flat, fill, dtype=dtype)

    def accumulator(self) -> torch.Tensor:
        """A new flat buffer for sums and centres of this buffer: same size and device, in
        ``accumulation_dtype`` (float32 for half precision)."""
        return self.like(dtype=accumulation_dtype(self.dtype))

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
