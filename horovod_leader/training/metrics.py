"""What a task trains on and is judged by: the training loss, and the test metric of a model.

* Classification (digits, MNIST-1D, CIFAR-10, synthetic): cross-entropy; test **accuracy**,
  the share of test samples classified right (higher is better).
* Byte-level language modelling (``--dataset pystdlib``): cross-entropy of every next byte;
  validation **bits per byte**, the mean cross-entropy over every validation byte in bits
  (lower is better; 8 is a uniform guess over 256 values).

Each metric is computed from two sums that add up across ranks (``totals``), so a test set
shared out among the ranks gives exactly the value one process would compute.
"""
from __future__ import annotations

import math
from typing import Dict, Tuple

import torch
from torch import nn


def cross_entropy(output: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of (N, classes) or (N, T, classes) outputs against (N,) or (N, T) targets."""
    if output.dim() > 2:
        return nn.functional.cross_entropy(output.flatten(0, -2), target.flatten(), reduction=reduction)
    return nn.functional.cross_entropy(output, target, reduction=reduction)


class Metric:
    """A test metric: ``totals`` gives (sum, count) for some samples; ``value(sum, count)``."""

    name = ""
    higher_is_better = True
    #: the record keys: the centre, each worker (a list), LSGD's leader, each group's centre, rank 0's worker
    keys: Dict[str, str] = {}

    def totals(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, device,
               batch: int = 1024) -> Tuple[float, int]:
        raise NotImplementedError

    def value(self, total: float, count: int) -> float:
        raise NotImplementedError

    def better(self, a: float, b: float) -> bool:
        """Whether ``a`` is at least as good as ``b``."""
        return a >= b if self.higher_is_better else a <= b


class Accuracy(Metric):
    name = "accuracy"
    keys = {"centre": "centre_accuracy", "workers": "worker_accuracies", "leader": "leader_accuracy",
            "groups": "group_centre_accuracies", "worker0": "worker0_accuracy"}

    def totals(self, model, inputs, targets, device, batch=1024):
        was_training = model.training
        model.eval()
        correct = 0
        with torch.no_grad():
            for i in range(0, len(targets), batch):
                logits = model(inputs[i:i + batch].to(device, non_blocking=True))
                correct += int((logits.argmax(1).cpu() == targets[i:i + batch]).sum())
        model.train(was_training)
        return float(correct), len(targets)

    def value(self, total, count):
        return total / count if count else float("nan")


class BitsPerByte(Metric):
    name = "bits_per_byte"
    higher_is_better = False
    keys = {"centre": "centre_bits_per_byte", "workers": "worker_bits_per_byte", "leader": "leader_bits_per_byte",
            "groups": "group_centre_bits_per_byte", "worker0": "worker0_bits_per_byte"}

    def totals(self, model, inputs, targets, device, batch=64):
        was_training = model.training
        model.eval()
        nats, count = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(targets), batch):
                out = model(inputs[i:i + batch].to(device, non_blocking=True))
                nats += float(cross_entropy(out, targets[i:i + batch].to(device), reduction="sum"))
                count += targets[i:i + batch].numel()
        model.train(was_training)
        return nats, count

    def value(self, total, count):
        return total / count / math.log(2) if count else float("nan")


METRICS = {"accuracy": Accuracy(), "bits_per_byte": BitsPerByte()}


def for_dataset(name: str) -> Metric:
    """The metric a data set is judged by."""
    return METRICS["bits_per_byte" if name == "pystdlib" else "accuracy"]
