"""Models used by the examples, tests and benchmarks.

``cnn`` is a small convolutional net for the 8x8 digits data set (scikit-learn's bundled
``load_digits``): it trains to > 95% test accuracy in a few hundred steps on a CPU.

The papers' CIFAR-10 models, layer for layer as in the authors' code (which takes ResNet-20
from akamaster/pytorch_resnet_cifar10 and VGG-16 from chengyangfu/pytorch-vgg-cifar10):

=========== =================================================== ============ =============
name        architecture                                        input        parameters
=========== =================================================== ============ =============
``resnet20`` ResNet-20, option A (zero-padding shortcuts)       any (28, 32) 269,722
``cnn7``     the EASGD paper's 7-layer CNN, no batch norm        3x28x28      351,946
``vgg16``    VGG-16 with batch norm, dropout/512/512/10 head     3x32x32      15,253,578
=========== =================================================== ============ =============

For MNIST-1D (40-point signals): ``cnn1d``, a small 1-D CNN, and ``mlp``, a wide
multi-layer perceptron (``width`` units in two hidden layers; the default 2,000 gives
4,104,010 parameters on MNIST-1D), the communication-heavy case; ``mlp`` takes any input.

Every model class states what input it needs: ``input_dims`` (2 for images, 1 for signals,
``None`` for anything) and ``input_size`` (the square side, ``None``: any), so that the
training command can refuse a model, data set and augmentation that do not fit before
building anything.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F


class DigitsCNN(nn.Module):
    """conv(16) - conv(32) - maxpool - fc(64) - fc(classes), for 1x8x8 inputs (other sizes
    through an adaptive pooling to 4x4)."""

    input_dims: Optional[int] = 2
    input_size: Optional[int] = None

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 8):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4) if image_size != 8 else nn.Identity(),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class ZeroPadShortcut(nn.Module):
    """ResNet option A shortcut: subsample by 2 and zero-pad the new channels, no parameters.

    ``x[:, :, ::2, ::2]`` padded with ``(planes - in_planes) / 2`` zero channels on each side,
    exactly the authors' ``F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, planes//4, planes//4))``
    (there ``planes = 2 * in_planes``)."""

    def __init__(self, in_planes: int, planes: int):
        super().__init__()
        extra = planes - in_planes
        self.pad_before, self.pad_after = extra // 2, extra - extra // 2

    def forward(self, x):
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad_before, self.pad_after))


class BasicBlock(nn.Module):
    """ResNet basic block for CIFAR (He et al., 2016) with option A shortcuts."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = ZeroPadShortcut(in_planes, planes) if stride != 1 or in_planes != planes else nn.Identity()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCIFAR(nn.Module):
    """ResNet-(6n+2) for CIFAR; n=3 is ResNet-20 (269,722 parameters for 10 classes), the
    papers' model. Global average pooling makes it work on 28x28 crops as well as 32x32."""

    input_dims: Optional[int] = 2
    input_size: Optional[int] = None

    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}")
        n = (depth - 2) // 6
        self.conv = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        layers, planes_in = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(n):
                layers.append(BasicBlock(planes_in, planes, stride if i == 0 else 1))
                planes_in = planes
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():  # as in the authors' source (akamaster)
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x):
        out = self.layers(F.relu(self.bn(self.conv(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


class CNN7(nn.Module):
    """The 7-layer network of the EASGD paper (section 5.1), as in the LSGD authors' code:

    conv 5x5 (64), ReLU, maxpool 2 -> conv 5x5 (128), ReLU, maxpool 2 -> conv 3x3 (64), ReLU
    -> FC 256 -> dropout 0.5 -> FC classes. No padding and no batch norm, so it needs 28x28
    input (28 -> 24 -> 12 -> 8 -> 4 -> 2, and 64 x 2 x 2 = 256 features): 351,946 parameters.
    """

    input_dims: Optional[int] = 2
    input_size: Optional[int] = 28

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 64, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(128, 64, 3), nn.ReLU(),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(256, 256), nn.Dropout(0.5), nn.Linear(256, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


# VGG configuration "D" (16 weight layers): channel counts, "M" for a 2x2 max pooling.
VGG16_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG16(nn.Module):
    """VGG-16 with batch norm for CIFAR, as in the authors' code: 13 convolutions 3x3 (with
    bias) + batch norm + ReLU, five 2x2 poolings, then dropout, FC 512, ReLU, dropout, FC 512,
    ReLU, FC classes: 15,253,578 parameters. Five poolings take 32x32 to 1x1, so it needs 32x32
    input (28x28 would reach 0x0). Convolutions start from N(0, 2/(k*k*out)), biases at 0."""

    input_dims: Optional[int] = 2
    input_size: Optional[int] = 32

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        layers, channels = [], in_channels
        for item in VGG16_LAYERS:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(channels, item, 3, padding=1), nn.BatchNorm2d(item), nn.ReLU()]
                channels = item
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(), nn.Linear(512, 512), nn.ReLU(), nn.Dropout(),
                                        nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, (2.0 / fan_out) ** 0.5)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.classifier(self.features(x))


class CNN1D(nn.Module):
    """A 1-D CNN for MNIST-1D signals of shape (channels, length):

    conv 5 (32), ReLU -> conv 3 stride 2 (32), ReLU -> conv 3 stride 2 (32), ReLU -> FC classes.
    On (1, 40): 40 -> 20 -> 10 positions, 320 features, 9,610 parameters: a small CNN of
    the kind of Greydanus' MNIST-1D baseline (about 94% on 4,000 training samples).
    """

    input_dims: Optional[int] = 1
    input_size: Optional[int] = None

    def __init__(self, num_classes: int = 10, in_channels: int = 1, length: int = 40, channels: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(in_channels, channels, 5, padding=2), nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU(),
        )
        out = (((length - 1) // 2 + 1) - 1) // 2 + 1  # two stride-2 convolutions, padding 1
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(channels * out, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


class WideMLP(nn.Module):
    """Flatten, then FC ``width``, ReLU, FC ``width``, ReLU, FC classes: with d inputs,
    ``width**2 + (d + 12)·width + classes`` parameters (10 classes), so 4,104,010 at the
    default width 2,000 on MNIST-1D (d = 40): data-parallel SGD all-reduces 16 MB a step."""

    input_dims: Optional[int] = None
    input_size: Optional[int] = None
    DEFAULT_WIDTH = 2000

    def __init__(self, num_classes: int = 10, inputs: int = 40, width: int = DEFAULT_WIDTH):
        super().__init__()
        self.layers = nn.Sequential(nn.Flatten(), nn.Linear(inputs, width), nn.ReLU(), nn.Linear(width, width),
                                    nn.ReLU(), nn.Linear(width, num_classes))

    def forward(self, x):
        return self.layers(x)


class GPTBlock(nn.Module):
    """Pre-norm transformer block: causal self-attention, then a 4x MLP with GELU."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        attended = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    """A small GPT-style byte-level language model: byte and position embeddings, ``layers``
    pre-norm blocks, a final norm and a linear head over the 256 byte values. Input: (B, T)
    int64 bytes with T <= ``context``; output: (B, T, 256) logits predicting the next byte.
    5,692,928 parameters with the defaults (width 256, 7 layers, 4 heads, context 128)."""

    input_dims = "tokens"
    input_size: Optional[int] = None
    DEFAULT_WIDTH, LAYERS, HEADS, CONTEXT, VOCABULARY = 256, 7, 4, 128, 256

    def __init__(self, width: int = DEFAULT_WIDTH, layers: int = LAYERS, heads: int = HEADS, context: int = CONTEXT):
        super().__init__()
        self.tokens = nn.Embedding(self.VOCABULARY, width)
        self.positions = nn.Embedding(context, width)
        self.blocks = nn.Sequential(*(GPTBlock(width, heads) for _ in range(layers)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, self.VOCABULARY)

    def forward(self, x):
        positions = torch.arange(x.shape[1], device=x.device)
        return self.head(self.norm(self.blocks(self.tokens(x) + self.positions(positions))))


CLASSES = {"cnn": DigitsCNN, "resnet20": ResNetCIFAR, "cnn7": CNN7, "vgg16": VGG16, "cnn1d": CNN1D, "mlp": WideMLP,
           "gpt": GPT}
MODELS = tuple(CLASSES)


def _check_name(name: str) -> None:
    if name not in CLASSES:
        raise ValueError(f"model={name!r} is not one of {list(MODELS)}")


def input_size(name: str) -> Optional[int]:
    """The square input side model ``name`` needs, or None when any size works."""
    _check_name(name)
    return CLASSES[name].input_size


def input_dims(name: str) -> Optional[int]:
    """2 for image models, 1 for signal models, ``"tokens"`` for language models, None for
    models that take any input."""
    _check_name(name)
    return CLASSES[name].input_dims


def build(name: str, num_classes: int, in_channels: int, input_shape: Optional[Sequence[int]] = None,
          width: Optional[int] = None) -> nn.Module:
    """A model by name: ``cnn`` (small digits CNN), ``resnet20``, ``cnn7``, ``vgg16``, ``cnn1d``,
    ``mlp``. ``input_shape`` is one input's shape without the batch dimension, as the data
    gives it (``(channels, length)`` for ``cnn1d``, anything for ``mlp``; default: MNIST-1D's
    ``(1, 40)``); ``width`` is the MLP's (default 2,000)."""
    _check_name(name)
    if name == "cnn":
        return DigitsCNN(num_classes, in_channels, image_size=8 if in_channels == 1 else 32)
    if name == "resnet20":
        return ResNetCIFAR(20, num_classes, in_channels)
    shape = tuple(input_shape) if input_shape is not None else (in_channels, 40)
    if name == "cnn1d":
        if len(shape) != 2:
            raise ValueError(f"model cnn1d needs 1-D signals of shape (channels, length), got inputs of shape {shape}")
        return CNN1D(num_classes, shape[0], shape[1])
    if name in ("mlp", "gpt") and width is not None and (isinstance(width, bool) or not isinstance(width, int)
                                                         or width < 1):
        raise ValueError(f"width must be an integer >= 1, got {width!r}")
    if name == "mlp":
        return WideMLP(num_classes, math.prod(shape), width or WideMLP.DEFAULT_WIDTH)
    if name == "gpt":
        if (width or GPT.DEFAULT_WIDTH) % GPT.HEADS:
            raise ValueError(f"width must be a multiple of the {GPT.HEADS} attention heads, got {width}")
        return GPT(width or GPT.DEFAULT_WIDTH, context=shape[-1] if input_shape is not None else GPT.CONTEXT)
    return CLASSES[name](num_classes, in_channels)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
