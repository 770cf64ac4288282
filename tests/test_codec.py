"""The one-pass codec kernels (csrc/codec.cpp) against the plain PyTorch reference."""
import math

import pytest
import torch

from horovod_leader import fused
from horovod_leader.compression import Compression

needs_kernels = pytest.mark.skipif(fused._ext is None or not hasattr(fused._ext, "encode_int8"),
                                   reason="the compiled extension is not built (the reference is what runs)")


def values(n, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g) * torch.logspace(-3, 1, n)).to(dtype)


@needs_kernels
@pytest.mark.parametrize("codec", [Compression.bf16, Compression.int8], ids=["bf16", "int8"])
@pytest.mark.parametrize("n", [1, 255, 256, 1000, 70_001])
def test_encode_diff_is_the_reference_bitwise(codec, n):
    x, ref = values(n, 1), values(n, 2)
    for r in (ref, None):
        fast, plain = codec.encode_diff(x, r), codec.encode_diff_reference(x, r)
        assert all(torch.equal(a, b) for a, b in zip(fast, plain)), (codec, n)


@needs_kernels
@pytest.mark.parametrize("codec", [Compression.bf16, Compression.int8], ids=["bf16", "int8"])
def test_decode_into_matches_the_reference(codec):
    n = 5_000
    payload = codec.encode_diff(values(n, 1), values(n, 2))
    ref = values(n, 3)
    fast, plain = torch.empty(n), torch.empty(n)
    assert torch.equal(codec.decode_into(payload, fast, ref), codec.decode_into_reference(payload, plain, ref))
    # a slice of the payload, scaled and accumulated: what the averages do per tensor
    start, count = 700, 1_300
    fast, plain = values(count, 4), values(count, 4)
    codec.decode_into(payload, fast, ref[:count], alpha=0.3, accumulate=True, start=start)
    codec.decode_into_reference(payload, plain, ref[:count], alpha=0.3, accumulate=True, start=start)
    assert torch.allclose(fast, plain, rtol=1e-6, atol=1e-7)


@needs_kernels
def test_non_finite_blocks_decode_non_finite():
    x = values(1_000, 1)
    x[700] = math.nan
    for codec in (Compression.bf16, Compression.int8):
        out = codec.decode_into(codec.encode_diff(x, None), torch.empty(1_000))
        assert not torch.isfinite(out[700]) and torch.isfinite(out[:512]).all()


@needs_kernels
def test_half_precision_values_take_the_kernel():
    x, ref = values(3_000, 1, torch.float16), values(3_000, 2, torch.float16)
    exact = (x.float() - ref.float())  # the kernel takes the difference in float32
    decoded = Compression.int8.decode_into(Compression.int8.encode_diff(x, ref), torch.empty(3_000))
    assert (decoded - exact).abs().max() <= Compression.int8.max_error(exact)
