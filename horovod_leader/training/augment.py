"""CIFAR-10 augmentation on whole batches of tensors, never one PIL image at a time.

Three kinds (``--augment``):

* ``paper``: the authors' transform. Train: random horizontal flip, then a random 28x28
  crop (``RandomCrop(28)``, no padding). Test: the centre 28x28 crop (``CenterCrop(28)``).
* ``standard``: the common recipe. Train: pad 4 pixels with black, random 32x32 crop, random
  horizontal flip. Test: the image as it is.
* ``none``: the images as they are.

A crop is a gather: for sample n with offsets (i_n, j_n), ``out[n, c, a, b] =
x[n, c, i_n + a, j_n + b]``, done for the whole batch with one advanced-indexing call, so
augmenting a batch of 128 CIFAR images costs well under a millisecond of a 2-core machine.
Randomness comes from the ``torch.Generator`` the caller passes, so a batch's augmentation is
a function of that generator's seed alone (resumed runs replay it exactly).
"""
from __future__ import annotations

from typing import Optional

import torch

AUGMENTATIONS = ("paper", "standard", "none")
PAPER_CROP = 28
STANDARD_PADDING = 4


def output_size(kind: str, image_size: int) -> int:
    """Side of the images that ``kind`` produces from square images of side ``image_size``."""
    if kind == "paper":
        return PAPER_CROP
    if kind in ("standard", "none"):
        return image_size
    raise ValueError(f"--augment {kind!r} is not one of {list(AUGMENTATIONS)}")


def default_for(dataset: str, model_input: Optional[int]) -> str:
    """The authors' transform for CIFAR-10 (standard when the model needs 32x32, as VGG-16
    does: five poolings of a 28x28 crop leave nothing); none for the other data sets."""
    if dataset != "cifar10":
        return "none"
    return "standard" if model_input == 32 else "paper"


def check_fit(kind: str, dataset: str, shape, model: str, model_input: Optional[int]) -> None:
    """Refuse a model and augmentation that do not fit, naming ``--augment``."""
    if len(shape) != 3:
        if kind != "none":
            raise ValueError(f"--augment {kind} crops images, but --dataset {dataset} holds signals of shape "
                             f"{tuple(shape)}: use --augment none")
        return
    channels, height, width = shape
    if kind == "paper" and min(height, width) < PAPER_CROP:
        raise ValueError(f"--augment paper crops 28x28, but --dataset {dataset} has {height}x{width} images: "
                         f"use --augment none or standard")
    if model_input is None:
        return
    produced = output_size(kind, height)
    if produced != model_input or height != width:
        fits = [k for k in AUGMENTATIONS if output_size(k, height) == model_input and height == width and
                not (k == "paper" and height < PAPER_CROP)]
        hint = f"use --augment {' or '.join(fits)}" if fits else f"choose another --dataset or --model"
        raise ValueError(f"--augment {kind} gives {channels}x{produced}x{produced} images from --dataset {dataset}, "
                         f"but --model {model} needs {model_input}x{model_input}: {hint}")


def crop(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, size: int) -> torch.Tensor:
    """``x[n, :, top[n]:top[n]+size, left[n]:left[n]+size]`` for every n, in one gather."""
    n, c = x.shape[:2]
    steps = torch.arange(size, device=x.device)
    rows = (top.to(x.device)[:, None] + steps)[:, None, :, None]
    cols = (left.to(x.device)[:, None] + steps)[:, None, None, :]
    return x[torch.arange(n, device=x.device)[:, None, None, None], torch.arange(c, device=x.device)[None, :, None, None],
             rows, cols]


def random_crop(x: torch.Tensor, size: int, generator: torch.Generator, padding: int = 0,
                fill: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A random ``size`` x ``size`` crop of each image, after padding every side by
    ``padding`` pixels of value ``fill`` (per channel)."""
    if padding:
        n, c, h, w = x.shape
        padded = torch.empty(n, c, h + 2 * padding, w + 2 * padding, dtype=x.dtype, device=x.device)
        padded[:] = (fill if fill is not None else torch.zeros(c)).to(x.dtype).to(x.device).view(1, c, 1, 1)
        padded[:, :, padding:padding + h, padding:padding + w] = x
        x = padded
    n, _, h, w = x.shape
    top = torch.randint(0, h - size + 1, (n,), generator=generator)
    left = torch.randint(0, w - size + 1, (n,), generator=generator)
    return crop(x, top, left, size)


def random_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image mirrored left-right with probability 1/2."""
    flip = (torch.rand(x.shape[0], generator=generator) < 0.5).to(x.device).view(-1, 1, 1, 1)
    return torch.where(flip, x.flip(3), x)


def centre_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """The central ``size`` x ``size`` window, rounded as torchvision's ``CenterCrop``."""
    h, w = x.shape[-2:]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return x[..., top:top + size, left:left + size]


class BatchAugment:
    """One ``--augment`` kind: ``train(x, generator)`` for training batches, ``test(x)`` for
    evaluation (and batch-norm re-estimation)."""

    def __init__(self, kind: str, fill: Optional[torch.Tensor] = None):
        output_size(kind, PAPER_CROP)  # validates the name
        self.kind = kind
        self.fill = fill

    def train(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.kind == "paper":  # torchvision order: flip, then crop
            return random_crop(random_flip(x, generator), PAPER_CROP, generator)
        if self.kind == "standard":
            return random_flip(random_crop(x, x.shape[-1], generator, STANDARD_PADDING, self.fill), generator)
        return x

    def test(self, x: torch.Tensor) -> torch.Tensor:
        return centre_crop(x, PAPER_CROP) if self.kind == "paper" else x
