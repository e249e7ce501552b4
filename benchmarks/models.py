"""Benchmark networks, defined here because torchvision cannot be installed beside torch 2.13.

Each builder follows the torchvision architecture of the same name layer for layer (ResNet-18
and -50, MobileNetV2, VGG-11-BN, DenseNet-121) and takes ``norm``:

- ``norm=True``: the network as trained, every convolution followed by its BatchNorm;
- ``norm=False``: the *floor* for inference, the same network built without the BatchNorms a
  fold can remove (the convolutions get a bias instead). DenseNet's pre-activation BatchNorms
  (after each concatenation) have no producer to fold into, so they stay in both.

``with_statistics`` gives every BatchNorm non-trivial running statistics and affine parameters;
``floor_like`` builds the floor network holding exactly the folded model's weights, so that a
latency comparison sees only the structure, never different numbers (denormals, say).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

# --------------------------------------------------------------------------------------------
# Building blocks


def conv_norm(
    cin: int,
    cout: int,
    k: int,
    norm: bool,
    stride: int = 1,
    groups: int = 1,
    conv_bias: bool = False,
) -> list[nn.Module]:
    """Conv followed by its BatchNorm, or (floor) by nothing and given a bias."""
    conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=conv_bias or not norm)
    return [conv, nn.BatchNorm2d(cout)] if norm else [conv]


class BasicBlock(nn.Module):
    """ResNet's two 3x3 convolutions, added to the input (projected where its shape changes)."""

    expansion = 1

    def __init__(self, cin: int, width: int, stride: int, norm: bool) -> None:
        super().__init__()
        cout = width * self.expansion
        self.body = nn.Sequential(*self.layers(cin, width, cout, stride, norm))
        self.shortcut = (
            nn.Sequential(*conv_norm(cin, cout, 1, norm, stride))
            if stride != 1 or cin != cout
            else nn.Identity()
        )
        self.relu = nn.ReLU(inplace=True)

    @staticmethod
    def layers(cin: int, width: int, cout: int, stride: int, norm: bool) -> list[nn.Module]:
        return [
            *conv_norm(cin, width, 3, norm, stride),
            nn.ReLU(inplace=True),
            *conv_norm(width, cout, 3, norm),
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


class Bottleneck(BasicBlock):
    """1x1 reduce, 3x3, 1x1 expand (4x), added to the input."""

    expansion = 4

    @staticmethod
    def layers(cin: int, width: int, cout: int, stride: int, norm: bool) -> list[nn.Module]:
        return [
            *conv_norm(cin, width, 1, norm),
            nn.ReLU(inplace=True),
            *conv_norm(width, width, 3, norm, stride),
            nn.ReLU(inplace=True),
            *conv_norm(width, cout, 1, norm),
        ]


class ResNet(nn.Module):
    def __init__(self, block: type[BasicBlock], depths: list[int], norm: bool) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            *conv_norm(3, 64, 7, norm, stride=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
        layers: list[nn.Module] = []
        cin = 64
        for i, depth in enumerate(depths):
            width = 64 * 2**i
            for j in range(depth):
                layers.append(block(cin, width, 2 if (j == 0 and i > 0) else 1, norm))
                cin = width * block.expansion
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


def resnet18(norm: bool = True) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], norm)


def resnet50(norm: bool = True) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], norm)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int, norm: bool) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [*conv_norm(cin, hidden, 1, norm), nn.ReLU6(inplace=True)]
        layers += [
            *conv_norm(hidden, hidden, 3, norm, stride, groups=hidden),
            nn.ReLU6(inplace=True),
            *conv_norm(hidden, cout, 1, norm),
        ]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


class MobileNetV2(nn.Module):
    # (expansion, channels, repeats, first stride), as in the paper and torchvision
    SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1)]
    SETTINGS += [(6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, norm: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = [*conv_norm(3, 32, 3, norm, stride=2), nn.ReLU6(inplace=True)]
        cin = 32
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t, norm))
                cin = c
        layers += [*conv_norm(cin, 1280, 1, norm), nn.ReLU6(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, 1000))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v2(norm: bool = True) -> MobileNetV2:
    return MobileNetV2(norm)


class VGG(nn.Module):
    """VGG-11 with BatchNorm (torchvision's ``vgg11_bn``: convolutions keep their bias)."""

    CONFIG = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]

    def __init__(self, norm: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for v in self.CONFIG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [*conv_norm(cin, int(v), 3, norm, conv_bias=True), nn.ReLU(True)]
                cin = int(v)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(7)
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096),
            nn.ReLU(True),
            nn.Dropout(),
            nn.Linear(4096, 4096),
            nn.ReLU(True),
            nn.Dropout(),
            nn.Linear(4096, 1000),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def vgg11_bn(norm: bool = True) -> VGG:
    return VGG(norm)


class DenseLayer(nn.Module):
    """BN-ReLU-Conv1x1-BN-ReLU-Conv3x3: only the middle BatchNorm has a producer."""

    def __init__(self, cin: int, growth: int, bn_size: int, norm: bool) -> None:
        super().__init__()
        self.pre = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(inplace=True))
        self.bottleneck = nn.Sequential(
            *conv_norm(cin, bn_size * growth, 1, norm), nn.ReLU(inplace=True)
        )
        self.conv = nn.Conv2d(bn_size * growth, growth, 3, 1, 1, bias=False)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.conv(self.bottleneck(self.pre(torch.cat(features, 1))))


