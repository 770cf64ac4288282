"""Flatness of a minimum: the trace and the largest eigenvalue of the loss Hessian.

GRAWA's claim is that it finds flatter minima than data-parallel SGD, EASGD and LSGD; its
authors measure flatness by the trace of the Hessian and by its top eigenvalue. Both are
computed here from Hessian-vector products alone, never from the Hessian itself:

* ``hessian_trace``: Hutchinson's estimator with Rademacher probes;
* ``top_eigenvalue``: the largest *algebraic* eigenvalue, by Lanczos iteration.

The Hessian is that of the mean loss over a fixed collection of batches,

    L(θ) = (1/B) Σ_b loss_fn(model, batch_b),    H = ∇²L(θ),

taken with respect to the parameters that require gradients, at the model's current values.
Hessian-vector products are PyTorch's own forward-over-reverse product,
``torch.func.jvp(torch.func.grad(L), (θ,), (v,))``, over ``torch.func.functional_call``.

Batch norm: the model is evaluated in **evaluation mode**, with the running statistics
stored in the model (the function the model computes at test time; batch statistics
would make every sample's loss depend on the rest of its batch). The model's mode, module
by module, is restored afterwards; its parameters, buffers and ``.grad`` are not touched.

Both functions work in a plain process, with neither Horovod nor MPI initialised. Given a
Horovod ``process_set=``, every rank of the set must call them with the same model values,
the same batches and the same arguments; the work is then spread over the set and the
result is the same float on every rank:

* ``hessian_trace`` spreads the probes (probe s on the set's rank s mod size) and joins the
  probe values with one all-reduce (``flatness.trace.values``); each probe is drawn from
  (seed, s) alone, so the value is the single-process value with the same seed, bit for bit
  when the Hessian-vector products are;
* ``top_eigenvalue`` spreads the batches (batch b on rank b mod size) and all-reduces every
  Hessian-vector product (``flatness.eig.hvp``); it agrees with the single-process value up
  to the rounding of the summation order, and rank 0 of the set broadcasts the final value
  (``flatness.eig.result``) so that every rank returns the same float.

Before any of that, one all-gather (``flatness.<kind>.check``, then ``.messages``) compares
the arguments across the set: a bad argument on any rank, or ranks that disagree, raise the
same ``ValueError`` on every rank of the set, and no rank is left waiting in a collective.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

LossFn = Callable[[nn.Module, Any], torch.Tensor]


# --------------------------------------------------------------------------- public API
def hessian_trace(model: nn.Module, loss_fn: LossFn, batches: Iterable, samples: int = 100, seed: int = 0,
                  process_set: Any = None) -> float:
    """Hutchinson's estimate of tr(H), with Rademacher probes.

    Estimator: with probes z_1..z_S whose entries are independent ±1 (E[z zᵀ] = I),

        tr(H) ≈ (1/S) Σ_s z_sᵀ H z_s,

    unbiased since E[zᵀHz] = tr(H E[zzᵀ]) = tr(H).

    Variance: for symmetric H and Rademacher z, Var(zᵀHz) = 2 Σ_{i≠j} H_ij² = 2(‖H‖_F² − Σ_i H_ii²)
    (the diagonal contributes nothing, since z_i² = 1), so the estimate has standard error

        σ = sqrt(2(‖H‖_F² − Σ_i H_ii²) / S).

    Samples for a precision: a standard error ε needs S ≥ 2(‖H‖_F² − Σ_i H_ii²) / ε²; the
    error shrinks as 1/sqrt(S), so halving it takes 4x the probes. ‖H‖_F is not known in
    advance; the sample variance s² of the probe values (``hutchinson_values``) estimates
    2(‖H‖_F² − Σ H_ii²), giving S ≈ s²/ε² (for a relative error r: S ≈ s² / (r·tr H)²).

    Args:
        model: evaluated in eval mode (batch-norm running statistics as stored), restored after.
        loss_fn: ``loss_fn(model, batch)`` returns a scalar tensor.
        batches: a re-iterable collection of batches (read once, into a list); the Hessian is
            that of their mean loss.
        samples: number of probes S (each costs one Hessian-vector product per batch).
        seed: probe s is drawn from (seed, s) alone, whichever rank computes it.
        process_set: a Horovod process set to spread the probes over, or ``None``.

    Returns the estimate as a float (the same on every rank of ``process_set``).
    """
    return float(np.mean(hutchinson_values(model, loss_fn, batches, samples, seed, process_set)))


def hutchinson_values(model: nn.Module, loss_fn: LossFn, batches: Iterable, samples: int = 100, seed: int = 0,
                      process_set: Any = None) -> List[float]:
    """The S probe values z_sᵀ H z_s whose mean is ``hessian_trace`` (same arguments).

    Their sample standard deviation divided by sqrt(S) is the estimate's standard error."""
    with _evaluation_mode(model):
        hessian = _agree(process_set, "trace", ("samples", samples), lambda: _Hessian(model, loss_fn, batches, seed))
        rank, size = _rank_and_size(process_set)
        values = torch.zeros(samples, dtype=torch.float64)
        for s in range(rank, samples, size):
            z = _rademacher(hessian.dimension, seed, s).to(hessian.device, hessian.dtype)
            values[s] = float(torch.dot(z, hessian.product(z)))
    if size > 1:
        from horovod_leader import engine
        hvd = engine.active()

        # Every entry is non-zero on exactly one rank, so the sum reproduces it exactly.
        hvd.allreduce_(values, op=hvd.Sum, name="flatness.trace.values", process_set=process_set)
    return values.tolist()


