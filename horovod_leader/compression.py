r"""Compressed exchanges: bf16 and int8 payloads for the leaders' broadcasts and the averages.

``compression=None | "bf16" | "int8"`` on every wrapper (or ``Compression.bf16`` /
``Compression.int8``, as Horovod names its ``Compression.fp16``; DataParallel and
OneSidedEASGD stay uncompressed). Each format is one ``Codec``: ``encode``, ``decode``,
``payload_like`` and ``payload_bytes``. What is compressed is always a *difference* from a reference that every rank
taking part already holds bitwise alike (the last copy received at that level, the last
centre, EASGD's centre, DiLoCo's outer parameters), so the rounding error scales with how far
a worker moved since, not with the size of the weights:

.. math::

    \text{send } e = \mathrm{encode}(x - r), \qquad \text{receive } \hat x = r + \mathrm{decode}(e)

* ``bf16``: the difference rounded to bfloat16 (8 significant bits, 7 of them stored: relative
  error at most :math:`2^{-8}`), sent as its 16-bit pattern in an ``int16`` tensor, because Horovod refuses
  bfloat16 tensors on the CPU. 2 bytes per value: half of float32.
* ``int8``: per-block absmax scaling, blocks of ``INT8_BLOCK`` = 256 values:
  :math:`s_b = \max_{j\in b}|v_j|/127`, :math:`q_j = \mathrm{round}(v_j/s_b)` in [-127, 127],
  sent as an ``int8`` tensor plus one float32 scale per block. Error at most :math:`s_b/2` per
  value. 1 + 4/256 bytes per value: 0.254 of float32 (the scales add 1.6%).

No error feedback is kept: every exchange re-encodes the whole difference from a reference
that all ranks share, so an error is not carried into the next round's payload.

Averages cannot sum bit patterns, so a compressed average is an **all-gather** of every
worker's payload, decoded and summed locally in float32, in rank order (so every rank gets a
bitwise identical result). A rank's ``comm_bytes`` counts its own payload, as for every
collective. On the wire, a ring all-gather moves (p - 1) payloads per rank, against
2 (p - 1)/p full-precision payloads for a ring all-reduce: with p = 4 workers, int8 moves about
half the bytes of an uncompressed all-reduce, and bf16 the same; the all-gather pays off
against the all-reduce for int8 up to about 8 workers.
"""
from __future__ import annotations

import abc
from typing import List, Optional, Union

import torch

INT8_BLOCK = 256