class DenseBlock(nn.Module):
    def __init__(self, layers: int, cin: int, growth: int, bn_size: int, norm: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            DenseLayer(cin + i * growth, growth, bn_size, norm) for i in range(layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(features))
        return torch.cat(features, 1)


class DenseNet(nn.Module):
    """DenseNet-121 (growth 32, blocks 6-12-24-16, bottleneck 4x, compression 0.5)."""

    def __init__(self, norm: bool = True, blocks: tuple[int, ...] = (6, 12, 24, 16)) -> None:
        super().__init__()
        growth, bn_size = 32, 4
        stages: list[nn.Module] = [
            *conv_norm(3, 64, 7, norm, stride=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        ]
        c = 64
        for i, n in enumerate(blocks):
            stages.append(DenseBlock(n, c, growth, bn_size, norm))
            c += n * growth
            if i != len(blocks) - 1:
                stages += [
                    nn.BatchNorm2d(c),
                    nn.ReLU(inplace=True),
                    nn.Conv2d(c, c // 2, 1, bias=False),
                    nn.AvgPool2d(2, 2),
                ]
                c //= 2
        stages += [nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*stages)
        self.classifier = nn.Linear(c, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def densenet121(norm: bool = True) -> DenseNet:
    return DenseNet(norm)


MODELS: dict[str, Callable[[bool], nn.Module]] = {
    "resnet18": resnet18,
    "resnet50": resnet50,
    "mobilenet_v2": mobilenet_v2,
    "vgg11_bn": vgg11_bn,
    "densenet121": densenet121,
}


def chain(blocks: int, channels: int = 8, norm: bool = True) -> nn.Sequential:
    """The scaling network: ``blocks`` x (3x3 Conv, BatchNorm, ReLU) at a fixed width."""
    layers: list[nn.Module] = []
    for _ in range(blocks):
        layers += [*conv_norm(channels, channels, 3, norm), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------------------------
# Statistics and the floor


@torch.no_grad()
def with_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm the kind of statistics a trained network has; returns the model.

    Means around zero with spread, variances log-uniform over [0.25, 4], gamma in [0.5, 1.5],
    beta with spread: a fold that ignored any of them would change the outputs.
    """
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
            m.running_var.copy_(torch.exp((torch.rand(c, generator=g) * 2 - 1) * 1.386))
            m.weight.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.copy_(torch.randn(c, generator=g) * 0.2)
    return model.eval()


def build(name: str, seed: int = 0) -> nn.Module:
    """The named benchmark network in eval mode, with non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    return with_statistics(MODELS[name](True), seed)


@torch.no_grad()
def floor_like(name: str, folded: nn.Module) -> nn.Module:
    """The no-BatchNorm network holding the folded model's weights (same numbers, no BN)."""
    floor = MODELS[name](False).eval()
    # Module paths differ (a folded BatchNorm is an Identity between the conv and the ReLU), but
    # both networks create their layers in the same sequence: match state entries in order.
    ours = list(folded.state_dict().items())
    theirs = list(floor.state_dict().items())
    if [t.shape for _, t in ours] != [t.shape for _, t in theirs]:
        raise RuntimeError(f"{name}: folded model and floor do not line up")
    floor.load_state_dict({n: t for (n, _), (_, t) in zip(theirs, ours, strict=True)})
    return floor


# --------------------------------------------------------------------------------------------
# ONNX files


def onnx_file(name: str, variant: str = "unfolded", net: nn.Module | None = None) -> Path:
    """The network as an ONNX file, exported once and kept in ``benchmarks/out/onnx``.

    ``variant`` is ``unfolded`` (``build(name)``) or a name for ``net`` (the floor, say).
    Exported by ``torch.onnx.export`` (TorchScript exporter, opset 17, no constant folding,
    which would fuse Conv+BatchNorm during export), batch and image size free; a network whose
    adaptive pooling cannot export so (VGG: 7x7 from any size) is fixed at batch 1, 224x224.
    """
    from .common import OUT

    path = OUT / "onnx" / f"{name}-{variant}.onnx"
    if path.exists():
        return path
    net = build(name) if net is None else net
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    # The TorchScript exporter turns adaptive pooling into a fixed-size pooling: pooling to
    # more than 1x1 (VGG's 7x7) exports for the example's image size only.
    pools = [m.output_size for m in net.modules() if isinstance(m, nn.AdaptiveAvgPool2d)]
    free = all(size in (1, (1, 1)) for size in pools)
    dynamic = {"input": {0: "batch", 2: "height", 3: "width"}, "output": {0: "batch"}}
    with torch.no_grad():
        torch.onnx.export(
            net,
            (torch.randn(1, 3, 224, 224),),
            str(tmp),
            dynamo=False,
            opset_version=17,
            do_constant_folding=False,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes=dynamic if free else None,
        )
    tmp.replace(path)
    return path


def onnx_is_static(path: Path) -> bool:
    """Whether the file's input shape is fixed (exported for 224x224 only)."""
    import onnx

    dims = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape
    return all(d.HasField("dim_value") for d in dims.dim)