def top_eigenvalue(model: nn.Module, loss_fn: LossFn, batches: Iterable, iters: int = 50, seed: int = 0,
                   process_set: Any = None) -> float:
    """The largest algebraic eigenvalue λ_max of H, by Lanczos iteration with full
    re-orthogonalisation.

    Why not plain power iteration: it converges to the eigenvalue of largest *magnitude*,
    which at a saddle or on a non-convex loss can be a negative one. Lanczos builds an
    orthonormal basis Q_k of the Krylov space span{q, Hq, ..., H^(k-1) q} (q drawn from
    ``seed``) in which T_k = Q_kᵀ H Q_k is tridiagonal; the largest eigenvalue θ_k of T_k
    (a Ritz value) is returned. It approaches both ends of the spectrum, so a dominant
    negative eigenvalue does not mislead it.

    Estimator and error: θ_k ≤ λ_max, and θ_k increases with k (Cauchy interlacing), so the
    estimate is a lower bound. By the Kaniel-Paige bound, with eigenvalues λ_1 ≥ λ_2 ≥ ... ≥ λ_n,
    γ = (λ_1 − λ_2)/(λ_2 − λ_n) and φ the angle between q and the top eigenvector,

        0 ≤ λ_1 − θ_k ≤ (λ_1 − λ_n) · (tan φ / C_{k−1}(1 + 2γ))²,

    where C_{k−1} is the Chebyshev polynomial, growing like exp(2(k−1)·sqrt(γ)). So the error
    falls geometrically with k; a relative precision r needs about
    k ≈ 1 + ln(2 tan φ · sqrt((λ_1 − λ_n)/(r·|λ_1|))) / (2 sqrt(γ)) steps (tan φ ~ sqrt(n) for a
    random q), and a small gap γ needs more. There is no sampling variance: for a given q
    the result is deterministic. It stops early, exactly, when the Krylov space becomes
    invariant (for example after n steps for n parameters).

    Args:
        model, loss_fn, batches, seed, process_set: as in ``hessian_trace``; with
            ``process_set`` the batches are spread over its ranks.
        iters: Lanczos steps k (one Hessian-vector product each). Memory: k vectors
            of the size of the parameters.

    Returns λ_max's estimate as a float (the same on every rank of ``process_set``).
    """
    with _evaluation_mode(model):
        hessian = _agree(process_set, "eig", ("iters", iters), lambda: _Hessian(model, loss_fn, batches, seed))
        rank, size = _rank_and_size(process_set)
        mine = [b for b in range(len(hessian.batches)) if b % size == rank]

        def product(v: torch.Tensor) -> torch.Tensor:
            if size == 1:
                return hessian.product(v)
            from horovod_leader import engine
            hvd = engine.active()

            local = hessian.product(v, mine, divide_by=len(hessian.batches))
            return hvd.allreduce_(local, op=hvd.Sum, name="flatness.eig.hvp", process_set=process_set)

        start = _gaussian(hessian.dimension, seed).to(hessian.device, hessian.dtype)
        value = _lanczos_top(product, start, iters)
    if size > 1:
        from horovod_leader import engine
        hvd = engine.active()

        result = torch.tensor([value], dtype=torch.float64)
        root = sorted(_ranks_of(process_set))[0]
        value = float(hvd.broadcast_(result, root_rank=root, name="flatness.eig.result", process_set=process_set))
    return value


