"""The fused two-force update: extension, PyTorch fallback and the plain reference agree."""
import itertools
import os

import pytest
import torch

from horovod_leader import fused

SIZES = [0, 1, 7, 4097, 1_000_003]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Tolerances against the float64 reference; half types are computed in float32 and rounded once.
TOL = {torch.float32: 2e-6, torch.float64: 1e-13, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

IMPLEMENTATIONS = ["fallback"] + (["extension"] if fused.backend() == "extension" else [])


def test_extension_is_built_when_required():
    # CI builds the extension; there a silent fallback would hide a broken build.
    if os.environ.get("HOROVOD_LEADER_REQUIRE_EXTENSION") == "1":
        assert fused.backend() == "extension"


def _run(impl, x, g, m, L, G, anchor=None, **kw):
    x, m = x.clone(), None if m is None else m.clone()
    if impl == "fallback":
        fused.fallback_two_force_update_(x, g, m, L if kw["local_pull"] else None, G if kw["global_pull"] else None,
                                         anchor, kw["lr"], kw["momentum"], kw["dampening"], kw["weight_decay"],
                                         kw["nesterov"], kw["local_pull"], kw["global_pull"], kw["first_step"])
    elif g is None:
        fused.leader_pull_(x, L, G, local_pull=kw["local_pull"], global_pull=kw["global_pull"], anchor=anchor)
    else:
        fused.two_force_update_(x, g, m, L, G, **kw)
    return x, m


def _inputs(n, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=gen, dtype=torch.float64).to(dtype) for _ in range(5)]


def _relative_error(got, want):
    return ((got.double() - want).abs() / (1.0 + want.abs())).max().item() if want.numel() else 0.0


CASES = list(itertools.product(
    [True, False],  # momentum
    [False, True],  # nesterov
    [(0.25, 0.5), (0.0, 0.5), (0.25, 0.0), (0.0, 0.0)],  # pulls, each set to zero in turn
))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
def test_two_force_update_matches_reference(impl, dtype, n):
    x, g, m, L, G = _inputs(n, dtype, seed=n)
    checked = 0
    for (use_momentum, nesterov, (a, b)), first_step in itertools.product(CASES, [False, True]):
        if nesterov and not use_momentum:
            continue
        kw = dict(lr=0.1, momentum=0.9 if use_momentum else 0.0, dampening=0.0 if nesterov else 0.1,
                  weight_decay=0.01, nesterov=nesterov, local_pull=a, global_pull=b, first_step=first_step)
        buf = m if use_momentum else None
        got_x, got_m = _run(impl, x, g, buf, L, G, **kw)
        want_x, want_m = fused.reference_two_force_update(x, g, buf, L, G, **kw)
        assert _relative_error(got_x, want_x) <= TOL[dtype], kw
        if use_momentum:
            assert _relative_error(got_m, want_m) <= TOL[dtype], kw
        checked += 1
    assert checked == 24


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pull_only_and_anchor(impl, dtype):
    x, _, _, L, G = _inputs(4097, dtype, seed=1)
    anchor = _inputs(4097, dtype, seed=2)[0]
    kw = dict(lr=0.0, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, local_pull=0.3,
              global_pull=0.2, first_step=False)
    for y in (None, anchor):
        got, _ = _run(impl, x, None, None, L, G, anchor=y, **kw)
        want, _ = fused.reference_two_force_update(x, None, None, L, G, anchor=y, **kw)
        assert _relative_error(got, want) <= TOL[dtype]


def test_matches_torch_sgd_then_pulls():
    """One fused call equals torch.optim.SGD.step() plus both pulls evaluated at the pre-step x."""
    gen = torch.Generator().manual_seed(0)
    x0, L, G = (torch.randn(1000, generator=gen) for _ in range(3))
    grads = [torch.randn(1000, generator=gen) for _ in range(3)]
    hyper = dict(lr=0.05, momentum=0.9, dampening=0.0, weight_decay=1e-3, nesterov=True)
    param = torch.nn.Parameter(x0.clone())
    sgd = torch.optim.SGD([param], **hyper)
    flat, buf = x0.clone(), torch.zeros(1000)
    for step, grad in enumerate(grads):
        before = param.detach().clone()
        param.grad = grad.clone()
        sgd.step()
        with torch.no_grad():
            param -= 0.1 * (before - L) + 0.2 * (before - G)
        fused.two_force_update_(flat, grad, buf, L, G, local_pull=0.1, global_pull=0.2, first_step=step == 0, **hyper)
        assert torch.allclose(flat, param.detach(), rtol=1e-5, atol=1e-6)
        assert torch.allclose(buf, sgd.state[param]["momentum_buffer"], rtol=1e-5, atol=1e-6)


def test_arguments_are_checked():
    x = torch.zeros(4)
    with pytest.raises(ValueError, match="momentum_buf"):
        fused.two_force_update_(x, x.clone(), None, None, None, lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="local_leader"):
        fused.two_force_update_(x, x.clone(), None, None, None, lr=0.1, local_pull=0.1)
    with pytest.raises(ValueError, match="grad must match"):
        fused.two_force_update_(x, torch.zeros(5), None, None, None, lr=0.1)
    with pytest.raises(TypeError, match="dtype"):
        fused.two_force_update_(torch.zeros(4, dtype=torch.int32), torch.zeros(4, dtype=torch.int32), None, None,
                                None, lr=0.1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_kernel_matches_reference(dtype):
    assert fused.extension_has_cuda(), "the extension was built without its CUDA kernel"
    for n in SIZES:
        x, g, m, L, G = (t.cuda() for t in _inputs(n, dtype, seed=n))
        for nesterov, first_step in itertools.product([False, True], [False, True]):
            kw = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.01, nesterov=nesterov, local_pull=0.25,
                      global_pull=0.5, first_step=first_step)
            got_x, got_m = _run("extension", x, g, m, L, G, **kw)
            want_x, want_m = fused.reference_two_force_update(x, g, m, L, G, **kw)
            assert _relative_error(got_x, want_x) <= TOL[dtype]
            assert _relative_error(got_m, want_m) <= TOL[dtype]
