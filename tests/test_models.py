"""The papers' models: parameter counts, output shapes, input sizes, refusal of misfits."""
import pytest
import torch
from torch.nn import functional as F

from horovod_leader.training import models


@pytest.mark.parametrize("name, side, params", [
    ("resnet20", 28, 269_722), ("resnet20", 32, 269_722), ("cnn7", 28, 351_946), ("vgg16", 32, 15_253_578),
])
def test_parameter_counts_and_outputs(name, side, params):
    torch.manual_seed(0)
    model = models.build(name, 10, 3)
    assert models.parameter_count(model) == params
    assert models.input_size(name) in (None, side)
    model.eval()
    assert model(torch.randn(2, 3, side, side)).shape == (2, 10)


def test_input_sizes_are_stated_and_enforced():
    assert models.input_size("cnn7") == 28 and models.input_size("vgg16") == 32
    assert models.input_size("resnet20") is None and models.input_size("cnn") is None
    with pytest.raises(RuntimeError):  # 32x32 leaves 64x3x3 = 576 features, not 256
        models.build("cnn7", 10, 3)(torch.randn(1, 3, 32, 32))
    with pytest.raises(RuntimeError):  # five poolings of 28x28 reach 0x0
        models.build("vgg16", 10, 3).eval()(torch.randn(1, 3, 28, 28))
    with pytest.raises(ValueError, match="model"):
        models.input_size("resnet9")


def test_resnet20_is_option_a():
    """Shortcuts that change shape subsample and zero-pad channels: no convolution in them."""
    model = models.build("resnet20", 10, 3)
    shortcuts = [block.shortcut for block in model.layers]
    padded = [s for s in shortcuts if isinstance(s, models.ZeroPadShortcut)]
    assert len(padded) == 2 and not any(list(s.parameters()) for s in shortcuts)
    x = torch.randn(2, 16, 8, 8)
    expected = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 8, 8))  # the authors' lambda, planes // 4 = 8
    assert torch.equal(padded[0](x), expected)


def test_cnn7_layers():
    convs = [m for m in models.build("cnn7", 10, 3).modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size) for c in convs] == [(64, (5, 5)), (128, (5, 5)), (64, (3, 3))]
    model = models.build("cnn7", 10, 3)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert any(isinstance(m, torch.nn.Dropout) and m.p == 0.5 for m in model.modules())


def test_model_and_augment_mismatch_is_refused_naming_augment(tmp_path):
    from cifar_fixture import write_cifar10
    from horovod_leader.training.command import parse_and_validate

    write_cifar10(tmp_path)
    cifar = ["--dataset", "cifar10", "--data-dir", str(tmp_path), "--out", "unused"]
    for args in (["--model", "cnn7", "--augment", "standard"], ["--model", "cnn7", "--augment", "none"],
                 ["--model", "vgg16", "--augment", "paper"]):
        parsed, error = parse_and_validate(cifar + args)
        assert parsed is None and "--augment" in error, (args, error)
    parsed, error = parse_and_validate(["--model", "cnn7", "--dataset", "synthetic", "--out", "unused"])
    assert parsed is None and "--augment" in error and "28x28" in error
    parsed, error = parse_and_validate(["--model", "vgg16", "--dataset", "digits", "--out", "unused"])
    assert parsed is None and "--augment" in error
    # The default follows the model: the authors' transform, or the standard one for VGG-16.
    for model, expected in (("resnet20", "paper"), ("cnn7", "paper"), ("vgg16", "standard"), ("cnn", "paper")):
        parsed, error = parse_and_validate(cifar + ["--model", model])
        assert error is None and parsed.augment == expected, (model, error)
    parsed, error = parse_and_validate(["--out", "unused"])
    assert error is None and parsed.augment == "none"


def test_mnist1d_models_learn_their_input_shape_from_the_data():
    cnn = models.build("cnn1d", 10, 1, input_shape=(1, 40))
    assert cnn(torch.randn(3, 1, 40)).shape == (3, 10) and models.parameter_count(cnn) == 9_610
    assert models.build("cnn1d", 10, 2, input_shape=(2, 64))(torch.randn(3, 2, 64)).shape == (3, 10)
    wide = models.build("mlp", 10, 1, input_shape=(1, 40))
    assert models.parameter_count(wide) == 2000 ** 2 + 52 * 2000 + 10 >= 4_000_000
    assert wide(torch.randn(3, 1, 40)).shape == (3, 10)
    digits_mlp = models.build("mlp", 10, 1, input_shape=(1, 8, 8), width=64)  # it also works on digits
    assert models.parameter_count(digits_mlp) == 64 * 64 + 64 + 64 * 64 + 64 + 64 * 10 + 10
    assert models.input_dims("cnn1d") == 1 and models.input_dims("mlp") is None and models.input_dims("cnn7") == 2
    with pytest.raises(ValueError, match="cnn1d"):
        models.build("cnn1d", 10, 1, input_shape=(1, 8, 8))
    with pytest.raises(ValueError, match="width"):
        models.build("mlp", 10, 1, input_shape=(1, 40), width=0)


def test_model_and_data_mismatch_is_refused_naming_model():
    from horovod_leader.training.command import parse_and_validate

    _, error = parse_and_validate(["--model", "cnn1d", "--out", "unused"])
    assert "--model cnn1d" in error and "mnist1d" in error
    _, error = parse_and_validate(["--model", "resnet20", "--dataset", "mnist1d", "--out", "unused"])
    assert "--model resnet20" in error
    _, error = parse_and_validate(["--model", "cnn1d", "--dataset", "mnist1d", "--augment", "standard", "--out", "x"])
    assert "--augment" in error
    args, error = parse_and_validate(["--model", "mlp", "--dataset", "mnist1d", "--width", "512", "--out", "x"])
    assert error is None and args.augment == "none" and args.width == 512
