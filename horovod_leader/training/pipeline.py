"""Which samples each rank trains on, epoch by epoch, in augmented batches.

Sampling (``--sampling``):

* ``reshuffle`` (default, the authors' ``DistributedSampler`` with ``set_epoch``): in epoch
  e one permutation π_e of the whole training set of N samples is drawn from (seed, e),
  the same on every rank, and rank r of p takes the slice ``π_e[r·L : (r+1)·L]`` with
  ``L = N // p``. Within an epoch the ranks' samples are disjoint and together cover the
  training set, less the ``N mod p`` remainder; each epoch gives each rank other samples.
* ``fixed``: rank r always trains on the strided shard ``r, r+p, r+2p, ...`` (L samples), in
  an order drawn from (seed, r, e): for studies of workers that see different data.

Each rank cuts its L samples into batches of ``batch_size`` (the last, partial one dropped
when L allows a full batch), so every rank takes the same number of steps per epoch. The
augmentation of batch b of epoch e on rank r uses a generator seeded from (seed, r, e, b):
everything a batch holds is a function of those numbers, and a run resumed in mid-epoch
replays the same batches without carrying generator state.
"""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch
from torch.utils.data import TensorDataset

from horovod_leader.training.augment import BatchAugment

SAMPLINGS = ("reshuffle", "fixed")

# Tags that keep the streams drawn from the same (seed, ...) numbers apart.
_ORDER, _AUGMENT, _FRESH = 1, 2, 3


def generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded from a tuple of integers (a fixed polynomial hash of them)."""
    seed = 0
    for part in parts:
        seed = (seed * 1_000_003 + int(part) + 7) % (1 << 62)
    return torch.Generator().manual_seed(seed)


def epoch_indices(n: int, rank: int, size: int, seed: int, epoch: int, sampling: str = "reshuffle") -> torch.Tensor:
    """The training-set indices rank ``rank`` of ``size`` visits in ``epoch``, in order."""
    length = n // size
    if sampling == "reshuffle":
        order = torch.randperm(n, generator=generator(_ORDER, seed, epoch))
        return order[rank * length:(rank + 1) * length]
    if sampling == "fixed":
        shard = torch.arange(n)[rank::size][:length]
        return shard[torch.randperm(length, generator=generator(_ORDER, seed, rank, epoch))]
    raise ValueError(f"--sampling {sampling!r} is not one of {list(SAMPLINGS)}")


class TrainPipeline:
    """This rank's training batches: sampled, augmented and moved to ``device``."""

    def __init__(self, train: TensorDataset, rank: int, size: int, batch_size: int, seed: int,
                 sampling: str = "reshuffle", augment: Optional[BatchAugment] = None,
                 device: torch.device = torch.device("cpu")):
        self.images, self.labels = train.tensors
        self.rank, self.size, self.batch_size, self.seed = rank, size, batch_size, seed
        self.sampling = sampling
        self.augment = augment or BatchAugment("none")
        self.device = device
        self.samples_per_rank = len(self.labels) // size
        if self.samples_per_rank == 0:
            raise ValueError(f"the training set has {len(self.labels)} samples, fewer than the {size} ranks")
        full = self.samples_per_rank // batch_size
        self.steps_per_epoch = full if full else 1  # a partial batch only when no full one fits
        self.batch_length = batch_size if full else self.samples_per_rank

    @property
    def num_samples(self) -> int:
        return len(self.labels)

    def indices(self, epoch: int) -> torch.Tensor:
        return epoch_indices(self.num_samples, self.rank, self.size, self.seed, epoch, self.sampling)

    def batch(self, indices: torch.Tensor, augment_generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        x = self.augment.train(self.images[indices], augment_generator)
        return x.to(self.device, non_blocking=True), self.labels[indices].to(self.device, non_blocking=True)

    def batches(self, epoch: int, skip: int = 0) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's batches from batch number ``skip`` on (a resumed run skips the ones seen)."""
        order = self.indices(epoch)
        for b in range(skip, self.steps_per_epoch):
            chosen = order[b * self.batch_length:(b + 1) * self.batch_length]
            yield self.batch(chosen, generator(_AUGMENT, self.seed, self.rank, epoch, b))

    def random_batch(self, count: int, draw: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """``count`` samples drawn without replacement from the whole training set, augmented;
        the ``draw``-th such batch of this rank (a function of seed, rank and draw)."""
        gen = generator(_FRESH, self.seed, self.rank, draw)
        chosen = torch.randperm(self.num_samples, generator=gen)[:count]
        return self.batch(chosen, gen)

    def evaluation_batches(self, limit: Optional[int], position: int, members: int
                           ) -> Iterator[torch.Tensor]:
        """Inputs for batch-norm re-estimation: the training set in index order, with the test
        transform, cut into batches of ``batch_size`` (full ones only, at least one); the first
        ``limit`` of them (all when None), batch k to member ``k mod members``. This member,
        at ``position``, gets its share."""
        total = max(self.num_samples // self.batch_size, 1)
        length = self.batch_size if self.num_samples >= self.batch_size else self.num_samples
        count = total if limit is None else min(limit, total)
        for k in range(position, count, members):
            x = self.augment.test(self.images[k * length:(k + 1) * length])
            yield x.to(self.device, non_blocking=True)


class FreshBatchLoss:
    """GRAWA's fresh gradient, as the authors take it: ``fresh_loss(model)`` is the loss of
    ``model`` on a new random batch of ``count`` samples from the whole training set
    (augmented, model in training mode), drawn at the moment of averaging. ``calls`` counts
    the batches drawn; it is saved in checkpoints so that a resumed run draws the same ones."""

    def __init__(self, pipeline: TrainPipeline, count: int):
        self.pipeline, self.count, self.calls = pipeline, count, 0

    def __call__(self, model: torch.nn.Module) -> torch.Tensor:
        x, y = self.pipeline.random_batch(self.count, self.calls)
        self.calls += 1
        from horovod_leader.training.metrics import cross_entropy

        return cross_entropy(model(x), y)
