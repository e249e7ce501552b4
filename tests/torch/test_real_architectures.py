"""The architectures people fold, re-created small in our own code, with the traits that matter
for folding: shared activation modules, downsample branches, inverted residuals, squeeze-excite,
BatchNorm + activation modules, pre-activation dense blocks, multi-branch concatenation, optional
forward arguments and structured outputs, FrozenBatchNorm2d backbones with a feature pyramid,
1-D and tabular nets, U-Net decoders with grouped ConvTranspose, VGG stacks.

Every test gives all BatchNorms non-trivial statistics (calibrated in training mode), folds with
example inputs and checks

(a) exactly which BatchNorms are folded into which layer and which are kept under which rule
    (worked out from the architecture by hand, next to each model);
(b) that the folded model matches the original on fresh inputs of another batch size
    (max|a - b| / max|a| <= 1e-5, ``check.check_torch_fold``) and that the folds changed weights;
(c) that exactly the kept BatchNorms are still BatchNorm modules;
(d) that the folded model is the same class with its attributes and, unless ``inplace``, that
    the original is untouched.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bnfold
from bnfold.core import rules
from bnfold.torch.eager.module import FoldedBatchNorm
from tests.helpers.check import REL_TOL, check_torch_fold
from tests.helpers.support import BatchNormAct2d, FrozenBatchNorm2d, randomize_all

NO_PRODUCER = rules.NO_PRODUCER
CHANNEL_AXIS = rules.CHANNEL_AXIS
STANDARD_FORWARD = rules.STANDARD_FORWARD


# --------------------------------------------------------------------------------------------
# The checks shared by every architecture


def is_bn_module(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm) or type(m).__name__ == (
        "FrozenBatchNorm2d"
    )


def bn_paths(model: nn.Module) -> set[str]:
    return {name for name, m in model.named_modules() if is_bn_module(m)}


def prepare(model: nn.Module, make_input: Callable, seed: int, batch: int = 6) -> nn.Module:
    """Random affine parameters; running statistics measured on a few batches in training."""
    calls = iter(range(10_000))
    return randomize_all(model, seed, lambda: make_input(batch, seed * 100 + next(calls)))


def check_fold(
    model: nn.Module,
    make_input: Callable[[int, int], tuple],
    expected_folds: dict[str, str],
    expected_skips: dict[str, str],
    *,
    no_example: bool = False,
    inplace: bool = False,
    attrs: tuple[str, ...] = (),
    fresh_batches: tuple[int, ...] = (3,),
) -> tuple[nn.Module, bnfold.FoldReport]:
    """Fold ``model`` and check (a)-(d) of the module docstring.

    ``expected_folds``: BatchNorm -> the layer it is folded into; ``expected_skips``:
    BatchNorm -> the rule that keeps it.
    """
    example = None if no_example else make_input(2, 12345)
    names = bn_paths(model)
    assert names == set(expected_folds) | set(expected_skips), "test bug: expected sets"
    attr_values = {a: operator.attrgetter(a)(model) for a in attrs}
    weights_before = {
        p: model.get_submodule(p).weight.detach().clone() for p in expected_folds.values()
    }
    expected = {bn: ("folded", p) for bn, p in expected_folds.items()}
    expected |= {bn: ("skipped", rule) for bn, rule in expected_skips.items()}
    fresh = [make_input(batch, 777 + i) for i, batch in enumerate(fresh_batches)]

    r = check_torch_fold(model, example, fresh, expected, exact=False, inplace=inplace)
    folded, report = r.folded, r.report

    for bn, prod in expected_folds.items():
        new = folded.get_submodule(prod).weight.detach()
        assert not torch.equal(new, weights_before[prod]), f"{bn} -> {prod}: weight unchanged"
    assert bn_paths(folded) == set(expected_skips)
    if not inplace:
        assert bn_paths(model) == names
    for a, value in attr_values.items():
        assert operator.attrgetter(a)(folded) == value, a
    return folded, report


def images(channels: int = 3, size: int = 32) -> Callable[[int, int], tuple]:
    def make(batch: int, seed: int) -> tuple[Tensor]:
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(batch, channels, size, size, generator=g),)

    return make


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, eps: float = 1e-5):
    return [
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout, eps=eps),
    ]


# --------------------------------------------------------------------------------------------
# 1. Residual network: one ReLU module reused, downsample = Sequential(conv 1x1, BN)


class Residual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = conv_bn(cin, cout, 3, stride)
        self.conv2, self.bn2 = conv_bn(cout, cout)
        self.relu = nn.ReLU(inplace=True)  # called twice: a module without state
        self.downsample = (
            nn.Sequential(*conv_bn(cin, cout, 1, stride)) if stride != 1 or cin != cout else None
        )

    def forward(self, x: Tensor) -> Tensor:
        skip = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + skip)


class ResNetLike(nn.Module):
    def __init__(self, widths=(8, 16, 32), classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(3, widths[0], 7, 2), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            blocks += [Residual(cin, w, 1 if i == 0 else 2), Residual(w, w, 1)]
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, classes)
        self.classes = classes

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1))


def resnet_expected() -> dict[str, str]:
    folds = {"stem.1": "stem.0"}
    for b in range(6):
        folds[f"blocks.{b}.bn1"] = f"blocks.{b}.conv1"
        folds[f"blocks.{b}.bn2"] = f"blocks.{b}.conv2"
    for b in (2, 4):  # the first block of each later stage changes width and stride
        folds[f"blocks.{b}.downsample.1"] = f"blocks.{b}.downsample.0"
    return folds


@pytest.mark.parametrize("inplace", [False, True])
def test_residual_network(inplace):
    torch.manual_seed(1)
    model = prepare(ResNetLike(), images(), seed=1)
    folded, _ = check_fold(
        model, images(), resnet_expected(), {}, inplace=inplace, attrs=("classes",),
        fresh_batches=(3, 1),
    )  # fmt: skip
    assert folded.blocks[0].conv1.bias is not None  # created for the bias-free conv


# --------------------------------------------------------------------------------------------
# 2. Inverted residuals: expand 1x1, depthwise 3x3, project 1x1 (no activation), ReLU6


class ConvNormAct(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(*conv_bn(cin, cout, k, stride, groups), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        layers = [ConvNormAct(cin, hidden, 1)] if expand != 1 else []
        layers += [ConvNormAct(hidden, hidden, 3, stride, groups=hidden), *conv_bn(hidden, cout, 1)]
        self.body = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x) if self.use_residual else self.body(x)


class MobileNetLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            ConvNormAct(3, 8, stride=2),
            InvertedResidual(8, 8, 1, expand=1),
            InvertedResidual(8, 12, 2, expand=4),
            InvertedResidual(12, 12, 1, expand=4),
            ConvNormAct(12, 32, 1),
        )
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(32, 5))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


def test_inverted_residual_network():
    torch.manual_seed(2)
    model = prepare(MobileNetLike(), images(), seed=2)
    folds = {"features.0.1": "features.0.0", "features.4.1": "features.4.0"}
    folds |= {
        "features.1.body.0.1": "features.1.body.0.0",
        "features.1.body.2": "features.1.body.1",
    }
    for b in (2, 3):
        for i in (0, 1):
            folds[f"features.{b}.body.{i}.1"] = f"features.{b}.body.{i}.0"
        folds[f"features.{b}.body.3"] = f"features.{b}.body.2"
    check_fold(model, images(), folds, {})


# --------------------------------------------------------------------------------------------
# 3. Mobile blocks with squeeze-excite, stochastic depth and BatchNorm + activation modules


@torch.fx.wrap
def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    if not training or p == 0.0:
        return x
    keep = torch.rand(x.shape[0], 1, 1, 1, device=x.device) >= p
    return x * keep / (1 - p)


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, squeeze, 1)
        self.expand = nn.Conv2d(squeeze, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.expand(F.silu(self.reduce(s))))


class MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int = 4) -> None:
        super().__init__()
        hidden = cin * expand
        self.expand_conv = nn.Conv2d(cin, hidden, 1, bias=False)
        self.bn1 = BatchNormAct2d(hidden)
        self.dw = nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False)
        self.bn2 = BatchNormAct2d(hidden)
        self.se = SqueezeExcite(hidden, max(1, cin // 4))
        self.project = nn.Conv2d(hidden, cout, 1, bias=False)
        self.bn3 = BatchNormAct2d(cout, act=nn.Identity())
        self.residual = stride == 1 and cin == cout
        self.drop_rate = 0.2

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn3(self.project(self.se(self.bn2(self.dw(self.bn1(self.expand_conv(x)))))))
        return x + drop_path(y, self.drop_rate, self.training) if self.residual else y


class EfficientLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 2, 1, bias=False)
        self.bn_stem = BatchNormAct2d(8)
        self.blocks = nn.Sequential(MBConv(8, 8, 1), MBConv(8, 16, 2), MBConv(16, 16, 1))
        self.head = nn.Linear(16, 4)

    def forward(self, x: Tensor) -> Tensor:
        y = self.blocks(self.bn_stem(self.stem(x)))
        return self.head(y.mean((2, 3)))


@pytest.mark.parametrize("inplace", [False, True])
def test_squeeze_excite_blocks_with_batchnorm_act(inplace):
    torch.manual_seed(3)
    model = prepare(EfficientLike(), images(), seed=3)
    folds = {"bn_stem": "stem"}
    for b in range(3):
        folds |= {
            f"blocks.{b}.bn1": f"blocks.{b}.expand_conv",
            f"blocks.{b}.bn2": f"blocks.{b}.dw",
            f"blocks.{b}.bn3": f"blocks.{b}.project",
        }
    folded, _ = check_fold(model, images(), folds, {}, inplace=inplace)
    # what the BatchNorm + activation modules did after normalising is still done
    assert any(isinstance(m, nn.SiLU) for m in folded.bn_stem.modules())
    assert not any(n.endswith("running_mean") for n in folded.state_dict())


# --------------------------------------------------------------------------------------------
# 4. Dense blocks: pre-activation BatchNorm -> ReLU -> conv, features concatenated


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)  # sees the concatenation: nothing to fold into
        self.conv1 = nn.Conv2d(cin, 2 * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(2 * growth)  # right after conv1: folds
        self.conv2 = nn.Conv2d(2 * growth, growth, 3, padding=1, bias=False)

    def forward(self, features: list[Tensor]) -> Tensor:
        x = torch.cat(features, 1)
        return self.conv2(F.relu(self.norm2(self.conv1(F.relu(self.norm1(x))))))


class DenseLike(nn.Module):
    def __init__(self, growth: int = 4) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.norm0 = nn.BatchNorm2d(8)
        self.layers = nn.ModuleList([DenseLayer(8 + i * growth, growth) for i in range(3)])
        self.norm_out = nn.BatchNorm2d(8 + 3 * growth)

    def forward(self, x: Tensor) -> Tensor:
        features = [F.relu(self.norm0(self.conv0(x)))]
        for layer in self.layers:
            features.append(layer(features))
        return F.relu(self.norm_out(torch.cat(features, 1))).mean((2, 3))


def test_dense_blocks_keep_preactivation_batchnorms():
    torch.manual_seed(4)
    model = prepare(DenseLike(), images(), seed=4)
    folds = {"norm0": "conv0"} | {f"layers.{i}.norm2": f"layers.{i}.conv1" for i in range(3)}
    skips = {f"layers.{i}.norm1": NO_PRODUCER for i in range(3)} | {"norm_out": NO_PRODUCER}
    _, report = check_fold(model, images(), folds, skips)
    assert "cat" in report.entry("norm_out").reason


# --------------------------------------------------------------------------------------------
# 5. Multi-branch blocks (1x7 / 7x1 kernels, eps 1e-3) and a head that runs only in training


class ConvUnit(nn.Module):
    def __init__(self, cin: int, cout: int, k, padding=0, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


class Branches(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.a = ConvUnit(cin, 6, 1)
        self.b = nn.Sequential(
            ConvUnit(cin, 4, 1), ConvUnit(4, 6, (1, 7), (0, 3)), ConvUnit(6, 6, (7, 1), (3, 0))
        )
        self.pool = ConvUnit(cin, 4, 1)

    def forward(self, x: Tensor) -> Tensor:
        pooled = self.pool(F.avg_pool2d(x, 3, 1, 1))
        return torch.cat([self.a(x), self.b(x), pooled, F.max_pool2d(x, 3, 1, 1)], 1)


class MultiBranchNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvUnit(3, 8, 3, stride=2)
        self.mix1 = Branches(8)
        self.mix2 = Branches(24)
        self.aux = ConvUnit(24, 4, 1)  # auxiliary head: training only
        self.fc = nn.Linear(40, 3)

    def forward(self, x: Tensor):
        y = self.mix1(self.stem(x))
        aux = self.aux(y).mean((2, 3)) if self.training else None
        out = self.fc(self.mix2(y).mean((2, 3)))
        return (out, aux) if self.training else out


def test_multi_branch_blocks_and_training_only_head():
    torch.manual_seed(5)
    model = prepare(MultiBranchNet(), images(), seed=5)
    units = ["stem", "aux"] + [
        f"{mix}.{u}" for mix in ("mix1", "mix2") for u in ("a", "b.0", "b.1", "b.2", "pool")
    ]
    folds = {f"{u}.bn": f"{u}.conv" for u in units if u != "aux"}
    _, report = check_fold(model, images(), folds, {"aux.bn": NO_PRODUCER})
    assert "never calls" in report.entry("aux.bn").reason  # in eval the head does not run


# --------------------------------------------------------------------------------------------
# 6. Hub-style model: config object, optional arguments, a Python input check, output classes


@dataclass
class NetConfig:
    num_channels: int = 3
    widths: tuple[int, ...] = (8, 16)
    num_labels: int = 4
    use_return_dict: bool = True


@dataclass
class ClassifierOutput:
    logits: Tensor
    hidden_states: tuple[Tensor, ...] | None = None


class ConvLayer(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1, act: bool = True) -> None:
        super().__init__()
        self.convolution = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.normalization = nn.BatchNorm2d(cout)
        self.activation = nn.ReLU() if act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.activation(self.normalization(self.convolution(x)))


class HubClassifier(nn.Module):
    main_input_name = "pixel_values"

    def __init__(self, config: NetConfig) -> None:
        super().__init__()
        self.config = config
        self.embedder = ConvLayer(config.num_channels, config.widths[0], 2)
        cins = (config.widths[0],) + config.widths[:-1]
        self.stages = nn.ModuleList(
            nn.Sequential(ConvLayer(cin, w, 2), ConvLayer(w, w, act=False))
            for cin, w in zip(cins, config.widths, strict=True)
        )
        self.classifier = nn.Linear(config.widths[-1], config.num_labels)

    def forward(self, pixel_values: Tensor, output_hidden_states=None, return_dict=None):
        if pixel_values.shape[1] != self.config.num_channels:  # fx cannot trace this check
            raise ValueError("channel dimension does not match the configuration")
        return_dict = return_dict if return_dict is not None else self.config.use_return_dict
        hidden = self.embedder(pixel_values)
        states = [hidden]
        for stage in self.stages:
            hidden = F.relu(stage(hidden))
            states.append(hidden)
        logits = self.classifier(hidden.mean((2, 3)))
        all_states = tuple(states) if output_hidden_states else None
        if not return_dict:
            return (logits,) if all_states is None else (logits, all_states)
        return ClassifierOutput(logits, all_states)


@pytest.mark.parametrize("call", [(), (None, False), (True,)], ids=["default", "tuple", "hidden"])
def test_hub_style_model_with_optional_arguments(call):
    torch.manual_seed(6)
    model = prepare(HubClassifier(NetConfig()), images(), seed=6)

    def make_input(batch: int, seed: int) -> tuple:
        return images()(batch, seed) + call

    folds = {"embedder.normalization": "embedder.convolution"} | {
        f"stages.{s}.{i}.normalization": f"stages.{s}.{i}.convolution"
        for s in (0, 1)
        for i in (0, 1)
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        folded, report = check_fold(model, make_input, folds, {}, attrs=("config.num_labels",))
    # the Python channel check defeats torch.fx: torch.export gave the data flow, and said so
    assert report.notes and "torch.export" in report.notes[0]
    assert any(issubclass(w.category, UserWarning) for w in caught)
    for other in [(), (None, False), (True, True)]:  # calls the example did not make
        assert bnfold.verify(model, folded, images()(3, 99) + other)[1] <= REL_TOL
    assert type(folded(*make_input(2, 5))) is type(model(*make_input(2, 5)))


# --------------------------------------------------------------------------------------------
# 7. Detection backbones: FrozenBatchNorm2d, frozen stages, a feature pyramid; and a conv layer
#    that applies its own norm inside its forward


class FrozenBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn = FrozenBatchNorm2d(cout)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


class PyramidBackbone(nn.Module):
    def __init__(self, widths=(8, 16, 32), out: int = 8) -> None:
        super().__init__()
        cins = (3,) + widths[:-1]
        self.body = nn.ModuleList(FrozenBlock(c, w, 2) for c, w in zip(cins, widths, strict=True))
        self.lateral = nn.ModuleList(nn.Conv2d(w, out, 1) for w in widths)
        self.smooth = nn.ModuleList(nn.Sequential(*conv_bn(out, out)) for _ in widths)
        for p in self.body[0].parameters():
            p.requires_grad_(False)  # the frozen first stage

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        feats = []
        for block in self.body:
            x = block(x)
            feats.append(x)
        top = self.lateral[-1](feats[-1])
        outs = [self.smooth[-1](top)]
        for i in range(len(feats) - 2, -1, -1):
            top = self.lateral[i](feats[i]) + F.interpolate(
                top, size=feats[i].shape[-2:], mode="nearest"
            )
            outs.insert(0, self.smooth[i](top))
        return {f"p{i}": o for i, o in enumerate(outs)}


def test_detection_backbone_with_frozen_batchnorm_and_pyramid():
    torch.manual_seed(7)
    model = prepare(PyramidBackbone(), images(size=64), seed=7)
    folds = {f"body.{i}.bn": f"body.{i}.conv" for i in range(3)}
    folds |= {f"smooth.{i}.1": f"smooth.{i}.0" for i in range(3)}
    folded, _ = check_fold(model, images(size=64), folds, {})
    assert not folded.body[0].conv.bias.requires_grad  # the frozen stage stays frozen


class ConvWithNorm(nn.Conv2d):
    """A convolution that applies its own norm inside forward."""

    def __init__(self, *args, norm: nn.Module | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.norm = norm

    def forward(self, x: Tensor) -> Tensor:
        x = F.conv2d(
            x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups
        )
        return x if self.norm is None else self.norm(x)


def test_norm_inside_a_conv_forward_is_kept_and_said_so():
    torch.manual_seed(8)
    model = nn.Sequential(
        ConvWithNorm(3, 8, 3, padding=1, bias=False, norm=FrozenBatchNorm2d(8)),
        nn.ReLU(),
        ConvWithNorm(8, 8, 3, padding=1, bias=False, norm=nn.BatchNorm2d(8)),
    )
    model = prepare(model, images(), seed=8)
    _, report = check_fold(
        model, images(), {}, {"0.norm": STANDARD_FORWARD, "2.norm": STANDARD_FORWARD}
    )
    assert all("never calls" not in e.reason and "belongs to" in e.reason for e in report)


# --------------------------------------------------------------------------------------------
# 8. 1-D audio CNN (Conv1d + BatchNorm1d) and a tabular MLP (Linear + BatchNorm1d)


class AudioNet(nn.Module):
    def __init__(self, channels: int = 8, classes: int = 5) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv1d(1, channels, 40, stride=8), nn.BatchNorm1d(channels)
        self.conv2, self.bn2 = nn.Conv1d(channels, channels, 3), nn.BatchNorm1d(channels)
        self.conv3, self.bn3 = nn.Conv1d(channels, 2 * channels, 3), nn.BatchNorm1d(2 * channels)
        self.fc = nn.Linear(2 * channels, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool1d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool1d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.relu(self.bn3(self.conv3(x)))
        return F.log_softmax(self.fc(x.mean(-1)), -1)


def waveforms(batch: int, seed: int) -> tuple[Tensor]:
    return (torch.randn(batch, 1, 800, generator=torch.Generator().manual_seed(seed)),)


@pytest.mark.parametrize("with_example", [True, False], ids=["example", "no-example"])
def test_audio_conv1d_batchnorm1d_needs_example_inputs(with_example):
    torch.manual_seed(9)
    model = prepare(AudioNet(), waveforms, seed=9)
    pairs = {f"bn{i}": f"conv{i}" for i in (1, 2, 3)}
    folds, skips = (pairs, {}) if with_example else ({}, dict.fromkeys(pairs, CHANNEL_AXIS))
    folded, _ = check_fold(model, waveforms, folds, skips, no_example=not with_example)
    if with_example:  # decided on batched input: an unbatched one raises, never answers wrongly
        assert type(folded.bn1) is FoldedBatchNorm and folded.bn1.num_features == 8
        with pytest.raises(AssertionError, match="3-D activations"):
            folded(torch.randn(1, 800))


class TabularNet(nn.Module):
    def __init__(self, cardinalities=(5, 7), n_cont: int = 6, hidden=(16, 8), out: int = 2):
        super().__init__()
        self.embeds = nn.ModuleList(nn.Embedding(n, 3) for n in cardinalities)
        self.bn_cont = nn.BatchNorm1d(n_cont)  # normalises a model input
        layers, cin = [], 3 * len(cardinalities) + n_cont
        for h in hidden:
            layers += [nn.Linear(cin, h), nn.BatchNorm1d(h), nn.ReLU(), nn.Dropout(0.1)]
            cin = h
        self.layers = nn.Sequential(*layers, nn.Linear(cin, out))
        self.n_cont = n_cont

    def forward(self, x_cat: Tensor, x_cont: Tensor) -> Tensor:
        emb = torch.cat([e(x_cat[:, i]) for i, e in enumerate(self.embeds)], 1)
        return self.layers(torch.cat([emb, self.bn_cont(x_cont)], 1))


def tabular_rows(batch: int, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    cats = torch.stack([torch.randint(0, n, (batch,), generator=g) for n in (5, 7)], 1)
    return cats, torch.randn(batch, 6, generator=g) * 3 + 1


@pytest.mark.parametrize("with_example", [True, False], ids=["example", "no-example"])
def test_tabular_linear_batchnorm1d_needs_example_inputs(with_example):
    torch.manual_seed(10)
    model = prepare(TabularNet(), tabular_rows, seed=10)
    pairs = {"layers.1": "layers.0", "layers.5": "layers.4"}
    skips = {"bn_cont": NO_PRODUCER}
    folds = pairs if with_example else {}
    if not with_example:
        skips |= dict.fromkeys(pairs, CHANNEL_AXIS)
    folded, report = check_fold(
        model, tabular_rows, folds, skips, no_example=not with_example, attrs=("n_cont",),
        fresh_batches=(3, 1),
    )  # fmt: skip
    assert "input" in report.entry("bn_cont").reason
    if with_example:
        assert type(folded.layers[1]) is FoldedBatchNorm and folded.layers[1].eps == 1e-5


# --------------------------------------------------------------------------------------------
# 9. U-Net: ConvTranspose2d (groups 1 and 4) + BatchNorm upsampling, padding, skip concatenation


class Up(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cin // 2, 2, stride=2, groups=groups)
        self.up_bn = nn.BatchNorm2d(cin // 2)
        self.conv = nn.Sequential(*conv_bn(cin, cout), nn.ReLU())

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        x = F.relu(self.up_bn(self.up(x)))
        dy, dx = skip.shape[2] - x.shape[2], skip.shape[3] - x.shape[3]
        x = F.pad(x, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
        return self.conv(torch.cat([skip, x], 1))


class UNetLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inc = nn.Sequential(*conv_bn(3, 8), nn.ReLU())
        self.down1 = nn.Sequential(nn.MaxPool2d(2), *conv_bn(8, 16), nn.ReLU())
        self.down2 = nn.Sequential(nn.MaxPool2d(2), *conv_bn(16, 32), nn.ReLU())
        self.up1 = Up(32, 16, groups=1)
        self.up2 = Up(16, 8, groups=4)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        x1 = self.inc(x)
        x2 = self.down1(x1)
        return self.out(self.up2(self.up1(self.down2(x2), x2), x1))


def test_unet_with_grouped_conv_transpose():
    torch.manual_seed(11)
    model = prepare(UNetLike(), images(size=36), seed=11)
    folds = {"inc.1": "inc.0", "down1.2": "down1.1", "down2.2": "down2.1"}
    for u in ("up1", "up2"):
        folds |= {f"{u}.up_bn": f"{u}.up", f"{u}.conv.1": f"{u}.conv.0"}
    check_fold(model, images(size=36), folds, {})


# --------------------------------------------------------------------------------------------
# 10. VGG with BatchNorm: a feature stack built from a configuration list


def vgg_features(cfg: list) -> nn.Sequential:
    layers, cin = [], 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(cin, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            cin = v
    return nn.Sequential(*layers)


class VGGLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = vgg_features([8, "M", 16, "M", 32, 32, "M", 32, 32])
        self.classifier = nn.Sequential(nn.Linear(32 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 4), 1))


def test_vgg_feature_stack():
    torch.manual_seed(12)
    model = prepare(VGGLike(), images(), seed=12)
    convs = [i for i, m in enumerate(model.features) if isinstance(m, nn.Conv2d)]
    check_fold(model, images(), {f"features.{i + 1}": f"features.{i}" for i in convs}, {})