class Codec(abc.ABC):
    """One payload format: how a 1-D float tensor travels, and what it costs."""

    #: the format's name, as ``compression=`` and ``--compression`` take it
    name: str = ""

    @abc.abstractmethod
    def encode(self, values: torch.Tensor) -> List[torch.Tensor]:
        """The payload tensors for a 1-D float tensor (any float dtype; computed in float32)."""

    @abc.abstractmethod
    def decode(self, payload: List[torch.Tensor], numel: int) -> torch.Tensor:
        """The float32 values a payload stands for."""

    def decode_range(self, payload: List[torch.Tensor], start: int, count: int) -> torch.Tensor:
        """Values ``start`` to ``start + count`` of what a payload stands for (float32)."""
        return self.decode(payload, start + count)[start:]

    @abc.abstractmethod
    def payload_like(self, numel: int, device=None) -> List[torch.Tensor]:
        """Empty payload tensors for ``numel`` values (what a receiver posts its broadcast
        into), on ``device``: the sender's payload is on the model's device, and Horovod
        refuses a broadcast whose ranks disagree on the device."""

    @abc.abstractmethod
    def max_error(self, values: torch.Tensor) -> float:
        """The largest rounding error the format allows for ``values`` (for tests and docs)."""

    def payload_bytes(self, numel: int) -> int:
        """Bytes of one payload of ``numel`` values."""
        return sum(t.numel() * t.element_size() for t in self.payload_like(numel))

    # ---- in one pass over memory (the compiled kernels on the CPU; the reference otherwise)
    def encode_diff(self, values: torch.Tensor, ref: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
        """``encode(values - ref)``: with the compiled extension, on the CPU, for float32,
        float16 and bfloat16 flat tensors, the difference and the encoding are one pass and
        the difference is taken in float32; otherwise ``encode_diff_reference``."""
        if _kernel_applies(values, ref):
            payload = self.payload_like(values.numel())
            self._encode_kernel(values.detach(), None if ref is None else ref.detach(), payload)
            return payload
        return self.encode_diff_reference(values, ref)

    def encode_diff_reference(self, values: torch.Tensor, ref: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
        """The plain PyTorch form of ``encode_diff``."""
        return self.encode(values - ref if ref is not None else values)

    def decode_into(self, payload: List[torch.Tensor], out: torch.Tensor, ref: Optional[torch.Tensor] = None,
                    alpha: float = 1.0, accumulate: bool = False, start: int = 0) -> torch.Tensor:
        """``out (+)= alpha * (decode(payload)[start:start + n] + ref)`` with n = ``out.numel()``,
        in one pass with the compiled extension (CPU, float32/float16/bfloat16 ``out``);
        otherwise ``decode_into_reference``. Returns ``out``."""
        if _kernel_applies(out, ref) and all(p.device.type == "cpu" for p in payload):
            self._decode_kernel(payload, None if ref is None else ref.detach(), out, float(alpha), bool(accumulate),
                                int(start))
            return out
        return self.decode_into_reference(payload, out, ref, alpha, accumulate, start)

    def decode_into_reference(self, payload: List[torch.Tensor], out: torch.Tensor,
                              ref: Optional[torch.Tensor] = None, alpha: float = 1.0, accumulate: bool = False,
                              start: int = 0) -> torch.Tensor:
        """The plain PyTorch form of ``decode_into``."""
        value = self.decode_range(payload, start, out.numel())
        if ref is not None:
            value = value + ref.float()
        if accumulate:
            out.add_(value, alpha=alpha)
        else:
            out.copy_(value * alpha if alpha != 1.0 else value)
        return out

    def __repr__(self) -> str:
        return f"Compression.{self.name}"


class BF16(Codec):
    """The values rounded to bfloat16, sent as their 16-bit patterns in an ``int16`` tensor
    (Horovod refuses bfloat16 tensors on the CPU): 2 bytes per value, relative error <= 2^-8."""

    name = "bf16"

    def encode(self, values):
        return [values.detach().reshape(-1).float().to(torch.bfloat16).view(torch.int16)]

    def decode(self, payload, numel):
        return payload[0].view(torch.bfloat16).float()[:numel]

    def decode_range(self, payload, start, count):
        return payload[0][start:start + count].view(torch.bfloat16).float()

    def payload_like(self, numel, device=None):
        return [torch.empty(numel, dtype=torch.int16, device=device)]

    def max_error(self, values):
        v = values.detach().reshape(-1).float()
        return float(v.abs().max()) * 2.0 ** -8 if v.numel() else 0.0

    def _encode_kernel(self, values, ref, payload):
        _extension().encode_bf16(values, ref, payload[0])

    def _decode_kernel(self, payload, ref, out, alpha, accumulate, start):
        _extension().decode_bf16(payload[0], ref, out, alpha, accumulate, start)


class Int8(Codec):
    """Per-block absmax scaling, blocks of ``INT8_BLOCK`` = 256 values: an ``int8`` tensor and
    one float32 scale per block, 1 + 4/256 bytes per value; error at most half a scale step."""

    name = "int8"

    @staticmethod
    def _tiles(values: torch.Tensor) -> torch.Tensor:
        v = values.detach().reshape(-1).float()
        blocks = (v.numel() + INT8_BLOCK - 1) // INT8_BLOCK
        padded = torch.zeros(blocks * INT8_BLOCK, dtype=torch.float32, device=v.device)
        padded[:v.numel()] = v
        return padded.view(blocks, INT8_BLOCK)

    def encode(self, values):
        tiles = self._tiles(values)
        scales = tiles.abs().amax(dim=1) / 127.0
        # An all-zero block gets scale 1; a block holding NaN or inf keeps its non-finite scale, so
        # that it decodes to non-finite values and the receiver's health check still sees it.
        scales = torch.where(scales == 0, torch.ones_like(scales), scales)
        quantised = torch.round(tiles / scales[:, None]).clamp_(-127, 127).to(torch.int8)
        return [quantised.reshape(-1), scales]

    def decode(self, payload, numel):
        quantised, scales = payload
        return (quantised.view(-1, INT8_BLOCK).float() * scales[:, None]).reshape(-1)[:numel]

    def decode_range(self, payload, start, count):
        quantised, scales = payload
        block = torch.arange(start, start + count, device=quantised.device) // INT8_BLOCK
        return quantised[start:start + count].float() * scales[block]

    def payload_like(self, numel, device=None):
        blocks = (numel + INT8_BLOCK - 1) // INT8_BLOCK
        return [torch.empty(blocks * INT8_BLOCK, dtype=torch.int8, device=device),
                torch.empty(blocks, dtype=torch.float32, device=device)]

    def max_error(self, values):
        if not values.numel():
            return 0.0
        return float(self._tiles(values).abs().amax(dim=1).max()) / 127.0 / 2.0 * 1.0001

    def _encode_kernel(self, values, ref, payload):
        _extension().encode_int8(values, ref, payload[0], payload[1])

    def _decode_kernel(self, payload, ref, out, alpha, accumulate, start):
        _extension().decode_int8(payload[0], payload[1], ref, out, alpha, accumulate, start)


_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _extension():
    from horovod_leader import fused

    return fused._ext


def _kernel_applies(values: torch.Tensor, ref: Optional[torch.Tensor]) -> bool:
    """Whether the one-pass kernels take these tensors (the extension built with them, CPU,
    flat contiguous float32/float16/bfloat16, ``ref`` alike)."""
    ext = _extension()
    return (ext is not None and hasattr(ext, "encode_int8") and values.device.type == "cpu" and values.dim() == 1
            and values.is_contiguous() and values.dtype in _KERNEL_DTYPES
            and (ref is None or (ref.dtype == values.dtype and ref.is_contiguous() and ref.device.type == "cpu"
                                 and ref.numel() == values.numel())))


class Compression:
    """The formats by name, as Horovod's ``Compression.fp16``: ``Compression.none`` (None),
    ``Compression.bf16``, ``Compression.int8``."""

    none = None
    bf16 = BF16()
    int8 = Int8()


CODECS = {"bf16": Compression.bf16, "int8": Compression.int8}
CHOICES = (None, "none", *CODECS)


def check_compression(value: Union[None, str, Codec]) -> Optional[Codec]:
    """The codec for ``None``/"none" (None: off), "bf16", "int8" or a ``Codec``; a clear error
    naming the argument otherwise."""
    if isinstance(value, Codec):
        return value
    if value not in CHOICES:
        raise ValueError(f"compression must be None, 'bf16' or 'int8' (or a Compression codec), got {value!r}")
    return None if value in (None, "none") else CODECS[value]


def name_of(codec: Optional[Codec]) -> Optional[str]:
    """The format's name, or None when off."""
    return None if codec is None else codec.name
