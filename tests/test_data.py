"""The data pipeline: per-epoch sampling, batch-wise augmentation, fresh batches."""
import pytest
import torch
import torchvision.transforms.functional as TF
from torch.utils.data import TensorDataset

from horovod_leader.training import data
from horovod_leader.training import augment
from horovod_leader.training.pipeline import FreshBatchLoss, TrainPipeline, epoch_indices


def test_reshuffle_covers_the_set_with_disjoint_slices_and_changes_every_epoch():
    n, size = 1003, 4
    epochs = []
    for epoch in range(2):
        slices = [epoch_indices(n, rank, size, seed=5, epoch=epoch) for rank in range(size)]
        assert all(len(s) == n // size for s in slices)
        union = torch.cat(slices)
        assert len(set(union.tolist())) == len(union) == n - n % size  # disjoint, everything but the remainder
        assert set(union.tolist()) <= set(range(n))
        epochs.append(slices)
    for rank in range(size):
        assert not torch.equal(epochs[0][rank], epochs[1][rank])  # another order ...
        assert set(epochs[0][rank].tolist()) != set(epochs[1][rank].tolist())  # ... and other samples
    assert torch.equal(epoch_indices(n, 2, size, seed=5, epoch=1), epochs[1][2])  # a function of (seed, epoch)


def test_fixed_sampling_keeps_the_shard():
    n, size = 1003, 4
    for rank in range(size):
        shard = set(range(rank, n, size)[:n // size])
        first = epoch_indices(n, rank, size, seed=5, epoch=0, sampling="fixed")
        second = epoch_indices(n, rank, size, seed=5, epoch=1, sampling="fixed")
        assert set(first.tolist()) == set(second.tolist()) == shard
        assert not torch.equal(first, second)  # reshuffled within the shard
    with pytest.raises(ValueError, match="--sampling"):
        epoch_indices(n, 0, size, 0, 0, sampling="iid")


def test_crop_gathers_each_window():
    x = torch.randn(5, 3, 32, 32)
    top, left = torch.tensor([0, 4, 2, 1, 3]), torch.tensor([4, 0, 3, 2, 1])
    out = augment.crop(x, top, left, 28)
    for n in range(5):
        assert torch.equal(out[n], x[n, :, top[n]:top[n] + 28, left[n]:left[n] + 28])
    assert torch.equal(augment.centre_crop(x, 28), TF.center_crop(x, [28, 28]))


def test_paper_augmentation_crops_28_and_flips():
    x = torch.randn(64, 3, 32, 32)
    out = augment.BatchAugment("paper").train(x, torch.Generator().manual_seed(0))
    assert out.shape == (64, 3, 28, 28)
    flipped = 0
    for n in range(64):  # every output is a 28x28 window of the image or of its mirror
        plain = any(torch.equal(out[n], x[n, :, i:i + 28, j:j + 28]) for i in range(5) for j in range(5))
        mirror = any(torch.equal(out[n], x[n].flip(2)[:, i:i + 28, j:j + 28]) for i in range(5) for j in range(5))
        assert plain or mirror
        flipped += not plain
    assert 10 < flipped < 54  # about half
    assert augment.BatchAugment("paper").test(x).shape == (64, 3, 28, 28)


def test_standard_augmentation_pads_with_black():
    fill = data.black_level("cifar10")
    x = torch.randn(256, 3, 32, 32)
    out = augment.BatchAugment("standard", fill).train(x, torch.Generator().manual_seed(1))
    assert out.shape == x.shape
    padded_pixels = (out == fill.view(1, 3, 1, 1)).all(1)  # pixels that are black in every channel
    assert padded_pixels.any()  # some crops reach into the padding
    assert torch.allclose(fill, -torch.tensor(data.CIFAR10_MEAN) / torch.tensor(data.CIFAR10_STD))
    assert torch.equal(augment.BatchAugment("standard", fill).test(x), x)
    assert torch.equal(augment.BatchAugment("none").train(x, torch.Generator()), x)


def small_set(n=103):
    gen = torch.Generator().manual_seed(3)
    return TensorDataset(torch.randn(n, 3, 32, 32, generator=gen), torch.randint(0, 10, (n,), generator=gen))


def test_pipeline_batches_replay_exactly():
    train = small_set()
    pipe = TrainPipeline(train, 1, 4, 8, seed=2, augment=augment.BatchAugment("paper"))
    assert pipe.steps_per_epoch == 25 // 8
    batches = list(pipe.batches(3))
    again = list(pipe.batches(3, skip=1))  # a resumed run skips the batches already seen
    assert len(batches) == 3 and len(again) == 2
    for (x1, y1), (x2, y2) in zip(batches[1:], again):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    order = epoch_indices(103, 1, 4, 2, 3)
    assert torch.equal(torch.cat([y for _, y in batches]), train.tensors[1][order[:24]])
    assert batches[0][0].shape == (8, 3, 28, 28)


def test_fresh_batch_loss_is_a_new_random_batch_each_time():
    train = small_set()
    pipe = TrainPipeline(train, 0, 2, 8, seed=2)
    fresh = FreshBatchLoss(pipe, 16)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    first, second = fresh(model), fresh(model)
    assert fresh.calls == 2 and first.requires_grad and float(first.detach()) != float(second.detach())
    x, y = pipe.random_batch(16, 0)  # the first draw, reproduced from (seed, rank, draw)
    assert len(set(y.tolist())) > 1 and x.shape == (16, 3, 32, 32)
    assert torch.allclose(first, torch.nn.functional.cross_entropy(model(x), y))


def test_mnist1d_is_generated_deterministically_cached_and_offline(tmp_path, monkeypatch):
    import random

    import numpy as np

    import mnist1d.data
    from horovod_leader.training import data_mnist1d

    def no_network(*args, **kwargs):
        raise AssertionError("MNIST-1D must not be downloaded")

    monkeypatch.setattr(mnist1d.data.requests, "get", no_network)
    monkeypatch.setattr(mnist1d.data, "get_dataset", no_network)
    monkeypatch.setenv("HOROVOD_LEADER_CACHE", str(tmp_path))
    random.seed(5)
    np.random.seed(5)
    expected_python, expected_numpy = random.random(), np.random.rand()
    random.seed(5)
    np.random.seed(5)
    train, test, channels, classes = data.load("mnist1d", samples=400)
    assert (random.random(), np.random.rand()) == (expected_python, expected_numpy)  # caller's state intact
    assert (channels, classes) == (1, 10)
    assert train.tensors[0].shape == (320, 1, 40) and test.tensors[0].shape == (80, 1, 40)
    assert train.tensors[0].dtype == torch.float32 and train.tensors[1].dtype == torch.int64
    assert set(train.tensors[1].tolist()) == set(range(10))
    cached = list(tmp_path.glob("mnist1d-*.npz"))
    assert len(cached) == 1 and not list(tmp_path.glob(".*tmp*"))
    # From the cache: the same arrays, without generating again.
    generate = data_mnist1d.generate
    monkeypatch.setattr(data_mnist1d, "generate", no_network)
    again, _, _, _ = data.load("mnist1d", samples=400)
    assert torch.equal(again.tensors[0], train.tensors[0]) and torch.equal(again.tensors[1], train.tensors[1])
    # Generation itself is a function of its arguments (the fixed data seed), not of the caller's seed.
    fresh = generate(data_mnist1d.generation_args(400))
    assert np.array_equal(fresh["x"].astype(np.float32)[:, None, :], train.tensors[0].numpy())
    other = data_mnist1d.generation_args(600)
    assert data_mnist1d.generation_args(400) != other
    with pytest.raises(ValueError, match="num_samples"):
        data_mnist1d.mnist1d(10)