# --------------------------------------------------------------------------- batches and loss
def fixed_training_batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, count: int,
                           transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                           device: Optional[torch.device] = None) -> List:
    """The first ``count`` full batches of ``batch_size`` of a training set, in index order,
    through ``transform`` (the test-time one: no random augmentation), as (x, y) pairs:
    the same on every rank and in every run with the same data split."""
    _check_count("count", count)
    _check_count("batch_size", batch_size)
    length = min(batch_size, len(labels))
    batches = []
    for k in range(min(count, max(len(labels) // length, 1))):
        x, y = images[k * length:(k + 1) * length], labels[k * length:(k + 1) * length]
        x = transform(x) if transform is not None else x
        batches.append((x.to(device), y.to(device)) if device is not None else (x, y))
    return batches


def cross_entropy_loss(model: nn.Module, batch) -> torch.Tensor:
    """The training loss, as ``loss_fn(model, (x, y))``."""
    x, y = batch
    out = model(x)
    if out.dim() > 2:  # a sequence model: every position's prediction
        return nn.functional.cross_entropy(out.flatten(0, -2), y.flatten())
    return nn.functional.cross_entropy(out, y)


# --------------------------------------------------------------------------- the Hessian operator
class _Objective(nn.Module):
    """``loss_fn(model, batch)`` as a module, so that ``functional_call`` can swap in parameters."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch):
        return self.loss_fn(self.model, batch)


class _Hessian:
    """Products H·v of the mean-loss Hessian with flat vectors, at the model's current parameters."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, batches: Iterable, seed: int):
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise ValueError(f"loss_fn must be callable as loss_fn(model, batch), got {loss_fn!r}")
        try:
            self.batches: List = list(batches)
        except TypeError:
            raise ValueError(f"batches must be an iterable of batches, got {type(batches).__name__}") from None
        if not self.batches:
            raise ValueError("batches is empty: the Hessian of the mean loss needs at least one batch")
        named = [(f"model.{name}", p) for name, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("model has no parameters that require gradients")
        dtypes = {p.dtype for _, p in named}
        if any(not dtype.is_floating_point for dtype in dtypes) or len({p.device for _, p in named}) > 1:
            raise ValueError("model's parameters must be floating point and on one device")
        try:
            with torch.no_grad():
                probe = loss_fn(model, self.batches[0])
        except Exception as error:  # reported on every rank of the set, not left to hang the others
            raise ValueError(f"loss_fn(model, batches[0]) raised {type(error).__name__}: {error}") from error
        if not isinstance(probe, torch.Tensor) or probe.numel() != 1:
            raise ValueError(f"loss_fn must return a scalar tensor, got {type(probe).__name__}"
                             f"{'' if not isinstance(probe, torch.Tensor) else ' of shape ' + str(tuple(probe.shape))}")
        self.names = [name for name, _ in named]
        self.params = {name: p.detach() for name, p in named}
        self.shapes = [p.shape for _, p in named]
        self.sizes = [p.numel() for _, p in named]
        self.dimension = sum(self.sizes)
        self.dtype = torch.float64 if torch.float64 in dtypes else torch.float32
        self.param_dtypes = [p.dtype for _, p in named]
        self.device = named[0][1].device
        self.seed = int(seed)
        objective = _Objective(model, loss_fn)

        def loss(params, batch):
            return torch.func.functional_call(objective, params, (batch,)).reshape(())

        self._gradient = torch.func.grad(loss)

    def _unflatten(self, v: torch.Tensor) -> Dict[str, torch.Tensor]:
        pieces = torch.split(v, self.sizes)
        return {name: piece.reshape(shape).to(dtype)
                for name, piece, shape, dtype in zip(self.names, pieces, self.shapes, self.param_dtypes)}

    def product(self, v: torch.Tensor, indices: Optional[Sequence[int]] = None,
                divide_by: Optional[int] = None) -> torch.Tensor:
        """(1/divide_by) Σ_{b in indices} H_b v (defaults: every batch, their number)."""
        indices = range(len(self.batches)) if indices is None else indices
        tangent = self._unflatten(v)
        total = torch.zeros(self.dimension, dtype=self.dtype, device=self.device)
        for b in indices:
            batch = self.batches[b]
            _, hv = torch.func.jvp(lambda p: self._gradient(p, batch), (self.params,), (tangent,))
            total += torch.cat([hv[name].reshape(-1).to(self.dtype) for name in self.names])
        return total / (len(self.batches) if divide_by is None else divide_by)


def _lanczos_top(product: Callable[[torch.Tensor], torch.Tensor], start: torch.Tensor, iters: int) -> float:
    """Largest Ritz value after ``iters`` Lanczos steps from ``start``."""
    steps = min(iters, start.numel())
    basis = torch.empty(steps, start.numel(), dtype=start.dtype, device=start.device)  # Q_k, one row per vector
    basis[0] = start / torch.linalg.vector_norm(start)
    alphas: List[float] = []
    betas: List[float] = []
    scale = 0.0
    tiny = 100 * torch.finfo(start.dtype).eps
    for k in range(steps):
        w = product(basis[k])
        scale = max(scale, float(torch.linalg.vector_norm(w)))
        alphas.append(float(torch.dot(w, basis[k])))
        # Full re-orthogonalisation, twice ("twice is enough"): without it rounding lets the
        # basis lose orthogonality and spurious copies of converged eigenvalues appear.
        known = basis[:k + 1]
        for _ in range(2):
            w = w - known.T @ (known @ w)
        beta = float(torch.linalg.vector_norm(w))
        if k + 1 == steps or beta <= tiny * max(scale, 1e-300):
            break  # done; or the Krylov space is invariant: T's eigenvalues are exact eigenvalues of H
        betas.append(beta)
        basis[k + 1] = w / beta
    off = np.asarray(betas[:len(alphas) - 1])
    tridiagonal = np.diag(np.asarray(alphas)) + np.diag(off, 1) + np.diag(off, -1)
    return float(np.linalg.eigvalsh(tridiagonal)[-1])


# --------------------------------------------------------------------------- helpers
def _check_count(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _generator(seed: int, stream: int) -> torch.Generator:
    # Independent streams from (seed, stream), whatever rank draws them.
    state = np.random.SeedSequence([seed, stream]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))


def _rademacher(n: int, seed: int, probe: int) -> torch.Tensor:
    return torch.randint(0, 2, (n,), generator=_generator(seed, probe), dtype=torch.float64) * 2 - 1


def _gaussian(n: int, seed: int) -> torch.Tensor:
    # Stream 2**32 is out of the probes' range, so Lanczos' start is not a probe.
    return torch.randn(n, generator=_generator(seed, 1 << 32), dtype=torch.float64)


@contextlib.contextmanager
def _evaluation_mode(model: nn.Module):
    """Eval mode inside; each module's own training flag restored after."""
    modes = [(m, m.training) for m in model.modules()] if isinstance(model, nn.Module) else []
    if modes:
        model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _ranks_of(process_set) -> List[int]:
    from horovod_leader import engine
    hvd = engine.active()

    return list(range(hvd.size())) if process_set is hvd.global_process_set else list(process_set.ranks)


def _rank_and_size(process_set) -> tuple:
    """This rank's index in the set and the set's size; (0, 1) without a set."""
    return (0, 1) if process_set is None else (process_set.rank(), process_set.size())


def _check_process_set(process_set) -> None:
    from horovod_leader import engine
    hvd = engine.active()

    if not hvd.is_initialized():
        raise ValueError("process_set was given but Horovod is not initialised: call hvd.init() first, "
                         "or pass process_set=None")
    if getattr(process_set, "process_set_id", None) is None or not callable(getattr(process_set, "size", None)):
        raise ValueError(f"process_set must be a registered Horovod process set, got {process_set!r}")
    if hvd.rank() not in _ranks_of(process_set):
        raise ValueError(f"process_set {process_set.ranks} does not include this rank {hvd.rank()}")


def _agree(process_set, kind: str, count: tuple, build: Callable[[], _Hessian]) -> _Hessian:
    """Check the arguments and build the operator; with a process set, make sure that every
    rank of it got valid and identical arguments, else raise the same error on all of them.

    Each rank checks its own arguments without communicating; then one all-gather of a row
    of integers (``flatness.<kind>.check``), reached by every rank whatever its arguments,
    tells every rank whether any rank failed or disagrees; the failing ranks' messages
    follow in a second all-gather (``flatness.<kind>.messages``). No rank raises alone."""
    name, value = count
    problem, hessian = None, None
    try:
        _check_count(name, value)
        hessian = build()
    except ValueError as error:
        if process_set is None:
            raise
        problem = str(error) or type(error).__name__
    if process_set is None:
        return hessian
    _check_process_set(process_set)  # local facts about the set itself: the same on every member
    from horovod_leader import engine
    hvd = engine.active()

    message = (problem or "").replace("\n", " ").encode()
    fields = [-1] * 5 if hessian is None else [int(value), hessian.seed, len(hessian.batches), hessian.dimension,
                                                 0 if hessian.dtype == torch.float32 else 1]
    row = torch.tensor([[len(message)] + fields], dtype=torch.int64)
    table = hvd.allgather(row, name=f"flatness.{kind}.check", process_set=process_set)
    ranks = sorted(_ranks_of(process_set))
    if int(table[:, 0].max()) > 0:
        # Horovod's all-gather takes a different length from each rank; one byte more each,
        # so that no rank sends an empty tensor.
        raw = hvd.allgather(torch.tensor(list(message + b"\n"), dtype=torch.uint8),
                            name=f"flatness.{kind}.messages", process_set=process_set)
        texts = bytes(raw.tolist()).decode(errors="replace").split("\n")
        failed = [f"rank {r}: {text}" for r, text in zip(ranks, texts) if text]
        raise ValueError("bad arguments on some ranks of process_set: " + "; ".join(failed))
    labels = (name, "seed", "number of batches", "number of parameters", "parameter dtype (float32/float64)")
    for column, label in enumerate(labels, start=1):
        seen = table[:, column].tolist()
        if len(set(seen)) > 1:
            raise ValueError(f"the ranks {ranks} of process_set disagree on {label}: {seen}; every rank must pass "
                             "the same model, batches and arguments")
    return hessian
